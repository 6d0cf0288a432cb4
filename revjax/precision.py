"""Precision policies for reversible stacks: compute dtype, stream dtype, matmul precision, and
an exact fixed-point mode.

A reversible backward pass recomputes each layer's input from its output, ``x1 = y1 - f(x2)``.
In floating point ``(x1 + d) - d != x1`` in general, and the round-off compounds through depth:
with a bfloat16 residual stream (8 significand bits) a 64-layer stack's gradient can be
meaningless. A :class:`Policy` separates three things:

* ``compute_dtype``: what the branches f and g run in (their inputs and floating params are cast
  to it); their outputs are cast back to the stream dtype before being added.
* ``stream_dtype``: what the residual streams ``x1, x2`` are kept and added in. It defaults to
  float32 whenever the compute dtype is 16-bit (bfloat16/float16), so low-precision compute keeps
  a float32 stream (DESIGN.md, numerics policy).
* ``matmul_precision``: the ``jax.default_matmul_precision`` under which the block is traced, in
  the forward *and* the backward pass (the backward is traced by ``jax.grad``, outside whatever
  context the caller's forward ran in). On GPU, JAX's default rounds float32 matmul inputs to
  TF32; a reconstruction error of one ulp can flip that rounding, so ``"highest"`` is what makes a
  float32 stack reconstruct to float32 accuracy.

**Exact mode** (``fraction_bits=F``): the stream lives on the grid ``2^-F Z`` inside the range
``|x| < R = 2^(p - F)`` (``p`` = significand bits of the stream dtype, 24 for float32). Each branch
output is rounded onto the grid, ``q(d) = round(d 2^F) 2^-F``, with a straight-through gradient
(``dq/dd = 1``). Sums and differences of grid values within the range are exact in floating point,
so ``(x1 + q(d)) - q(d) == x1`` bit for bit: reconstruction is exact at any depth *provided the
branch output ``d`` has the same bits in the forward pass and in the backward pass's vjp*. XLA
does not promise that: a branch dividing by ``sqrt`` (``h / jnp.sqrt(v + eps)``, an RMSNorm or
LayerNorm written so) rounds differently in the two programs on CPU, so some ``q(d)`` land on
another grid point and the gradient is then less accurate than a float32 stream's (1.1e-4
against 1.3e-6 at L = 16); written with ``jax.lax.rsqrt`` it is not affected
(``tests/test_precision.py``). :func:`revjax.diagnostics.reconstruction_report` inverts by
``block.inverse``, not the backward pass, so it cannot see this. Where the two agree, the gradient
of :func:`revjax.reversible_scan` equals plain backprop of the same (quantised) network up to the
rounding of the gradient arithmetic itself, which XLA may order differently in the two programs
(bitwise equal for GELU-MLP branches; within float32 rounding, not compounding with depth, for
branches with a LayerNorm; ``tests/test_precision.py``). Leaving the range would silently break
exactness, so the forward pass checks every layer's output and raises ``OverflowError`` naming the
first offending layer (one host check per scan, not per layer). Only each layer's output is
checked: inside a ``sequence`` block an intermediate stream that leaves the range and comes back is
not caught. Exact mode needs additive couplings and permutations (a scale ``exp(s)`` leaves the
grid) and a float32/float64 stream.

``apply_policy`` rewrites a :class:`revjax.Coupling`; ``reversible_scan``, ``plain_scan``,
``inverse_scan`` and the diagnostics take ``policy=`` and apply it for you.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from revjax._validate import raise_on_host
from revjax.coupling import Coupling

PyTree = Any

_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_FLOATS = (*_SIXTEEN_BIT, jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
_PRECISION_NAMES = (
    "default",
    "high",
    "highest",
    "bfloat16",
    "tensorfloat32",
    "float32",
    # DEFAULT is a preset name jax.default_matmul_precision does not accept.
    *(name for name in lax.DotAlgorithmPreset.__members__ if name != "DEFAULT"),
)


def _as_float_dtype(value: Any, field: str) -> np.dtype | None:
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise TypeError(f"Policy.{field}: {value!r} is not a dtype") from err
    if dtype not in _FLOATS:
        raise TypeError(
            f"Policy.{field} must be one of {[d.name for d in _FLOATS]}, got {dtype.name}"
        )
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"Policy.{field}=float64 needs jax_enable_x64; without it JAX silently computes in "
            "float32"
        )
    return dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """Dtypes and matmul precision of a reversible stack; see the module docstring.

    Attributes:
      compute_dtype: dtype f and g compute in, or None to leave their inputs as they are.
      stream_dtype: dtype of the residual stream. None resolves to float32 when
        ``compute_dtype`` is bfloat16/float16, or in exact mode without a compute dtype; to
        ``compute_dtype`` when that is 32/64-bit; and otherwise to the input stream's own dtype.
        Branch outputs are cast to it before being added: with ``compute_dtype`` None a stream
        narrower than the branches' outputs (bfloat16 with float32 params) rounds them, which is
        accepted (the outputs' dtype is not known here), unlike the explicit narrower pair.
      matmul_precision: a ``jax.default_matmul_precision`` name (``"default"``, ``"high"``,
        ``"highest"``, ``"float32"``, ... or a ``lax.DotAlgorithmPreset`` name), or None to
        inherit the caller's.
      fraction_bits: ``F`` for exact fixed-point mode (grid ``2^-F``, range ``2^(p - F)``), or
        None for a floating stream.

    Raises:
      TypeError: a dtype that is not bfloat16/float16/float32/float64.
      ValueError: a stream narrower than the compute dtype (e.g. float16 stream with bfloat16
        compute, whose outputs would overflow or round when added), float64 without x64, an
        unknown matmul precision, exact mode on a 16-bit stream, or ``F`` out of range.
    """

    compute_dtype: Any = None
    stream_dtype: Any = None
    matmul_precision: str | None = None
    fraction_bits: int | None = None

    def __post_init__(self):
        compute = _as_float_dtype(self.compute_dtype, "compute_dtype")
        stream = _as_float_dtype(self.stream_dtype, "stream_dtype")
        exact = self.fraction_bits is not None
        if stream is None:
            if (compute is not None and compute in _SIXTEEN_BIT) or (exact and compute is None):
                stream = jnp.dtype(jnp.float32)
            elif compute is not None:
                stream = compute
        both = compute is not None and stream is not None
        if both and jnp.promote_types(compute, stream) != stream:
            raise ValueError(
                f"Policy: a {stream.name} stream cannot hold {compute.name} branch outputs "
                "without rounding or overflow; use a stream at least as wide as the compute "
                "dtype (e.g. stream_dtype=float32 with compute_dtype=bfloat16)"
            )
        if self.matmul_precision is not None and self.matmul_precision not in _PRECISION_NAMES:
            raise ValueError(
                f"Policy.matmul_precision={self.matmul_precision!r} is not a "
                f"jax.default_matmul_precision name; choose from {list(_PRECISION_NAMES)}"
            )
        if exact:
            if isinstance(self.fraction_bits, bool) or not isinstance(
                self.fraction_bits, numbers.Integral
            ):
                raise TypeError(
                    f"Policy.fraction_bits must be an int, got {type(self.fraction_bits).__name__}"
                )
            # A NumPy integer becomes a Python int, so equal policies compare and hash equal.
            object.__setattr__(self, "fraction_bits", int(self.fraction_bits))
            if stream not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
                raise ValueError(
                    f"Policy: exact mode needs a float32 or float64 stream, got {stream.name} "
                    "(the significand of a 16-bit float, 11 bits for float16 and 8 for "
                    "bfloat16, leaves no useful fixed-point range)"
                )
            significand = jnp.finfo(stream).nmant + 1
            if not 0 <= self.fraction_bits < significand:
                raise ValueError(
                    f"Policy.fraction_bits={self.fraction_bits} must lie in [0, {significand - 1}] "
                    f"for a {stream.name} stream (range 2^({significand} - fraction_bits))"
                )
        object.__setattr__(self, "compute_dtype", compute)
        object.__setattr__(self, "stream_dtype", stream)

    @property
    def exact(self) -> bool:
        """Whether the stream is fixed-point (``fraction_bits`` is set)."""
        return self.fraction_bits is not None

    @property
    def grid_range(self) -> float:
        """``R = 2^(p - F)``: exact mode keeps every stream value strictly inside ``(-R, R)``."""
        if not self.exact:
            raise ValueError("Policy.grid_range: only exact mode (fraction_bits set) has a range")
        return 2.0 ** (jnp.finfo(self.stream_dtype).nmant + 1 - self.fraction_bits)


def exact_policy(
    fraction_bits: int = 12, *, compute_dtype: Any = None, matmul_precision: str | None = None
) -> Policy:
    """Exact fixed-point mode on a float32 stream: grid ``2^-F``, range ``|x| < 2^(24 - F)``.

    The default ``F = 12`` gives a resolution of 2.4e-4 (each branch output moves by at most
    1.2e-4, finer than bfloat16's own rounding for outputs above 0.06) and a range of +-4096.
    Streams that grow further need fewer fraction bits; the range check says when.
    """
    return Policy(
        compute_dtype=compute_dtype, matmul_precision=matmul_precision, fraction_bits=fraction_bits
    )


# --------------------------------------------------------------------------------------------
# Fixed-point grid.


def round_to_grid(x: jax.Array, fraction_bits: int) -> jax.Array:
    """``round(x 2^F) 2^-F`` (round half to even) with a straight-through derivative of 1.

    Scaling by a power of two is exact, so ``r = round(x 2^F) 2^-F`` is the grid point nearest
    to ``x``. The result is written ``x + stop_gradient(r - x)``, which equals ``r`` bit for bit:
    ``r - x`` is exact (its bits are those of ``x`` below the grid, or ``r - x`` is within a
    factor of two of ``x``), so the sum is exactly the representable ``r``. Its derivative is
    1 at every order (no ``custom_jvp``: under JAX 0.10.2 one with an identity tangent got wrong
    second derivatives inside ``lax.scan``, ``tests/test_precision.py``).

    Raises:
      TypeError: ``fraction_bits`` is not an int (a bool, a float, a traced value).
      ValueError: ``2^F`` or ``2^-F`` is not a normal number of ``x``'s dtype (float32:
        ``|F| > 126``), where the scaling would give inf or 0 and the result NaN.

    A finite ``x`` comes back finite: one large enough that ``x 2^F`` overflows is on the grid
    already and is returned as it is.
    """
    if isinstance(fraction_bits, bool) or not isinstance(fraction_bits, numbers.Integral):
        raise TypeError(
            f"round_to_grid: fraction_bits must be a static int, got {type(fraction_bits).__name__}"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"round_to_grid: x must be a floating array, got {x.dtype}")
    info = jnp.finfo(x.dtype)
    limit = min(int(info.maxexp) - 1, -int(info.minexp))
    if abs(int(fraction_bits)) > limit:
        raise ValueError(
            f"round_to_grid: fraction_bits={fraction_bits} is out of range for {x.dtype} x: "
            f"2^F and 2^-F must be normal {x.dtype} numbers, |F| <= {limit}"
        )
    scale = 2.0**fraction_bits
    grid_point = (jnp.round(x * scale) / scale).astype(x.dtype)
    rounded = x + lax.stop_gradient(grid_point - x)
    # |x| >= 2^(nmant - F): x's spacing is at least 2^-F, so x is on the grid already, and
    # x 2^F may overflow (5.0 at F = 126 gave inf). Where 2^(nmant - F) is beyond the dtype's
    # range, so is every x 2^F.
    on_grid_from = 2.0 ** (int(info.nmant) - int(fraction_bits))
    if on_grid_from > float(info.max):
        return rounded
    return jnp.where(jnp.abs(x) >= on_grid_from, x, rounded)


def _max_abs(tree: PyTree) -> jax.Array:
    """Largest |entry| over all leaves, in the widest of their dtypes and float32; 0 for empty
    leaves (a zero-size batch).

    Reduced in that dtype, not in float32: a float64 stream's entry just inside the range
    (8191.9999 with a range of 8192) would round up to the bound in float32 and be reported
    as out of range.
    """
    leaves = jax.tree.leaves(tree)
    dtype = jnp.result_type(jnp.float32, *(jnp.result_type(leaf) for leaf in leaves))
    return functools.reduce(
        jnp.maximum,
        [jnp.max(jnp.abs(leaf), initial=0).astype(dtype) for leaf in leaves],
        jnp.zeros((), dtype),
    )


NO_LAYER, INPUT_LAYER = -1, -2  # RangeCheck codes: all in range; the input stream is out of range


def _raise_if_out_of_range(layer: np.ndarray, value: np.ndarray, *, policy: Policy, where: str):
    layer, value = np.atleast_1d(np.asarray(layer)), np.atleast_1d(np.asarray(value))
    bad = layer != NO_LAYER
    if np.any(bad):
        # Under vmap the callback sees one entry per example; report the earliest failure.
        i = int(np.argmin(np.where(bad, layer, np.iinfo(layer.dtype).max)))
        culprit = (
            "the input stream" if layer[i] == INPUT_LAYER else f"the output of layer {layer[i]}"
        )
        raise OverflowError(
            f"{where}: exact mode: {culprit} has max |x| = {float(value[i]):g}, "
            f"outside the fixed-point range (-{policy.grid_range:g}, {policy.grid_range:g}) of "
            f"fraction_bits={policy.fraction_bits}; reconstruction would no longer be exact. "
            "Use fewer fraction_bits (each halves the resolution and doubles the range) or "
            "bound the branches' outputs."
        )


class RangeCheck:
    """Finds the first layer whose output leaves exact mode's range, and reports it on the host.

    ``out_of_range(y) -> (bool, max|y|)`` is traced into the scan body; the scan carries the
    first offending layer (``NO_LAYER`` for none, ``INPUT_LAYER`` when the input itself is out of
    range) and ``report`` raises ``OverflowError`` after the scan through one
    ``jax.debug.callback``.
    """

    def __init__(self, policy: Policy, where: str):
        self.policy, self.where = policy, where

    def out_of_range(self, y: PyTree) -> tuple[jax.Array, jax.Array]:
        m = _max_abs(y)
        # ``not (m < R)`` also catches NaN; a true sum at or beyond R rounds to >= R (rounding
        # is monotone), so every inexact addition is caught.
        return jnp.logical_not(m < self.policy.grid_range), m

    def report(self, first_layer: jax.Array, value: jax.Array) -> None:
        raise_on_host(
            functools.partial(_raise_if_out_of_range, policy=self.policy, where=self.where),
            first_layer,
            value,
        )


def range_check(policy: Policy | None, where: str) -> RangeCheck | None:
    """The per-layer range check of an exact policy, None otherwise."""
    return RangeCheck(policy, where) if policy is not None and policy.exact else None


# --------------------------------------------------------------------------------------------
# Applying a policy.


class LowPrecisionStreamWarning(UserWarning):
    """A gradient is taken through a reversible stack whose residual stream is 16-bit floating
    point only because its input is (no policy names a stream dtype): the backward pass then
    reconstructs every layer's input in that dtype, and the round-off compounds with depth.
    Silence it by naming the stream: ``Policy(compute_dtype=jnp.bfloat16)`` keeps a float32
    stream, ``Policy(stream_dtype=jnp.bfloat16)`` keeps the 16-bit one on purpose (likewise
    ``jnp.float16``; the message names the stream's own dtype)."""


def implicit_narrow_stream(x: PyTree, policy: Policy | None) -> str | None:
    """The names of the 16-bit floating dtypes of the stream ``x`` (as the scan keeps it) when
    no ``policy`` names a stream dtype, e.g. ``"bfloat16"``; None otherwise."""
    if policy is not None and policy.stream_dtype is not None:
        return None
    names = {
        jnp.dtype(jnp.result_type(a)).name
        for a in jax.tree.leaves(x)
        if jnp.dtype(jnp.result_type(a)) in _SIXTEEN_BIT
    }
    return ", ".join(sorted(names)) or None


def warn_implicit_narrow_stream(dtype_names: str, where: str) -> None:
    """Issues :class:`LowPrecisionStreamWarning` for a stream of ``dtype_names`` (e.g.
    ``"float16"``), naming the policies that fix it in that dtype."""
    dtype = dtype_names.split(", ")[0]
    warnings.warn(
        f"{where}: differentiating through a {dtype_names} residual stream, the input's own "
        "dtype (no policy names a stream dtype): the backward pass reconstructs each layer's "
        "input in it and the round-off compounds with depth (a 64-layer bfloat16 stack's "
        f"gradient can be meaningless). Pass policy=Policy(compute_dtype=jnp.{dtype}) for "
        f"{dtype} branches on a float32 stream, or Policy(stream_dtype=jnp.{dtype}) to keep "
        "this stream on purpose (which also silences this warning); where no policy can be "
        "passed, a float32 input keeps a float32 stream",
        LowPrecisionStreamWarning,
        stacklevel=_stacklevel_outside_libraries(),
    )


def _stacklevel_outside_libraries() -> int:
    """The ``stacklevel`` that makes a warning issued by this function's caller name the
    innermost frame outside revjax, JAX and Flax: the user's line that calls the model or
    ``reversible_scan`` rather than the line of revjax (or of JAX's tracing machinery) that
    warns. 2 (the caller's caller) when every frame is inside them."""
    roots = tuple(
        os.path.dirname(module.__file__) + os.sep
        for name in ("revjax", "jax", "jaxlib", "flax")
        if (module := sys.modules.get(name)) is not None and getattr(module, "__file__", None)
    )
    frame, level = sys._getframe(2), 2  # the warning's issuer, at stacklevel 1
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(roots):
            return level
        frame, level = frame.f_back, level + 1
    return 2


def _cast_floats(tree: PyTree, dtype: np.dtype) -> PyTree:
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree
    )


def to_stream(x: PyTree, policy: Policy | None) -> PyTree:
    """The input stream in the policy's stream dtype, snapped onto the grid in exact mode (with a
    straight-through gradient, so ``d/dx`` is the identity cast back to ``x``'s dtypes)."""
    if policy is None:
        return x
    if policy.stream_dtype is not None:
        x = _cast_floats(x, policy.stream_dtype)
    if policy.exact:
        x = jax.tree.map(lambda a: round_to_grid(a, policy.fraction_bits), x)
    return x


def _branch_wrapper(policy: Policy) -> Callable[[Callable, str], Callable]:
    def wrap(fn, kind):
        if policy.exact and kind not in ("additive", "permutation"):
            raise ValueError(
                "exact mode needs additive couplings (and permutations); a block of kind "
                f"{kind!r} scales or bends the stream, which leaves the fixed-point grid"
            )
        if fn is None:  # a layer without branches, shown to the policy for the check above
            return None

        def branch(p, h, *key):
            if policy.compute_dtype is not None:
                p, h = _cast_floats(p, policy.compute_dtype), _cast_floats(h, policy.compute_dtype)
            out = fn(p, h, *key)
            if policy.exact:
                out = jax.tree.map(
                    lambda d: round_to_grid(d.astype(policy.stream_dtype), policy.fraction_bits),
                    out,
                )
            return out

        return branch

    return wrap


def _under_matmul_precision(fn: Callable | None, precision: str) -> Callable | None:
    if fn is None:
        return None

    @functools.wraps(fn)
    def traced_under_precision(*args, **kwargs):
        # Read when each dot_general is bound, i.e. while tracing: wrapping the block itself
        # covers the forward pass, the reconstruction and the vjps of the backward pass alike.
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return traced_under_precision


def apply_policy(block: Coupling, policy: Policy | None) -> Coupling:
    """``block`` with ``policy``'s compute dtype, exact grid and matmul precision applied.

    Branches are rewritten through ``block.map_branches``: floating inputs and params are cast to
    ``compute_dtype``; in exact mode outputs are cast to the stream dtype and rounded onto the
    grid. Every function of the block is then traced under ``matmul_precision``. The stream
    dtype is not the block's business: pass the stream through :func:`to_stream`. Layer-wise
    layers (:mod:`revjax.layers`) have no branches: they act on the stream itself and run in
    its dtype, untouched by ``compute_dtype``.

    Policies compose: a block that already carries one takes another (``apply_policy(
    apply_policy(block, a), b)``, or a policy-carrying block given to ``reversible_scan(...,
    policy=b)``). The first-applied policy's casts and matmul precision act innermost, so where
    the two set the same thing, the first one wins; set each thing once.

    Raises:
      TypeError: the policy must reach inside the branches (a compute dtype or exact mode) but
        the block is a hand-written Coupling without ``map_branches``.
      ValueError: exact mode on an affine coupling.
    """
    if policy is None:
        return block
    if policy.compute_dtype is not None or policy.exact:
        if block.map_branches is None:
            raise TypeError(
                "apply_policy: this Coupling has no map_branches, so a compute dtype or exact "
                "mode cannot reach inside its functions; build it with additive_coupling/"
                "affine_coupling/sequence, or do the casting in your own forward and inverse"
            )
        block = block.map_branches(_branch_wrapper(policy))
    if policy.matmul_precision is not None:
        precision_only = Policy(matmul_precision=policy.matmul_precision)
        under = lambda fn: _under_matmul_precision(fn, policy.matmul_precision)
        remap = block.map_branches
        block = block._replace(
            forward=under(block.forward),
            inverse=under(block.inverse),
            backward=under(block.backward),
            log_det=under(block.log_det),
            vijp_step=under(block.vijp_step),
            aux=under(block.aux),
            log_det_backward=under(block.log_det_backward),
            # Rebuilding the branches later (a second policy) must keep this precision.
            map_branches=None
            if remap is None
            else lambda wrap: apply_policy(remap(wrap), precision_only),
        )
    return block


__all__ = [
    "LowPrecisionStreamWarning",
    "Policy",
    "apply_policy",
    "exact_policy",
    "round_to_grid",
    "to_stream",
]
