"""Loading base causal language models and their tokenizers.

Three kinds of names are accepted by :func:`load_base`: a built-in alias (a GGUF file shipped in a pip
package, converted once to a safetensors cache: comoe.models.gguf), a local Hugging Face model folder, and
a Hugging Face Hub id. Weights are only ever read from safetensors or GGUF files, never unpickled, so
loading a model cannot execute code unless ``trust_remote_code`` is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from comoe.models.gguf import ALIASES, alias_cache, cache_root
from comoe.models.quantization import bnb_config, without_cpu_repacking

_PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_base(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (eval mode, ``dtype``) and its tokenizer (with a pad token) from a name.

    ``name_or_path`` is a key of :data:`ALIASES`, a local model folder, or a Hub id, tried in that order.
    ``quantization`` '4bit' or '8bit' loads the linears quantized with bitsandbytes (comoe.models.
    quantization; ``dtype`` is then that of the layers left unquantised), on ``device`` (default: the
    CPU), where bitsandbytes quantizes them. ``cache_dir`` only matters for aliases: their converted copies
    live in ``cache_dir / alias`` (default: ``$COMOE_CACHE``, else ``~/.cache/comoe``).

    The model's ``config._name_or_path`` and ``name_or_path`` (what comoe and PEFT adapter folders record as
    their base model) are the alias for an alias and the absolute path for a local folder (see
    :func:`recorded_name`), so that the recorded name loads the same model from any working directory.
    """
    loading = dict(dtype=dtype, quantization=quantization, device=device, trust_remote_code=trust_remote_code)
    if name_or_path in ALIASES:
        folder = alias_cache(name_or_path, cache_root(cache_dir))
    elif Path(name_or_path).is_dir():
        folder = Path(name_or_path)
        _check_local_folder(folder)
    elif _looks_like_a_path(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder (nor a built-in alias or hub id)")
    else:
        return _load_from_hub(name_or_path, **loading)
    model, tokenizer = _load_pretrained(folder, **loading)
    # recorded in adapter folders: the alias, not this machine's cache path; a folder from anywhere. comoe's
    # folders read the config's name, PEFT's the model's `name_or_path` attribute: both get the same one.
    model.config._name_or_path = model.name_or_path = recorded_name(name_or_path)
    return model, tokenizer


def recorded_name(name_or_path: str) -> str:
    """A base model's name as adapter folders record it: a built-in alias or a hub id as given, a local
    folder (as load_base tells them apart) as its absolute path, except an alias's converted cache folder
    (the default cache root's `<alias>`), which is recorded as the alias (folders written before PEFT's
    recorded the alias name the cache)."""
    if name_or_path in ALIASES or not Path(name_or_path).is_dir():
        return name_or_path
    path = Path(os.path.abspath(os.path.expanduser(name_or_path)))
    if path.name in ALIASES and path.resolve().parent == cache_root(None).resolve():
        return path.name
    return str(path)


def same_model(first: str, second: str) -> bool:
    """Whether two names load the same model: equal recorded names, or folders that are the same folder."""
    first, second = recorded_name(first), recorded_name(second)
    if first == second:
        return True
    return Path(first).is_dir() and Path(second).is_dir() and Path(first).samefile(second)


def _load_pretrained(
    source: str | Path,
    *,
    dtype: torch.dtype,
    quantization: str | None,
    device: torch.device | str | None,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer with safetensors enforced, so no pickle is ever read."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    quantized: dict = {}
    if quantization is not None:  # bitsandbytes quantizes as it loads, on the device the weights go to
        quantized = dict(
            quantization_config=bnb_config(quantization, dtype), device_map={"": str(device or "cpu")}
        )
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **quantized
    )
    if quantization == "4bit":
        without_cpu_repacking(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched training and generation need padding; eos is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _load_from_hub(model_id: str, **loading: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from the Hub, turning the opaque download error into one that says what would work offline."""
    try:
        return _load_pretrained(model_id, **loading)
    except OSError as exc:
        raise OSError(
            f"could not load {model_id!r}: it is neither a built-in alias ({', '.join(sorted(ALIASES))}) "
            "nor an existing local folder, and loading it as a Hugging Face Hub id failed. "
            f"Offline, only local folders and the built-in aliases work. Cause: {str(exc).splitlines()[0]}"
        ) from exc


def _looks_like_a_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything absolute, relative-dotted or deeper is a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


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
