"""revjax: memory-efficient training in JAX through invertibility."""

import importlib
from types import ModuleType

from revjax import activations, diagnostics, layers, memory, moonwalk, precision
from revjax.coupling import Coupling, additive_coupling, affine_coupling, sequence, swap
from revjax.scan import inverse_scan, reversible_scan


def __getattr__(name: str) -> ModuleType:
    """``revjax.nnx`` is imported on first use: the core is pure JAX, so ``import revjax``
    does not load Flax (PEP 562 module ``__getattr__``)."""
    if name == "nnx":
        return importlib.import_module("revjax.nnx")
    raise AttributeError(f"module 'revjax' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Coupling",
    "activations",
    "additive_coupling",
    "affine_coupling",
    "diagnostics",
    "inverse_scan",
    "layers",
    "memory",
    "moonwalk",
    "nnx",
    "precision",
    "reversible_scan",
    "sequence",
    "swap",
]
