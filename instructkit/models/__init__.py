"""Model loading (HF id, folder, GGUF, run folder, embedded default) and PEFT methods."""

from instructkit.models.embedded import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL"]
