"""Blocks whose branches close over traced values, made explicit for ``reversible_scan``.

``reversible_scan`` is one ``jax.custom_vjp`` whose block is a static (non-differentiable)
argument. A branch that closes over a value traced by a transformation *outside* that
``custom_vjp`` (per-example conditioning under ``jax.vmap``, a captured value that ``jax.grad``
differentiates) would leak that transformation's tracer into the backward pass, which runs after
the transformation has finished: JAX raises an ``UnexpectedTracerError``, or the captured value
would get no gradient. Values traced by an enclosing ``jax.jit`` or ``lax.scan`` are harmless:
they belong to the same staged computation.

:func:`hoist_traced_constants` finds such values by tracing one layer's ``forward`` and
``inverse`` to jaxprs at abstract shapes: every value a function closes over becomes one of
the jaxpr's constants. When one of them is an outer transformation's tracer, the block is
rebuilt as a closure-free :class:`revjax.Coupling` that evaluates those jaxprs with the
constants passed in as *shared parameters*: ``params`` of layer ``l`` becomes
``(params_l, shared)``, the same ``shared`` for every layer. They are then ordinary inputs of the
``custom_vjp``, which every JAX transformation handles, and the backward pass sums their
gradient over the layers. The rebuilt block has no fused backward: it reconstructs each layer's
input with ``inverse`` and then takes one ``jax.vjp`` of ``forward``, i.e. one more evaluation of
the branches per layer than the fused step of an additive coupling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core

from revjax.coupling import Coupling, call_with_key

PyTree = Any


def _traced_by_an_outer_transformation(value: Any) -> bool:
    # A DynamicJaxprTracer belongs to a computation being staged out (jit, scan, the custom_vjp
    # itself): closing over it is fine. Any other tracer (vmap's, grad's) is not.
    return isinstance(value, jax.core.Tracer) and type(value).__name__ != "DynamicJaxprTracer"


def _as_jaxpr(fn: Callable[..., PyTree], *example: Any) -> tuple[Any, Any]:
    """``fn`` traced at ``example`` (arrays or ``jax.ShapeDtypeStruct``s): ``(closed jaxpr,
    output tree)``; the values ``fn`` closes over are the closed jaxpr's ``consts``."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*example)
    return closed, jax.tree.structure(shape)


def _evaluate(closed: Any, out_tree: Any, consts: list, *args: Any) -> PyTree:
    """The jaxpr of ``closed`` on ``args`` with ``consts`` in place of its own constants."""
    run = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(closed.jaxpr, list(consts)))
    return jax.tree.unflatten(out_tree, run(*jax.tree.leaves(args)))


def hoist_traced_constants(
    block: Coupling, layer_params: PyTree, x: PyTree, key: Any
) -> tuple[Coupling, tuple | None]:
    """``(block, None)`` when no branch closes over an outer transformation's tracer; else a
    closure-free block whose layer parameters are ``(params_l, shared)`` and ``shared``.

    ``layer_params``, ``x`` and ``key`` describe one layer's arguments (arrays or
    ``jax.ShapeDtypeStruct``s; ``key`` may be None).

    Raises:
      TypeError: a block with side information (``aux``, e.g. batch norm) closes over such a
        value; that combination is not supported.
    """
    call = lambda fn: lambda p, h, k: call_with_key(fn, p, h, key=k)
    outer = lambda closed: any(_traced_by_an_outer_transformation(c) for c in closed.consts)
    forward, out_tree = _as_jaxpr(call(block.forward), layer_params, x, key)
    if block.aux is not None:  # its inverse needs the forward's side information
        side, _ = _as_jaxpr(call(block.aux), layer_params, x, key)
        if outer(forward) or outer(side):
            raise TypeError(
                "reversible_scan: a block with side information (aux, e.g. batch norm) closes "
                "over a value traced by an enclosing transformation (vmap, grad); pass that "
                "value through params instead"
            )
        return block, None
    inverse, in_tree = _as_jaxpr(call(block.inverse), layer_params, x, key)
    if not (outer(forward) or outer(inverse)):
        return block, None
    constants = [*forward.consts, *inverse.consts]
    n = len(forward.consts)

    def free_forward(params: PyTree, h: PyTree, key: Any = None) -> PyTree:
        p, shared = params
        return _evaluate(forward, out_tree, shared[:n], p, h, key)

    def free_inverse(params: PyTree, h: PyTree, key: Any = None) -> PyTree:
        p, shared = params
        return _evaluate(inverse, in_tree, shared[n:], p, h, key)

    return Coupling(forward=free_forward, inverse=free_inverse), tuple(constants)
