"""mtcore: Mutual-Taught (Shi et al., ACL 2025) for LLaMA-3, by hand: co-adapting a policy and its reward model."""

from mtcore.checkpoint import load_model, save_model
from mtcore.data import load_tokenizer
from mtcore.errors import MtcoreError
from mtcore.model import Llama, ModelArgs

__version__ = "0.1.0"
__all__ = ["Llama", "ModelArgs", "MtcoreError", "load_model", "load_tokenizer", "save_model"]
