"""tinymoe: a small, readable engine for Mixture-of-Experts inference with offloaded experts.

`from tinymoe import generate` works as usual, but each name is imported on first use
(PEP 562): `import tinymoe` alone loads no torch, so the `tinymoe` command (launch.py) is
already running, and can turn a Ctrl-C into a quiet exit, while torch loads.
"""

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from tinymoe.engine.config import ModelConfig
    from tinymoe.engine.generate import GenerationResult, generate
    from tinymoe.engine.loader import load_model, save_model
    from tinymoe.engine.model import MoETransformer
    from tinymoe.errors import TinyMoeError

_HOME = {  # name -> the module that defines it
    "GenerationResult": "tinymoe.engine.generate",
    "ModelConfig": "tinymoe.engine.config",
    "MoETransformer": "tinymoe.engine.model",
    "TinyMoeError": "tinymoe.errors",
    "generate": "tinymoe.engine.generate",
    "load_model": "tinymoe.engine.loader",
    "save_model": "tinymoe.engine.loader",
}
__all__ = [
    "GenerationResult",
    "ModelConfig",
    "MoETransformer",
    "TinyMoeError",
    "generate",
    "load_model",
    "save_model",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'tinymoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


# `python -m tinymoe.<tool>`: Python imports this package first, with sys.argv[0] == "-m" while
# it locates the tool; then the tool's own imports load torch. Catch a Ctrl-C there too.
if sys.argv[:1] == ["-m"]:
    from tinymoe.launch import quiet_interrupt_while_importing

    quiet_interrupt_while_importing()
