"""revjax: memory-efficient training in JAX through invertibility."""

from revjax import activations, diagnostics, layers, memory, moonwalk, nnx, precision
from revjax.coupling import Coupling, additive_coupling, affine_coupling, sequence, swap
from revjax.scan import inverse_scan, reversible_scan

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
