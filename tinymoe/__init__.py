"""tinymoe: a small, readable engine for Mixture-of-Experts inference with offloaded experts."""

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.generate import GenerationResult, generate
from tinymoe.loader import load_model, save_model
from tinymoe.model import MoETransformer

__all__ = [
    "GenerationResult",
    "ModelConfig",
    "MoETransformer",
    "TinyMoeError",
    "generate",
    "load_model",
    "save_model",
]
