"""Gradient methods of :mod:`revjax.moonwalk` behind one entry point, ``value_and_grad``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from revjax._tree_metrics import relative_error
from revjax._validate import positive_int, raise_on_host
from revjax.coupling import Coupling
from revjax.moonwalk.layers import Layer, _separating_masks, chain, check_layer, widen_like

PyTree = Any
METHODS = ("backprop", "revbackprop", "moonwalk", "mixed_moonwalk", "forward", "projected_forward")
FORWARD_MODE_METHODS = ("moonwalk", "forward", "projected_forward")  # JVP through the network


def _check_per_example(shape: tuple[int, ...], batch: int) -> None:
    if shape != (batch,):
        hint = (
            " (a scalar: return one loss per example, without a mean or sum over the batch; "
            "and x needs a leading batch axis, which is taken to be its first axis)"
            if shape == ()
            else ""
        )
        raise ValueError(
            f"loss_fn must return per-example losses of shape (batch,) = ({batch},), batch "
            f"being x's leading axis; got shape {shape}{hint}"
        )


def _raise_if_examples_coupled(first: Any) -> None:
    first = np.atleast_1d(np.asarray(first))  # one entry per vmapped call
    bad = first[first >= 0]
    if bad.size:
        raise ValueError(
            f"value_and_grad(method='moonwalk'): the loss of example {int(bad.min())} depends on "
            "the input of another example (a batch mean or batch statistics inside loss_fn or a "
            "layer), but pure Moonwalk's input gradient by JVPs assumes each example's loss "
            "depends on that example only, so its gradient would be wrong; use "
            "method='mixed_moonwalk', whose input gradient comes from a reverse pass (a "
            "dense() layer must still act on each example alone)"
        )


def _ravel_inexact(params: PyTree) -> tuple[jax.Array, Callable, Callable]:
    """``(flat, params_at, grads_from)`` for the forward-mode methods, which must not perturb an
    integer or bool leaf (it has no tangent space): ``flat`` is the floating leaves of
    ``params`` raveled, ``params_at(v)`` is ``params`` with those leaves read from ``v`` and the
    others unchanged, and ``grads_from(g)`` the gradient tree of a flat gradient ``g``, in the
    leaves' dtypes, with ``float0`` zeros at the other leaves (as ``jax.grad(...,
    allow_int=True)``)."""
    leaves, treedef = jax.tree.flatten(params)
    inexact = [jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in leaves]
    floats = [a for a, keep in zip(leaves, inexact, strict=True) if keep]
    others = [a for a, keep in zip(leaves, inexact, strict=True) if not keep]
    flat, unravel = ravel_pytree(floats)

    def merge(float_leaves, other_leaves):
        float_leaves, other_leaves = iter(float_leaves), iter(other_leaves)
        return treedef.unflatten([next(float_leaves if k else other_leaves) for k in inexact])

    def params_at(v):
        return merge(unravel(v), others)

    def grads_from(g):  # JVPs come out in the loss's dtype: back to each leaf's
        grads = unravel(g.astype(flat.dtype))
        grads = [d.astype(jnp.result_type(a)) for d, a in zip(grads, floats, strict=True)]
        return merge(grads, [np.zeros(np.shape(a), jax.dtypes.float0) for a in others])

    return flat, params_at, grads_from


def first_coupled_example(
    forward: Callable[[PyTree], PyTree],
    loss_fn: Callable[..., jax.Array],
    x: PyTree,
    *loss_args,
    chunk_size: int | None = None,
) -> jax.Array:
    """Index of the first example whose loss responds to another example's input, else -1.

    Each probe is one JVP with a fixed pseudo-random tangent set in a subset ``S`` of the
    examples only. With examples that do not interact, forward mode carries exact zeros through
    each example's own arithmetic, so the loss tangents outside ``S`` are exactly 0; a nonzero
    one (compared as ``|t| > 0``, so a NaN from a non-finite network is not taken for coupling)
    means that example's loss depends on an example in ``S``. The subsets are, for each bit of
    the example index, the examples with the bit set and those with it clear: any two examples
    differ in some bit, so every dependence between two examples is caught, for
    ``2 ceil(log2 batch)`` JVPs (``chunk_size`` at a time) beyond the ``d`` of the input
    gradient (none for a batch of 1).
    """
    batch = jax.tree.leaves(x)[0].shape[0]
    masks = _separating_masks(batch)
    if not masks.size:
        return jnp.int32(-1)
    leaves, treedef = jax.tree.flatten(x)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    probe = [
        jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype)
        for k, a in zip(keys, leaves, strict=True)
    ]

    def outside_responses(inside):  # |loss tangent| > 0 for the examples outside the subset
        expand = lambda a: inside.reshape((batch,) + (1,) * (a.ndim - 1))
        tangent = treedef.unflatten([jnp.where(expand(a), a, 0).astype(a.dtype) for a in probe])
        t = jax.jvp(lambda x_: loss_fn(forward(x_), *loss_args), (x,), (tangent,))[1]
        return (jnp.abs(t) > 0) & ~inside

    responding = lax.map(
        outside_responses, jnp.asarray(masks), batch_size=chunk_size or masks.shape[0]
    )
    coupled = jnp.any(responding, axis=0)
    # A min-reduction, not argmax: on a batch-sharded mesh it is one all-reduce of a scalar
    # rather than an all-gather of the per-example flags.
    first = jnp.min(jnp.where(coupled, jnp.arange(batch), batch))
    return jnp.where(first < batch, first, -1)


def input_cotangent_by_jvps(
    forward: Callable[[PyTree], PyTree],
    loss_fn: Callable[..., jax.Array],
    x: PyTree,
    *loss_args,
    chunk_size: int | None = None,
) -> PyTree:
    """``h_0 = d mean(loss) / dx`` by forward mode only: one JVP per input coordinate.

    With per-example losses ``l_b`` that depend only on example ``b``, the JVP along ``e_j`` set
    in every example at once returns ``dl_b / dx_bj`` for all ``b``: ``d`` JVPs (``d`` =
    per-example input size) give the whole input gradient. ``chunk_size`` of them run at once
    (all ``d`` when None), so the JVPs' live tangents take ``chunk_size / d`` of the memory.
    ``h_0`` is shaped like ``x``, each leaf in the wider of its dtype and the loss's (a
    bfloat16 ``x`` with a float32 loss gives a float32 ``h_0``: the sweep starts from it).

    The assumption is load-bearing: a loss or a layer that couples examples (a batch mean
    inside the loss, batch-statistics normalisation) would make ``h_0`` wrong, so
    :func:`first_coupled_example` checks it (``2 ceil(log2 batch)`` more JVPs) and a coupling
    raises at run time; use ``mixed_moonwalk`` there.

    Raises:
      ValueError: (at trace time) ``loss_fn(forward(x))`` not of shape ``(batch,)``; (at run
        time, through ``jax.debug.callback``; under ``jax.jit`` wrapped in
        ``jax.errors.JaxRuntimeError`` with the same message) an example's loss responds to
        another example's input.
      TypeError: ``x`` has integer or bool leaves (JVPs along them do not exist).
    """
    bad = [a.dtype for a in jax.tree.leaves(x) if not jnp.issubdtype(a.dtype, jnp.inexact)]
    if bad:
        raise TypeError(
            f"pure Moonwalk's input gradient (input_cotangent_by_jvps) takes JVPs along x, but x "
            f"has leaves of dtype {bad[0]}, which have no tangents; use "
            "method='mixed_moonwalk' (its input gradient comes from a reverse pass), or cast x "
            "to a float dtype"
        )
    batch = jax.tree.leaves(x)[0].shape[0]
    out = jax.eval_shape(lambda x_: loss_fn(forward(x_), *loss_args), x)
    _check_per_example(out.shape, batch)
    coupled_at = first_coupled_example(forward, loss_fn, x, *loss_args, chunk_size=chunk_size)
    raise_on_host(_raise_if_examples_coupled, coupled_at)
    # One example's layout, without slicing x (a slice of an example axis split over an
    # Explicit mesh does not trace).
    first, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), x))

    def along(e):
        spread = lambda t, a: jnp.broadcast_to(t, a.shape).astype(a.dtype)
        tangent = jax.tree.map(spread, unravel(e), x)
        return jax.jvp(lambda x_: loss_fn(forward(x_), *loss_args), (x,), (tangent,))[1]

    basis = jnp.eye(first.size, dtype=first.dtype)
    per_coordinate = lax.map(along, basis, batch_size=chunk_size or first.size)  # (d, batch)
    # The JVPs come out in the loss's dtype (often float32 for a bf16 network). h_0 keeps the
    # wider of that and x's dtypes, leaf by leaf: rounding it to a bfloat16 x's dtype put a
    # bfloat16-sized error into every gradient of a float32 network (see widen_like). So the
    # rows are split by hand: ravel_pytree's unravel would cast them back to x's dtypes.
    rows = per_coordinate.T / batch  # (batch, d)
    leaves, treedef = jax.tree.flatten(x)
    ends = np.cumsum([math.prod(a.shape[1:]) for a in leaves])
    pieces = jnp.split(rows, ends[:-1], axis=1)
    h0 = [p.reshape(a.shape) for p, a in zip(pieces, leaves, strict=True)]
    return widen_like(jax.tree.unflatten(treedef, h0), x)


def value_and_grad(
    layers: Layer | Sequence[Layer],
    loss_fn: Callable[..., jax.Array],
    *,
    method: str,
    num_tangents: int = 16,
    chunk_size: int = 64,
    with_drift: bool = False,
) -> Callable[..., tuple]:
    """``fn(params, x, *loss_args, key=None) -> (loss, grads)`` by the chosen method, or
    ``(loss, grads, drift)`` with ``with_drift=True`` (Moonwalk methods only).

    Args:
      layers: a :class:`Layer` or a sequence of them (composed with :func:`chain`; then
        ``params`` is a tuple with one entry per layer).
      loss_fn: ``loss_fn(y, *loss_args) -> (batch,)`` per-example losses; the objective is
        their mean. Per-example losses are what pure-forward Moonwalk needs to get every
        example's input gradient from one JVP per input coordinate: with ``"moonwalk"``,
        example ``b``'s loss must depend on example ``b`` only (no batch mean inside
        ``loss_fn``, no layer mixing examples), else it would be wrong; a run-time check
        (:func:`first_coupled_example`) raises ``ValueError`` then.
      method: ``"backprop"`` (``jax.grad``), ``"revbackprop"`` (``reversible_scan``; couplings
        only), ``"moonwalk"`` (input gradient by JVPs, then the vijp forward sweep),
        ``"mixed_moonwalk"`` (input gradient by a reverse pass storing only residuals, then the
        sweep), ``"forward"`` (exact forward mode: one JVP per parameter, ``chunk_size`` at a
        time), ``"projected_forward"`` (Baydin et al. 2022: ``mean_i (g . v_i) v_i`` over
        ``num_tangents`` Gaussian tangents; needs ``key``; unbiased, not exact).
      num_tangents: tangents of ``"projected_forward"``.
      chunk_size: JVPs run at once by ``"forward"``, ``"projected_forward"`` and the input
        gradient of ``"moonwalk"`` (memory vs speed).
      with_drift: also return the sweep's self-check (``"moonwalk"``, ``"mixed_moonwalk"``).
        The vijp sweep carries ``h_l = dL/dz_l`` forward through ``J_l^{-1}``, which amplifies
        round-off by the inverse Jacobians' norms (``1 / slope`` per leaky ReLU, compounding
        with depth); the exact sweep ends at ``h_L = dL/dy``, known from the loss alone. So
        ``drift = |h_L - dL/dy| / |dL/dy|`` is a free witness of that amplification: when it
        is not small, neither is the gradient's error (README, Moonwalk).

    Returns:
      The function; ``grads`` has the structure of ``params`` and its leaves' dtypes, except
      that an integer or bool leaf gets a ``float0`` zero (as ``jax.grad(...,
      allow_int=True)``), by every method. Jit it as usual.

    Raises:
      ValueError: unknown ``method``, ``num_tangents`` / ``chunk_size`` not positive ints,
        ``with_drift`` for a method without a forward sweep; when called, an empty batch
        (``x`` with leading axis 0).
      TypeError: ``layers`` not a :class:`Layer` or a sequence of them (naming the item).
    """
    if method not in METHODS:
        raise ValueError(f"value_and_grad: unknown method {method!r}; choose from {METHODS}")
    num_tangents = positive_int(num_tangents, "num_tangents", "value_and_grad")
    chunk_size = positive_int(chunk_size, "chunk_size", "value_and_grad")
    if with_drift and method not in ("moonwalk", "mixed_moonwalk"):
        raise ValueError(
            f"value_and_grad: with_drift=True needs a Moonwalk method (a forward vijp sweep), "
            f"got method={method!r}"
        )
    if isinstance(layers, Layer):
        net = layers
    elif isinstance(layers, Coupling) or not isinstance(layers, Iterable):
        # A Coupling is a NamedTuple, so it would otherwise be taken for a list of layers.
        net = check_layer(layers, "value_and_grad")  # raises, naming what was given
    else:
        layers = list(layers)  # may be a generator
        if not layers:
            raise ValueError("value_and_grad: layers is empty; give at least one Layer")
        for i, layer in enumerate(layers):  # named as the caller wrote it, not as chain's item
            check_layer(layer, f"value_and_grad: layers[{i}]")
        net = chain(*layers)
    mean_loss = lambda y, *args: jnp.mean(loss_fn(y, *args))

    # allow_int: an integer or bool leaf of params (a count, a mask) gets a float0 zero, as in
    # every other method, instead of jax.grad's TypeError.
    def backprop(params, x, *args, key=None):
        objective = lambda p: mean_loss(net.forward(p, x), *args)
        return jax.value_and_grad(objective, allow_int=True)(params)

    def revbackprop(params, x, *args, key=None):
        objective = lambda p: mean_loss(net.reversible_forward(p, x), *args)
        return jax.value_and_grad(objective, allow_int=True)(params)

    def moonwalk(params, x, *args, key=None):
        forward_x = lambda x_: net.forward(params, x_)
        h0 = input_cotangent_by_jvps(forward_x, loss_fn, x, *args, chunk_size=chunk_size)
        y, h_end, grads = net.step(params, x, h0)
        if not with_drift:
            return mean_loss(y, *args), grads
        loss, h_y = jax.value_and_grad(mean_loss)(y, *args)
        return loss, grads, relative_error(h_end, h_y)

    def mixed_moonwalk(params, x, *args, key=None):
        y, residuals = net.save_forward(params, x)
        loss, h_y = jax.value_and_grad(mean_loss)(y, *args)
        _, h0 = net.pull(params, residuals, y, h_y)
        # The pull's h0 comes out in the dtypes of the first layer's parameters or of the
        # cotangents it was given, which need not be x's; it is not narrowed to x's.
        _, h_end, grads = net.step(params, x, widen_like(h0, x))
        return (loss, grads, relative_error(h_end, h_y)) if with_drift else (loss, grads)

    def forward(params, x, *args, key=None):
        flat, params_at, grads_from = _ravel_inexact(params)
        objective = lambda v: mean_loss(net.forward(params_at(v), x), *args)
        if flat.size == 0:  # nothing to differentiate (float0 zeros for integer leaves)
            return objective(flat), grads_from(flat)
        one_hot = lambda i: jnp.zeros_like(flat).at[i].set(1)
        coordinate = lambda i: jax.jvp(objective, (flat,), (one_hot(i),))[1]
        grads = lax.map(coordinate, jnp.arange(flat.size), batch_size=chunk_size)
        return objective(flat), grads_from(grads)

    def projected_forward(params, x, *args, key=None):
        if key is None:
            raise ValueError("value_and_grad(method='projected_forward') needs key=")
        flat, params_at, grads_from = _ravel_inexact(params)
        objective = lambda v: mean_loss(net.forward(params_at(v), x), *args)
        if flat.size == 0:  # nothing to differentiate (float0 zeros for integer leaves)
            return objective(flat), grads_from(flat)

        def estimate(k):
            tangent = jax.random.normal(k, flat.shape, flat.dtype)
            return jax.jvp(objective, (flat,), (tangent,))[1] * tangent

        keys = jax.random.split(key, num_tangents)
        estimates = lax.map(estimate, keys, batch_size=min(chunk_size, num_tangents))
        return objective(flat), grads_from(jnp.mean(estimates, axis=0))

    implementation = {
        "backprop": backprop,
        "revbackprop": revbackprop,
        "moonwalk": moonwalk,
        "mixed_moonwalk": mixed_moonwalk,
        "forward": forward,
        "projected_forward": projected_forward,
    }[method]

    def value_and_grad_fn(params, x, *loss_args, key=None):
        batch = jax.tree.leaves(x)[0].shape[0]
        if batch == 0:  # the mean loss is 0/0 and the sweeps have no examples to solve for
            raise ValueError(
                f"value_and_grad(method={method!r}): x has an empty batch (leading axis 0, "
                f"shape {jax.tree.leaves(x)[0].shape}); the loss is a mean over examples"
            )
        out = jax.eval_shape(lambda p, x_: loss_fn(net.forward(p, x_), *loss_args), params, x)
        _check_per_example(out.shape, batch)
        try:
            return implementation(params, x, *loss_args, key=key)
        except TypeError as err:
            if method in FORWARD_MODE_METHODS and "forward-mode" in str(err):
                err.add_note(
                    f"revjax.moonwalk.value_and_grad(method={method!r}) differentiates the "
                    "network in forward mode (JVPs), and a jax.custom_vjp inside it (e.g. "
                    "revjax.activations.gelu/silu, or reversible_scan in a branch) has no "
                    "forward-mode rule: use jax.nn activations in those layers, or "
                    "method='mixed_moonwalk', whose input gradient comes from a reverse pass."
                )
            raise

    return value_and_grad_fn


__all__ = [
    "FORWARD_MODE_METHODS",
    "METHODS",
    "first_coupled_example",
    "input_cotangent_by_jvps",
    "value_and_grad",
]
