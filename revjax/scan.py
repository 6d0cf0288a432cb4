"""``reversible_scan``: backprop through a stack of reversible layers without stored activations.

For a stack of ``L`` layers ``x_l = block.forward(theta_l, x_{l-1})`` the forward pass keeps only
the final output ``y = x_L``. The backward pass walks the layers in reverse and, at each layer,
reconstructs the input from the output while pulling the cotangent back (RevBackprop):

    (x_{l-1}, x_bar_{l-1}, theta_bar_l) = backward(theta_l, x_l, x_bar_l)

so activation memory is one layer's working set, independent of ``L``. The whole scan is one
``jax.custom_vjp``: a per-layer ``custom_vjp`` inside ``lax.scan`` would have its residuals stacked
over layers by the scan's own autodiff, which is exactly the memory this module removes.

Randomness: with ``key``, layer ``l`` receives ``layer_key(key, l) = fold_in(key, l)`` in the
forward pass and the very same key in the backward pass, so dropout masks are replayed exactly.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from revjax.closure import hoist_traced_constants
from revjax.coupling import (
    Coupling,
    call_with_key,
    reconstruct_and_vjp,
    reconstruct_and_vjp_with_log_det,
    with_aux,
)
from revjax.precision import (
    INPUT_LAYER,
    NO_LAYER,
    Policy,
    RangeCheck,
    apply_policy,
    implicit_narrow_stream,
    range_check,
    to_stream,
    warn_implicit_narrow_stream,
)

PyTree = Any
Key = Any


def layer_key(key: Key | None, layer: jax.Array | int) -> Key | None:
    """The key of layer ``layer``: ``jax.random.fold_in(key, layer)``, or None without a key."""
    return None if key is None else jax.random.fold_in(key, layer)


def check_key(key: Key | None, *, where: str) -> None:
    """Refuses anything but None or one PRNG key: a typed key (``jax.random.key``) of shape
    ``()`` or a raw ``uint32`` key (``jax.random.PRNGKey``: ``[2]``, or ``[4]`` for ``rbg``)."""
    if key is None:
        return
    dtype, shape = getattr(key, "dtype", None), jnp.shape(key) if hasattr(key, "shape") else None
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and shape in ((2,), (4,))
    if not ((typed and shape == ()) or raw):
        got = f"{type(key).__name__} {key!r}" if dtype is None else f"{dtype}{list(shape)}"
        raise TypeError(
            f"{where}: key must be one PRNG key, jax.random.key(seed) or "
            f"jax.random.PRNGKey(seed), or None; got {got}"
        )


def stack_depth(params: PyTree, *, where: str = "reversible_scan") -> int:
    """The number of layers ``L``: the common leading axis of every leaf of ``params``.

    Raises:
      ValueError: no array leaves, a scalar leaf, leaves with different leading axes, or L = 0.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(
            f"{where}: params has no array leaves, so the number of layers L (their common "
            "leading axis) is undefined"
        )
    depths = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{where}: params leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs "
                "a leading layer axis L"
            )
        depths.setdefault(shape[0], []).append(jax.tree_util.keystr(path))
    if len(depths) > 1:
        detail = "; ".join(f"L={d}: {', '.join(p[:4])}" for d, p in sorted(depths.items()))
        raise ValueError(
            f"{where}: params leaves must share one leading layer axis L, found {detail}"
        )
    (depth,) = depths
    if depth == 0:
        raise ValueError(f"{where}: empty stack, the params' leading layer axis is L = 0")
    return depth


def check_stream(x: PyTree, *, where: str = "reversible_scan") -> None:
    """Raises ``TypeError`` unless every leaf of the stream ``x`` is a floating-point array."""
    leaves = jax.tree_util.tree_leaves_with_path(x)
    if not leaves:
        raise ValueError(f"{where}: the stream x has no array leaves")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where}: stream leaf {jax.tree_util.keystr(path) or 'x'} has dtype {dtype}; "
                "reversible streams must be floating point; cast it to float32 (or float64). "
                "For exact reconstruction, revjax.precision's exact mode keeps such a float "
                "stream on a fixed-point grid; it does not take integer streams either"
            )


def _layer_struct(params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), params
    )


def _signature(tree: PyTree) -> tuple:
    return jax.tree.structure(tree), [
        (jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(tree)
    ]


def check_block(
    block: Coupling,
    params: PyTree,
    x: PyTree,
    key: Key | None,
    *,
    where: str,
    check_inverse: bool = True,
) -> None:
    """Traces one layer abstractly and checks that it maps the stream to the same type, and
    (``check_inverse``) that its inverse maps that back to the stream's type.

    A scan's carry cannot change structure, shape or dtype between layers; catching it here gives
    an error that names the mismatch instead of a scan-internal one (or, for an inverse that
    drops a column, a broadcasting error raised inside ``forward`` during the backward pass).
    A function that is not callable (``Coupling(forward, None)``) is a ``TypeError`` naming it.
    """
    if not isinstance(block, Coupling):
        raise TypeError(f"{where}: block must be a revjax.Coupling, got {type(block).__name__}")
    for field in ("forward", "inverse"):
        if not callable(getattr(block, field)):
            raise TypeError(
                f"{where}: block.{field} must be a function, got {getattr(block, field)!r}"
            )
    k = layer_key(key, 0)
    out = jax.eval_shape(
        lambda p, x_: call_with_key(block.forward, p, x_, key=k), _layer_struct(params), x
    )
    if _signature(out) != _signature(x):
        raise ValueError(
            f"{where}: block.forward must return a stream of the same structure, shapes and "
            f"dtypes as its input; input {_signature(x)}, output {_signature(out)}"
        )
    if not check_inverse:
        return

    def round_trip(p, x_):
        y = call_with_key(block.forward, p, x_, key=k)
        side = None if block.aux is None else call_with_key(block.aux, p, x_, key=k)
        return call_with_key(with_aux(block.inverse, block, side), p, y, key=k)

    back = jax.eval_shape(round_trip, _layer_struct(params), x)
    if _signature(back) != _signature(x):  # else the error came from the scan, or from forward
        raise ValueError(
            f"{where}: block.inverse must return a stream of the same structure, shapes and "
            f"dtypes as block.forward's input; input {_signature(x)}, inverse(forward(x)) "
            f"{_signature(back)}"
        )


def log_det_dtype(
    block: Coupling, params: PyTree, x: PyTree, key: Key | None, *, where: str
) -> Any:
    """The dtype in which a stack's ``log|det J|`` is summed: the block's ``log_det`` output
    dtype, at least float32 (traced abstractly on one layer).

    Raises:
      ValueError: the block has no ``log_det``, or it returns anything but one floating scalar.
    """
    if block.log_det is None:
        raise ValueError(
            f"{where}: return_log_det=True needs a block with log_det; this one has none (a "
            "sequence has one only when every block does; layers and couplings built by revjax "
            "have one, a hand-written Coupling needs a log_det field)"
        )
    k = layer_key(key, 0)
    out = jax.eval_shape(
        lambda p, x_: call_with_key(block.log_det, p, x_, key=k), _layer_struct(params), x
    )
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and out.shape == ()
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise ValueError(
            f"{where}: block.log_det must return one floating scalar (log|det dy/dx| summed "
            f"over all elements), got {jax.tree.map(lambda a: f'{a.dtype}{list(a.shape)}', out)}"
        )
    return jnp.promote_types(out.dtype, jnp.float32)


def anchor_interval(
    depth: int, checkpoint_every: int | None, where: str = "reversible_scan"
) -> int:
    """The number of layers between stored anchors: ``checkpoint_every``, or ``depth`` (one
    segment, nothing stored but the output) when it is None.

    Raises:
      TypeError: ``checkpoint_every`` is not an integer (bool, float); the message starts with
        ``where``.
      ValueError: ``checkpoint_every`` is not a positive integer dividing ``depth``; likewise.
    """
    if checkpoint_every is None:
        return depth
    try:  # an int, a NumPy integer or a concrete integer jax.Array (not bool, float, tracer)
        dtype = getattr(checkpoint_every, "dtype", None)
        if isinstance(checkpoint_every, bool) or (dtype is not None and dtype.kind == "b"):
            raise TypeError
        checkpoint_every = operator.index(checkpoint_every)
    except TypeError:
        traced = isinstance(checkpoint_every, jax.core.Tracer)
        raise TypeError(
            f"{where}: checkpoint_every must be an int or None, got "
            f"{type(checkpoint_every).__name__}"
            + (
                " (a traced value: it fixes the scan's structure, so it must be a static "
                "Python int, e.g. a static_argnames argument of jax.jit)"
                if traced
                else ""
            )
        ) from None
    if checkpoint_every < 1 or depth % checkpoint_every:
        divisors = [d for d in range(1, depth + 1) if depth % d == 0]
        raise ValueError(
            f"{where}: checkpoint_every={checkpoint_every} must be a positive divisor of the "
            f"number of layers L={depth}; valid values: {divisors}"
        )
    return checkpoint_every


def _forward(
    block: Coupling,
    params: PyTree,
    x: PyTree,
    key: Key | None,
    *,
    every: int | None = None,
    remat: bool = False,
    check: RangeCheck | None = None,
    shared: tuple | None = None,
    log_det: Any = None,
) -> tuple[PyTree, PyTree | None, PyTree | None, jax.Array | None]:
    """``lax.scan`` of ``block.forward`` over the layers; returns ``(y, anchors, aux,
    log_det)``.

    every: with an anchor interval ``k < L``, also returns the exact stream after every ``k``
      layers in a ``(L // k, ...)`` buffer per stream leaf (else ``anchors`` is None). Layer ``l``
      writes its output to slot ``l // k``; the last write into a slot is the segment's exact
      output. Writing every layer (instead of branching) keeps the loop body uniform; it costs
      one stream copy per layer.
    remat: wrap each layer in ``jax.checkpoint`` (per-layer rematerialisation).
    check: exact mode's range check; the scan carries the first offending layer and reports it
      once, after the loop.

    ``aux`` is the block's side information per layer, stacked on a leading ``L`` axis (None
    for blocks without ``aux``). With ``shared`` (:mod:`revjax.closure`), layer ``l`` gets the
    parameters ``(params_l, shared)``. With a dtype ``log_det`` (see :func:`log_det_dtype`),
    also sums ``block.log_det`` over the layers in that dtype (else that output is None).
    """
    depth = stack_depth(params)

    def step(p, x_, k):
        y_ = call_with_key(block.forward, p, x_, key=k)
        # Under jit the branch evaluations of forward and log_det are the same operations on
        # the same values, which XLA's common-subexpression elimination merges.
        term = None if log_det is None else call_with_key(block.log_det, p, x_, key=k)
        return y_, term

    if remat:
        # Inside a scan the recomputation cannot be CSE'd into the forward pass, so the
        # optimisation barriers of prevent_cse=True are unnecessary (see jax.checkpoint's docs).
        step = jax.checkpoint(step, prevent_cse=False)
    with_anchors = every is not None and every < depth
    # Built from the stream itself, so the buffer carries its sharding: on an Explicit mesh a
    # fresh jnp.zeros is unsharded and writing the batch-sharded stream into it is refused.
    anchors = (
        jax.tree.map(lambda a: jnp.broadcast_to(jnp.zeros_like(a), (depth // every, *a.shape)), x)
        if with_anchors
        else None
    )
    status = None
    if check is not None:
        bad, value = check.out_of_range(x)
        status = (jnp.where(bad, INPUT_LAYER, NO_LAYER), value)

    def body(carry, inputs):
        x_, anchors_, status_, total = carry
        p, layer = inputs
        p = p if shared is None else (p, shared)
        k = layer_key(key, layer)
        side = None if block.aux is None else call_with_key(block.aux, p, x_, key=k)
        y_, term = step(p, x_, k)
        if log_det is not None:
            total = total + jnp.asarray(term, log_det)  # a Python float (a constant) too
        if with_anchors:
            anchors_ = jax.tree.map(
                lambda buf, v: lax.dynamic_update_index_in_dim(buf, v, layer // every, 0),
                anchors_,
                y_,
            )
        if check is not None:
            bad, value = check.out_of_range(y_)
            first = (status_[0] == NO_LAYER) & bad
            status_ = (jnp.where(first, layer, status_[0]), jnp.where(first, value, status_[1]))
        return (y_, anchors_, status_, total), side

    total = None if log_det is None else jnp.zeros((), log_det)
    (y, anchors, status, total), aux = lax.scan(
        body, (x, anchors, status, total), (params, jnp.arange(depth))
    )
    if check is not None:
        check.report(*status)
    return y, anchors, aux, total


def restart_at_anchor(stream: PyTree, exact: PyTree, layer: jax.Array, every: int) -> PyTree:
    """``exact`` at the last layer of each segment of ``every`` layers, else ``stream``.

    Reconstruction walking backward restarts there from the stored exact output, so round-off
    accumulates over at most ``every`` layers.
    """
    at_anchor = layer % every == every - 1
    return jax.tree.map(lambda e, s: jnp.where(at_anchor, e, s), exact, stream)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _reversible_scan(
    block: Coupling,
    every: int,
    check: RangeCheck | None,
    log_det: Any,
    narrow: str | None,
    params: PyTree,
    x: PyTree,
    key: Key | None,
    shared: tuple | None,
) -> tuple[PyTree, jax.Array | None, PyTree]:
    y, _, aux, total = _forward(block, params, x, key, check=check, shared=shared, log_det=log_det)
    return y, total, aux


def _reversible_scan_fwd(block, every, check, log_det, narrow, params, x, key, shared):
    # Residuals: the output, the anchors and side information if any (params, key and shared
    # are inputs, stored anyway). Traced only when differentiating: the one place to warn about
    # reconstruction in an implicit 16-bit stream (a forward-only use has no reconstruction).
    if narrow is not None:
        warn_implicit_narrow_stream(narrow, "reversible_scan")
    y, anchors, aux, total = _forward(
        block, params, x, key, every=every, check=check, shared=shared, log_det=log_det
    )
    return (y, total, aux), (params, y, anchors, aux, key, shared)


def reverse_sweep(
    block: Coupling,
    params: PyTree,
    y: PyTree,
    y_bar: PyTree,
    *,
    key: Key | None = None,
    anchors: PyTree | None = None,
    every: int | None = None,
    aux: PyTree | None = None,
) -> tuple[PyTree, PyTree, PyTree]:
    """RevBackprop over a whole stack: ``(x, x_bar, params_bar)`` from its output and cotangent.

    Walks the layers in reverse, reconstructing each layer's input from its output while
    pulling the cotangent back (restarting at ``anchors`` every ``every`` layers, handing each
    layer its ``aux``). This is the backward pass of :func:`reversible_scan`; it also returns
    the reconstructed input, so stacks can be chained (e.g. across the stages of a network)
    under one ``custom_vjp`` that stores only the last output.

    Raises:
      ValueError: ``anchors`` without ``every``.
    """
    if anchors is not None and every is None:
        raise ValueError("reverse_sweep: anchors need their interval every=")
    x, x_bar, params_bar, _ = _reverse_sweep(block, params, y, y_bar, key, anchors, every, aux)
    return x, x_bar, params_bar


def _floating(value: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(value), jnp.inexact)


def _sum_dtype(value: Any) -> Any:
    return jnp.promote_types(jnp.result_type(value), jnp.float32)


def _reverse_sweep(
    block, params, y, y_bar, key, anchors, every, aux, shared=None, log_det_bar=None
):
    """:func:`reverse_sweep`, plus the gradient of ``shared`` parameters (given to every layer
    as ``(params_l, shared)``, see :mod:`revjax.closure`) summed over the layers in at least
    float32; None for non-floating shared values (and for ``shared=None``). With
    ``log_det_bar``, the cotangent of the summed ``log_det`` of the layers, each layer steps
    with :func:`revjax.coupling.reconstruct_and_vjp_with_log_det`."""
    if log_det_bar is None:
        step, extra = reconstruct_and_vjp(block), ()
    else:
        step, extra = reconstruct_and_vjp_with_log_det(block), (log_det_bar,)
    # Running sums of the shared gradient; a scalar placeholder for non-floating values.
    totals = None
    if shared is not None:
        totals = tuple(
            jnp.zeros_like(c, _sum_dtype(c)) if _floating(c) else jnp.zeros(()) for c in shared
        )

    def body(carry, inputs):
        y_l, y_bar_l, totals_ = carry
        p, layer, side = inputs
        if anchors is not None:
            y_l = restart_at_anchor(
                y_l, jax.tree.map(lambda buf: buf[layer // every], anchors), layer, every
            )
        layer_step = with_aux(step, block, side)
        p = p if shared is None else (p, shared)
        x_l, x_bar_l, p_bar = call_with_key(
            layer_step, p, y_l, y_bar_l, *extra, key=layer_key(key, layer)
        )
        if shared is not None:
            p_bar, shared_bar = p_bar
            totals_ = tuple(
                t + b.astype(t.dtype) if _floating(c) else t
                for t, b, c in zip(totals_, shared_bar, shared, strict=True)
            )
        return (x_l, x_bar_l, totals_), p_bar

    depth = stack_depth(params)
    (x, x_bar, totals), params_bar = lax.scan(
        body, (y, y_bar, totals), (params, jnp.arange(depth), aux), reverse=True
    )
    if shared is None:
        return x, x_bar, params_bar, None
    shared_bar = tuple(
        t.astype(jnp.result_type(c)) if _floating(c) else None
        for t, c in zip(totals, shared, strict=True)
    )
    return x, x_bar, params_bar, shared_bar


def _reversible_scan_bwd(block, every, check, log_det, narrow, residuals, cotangents):
    params, y, anchors, aux, key, shared = residuals
    # aux is returned under stop_gradient: its cotangent is zero. log_det_bar is None when the
    # log-det was not asked for (its output is None).
    y_bar, log_det_bar, _ = cotangents
    _, x_bar, params_bar, shared_bar = _reverse_sweep(
        block, params, y, y_bar, key, anchors, every, aux, shared, log_det_bar
    )
    return params_bar, x_bar, None, shared_bar


_reversible_scan.defvjp(_reversible_scan_fwd, _reversible_scan_bwd)


def prepare_stack(
    block: Coupling,
    params: PyTree,
    x: PyTree,
    key: Key | None,
    policy: Policy | None,
    where: str,
    *,
    check_inverse: bool = True,
) -> tuple[Coupling, PyTree, int, RangeCheck | None]:
    """Validates a stack's inputs and applies ``policy`` (``check_inverse``: see
    :func:`check_block`; plain backprop never calls the inverse).

    Returns ``(block, x, depth, check)``: the block with the policy applied, the input stream in
    the policy's stream dtype, the number of layers ``L``, and exact mode's range check (or
    None). Errors name ``where``.
    """
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"{where}: policy must be a revjax.precision.Policy, got {policy!r}")
    depth = stack_depth(params, where=where)
    check_stream(x, where=where)
    check_key(key, where=where)
    if not isinstance(block, Coupling):
        raise TypeError(f"{where}: block must be a revjax.Coupling, got {type(block).__name__}")
    block, x = apply_policy(block, policy), to_stream(x, policy)
    check_block(block, params, x, key, where=where, check_inverse=check_inverse)
    return block, x, depth, range_check(policy, where)


def reversible_scan(
    block: Coupling,
    params: PyTree,
    x: PyTree,
    *,
    key: Key | None = None,
    checkpoint_every: int | None = None,
    policy: Policy | None = None,
    return_aux: bool = False,
    return_log_det: bool = False,
) -> PyTree | tuple:
    """Applies ``L`` stacked reversible layers, with a backward pass that stores no activations.

    Equal in value and gradient (up to reconstruction round-off) to :func:`plain_scan`, i.e.
    ``lax.scan`` of ``block.forward`` over the layers. Branches may close over values traced by
    an enclosing ``jax.vmap`` or ``jax.grad``; those become parameters shared by every layer
    (:mod:`revjax.closure`), at one more branch evaluation per layer in the backward pass.

    Args:
      block: the layer, a :class:`revjax.Coupling`.
      params: pytree whose leaves all have leading axis ``L``; layer ``l`` uses ``leaf[l]``.
      x: the input stream, a pytree of floating arrays (for Feistel couplings, ``(x1, x2)``).
      key: optional PRNG key; layer ``l`` is called with ``layer_key(key, l)`` in both passes.
      checkpoint_every: optional anchor interval ``k`` dividing ``L``. The forward pass stores
        the exact stream after every ``k`` layers (``L / k`` streams) and the backward pass
        restarts reconstruction from them, so round-off accumulates over ``k`` layers instead
        of ``L``, at no extra compute. ``k = L`` (the default) stores only the output; ``k = 1``
        stores every layer's output, the memory of per-layer checkpointing.
      policy: optional :class:`revjax.precision.Policy` (compute dtype of the branches, stream
        dtype, matmul precision, exact fixed-point mode). ``x`` is cast to the stream dtype
        (and snapped to the grid in exact mode) on entry; the gradient w.r.t. ``x`` comes back
        in ``x``'s dtypes.
      return_aux: also return the blocks' side information (e.g. batch norm's batch
        statistics, for updating running statistics once per step), stacked over layers and
        under ``stop_gradient``.
      return_log_det: also return ``sum_l block.log_det(params_l, x_{l-1})``, the stack's
        ``log|det dy/dx|`` (summed over all elements, float32 or wider), differentiable: the
        backward pass adds its cotangent layer by layer while reconstructing, still storing
        no activations (normalising flows: ``log p(x) = log p_z(y) + log_det``). Couplings
        built by revjax fold it into their fused step; other blocks, and blocks rebuilt
        because their branches close over traced values (which have no fused step), pay one
        ``jax.vjp`` of ``log_det`` per layer, i.e. another evaluation of the branches.

    Returns:
      ``y = x_L``, same structure and shapes as ``x``, in the policy's stream dtype (``x``'s
      dtypes without a policy); with ``return_log_det`` and/or ``return_aux``, the tuple
      ``(y, log_det, aux)`` without the ones not asked for.

    Raises:
      ValueError: params with no array leaves, a scalar params leaf, leaves with different
        leading axes, ``L = 0``, a block that changes the stream's structure, shapes or dtypes
        (e.g. a branch returning the wrong shape), a ``checkpoint_every`` below 1 or that does
        not divide ``L``, or ``return_log_det`` for a block without a scalar ``log_det``.
      TypeError: a non-floating stream leaf, a block that is not a ``Coupling``, a ``key`` that
        is not one PRNG key (or None), a ``checkpoint_every`` that is not an int, or a
        ``policy`` that is not a :class:`~revjax.precision.Policy`.
      OverflowError: (when the computation runs, wrapped in JAX's runtime error) in exact mode, a
        layer whose output leaves the fixed-point range; the message names the first such layer.

    Warns:
      LowPrecisionStreamWarning: when differentiated (traced for a gradient) with a 16-bit
        floating stream that no policy named, i.e. a bfloat16/float16 ``x`` without a policy
        stream dtype (:class:`revjax.precision.LowPrecisionStreamWarning`).
    """
    block, x, depth, check = prepare_stack(block, params, x, key, policy, "reversible_scan")
    every = anchor_interval(depth, checkpoint_every)
    log_det = (
        log_det_dtype(block, params, x, key, where="reversible_scan") if return_log_det else None
    )
    # Values the branches close over that an enclosing vmap/grad traces become explicit shared
    # parameters of the custom_vjp (revjax.closure); otherwise the block is used as it is.
    # Traced at layer 0's actual arguments, whose types (e.g. shard_map's varying axes) the
    # replayed jaxprs must match; the slices are dead code unless hoisting happens.
    block, shared = hoist_traced_constants(
        block, jax.tree.map(lambda a: a[0], params), x, layer_key(key, 0), log_det=return_log_det
    )
    narrow = implicit_narrow_stream(x, policy)
    y, total, aux = _reversible_scan(block, every, check, log_det, narrow, params, x, key, shared)
    return _outputs(y, total, aux, return_log_det, return_aux)


def _outputs(y: PyTree, log_det: Any, aux: PyTree, return_log_det: bool, return_aux: bool):
    """``y``, or the tuple ``(y, log_det, aux)`` without the parts not asked for (``aux``
    under ``stop_gradient``)."""
    extra = ([log_det] if return_log_det else []) + ([lax.stop_gradient(aux)] if return_aux else [])
    return (y, *extra) if extra else y


def plain_scan(
    block: Coupling,
    params: PyTree,
    x: PyTree,
    *,
    key: Key | None = None,
    remat: bool = False,
    policy: Policy | None = None,
    return_aux: bool = False,
    return_log_det: bool = False,
) -> PyTree | tuple:
    """The non-reversible twin of :func:`reversible_scan`: ``lax.scan`` of ``block.forward``.

    Differentiating it stores every layer's activations (``remat=False``, plain backprop) or only
    each layer's input, recomputing the layer in the backward pass (``remat=True``, per-layer
    ``jax.checkpoint``). Layers get the same keys, and ``policy``, ``return_aux`` and
    ``return_log_det`` the same meaning, as in :func:`reversible_scan`, so the two compute the
    same network.
    """
    block, x, _, check = prepare_stack(
        block, params, x, key, policy, "plain_scan", check_inverse=False
    )
    log_det = log_det_dtype(block, params, x, key, where="plain_scan") if return_log_det else None
    y, _, aux, total = _forward(block, params, x, key, remat=remat, check=check, log_det=log_det)
    return _outputs(y, total, aux, return_log_det, return_aux)


def inverse_scan(
    block: Coupling,
    params: PyTree,
    y: PyTree,
    *,
    key: Key | None = None,
    policy: Policy | None = None,
    aux: PyTree | None = None,
) -> PyTree:
    """Inverts a whole stack: returns ``x`` with ``reversible_scan(block, params, x) == y``.

    Runs ``block.inverse`` from layer ``L - 1`` down to ``0`` with the same per-layer keys (and
    policy) as the forward pass. Differentiable by ordinary autodiff (which stores its
    activations). Blocks with side information (batch norm) need the ``aux`` that
    ``reversible_scan(..., return_aux=True)`` returned.

    Raises:
      ValueError: the block has side information and ``aux`` is missing, ``aux`` is given
        for a block without side information, or a leaf of ``aux`` has not ``L`` entries.
    """
    block, y, depth, _ = prepare_stack(block, params, y, key, policy, "inverse_scan")
    if block.aux is not None and aux is None:
        raise ValueError(
            "inverse_scan: this block's inverse needs side information from the forward pass "
            "(e.g. batch statistics); pass aux= from reversible_scan(..., return_aux=True)"
        )
    if block.aux is None and aux is not None:
        raise ValueError(
            "inverse_scan: aux= was given but this block has no side information (only blocks "
            "such as layers.batch_norm do), so it would be ignored; drop aux="
        )
    if aux is not None:  # else lax.scan's "different leading axis sizes: 3, 3, 3, 2, 2"
        lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(aux)}
        if lengths - {depth}:
            raise ValueError(
                f"inverse_scan: aux must hold one entry per layer (leading axis L = {depth}, "
                f"from params), got leading axes {sorted(lengths, key=str)}; pass the aux "
                "reversible_scan(..., return_aux=True) returned for these params"
            )

    def body(y_, inputs):
        p, layer, side = inputs
        inverse = with_aux(block.inverse, block, side)
        return call_with_key(inverse, p, y_, key=layer_key(key, layer)), None

    x, _ = lax.scan(body, y, (params, jnp.arange(depth), aux), reverse=True)
    return x


__all__ = [
    "inverse_scan",
    "plain_scan",
    "reverse_sweep",
    "reversible_scan",
]
