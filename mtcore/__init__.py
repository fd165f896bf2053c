"""mtcore: Mutual-Taught (Shi et al., ACL 2025) for LLaMA-3, by hand: co-adapting a policy and its reward model."""

from mtcore.errors import MtcoreError

__version__ = "0.1.0"
__all__ = ["Llama", "ModelArgs", "MtcoreError", "load_model", "load_tokenizer", "save_model"]

# The rest is imported when first used (they import torch, which `mtcore --help` does not need).
_LAZY = {"Llama": "mtcore.model", "ModelArgs": "mtcore.model", "load_model": "mtcore.checkpoint",
         "save_model": "mtcore.checkpoint", "load_tokenizer": "mtcore.data"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtcore' has no attribute {name!r}")
