"""Settings of `comoe serve`: one dataclass, read from flags and/or a YAML file with the same keys."""

from __future__ import annotations

from dataclasses import dataclass

from comoe.settings import DTYPES, check_field_types, setting
from comoe.validation import check_choice, check_int, fail

SERVE_PYTHON_ENV = "COMOE_SERVE_PYTHON"  # the serving environment's python, when not .venv-serve's


@dataclass
class ServeArgs:
    """An OpenAI-compatible server (vLLM with the comoe-vllm plugin) for one comoe adapter."""

    adapter: str | None = setting(None, "the comoe adapter folder to serve (required)")
    model: str | None = setting(
        None, "base model: alias, local folder or hub id (default: the one the adapter records)"
    )
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(8000, "port to listen on")
    served_model_name: str | None = setting(
        None, "the model name clients ask for (default: the adapter folder's name)"
    )
    dtype: str = setting("float32", "the base model's dtype in vLLM", choices=DTYPES)
    max_model_len: int | None = setting(
        None, "longest prompt + completion, in tokens (default: the base model's context)"
    )
    tensor_parallel_size: int = setting(1, "GPUs (or CPU ranks) the model is sharded over")
    kv_cache_gib: float = setting(
        1.0, "KV cache size in GiB (on the CPU, vLLM otherwise reserves a share of the whole memory)"
    )
    enforce_eager: bool = setting(False, "run without torch.compile (faster start, slower tokens)")
    python: str | None = setting(
        None, f"the serving environment's python (default: ${SERVE_PYTHON_ENV}, else .venv-serve's)"
    )
    vllm_args: str | None = setting(None, "more vLLM server flags, as one quoted string")

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.adapter is None:
            raise ValueError("give the adapter folder to serve: --adapter DIR")
        check_choice("dtype", self.dtype, DTYPES)
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, low=1)
        check_int("tensor_parallel_size", self.tensor_parallel_size, low=1)
        if not 1 <= self.port <= 65535:
            fail("port", self.port, "an integer in [1, 65535]")
        if not self.kv_cache_gib > 0:
            fail("kv_cache_gib", self.kv_cache_gib, "a number of GiB > 0")
