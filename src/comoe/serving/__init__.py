"""`comoe serve`: an adapter served by vLLM with the comoe-vllm plugin (serving/ in the repository), in its
own virtual environment (`make serve-setup`), so vLLM's pinned transformers never constrains comoe's."""
