"""Blocks whose branches close over traced values, made explicit for ``reversible_scan``.

``reversible_scan`` is one ``jax.custom_vjp`` whose block is a static (non-differentiable)
argument. A branch that closes over a value traced by a transformation *outside* that
``custom_vjp`` (per-example conditioning under ``jax.vmap``, a captured value that ``jax.grad``
differentiates) would leak that transformation's tracer into the backward pass, which runs after
the transformation has finished: JAX raises an ``UnexpectedTracerError``, or refuses to
differentiate the closed-over value. The same holds for a floating value staged by an enclosing
``jax.jit``, ``lax.scan`` or ``jax.checkpoint`` when a ``grad`` outside that region
differentiates it, and for a staged integer, boolean or key value there (the backward pass
runs after the staging ended).

:func:`hoist_traced_constants` finds such values by tracing one layer's ``forward`` and ``inverse``
to jaxprs (at layer 0's real arguments, so that types beyond shape and dtype, such as the axes a
value varies over inside ``jax.shard_map``, match when the jaxprs are replayed): every value a
function closes over becomes one of the jaxpr's constants. When one of them must be an input
(:func:`_must_be_an_input`), the block is rebuilt as a closure-free :class:`revjax.Coupling` that
evaluates those jaxprs with the constants passed in as *shared parameters*: ``params`` of layer
``l`` becomes ``(params_l, shared)``, the same ``shared`` for every layer. They are then ordinary
inputs of the ``custom_vjp``, which every JAX transformation handles, and the backward pass sums
their gradient over the layers. The rebuilt block has no fused backward: it reconstructs each
layer's input with ``inverse`` and then takes one ``jax.vjp`` of ``forward``, i.e. one more
evaluation of the branches per layer than the fused step of an additive coupling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core

from revjax.coupling import Coupling, call_with_key, with_aux

PyTree = Any


def _must_be_an_input(value: Any) -> bool:
    """Whether a closed-over value must become an explicit input of the ``custom_vjp``: every
    tracer does.

    A tracer of vmap or grad would leak into the backward pass. A value staged by an enclosing
    ``jit``, ``lax.scan`` or ``jax.checkpoint`` would too when a ``grad`` *outside* that staged
    region runs the backward pass after the staging ended: for a floating value (which that
    grad may also differentiate) and equally for an integer, boolean or key value (a class
    index, a mask, a dropout key), whose dead tracer JAX then refuses.
    """
    return isinstance(value, jax.core.Tracer)


def _as_jaxpr(fn: Callable[..., PyTree], *example: Any) -> tuple[Any, list, Any]:
    """``fn`` traced at ``example``: ``(jaxpr, constants, output tree)``; the values ``fn``
    closes over are the constants. Only the (pure) jaxpr is kept by the rebuilt block, so the
    tracers among the constants do not outlive this call except as explicit inputs."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*example)
    return closed.jaxpr, list(closed.consts), jax.tree.structure(shape)


def _evaluate(jaxpr: Any, out_tree: Any, consts: tuple, *args: Any) -> PyTree:
    """``jaxpr`` on ``args`` with ``consts`` as its constants."""
    run = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(jaxpr, list(consts)))
    return jax.tree.unflatten(out_tree, run(*jax.tree.leaves(args)))


def hoist_traced_constants(
    block: Coupling, layer_params: PyTree, x: PyTree, key: Any, *, log_det: bool = False
) -> tuple[Coupling, tuple | None]:
    """``(block, None)`` when no branch closes over a value that must be an input of the
    ``custom_vjp`` (:func:`_must_be_an_input`); else a closure-free block whose layer parameters
    are ``(params_l, shared)``, and ``shared``.

    ``layer_params``, ``x`` and ``key`` are one layer's arguments (``key`` may be None); pass
    the real ones, not ``jax.ShapeDtypeStruct``s, where their types carry more than shape and
    dtype (inside ``jax.shard_map``).

    With ``log_det``, the block's ``log_det`` is kept too (hoisted like ``forward`` and
    ``inverse``; without a fused step, ``reversible_scan(..., return_log_det=True)`` then
    takes one more ``jax.vjp``, of ``log_det``, per layer); otherwise the closure-free block
    has none. A block with side information (``aux``, e.g. batch norm) keeps it: its ``aux``
    is hoisted too, and its ``inverse`` is traced with the side information as an input
    (shaped as ``aux`` returns it), which the rebuilt ``inverse`` passes on.
    """
    call = lambda fn: lambda p, h, k: call_with_key(fn, p, h, key=k)
    forward, forward_consts, out_tree = _as_jaxpr(call(block.forward), layer_params, x, key)
    if block.aux is None:
        inverse, inverse_consts, in_tree = _as_jaxpr(call(block.inverse), layer_params, x, key)
        aux_consts: list = []
    else:
        aux_closed, side = jax.make_jaxpr(call(block.aux), return_shape=True)(layer_params, x, key)
        aux_jaxpr, aux_consts = aux_closed.jaxpr, list(aux_closed.consts)
        aux_tree = jax.tree.structure(side)
        inverse, inverse_consts, in_tree = _as_jaxpr(
            lambda p, h, k, s: call_with_key(with_aux(block.inverse, block, s), p, h, key=k),
            layer_params,
            x,
            key,
            side,
        )
    log_det_consts: list = []
    if log_det:
        log_det_jaxpr, log_det_consts, log_det_tree = _as_jaxpr(
            call(block.log_det), layer_params, x, key
        )
    constants = [*forward_consts, *inverse_consts, *aux_consts, *log_det_consts]
    if not any(_must_be_an_input(c) for c in constants):
        return block, None
    n = len(forward_consts)
    m = n + len(inverse_consts)
    a = m + len(aux_consts)

    def free_forward(params: PyTree, h: PyTree, key: Any = None) -> PyTree:
        p, shared = params
        return _evaluate(forward, out_tree, shared[:n], p, h, key)

    def free_inverse(params: PyTree, h: PyTree, key: Any = None, aux: PyTree = None) -> PyTree:
        p, shared = params
        side = () if block.aux is None else (aux,)
        return _evaluate(inverse, in_tree, shared[n:m], p, h, key, *side)

    def free_aux(params: PyTree, h: PyTree, key: Any = None) -> PyTree:
        p, shared = params
        return _evaluate(aux_jaxpr, aux_tree, shared[m:a], p, h, key)

    def free_log_det(params: PyTree, h: PyTree, key: Any = None) -> jax.Array:
        p, shared = params
        return _evaluate(log_det_jaxpr, log_det_tree, shared[a:], p, h, key)

    free = Coupling(
        forward=free_forward,
        inverse=free_inverse,
        aux=None if block.aux is None else free_aux,
        log_det=free_log_det if log_det else None,
    )
    return free, tuple(constants)


__all__ = ["hoist_traced_constants"]
