"""Moonwalk layers: a forward map together with its vector-inverse-Jacobian product.

For a layer ``y = f(theta, x)`` with Jacobian ``J = dy/dx`` and a cotangent ``a`` of its input,
the **vijp** is the output cotangent ``b`` solving ``b J = a``. It exists for every ``a`` in the
row space of ``J`` and is unique when ``J`` has full row rank, i.e. when the layer is
*submersive* (surjective Jacobian): every invertible layer is, and so is a width-reducing
linear map of full rank. A :class:`Layer` bundles what the gradient methods of
:mod:`revjax.moonwalk` need:

* ``forward(params, x) -> y``;
* ``step(params, x, x_bar) -> (y, y_bar, params_bar)``: the forward-sweep step, the vijp
  ``y_bar`` plus the parameter gradient ``y_bar dy/dtheta`` it releases;
* ``save_forward(params, x) -> (y, residual)`` and ``pull(params, residual, y, y_bar) ->
  (x or None, x_bar)``: an input-only backward step that needs only ``residual`` (what mixed
  Moonwalk stores per layer) and, when ``needs_output``, the layer's output; a layer that
  ``reconstructs`` returns its input too, which its predecessor may need as *its* output.
* ``coupling``: the :class:`revjax.Coupling` behind an unstacked layer, if any, and
  ``revforward(params, x) -> y``: the forward pass through :func:`revjax.reversible_scan`
  (RevBackprop), None for a layer that is not a coupling; call it through
  :meth:`Layer.reversible_forward`, which raises ``TypeError`` naming such a layer.

A step or pull takes its cotangent in any floating dtype and casts it to its primal's before
it meets a pullback, so layers of different dtypes (a bfloat16 layer, then a float32 one)
compose. A step returns ``y_bar`` in the wider of ``y``'s dtypes and the precision it was
computed in; a pull, which need not know ``x``'s, leaves that cast to its caller. The sweep
never narrows a cotangent below the precision it was computed in before a layer needs it:
``value_and_grad`` keeps ``h_0`` in the wider of its own and ``x``'s dtypes
(:func:`widen_like`), so a bfloat16 input into float32 layers starts the sweep from a float32
``h_0``, and a float32 ``y_bar`` out of a bfloat16 leaky ReLU reaches the float32 layer after it
unrounded, as backprop's float32 layers see float32 cotangents.

Layer constructors here: :func:`from_coupling` (any Coupling without side information),
:func:`leaky_relu`, :func:`submersive_linear`, :func:`dense` (explicit-Jacobian fallback for
small layers), and the combinators :func:`chain` (composition) and :func:`stack` (``lax.scan``
over stacked params).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from revjax._validate import (
    check_representable_in,
    positive_float,
    raise_on_host,
    real_scalar,
)
from revjax.coupling import Coupling, reconstruct_and_vjp, sequence
from revjax.scan import reversible_scan, stack_depth

PyTree = Any


class Layer(NamedTuple):
    """One Moonwalk layer; see the module docstring for the meaning of each field."""

    name: str
    forward: Callable[[PyTree, PyTree], PyTree]
    step: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree, PyTree]]
    save_forward: Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]
    pull: Callable[[PyTree, PyTree, PyTree, PyTree], tuple[PyTree | None, PyTree]]
    reconstructs: bool = False
    needs_output: bool = False
    coupling: Coupling | None = None
    revforward: Callable[[PyTree, PyTree], PyTree] | None = None

    def reversible_forward(self, params: PyTree, x: PyTree) -> PyTree:
        """``forward`` through ``reversible_scan``; ``TypeError`` for a non-coupling layer."""
        if self.revforward is None:
            raise TypeError(
                f"layer {self.name!r} is not a reversible coupling, so RevBackprop cannot "
                "reconstruct its input; use method='moonwalk', 'mixed_moonwalk' or 'backprop'"
            )
        return self.revforward(params, x)


def check_layer(layer: Any, where: str) -> Layer:
    """``layer`` if it is a Moonwalk :class:`Layer`, else a ``TypeError`` saying how to get one."""
    if not isinstance(layer, Layer):
        raise TypeError(
            f"{where}: expected a revjax.moonwalk Layer (from moonwalk.from_coupling, dense, "
            f"leaky_relu, submersive_linear, chain or stack), got {type(layer).__name__}"
        )
    return layer


def cast_like(cotangent: PyTree, primal: PyTree) -> PyTree:
    """``cotangent`` in ``primal``'s floating dtypes, leaf by leaf (other leaves as they are).

    A pullback takes a cotangent only in its primal's dtype, and in a network whose layers have
    different dtypes (a bfloat16 layer, then a float32 one) the cotangent a layer receives comes
    out in its neighbour's dtype; each step and pull casts it before it meets a pullback."""
    inexact = lambda a: jnp.issubdtype(jnp.result_type(a), jnp.inexact)
    return jax.tree.map(
        lambda c, a: c.astype(jnp.result_type(a)) if inexact(c) and inexact(a) else c,
        cotangent,
        primal,
    )


def widen_like(cotangent: PyTree, primal: PyTree) -> PyTree:
    """``cotangent`` in the wider of its own and ``primal``'s floating dtypes, leaf by leaf:
    :func:`cast_like` where the cotangent is narrower, unchanged where it is wider (a float32
    ``h_0`` of a bfloat16 input stays float32; rounding it to bfloat16 put a bfloat16-sized
    error, 1.4e-3, into every parameter gradient of a float32 network)."""
    inexact = lambda a: jnp.issubdtype(jnp.result_type(a), jnp.inexact)

    def widen(c, a):
        if not (inexact(c) and inexact(a)):
            return c
        return c.astype(jnp.promote_types(jnp.result_type(c), jnp.result_type(a)))

    return jax.tree.map(widen, cotangent, primal)


def _single_array(x: PyTree, where: str) -> jax.Array:
    """``x`` when it is one array (these layers act on one stream), else ``ValueError``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(
            f"{where}: acts on one array, got {type(x).__name__} {jax.tree.structure(x)}; "
            "apply it to one part of a pytree stream inside a coupling's branch instead"
        )
    return x


def vijp(layer: Layer, params: PyTree, x: PyTree, cotangent: PyTree) -> PyTree:
    """The output cotangent ``b`` with ``b J = cotangent``, ``J = d forward / dx`` at ``x``."""
    return check_layer(layer, "moonwalk.vijp").step(params, x, cotangent)[1]


# --------------------------------------------------------------------------------------------
# Couplings: invertible, so b = a J^-1 = a (dx/dy) is the vjp of the inverse.


def from_coupling(block: Coupling, name: str = "coupling") -> Layer:
    """A Moonwalk layer from any :class:`revjax.Coupling` without side information (``aux``,
    e.g. :func:`revjax.layers.batch_norm`'s batch statistics: ``TypeError``, a Moonwalk sweep
    does not carry it).

    Uses the coupling's fused ``vijp_step`` when it has one (the couplings of
    :mod:`revjax.coupling` do), else ``y_bar = vjp(inverse at y)(x_bar)`` (``J^-1 = dx/dy``)
    and the parameter cotangent by ``jax.vjp`` of ``forward``. Mixed Moonwalk stores nothing for
    it: its backward step reconstructs the input from the output, as in RevBackprop.
    """
    if not isinstance(block, Coupling):
        raise TypeError(f"from_coupling({name!r}): expected a revjax.Coupling, got {block!r}")
    if block.aux is not None:
        raise TypeError(
            f"from_coupling({name!r}): the block needs side information from the forward pass "
            "(e.g. batch norm's batch statistics), which a Moonwalk sweep does not carry"
        )

    def generic_step(params, x, x_bar):
        y, forward_pullback = jax.vjp(block.forward, params, x)
        # inverse(y) comes out in the dtypes y and the params promote to, not necessarily x's
        # (a bfloat16 x through float32 params gives a float32 y, and a float32 inverse).
        x_again, inverse_pullback = jax.vjp(lambda y_: block.inverse(params, y_), y)
        (y_bar,) = inverse_pullback(cast_like(x_bar, x_again))
        return y, y_bar, forward_pullback(y_bar)[0]

    def fused_step(params, x, x_bar):
        # Not narrowed to x's dtypes: the fused step casts each branch's cotangent to that
        # branch's output dtype itself and combines the rest in the cotangent's precision.
        y, y_bar, params_bar = block.vijp_step(params, x, widen_like(x_bar, x))
        return y, widen_like(y_bar, y), params_bar

    backward = reconstruct_and_vjp(block)

    def pull(params, residual, y, y_bar):
        # forward at the reconstructed input returns y's dtypes again, so y_bar is cast to
        # those (jit drops the unused parameter cotangent).
        x, x_bar, _ = backward(params, y, cast_like(y_bar, y))
        return x, x_bar

    return Layer(
        name=name,
        forward=block.forward,
        step=generic_step if block.vijp_step is None else fused_step,
        save_forward=lambda params, x: (block.forward(params, x), None),
        pull=pull,
        reconstructs=True,
        needs_output=True,
        coupling=block,
        revforward=lambda params, x: _reversible_single(block, params, x, name),
    )


def _reversible_single(block: Coupling, params: PyTree, x: PyTree, name: str) -> PyTree:
    """One coupling through :func:`reversible_scan` (a stack of ``L = 1``). A parameter-free
    block (an invertible activation, a squeeze) gets a zero-size dummy layer axis, since
    ``reversible_scan`` reads ``L`` from the params."""
    out = jax.eval_shape(lambda p, x_: block.forward(p, x_), params, x)
    describe = lambda tree: jax.tree.map(lambda a: f"{jnp.result_type(a)}{list(a.shape)}", tree)
    if describe(out) != describe(x):
        raise TypeError(
            "method='revbackprop' runs couplings through reversible_scan, whose stream keeps "
            f"its shape and dtype from layer to layer; layer {name!r} maps "
            f"{describe(x)} to {describe(out)} (e.g. a squeeze). Use method='backprop' or "
            "'mixed_moonwalk' for a network with it."
        )
    if jax.tree.leaves(params):
        return reversible_scan(block, jax.tree.map(lambda a: jnp.asarray(a)[None], params), x)
    free = Coupling(
        forward=lambda _, x_: block.forward(params, x_),
        inverse=lambda _, y: block.inverse(params, y),
    )
    return reversible_scan(free, jnp.zeros((1, 0)), x)


# --------------------------------------------------------------------------------------------
# Elementwise: invertible leaky ReLU, one bit per element for mixed Moonwalk.


def leaky_relu(slope: float = 0.1, name: str = "leaky_relu") -> Layer:
    """``y = x`` for ``x >= 0``, ``slope x`` otherwise; parameter-free (params ``None``).

    vijp: ``b = a / sigma'(x)``, elementwise, with ``sigma' in {1, slope}`` known from ``x`` in
    the forward sweep. Mixed Moonwalk stores ``x >= 0`` packed 8 per byte along the last axis.

    Raises:
      ValueError: ``slope <= 0`` (``slope = 0`` makes the Jacobian singular, a negative slope
        makes the map non-injective), a slope that is not one finite real number (``bool``,
        a string, an array), or (at trace time) one that rounds to 0 in the input's dtype
        (``1e-8`` in float16: the vijp would divide by 0) or overflows to inf (``1e5``), or an
        input that is not one array.
    """
    where = f"leaky_relu({name!r})"
    slope = positive_float(slope, "slope", where)  # 0: a singular Jacobian

    def forward(params, x):
        x = _single_array(x, where)
        check_representable_in(
            slope,
            x.dtype,
            "slope",
            where,
            "the Jacobian is singular or infinite there; use a slope nearer 1",
        )
        return jnp.where(x >= 0, x, slope * x)

    def derivative(positive, stream, like):
        # The slope as forward applies it, rounded to the stream's dtype (0.3 is 0.30078 in
        # bfloat16), in the cotangent's dtype: the exact 0.3 misstated bfloat16's by 2.6e-3.
        applied = jnp.asarray(slope, stream.dtype).astype(like.dtype)
        return jnp.where(positive, jnp.ones((), like.dtype), applied)

    def step(params, x, x_bar):
        y = forward(params, x)
        # Divided in the cotangent's own precision (not rounded to x's, before or after).
        x_bar = widen_like(x_bar, x)
        return y, widen_like(x_bar / derivative(x >= 0, x, x_bar), y), params

    def save_forward(params, x):
        # The signs, plus a zero-size array that records x's dtype (the slope's rounding).
        return forward(params, x), (jnp.packbits(x >= 0, axis=-1), jnp.zeros((0,), x.dtype))

    def pull(params, residual, y, y_bar):
        bits, stream = residual
        positive = jnp.unpackbits(bits, axis=-1, count=y_bar.shape[-1]).astype(bool)
        return None, y_bar * derivative(positive, stream, y_bar)

    return Layer(name, forward, step, save_forward, pull)


# --------------------------------------------------------------------------------------------
# Submersive linear: y = x W + c, W = [U; V] with U unit upper triangular (k x k).


def init_submersive_linear(
    key: jax.Array,
    width_in: int,
    width_out: int,
    *,
    scale: float = 1.0,
    dtype: Any = jnp.float32,
    name: str = "submersive_linear",
) -> dict[str, jax.Array]:
    """Params of :func:`submersive_linear` from ``width_in = n`` to ``width_out = k <= n``.

    ``upper (k, k)`` (only its strict upper triangle is used), ``lower (n - k, k)``, ``bias (k,)``;
    the off-diagonal entries ~ N(0, scale^2 / n).

    Raises:
      ValueError: ``k > n``: a width-increasing linear map cannot be submersive.
    """
    if width_out > width_in or width_out < 1:
        raise ValueError(
            f"submersive_linear({name!r}): maps width {width_in} to {width_out}; only "
            "width-preserving or width-reducing linear layers (1 <= out <= in) are submersive"
        )
    k1, k2 = jax.random.split(key)
    std = scale / width_in**0.5
    return {
        "upper": (std * jax.random.normal(k1, (width_out, width_out))).astype(dtype),
        "lower": (std * jax.random.normal(k2, (width_in - width_out, width_out))).astype(dtype),
        "bias": jnp.zeros((width_out,), dtype),
    }


def submersive_weight(params: dict[str, jax.Array], name: str = "submersive_linear") -> jax.Array:
    """``W = [I + triu(upper, 1); lower]``, shape ``(n, k)``: full column rank ``k`` always.

    Raises:
      ValueError: ``params`` not a mapping with exactly ``upper (k, k)``, ``lower (n - k, k)``
        and ``bias (k,)`` (a ``bias`` of shape ``(1,)`` was broadcast silently).
    """
    keys = sorted(params) if isinstance(params, Mapping) else None
    if keys != ["bias", "lower", "upper"]:
        raise ValueError(
            f"submersive_linear({name!r}): expects params {{'upper', 'lower', 'bias'}} (from "
            f"init_submersive_linear); got {keys if keys is not None else type(params).__name__}"
        )
    upper, lower, bias = params["upper"], params["lower"], params["bias"]
    k = upper.shape[-1]
    if upper.shape != (k, k) or lower.ndim != 2 or lower.shape[-1] != k or bias.shape != (k,):
        raise ValueError(
            f"submersive_linear({name!r}): expected upper (k, k), lower (n - k, k) and bias "
            f"(k,); got upper {upper.shape}, lower {lower.shape}, bias {bias.shape}"
        )
    unit_upper = jnp.eye(k, dtype=upper.dtype) + jnp.triu(upper, 1)
    return jnp.concatenate([unit_upper, lower], axis=0)


def submersive_linear(name: str = "submersive_linear") -> Layer:
    """``y = x W + bias`` with ``W = [U; V]``, ``U`` unit upper triangular; ``x (..., n)``.

    vijp: ``b W^T = a`` restricted to the first ``k`` coordinates is ``b U^T = a[..., :k]``, a
    unit-triangular solve that always has a unique solution (the remaining ``n - k`` equations
    hold whenever ``a`` is in the row space of ``J``, as every backpropagated cotangent is).
    Mixed Moonwalk stores nothing: ``x_bar = y_bar W^T`` needs only the weights.
    """

    def forward(params, x):
        w = submersive_weight(params, name)
        x = _single_array(x, f"submersive_linear({name!r})")
        if x.shape[-1] != w.shape[0]:
            raise ValueError(
                f"submersive_linear({name!r}): input width {x.shape[-1]} does not match the "
                f"weight's {w.shape[0]}"
            )
        return x @ w + params["bias"]

    def step(params, x, x_bar):
        y, pullback = jax.vjp(forward, params, x)
        u = submersive_weight(params, name)[: y.shape[-1]]
        # Solved in the cotangent's own precision (not rounded to x's, before or after).
        a = widen_like(x_bar, x)[..., : y.shape[-1]]
        flat = a.reshape(-1, a.shape[-1])  # solve U b^T = a^T for every row at once
        flat = flat.astype(jnp.promote_types(flat.dtype, u.dtype))
        y_bar = jax.scipy.linalg.solve_triangular(u, flat.T, lower=False, unit_diagonal=True)
        y_bar = y_bar.T.reshape(a.shape).astype(jnp.promote_types(a.dtype, y.dtype))
        return y, y_bar, pullback(cast_like(y_bar, y))[0]

    def pull(params, residual, y, y_bar):
        return None, y_bar @ submersive_weight(params, name).T

    return Layer(name, forward, step, lambda params, x: (forward(params, x), None), pull)


# --------------------------------------------------------------------------------------------
# Dense fallback: the explicit per-example Jacobian.


def _separating_masks(batch: int) -> np.ndarray:
    """``(2 ceil(log2 batch), batch)`` bool masks such that for any two examples ``a != b`` one
    mask holds ``a`` and not ``b``: the examples whose index has bit ``k`` set, and those whose
    index has it clear, for each bit ``k`` (two indices differ in some bit)."""
    index = np.arange(batch)
    bits = [(index >> k) & 1 == 1 for k in range(max(batch - 1, 0).bit_length())]
    return np.array([m for bit in bits for m in (bit, ~bit)], dtype=bool).reshape(-1, batch)


def _first_mixed_row(pullback: Callable[[jax.Array], jax.Array], y: jax.Array) -> jax.Array:
    """Index of the first input row of a map ``(batch, n) -> (batch, k)`` that reaches another
    row's output, else -1, from its ``pullback`` (the vjp in ``x``) at output ``y``: one vjp per
    separating mask (see ``_separating_masks``), the cotangent set in the mask's rows only; rows
    acting alone give exactly zero input cotangents outside. Reverse mode, so a
    ``jax.custom_vjp`` inside the map is fine."""
    masks = _separating_masks(y.shape[0])
    if not masks.size:
        return jnp.int32(-1)
    probe = jax.random.normal(jax.random.key(0), y.shape, jnp.float32).astype(y.dtype)

    def outside_responses(inside):
        x_bar = pullback(jnp.where(inside[:, None], probe, 0).astype(y.dtype))
        return jnp.any(jnp.abs(x_bar) > 0, axis=-1) & ~inside

    mixed = jnp.any(lax.map(outside_responses, jnp.asarray(masks)), axis=0)
    first = jnp.min(jnp.where(mixed, jnp.arange(y.shape[0]), y.shape[0]))
    return jnp.where(first < y.shape[0], first, -1)


def _raise_if_singular(worst, first_nonfinite, nonfinite, mixed_at, *, name, tolerance):
    # Scalars reduced on the device (one entry each per vmapped call), so every device of a
    # sharded batch holds them whole and raises alike (see revjax._validate.raise_on_host).
    worst, first_nonfinite, nonfinite, mixed_at = (
        np.atleast_1d(np.asarray(a)) for a in (worst, first_nonfinite, nonfinite, mixed_at)
    )
    if np.any(mixed_at >= 0):
        raise ValueError(
            f"dense({name!r}): forward mixes examples (the input of row "
            f"{int(mixed_at[mixed_at >= 0].min())} reaches another row's output, e.g. through a "
            "batch mean), but dense takes each row's Jacobian alone, so its vijp would be "
            "wrong; write the layer as a coupling (from_coupling) or use method='backprop'"
        )
    if np.any(nonfinite > 0):
        row, count = int(first_nonfinite[nonfinite > 0].min()), int(nonfinite.sum())
        raise ValueError(
            f"dense({name!r}): the Jacobian has non-finite entries at batch row {row} ({count} "
            "row(s) in all; a NaN or inf in the input, the params or the layer), so the vijp "
            "is undefined"
        )
    worst = abs(float(np.min(worst)))  # >= 0; abs() prints a -0.0 singular value as "0"
    if not worst > tolerance:
        raise ValueError(
            f"dense({name!r}): the layer is not submersive at this input: its Jacobian's "
            f"smallest/largest singular value ratio is {worst:g} <= {tolerance:g}, so the vijp "
            "b J = a has no unique solution"
        )


def dense(
    forward: Callable[[PyTree, jax.Array], jax.Array],
    name: str = "dense",
    *,
    tolerance: float = 1e-6,
) -> Layer:
    """A layer with an explicit-Jacobian vijp, for small layers and for testing.

    ``forward(params, x)`` maps ``x (batch, n)`` to ``(batch, k)`` acting on each row
    independently (checked at run time by ``2 ceil(log2 batch)`` vjps, each with a cotangent in
    one subset of the rows; ``gradients.first_coupled_example`` checks losses alike). The vijp
    computes each row's ``k x n`` Jacobian ``J = U S V^T`` and returns ``b = a V S^-1 U^T``
    (exact for ``a`` in the row space). The Jacobians come from ``k <= n`` vjps of the batched
    ``forward``, the cotangent ``e_j`` in every row at once (rows are independent, so row
    ``b`` of the result is row ``b``'s ``e_j J``): ``forward`` runs on the whole batch, as
    called, so per-example values it closes over (a mask, a conditioning vector) line up with
    their rows, and a ``jax.custom_vjp`` inside it, such as ``revjax.activations.gelu``, works
    under ``method="mixed_moonwalk"``. Mixed Moonwalk stores the input.

    ``tolerance``: the smallest accepted ratio of smallest to largest singular value, a
    finite number in ``[0, 1)``.

    The SVD runs in float32 at least (XLA has no bfloat16/float16 SVD); ``y_bar`` is cast back
    to the output's dtype.

    Raises:
      ValueError: ``tolerance`` outside ``[0, 1)`` or not a real number (at construction); (at
        trace time, in the vijp) ``x`` not of shape ``(batch, n)``, the output
        not ``(batch, k)``, or ``k > n``; or (at run time, through ``jax.debug.callback``) a
        ``forward`` that mixes rows, or a Jacobian whose singular values have a ratio ``<=
        tolerance`` or are not finite; all name the layer. Under ``jax.jit`` the run-time
        error reaches the caller wrapped in ``jax.errors.JaxRuntimeError`` (the callback's
        exception cannot cross the compiled call), with the same message.
    """

    number = real_scalar(tolerance)
    if number is None or not 0 <= number < 1:  # NaN too: every layer was then refused
        raise ValueError(
            f"dense({name!r}): tolerance is the smallest accepted singular value ratio, a "
            f"number in [0, 1); got {tolerance!r}"
        )
    tolerance = number

    def step(params, x, x_bar):
        shape = lambda a: getattr(a, "shape", jax.tree.structure(a))
        if getattr(x, "ndim", None) != 2:
            raise ValueError(
                f"dense({name!r}): expects x of shape (batch, n), one row per example (its "
                f"Jacobian is taken row by row); got x of shape {shape(x)}. Flatten each "
                "example to a row, or use method='backprop'"
            )
        y, pullback = jax.vjp(forward, params, x)
        if getattr(y, "ndim", None) != 2 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"dense({name!r}): expects forward(params, x) of shape (batch, k) for x of shape "
                f"(batch, n) = {x.shape}; got {shape(y)}"
            )
        if y.shape[-1] > x.shape[-1]:
            raise ValueError(
                f"dense({name!r}): maps width {x.shape[-1]} to {y.shape[-1]}; a width-increasing "
                "layer is not submersive, so its vijp does not exist"
            )
        # Row b of the x-cotangent of e_j in every row is row b's e_j J (rows independent):
        # the Jacobians (batch, k, n) from k vjps of forward as called. A forward run on one row
        # at a time gave every row the first row of a per-example array forward closes over.
        unit = lambda j: jnp.broadcast_to(jnp.eye(y.shape[-1], dtype=y.dtype)[j], y.shape)
        jac = jnp.moveaxis(jax.vmap(lambda j: pullback(unit(j))[1])(jnp.arange(y.shape[-1])), 0, 1)
        solve_dtype = jnp.promote_types(jac.dtype, jnp.float32)
        u, s, vt = jnp.linalg.svd(jac.astype(solve_dtype), full_matrices=False)
        largest = s[:, 0]  # an all-zero Jacobian has ratio 0 (singular), not 0/0
        ratio = jnp.where(largest > 0, s[:, -1] / jnp.where(largest > 0, largest, 1), 0.0)
        finite = jnp.all(jnp.isfinite(jac), axis=(1, 2))
        rows = jnp.arange(x.shape[0])
        raise_on_host(
            functools.partial(_raise_if_singular, name=name, tolerance=tolerance),
            jnp.min(ratio, initial=jnp.inf),
            jnp.min(jnp.where(finite, x.shape[0], rows), initial=x.shape[0]),
            jnp.sum(~finite),
            _first_mixed_row(lambda y_bar: pullback(y_bar)[1], y),
        )
        x_bar = widen_like(x_bar, x)
        coefficients = jnp.einsum("bn,bkn->bk", x_bar.astype(solve_dtype), vt) / s
        y_bar = jnp.einsum("bk,bjk->bj", coefficients, u)
        y_bar = y_bar.astype(jnp.promote_types(x_bar.dtype, y.dtype))  # not rounded below either
        return y, y_bar, pullback(cast_like(y_bar, y))[0]

    def pull(params, x, y, y_bar):
        y_again, pullback = jax.vjp(lambda x_: forward(params, x_), x)
        return None, pullback(cast_like(y_bar, y_again))[0]

    return Layer(name, forward, step, lambda params, x: (forward(params, x), x), pull)


# --------------------------------------------------------------------------------------------
# Combinators.


def _like(params: tuple | list, items: list) -> tuple | list:
    """``items`` in the sequence type of ``params`` (tuple, list or a NamedTuple)."""
    if isinstance(params, list):
        return type(params)(items)
    return type(params)(*items) if hasattr(params, "_fields") else tuple(items)


def chain(*layers: Layer, name: str = "chain") -> Layer:
    """Composition ``layers[-1] o ... o layers[0]`` with ``params = (params_0, ..., params_n)``.

    Mixed Moonwalk stores each layer's residual, plus the output of a layer that needs it in its
    backward step unless the next layer reconstructs it (or it is the chain's output).
    """
    if not layers:
        raise ValueError(f"chain({name!r}) needs at least one layer")
    for i, layer in enumerate(layers):
        check_layer(layer, f"chain({name!r}) item {i}")
    n = len(layers)
    keep_output = [
        layers[i].needs_output and i < n - 1 and not layers[i + 1].reconstructs for i in range(n)
    ]

    def _params(params):
        if not (isinstance(params, tuple | list) and len(params) == n):
            raise ValueError(
                f"chain({name!r}) of {n} layers expects a tuple of {n} per-layer params; got "
                f"{type(params).__name__} {jax.tree.structure(params)}"
            )
        return params

    def forward(params, x):
        for layer, p in zip(layers, _params(params), strict=True):
            x = layer.forward(p, x)
        return x

    def step(params, x, x_bar):
        grads = []
        for layer, p in zip(layers, _params(params), strict=True):
            # Widened to x's precision at least (not narrowed: see widen_like) for Layers written
            # elsewhere; each step casts to its pullback's dtype itself.
            x, x_bar, g = layer.step(p, x, widen_like(x_bar, x))
            grads.append(g)
        return x, x_bar, _like(params, grads)

    def save_forward(params, x):
        residuals = []
        for layer, p, keep in zip(layers, _params(params), keep_output, strict=True):
            x, r = layer.save_forward(p, x)
            residuals.append((r, x if keep else None))
        return x, tuple(residuals)

    def pull(params, residuals, y, y_bar):
        params = _params(params)
        for i in reversed(range(n)):
            r, stored = residuals[i]
            y_i = stored if keep_output[i] else y
            y, y_bar = layers[i].pull(params[i], r, y_i, y_bar)
        return y, y_bar

    def revforward(params, x):
        for layer, p in zip(layers, _params(params), strict=True):
            x = layer.reversible_forward(p, x)
        return x

    couplings = [layer.coupling for layer in layers]
    return Layer(
        name=name,
        forward=forward,
        step=step,
        save_forward=save_forward,
        pull=pull,
        reconstructs=layers[0].reconstructs,
        needs_output=layers[-1].needs_output,
        coupling=None if None in couplings else sequence(*couplings),
        revforward=revforward,
    )


def stack(layer: Layer, name: str | None = None) -> Layer:
    """``L`` copies of ``layer`` run by ``lax.scan``; every params leaf has leading axis ``L``.

    The forward sweep carries ``(x, x_bar)`` and emits each layer's gradient, so its memory is
    one layer's working set whatever ``L``. Mixed Moonwalk stores the stacked residuals (and the
    per-layer outputs only if the layer needs them and cannot reconstruct them).
    """
    layer = check_layer(layer, "moonwalk.stack")  # before its name is read, named or not
    name = name or f"stack({layer.name})"
    keep_output = layer.needs_output and not layer.reconstructs

    def forward(params, x):
        stack_depth(params, where=name)
        return lax.scan(lambda x_, p: (layer.forward(p, x_), None), x, params)[0]

    def step(params, x, x_bar):
        stack_depth(params, where=name)

        def body(carry, p):
            y, y_bar, g = layer.step(p, *carry)
            return (y, cast_like(y_bar, carry[1])), g  # the carry keeps its dtypes

        (y, y_bar), grads = lax.scan(body, (x, widen_like(x_bar, x)), params)
        return y, y_bar, grads

    def save_forward(params, x):
        stack_depth(params, where=name)

        def body(x_, p):
            y_, r = layer.save_forward(p, x_)
            return y_, (r, y_ if keep_output else None)

        return lax.scan(body, x, params)

    def pull(params, residuals, y, y_bar):
        rs, outputs = residuals

        def body(carry, inputs):
            y_, y_bar_ = carry
            p, r, stored = inputs
            x_, x_bar_ = layer.pull(p, r, stored if keep_output else y_, y_bar_)
            # The scan carry keeps its dtypes; a stack's layers keep the stream's dtype.
            return (x_ if layer.reconstructs else y_, cast_like(x_bar_, y_bar_)), None

        (x, x_bar), _ = lax.scan(body, (y, y_bar), (params, rs, outputs), reverse=True)
        return (x if layer.reconstructs else None), x_bar

    def revforward(params, x):
        if layer.coupling is not None:  # one custom_vjp for the whole stack
            return reversible_scan(layer.coupling, params, x)
        # A stack of stacks (or chains of them): scan the inner layer's own RevBackprop
        # forward; a layer that is not reversible raises there, naming itself.
        stack_depth(params, where=name)
        return lax.scan(lambda x_, p: (layer.reversible_forward(p, x_), None), x, params)[0]

    return Layer(
        name=name,
        forward=forward,
        step=step,
        save_forward=save_forward,
        pull=pull,
        reconstructs=layer.reconstructs,
        needs_output=layer.needs_output,
        revforward=revforward,
    )


__all__ = [
    "Layer",
    "chain",
    "dense",
    "from_coupling",
    "init_submersive_linear",
    "leaky_relu",
    "stack",
    "submersive_linear",
    "submersive_weight",
    "vijp",
]
