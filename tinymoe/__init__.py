"""tinymoe: a small, readable engine for Mixture-of-Experts inference with offloaded experts."""

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.generate import GenerationResult, generate
from tinymoe.engine.loader import load_model, save_model
from tinymoe.engine.model import MoETransformer
from tinymoe.errors import TinyMoeError

__all__ = [
    "GenerationResult",
    "ModelConfig",
    "MoETransformer",
    "TinyMoeError",
    "generate",
    "load_model",
    "save_model",
]
