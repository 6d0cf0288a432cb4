"""Comparisons of two pytrees: relative error of the Euclidean norm, and bit equality.

The lowest layer of revjax's numerics: ``revjax.diagnostics`` re-exports
:func:`relative_error` and :func:`bitwise_equal` (their public home), and the Moonwalk drift
check uses :func:`relative_error` without depending on the diagnostics.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any


def metric_leaves(fn: str, *trees: PyTree) -> list[list[jax.Array]]:
    """The leaves of each tree, all cast to one metric dtype: float32, or float64 where a leaf
    is float64 (with x64 on), so a float64 comparison keeps float64's digits. Complex leaves
    are refused (their imaginary part would be dropped silently); ``float0`` leaves (integer
    inputs' gradients under ``allow_int``) count as zeros."""
    leaves = [jax.tree.leaves(tree) for tree in trees]
    dtypes = [jnp.result_type(leaf) for tree in leaves for leaf in tree]
    for dtype in dtypes:
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"{fn}: complex leaves are not supported (got {dtype})")
    floats = [d for d in dtypes if d != jax.dtypes.float0]
    dtype = jnp.result_type(jnp.float32, *floats)

    def cast(leaf):
        if jnp.result_type(leaf) == jax.dtypes.float0:
            return jnp.zeros(jnp.shape(leaf), dtype)
        return jnp.asarray(leaf, dtype)

    return [[cast(leaf) for leaf in tree] for tree in leaves]


def _dtype_of(leaves: list[jax.Array]) -> jnp.dtype:
    return leaves[0].dtype if leaves else jnp.dtype(jnp.float32)


def _power_of_two_scale(leaves: list[jax.Array]) -> jax.Array:
    """The int32 exponent ``e`` of the largest power of two ``2^e <= max |leaf|``, clipped to
    the normal range less two (float32: [-126, 126]) so that ``2^e`` and ``2^-e`` are normal
    numbers (XLA on CPU flushes a subnormal reciprocal to zero). Dividing by ``2^e`` is exact
    and leaves every entry below 4 in magnitude."""
    dtype = _dtype_of(leaves)
    info = jnp.finfo(dtype)
    peak = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(v), initial=0.0) for v in leaves], jnp.zeros((), dtype)
    )
    _, exponent = jnp.frexp(peak)
    return jnp.clip(exponent - 1, info.minexp, info.maxexp - 2)


def _scaled_norm(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(n, e)`` with ``||leaves|| = n * 2^e``: the Euclidean norm of all leaves jointly, taken
    after an exact power-of-two rescaling so that neither overflow (float32: |v| > 1e19) nor
    underflow (|v| < 1e-19) of the squares distorts it."""
    dtype = _dtype_of(leaves)
    exponent = _power_of_two_scale(leaves)
    scale = jnp.ldexp(jnp.ones((), dtype), exponent)
    total = sum((jnp.sum(jnp.square(v / scale)) for v in leaves), jnp.zeros((), dtype))
    return jnp.sqrt(total), exponent


def relative_norm(approx: list[jax.Array], reference: list[jax.Array]) -> jax.Array:
    """``||approx - reference|| / ||reference||`` of leaf lists in one float dtype (float32, or
    float64), robust to the extremes: inf when only the reference is zero, 0 when both are,
    NaN when any entry is NaN or inf."""
    # Both operands are divided by one common power of two 2^c first (exact), so that their
    # difference cannot overflow; then ||diff|| = d * 2^(d_exp + c), ||reference|| = r * 2^r_exp.
    common_exp = _power_of_two_scale([*approx, *reference])
    common = jnp.ldexp(jnp.ones((), _dtype_of([*approx, *reference])), common_exp)
    diff = [a / common - r / common for a, r in zip(approx, reference, strict=True)]
    diff_norm, diff_exp = _scaled_norm(diff)
    ref_norm, ref_exp = _scaled_norm(reference)
    ratio = diff_norm / jnp.where(ref_norm > 0, ref_norm, 1.0)
    # ldexp applies the exponent difference once: inf only if the true ratio exceeds float32.
    error = jnp.ldexp(ratio, diff_exp + common_exp - ref_exp)
    error = jnp.where(ref_norm > 0, error, jnp.where(diff_norm > 0, jnp.inf, 0.0))
    finite = functools.reduce(
        jnp.logical_and, [jnp.all(jnp.isfinite(v)) for v in [*approx, *reference]], jnp.bool_(True)
    )
    return jnp.where(finite, error, jnp.nan)


def relative_error(approx: PyTree, reference: PyTree) -> jax.Array:
    """``||approx - reference|| / ||reference||`` over all leaves jointly, in float32 (float64
    when a leaf is float64, with x64 on). Concrete leaves whose values float32 cannot hold (a
    NumPy float64 without x64, an integer dtype of 32 or more bits) are compared on the host in
    NumPy float64, and the result is a NumPy float64.

    The norm is the Euclidean norm of every leaf flattened and concatenated; both pytrees must
    have the same structure and shapes (real dtypes: complex leaves raise ``TypeError``). Every
    norm is taken after an exact power-of-two rescaling, so huge values (|g| > 1e19, whose
    squares overflow float32) and tiny ones (whose squares underflow) still give the right
    answer. Returns ``inf`` when the reference is zero and the approximation is not, 0 when both
    are zero (also for pytrees without leaves), and NaN when either holds a NaN or inf (never a
    misleading 0). Values are taken as normal numbers: XLA on CPU flushes float32 subnormals
    (``|v| < 1.2e-38``) to zero, so two arrays differing only there compare as equal. PRNG key
    leaves are refused (``TypeError`` naming the leaf).
    """
    if jax.tree.structure(approx) != jax.tree.structure(reference):
        raise ValueError(
            "relative_error: pytrees differ in structure: "
            f"{jax.tree.structure(approx)} vs {jax.tree.structure(reference)}"
        )
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(approx)]
    leaves = zip(paths, jax.tree.leaves(approx), jax.tree.leaves(reference), strict=True)
    for path, x, y in leaves:
        if _is_key(x) or _is_key(y):  # key_data's bits are not a quantity with a norm
            raise TypeError(
                f"relative_error: leaf {path or '(root)'} is a PRNG key array "
                f"({getattr(x, 'dtype', None)} vs {getattr(y, 'dtype', None)}); keys have no "
                "error to measure. Compare the parameters only (e.g. nnx.state(model, "
                "nnx.Param)), and keys with revjax.diagnostics.bitwise_equal"
            )
        if jnp.shape(x) != jnp.shape(y):  # broadcasting would give a meaningless number
            raise ValueError(
                f"relative_error: leaf {path or '(root)'} has shape {jnp.shape(x)} in approx "
                f"but {jnp.shape(y)} in reference"
            )
    if _wider_than_float32(approx, reference):
        return _host_relative_norm(jax.tree.leaves(approx), jax.tree.leaves(reference))
    return relative_norm(*metric_leaves("relative_error", approx, reference))


#: Dtypes whose values float32 cannot hold: float64's range and digits, integers above 2^24.
_WIDE = {np.dtype(d) for d in ("float64", "int32", "int64", "uint32", "uint64")}


def _wider_than_float32(*trees: PyTree) -> bool:
    """Whether the comparison must leave float32: a leaf, as given, of a dtype in ``_WIDE``
    where JAX would compute in float32 (a NumPy float64 without x64: ``1e-300`` became 0 and
    ``1e300`` inf, so ``relative_error`` said 0 or NaN; any integer above ``2^24``). Only for
    concrete leaves, which NumPy can read: under ``jit`` (tracers) the device path is kept."""
    leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return False
    given = [_given_dtype(leaf) for leaf in leaves if not _is_key(leaf)]
    if jax.config.jax_enable_x64:  # float64 stays float64 on the device: only integers
        return any(d in _WIDE and d.kind in "iu" for d in given)
    return any(d in _WIDE for d in given)


def _host_relative_norm(approx: list[Any], reference: list[Any]) -> np.float64:
    """:func:`relative_norm` in NumPy float64 on the host, same conventions (inf, 0, NaN)."""
    as_f64 = lambda leaves: [np.asarray(v, np.float64).ravel() for v in leaves]
    approx, reference = as_f64(approx), as_f64(reference)
    if not all(np.all(np.isfinite(v)) for v in [*approx, *reference]):
        return np.float64(np.nan)

    def norm(vectors):  # scaled by the largest entry so no square overflows or underflows
        peak = max((float(np.max(np.abs(v), initial=0.0)) for v in vectors), default=0.0)
        if peak == 0:
            return 0.0
        return peak * float(np.sqrt(sum(np.sum(np.square(v / peak)) for v in vectors)))

    with np.errstate(over="ignore"):  # a - r of two huge finite values may be inf: scaled below
        diff = [a - r for a, r in zip(approx, reference, strict=True)]
    if not all(np.all(np.isfinite(d)) for d in diff):
        common = max(float(np.max(np.abs(v), initial=0.0)) for v in [*approx, *reference])
        diff = [a / common - r / common for a, r in zip(approx, reference, strict=True)]
        diff_norm, ref_norm = norm(diff), norm([r / common for r in reference])
    else:
        diff_norm, ref_norm = norm(diff), norm(reference)
    if ref_norm == 0:
        return np.float64(np.inf if diff_norm > 0 else 0.0)
    return np.float64(diff_norm / ref_norm)


def _is_key(value: Any) -> bool:
    """Whether ``value`` is a typed PRNG key array (``jax.random.key``)."""
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _given_dtype(value: Any) -> Any:
    """The dtype of ``value`` as given (a NumPy float64 stays float64 without x64; a key array's
    dtype names its implementation)."""
    if _is_key(value):
        return value.dtype
    return np.dtype(value.dtype) if hasattr(value, "dtype") else np.dtype(jnp.result_type(value))


def _python_number(value: Any) -> bool:
    return isinstance(value, int | float | complex)


def _on_host(value: Any) -> bool:
    return isinstance(value, np.ndarray | np.generic)


def _host_bitwise_equal(x: np.ndarray, y: np.ndarray) -> bool:
    """:func:`bitwise_equal` of two NumPy arrays of one dtype, in NumPy."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x, y = np.stack([x.real, x.imag]), np.stack([y.real, y.imag])
    if jnp.issubdtype(x.dtype, jnp.floating):  # bfloat16 too (NumPy's issubdtype misses it)
        bits = np.dtype(f"uint{8 * x.dtype.itemsize}")
        x, y = np.ascontiguousarray(x).view(bits), np.ascontiguousarray(y).view(bits)
    return bool(np.array_equal(x, y))


def bitwise_equal(a: PyTree, b: PyTree) -> jax.Array:
    """Whether two pytrees have the same structure, shapes, dtypes and bit patterns (a boolean
    scalar; usable under ``jit``).

    Stricter than ``array_equal``: ``+0.0`` and ``-0.0`` differ, and a NaN equals a NaN with the
    same payload. This is the check behind every "bitwise" claim of revjax. Dtypes are those
    of the leaves as given, and two NumPy leaves are compared on the host: a NumPy float64 is
    neither float32 nor converted to it when JAX runs without x64, and two Python numbers are
    compared exactly (``1.0`` and ``1.0 + 1e-12`` differ; an int above ``2^31`` is no
    error), of the same Python type. PRNG key arrays (an NNX
    model's ``nnx.Rngs``) are equal when their implementations and key data are; ``float0``
    leaves (integer inputs' gradients) have no bits, so equal shapes suffice.
    """
    if jax.tree.structure(a) != jax.tree.structure(b):
        return jnp.bool_(False)
    same = [jnp.bool_(True)]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if _python_number(x) and _python_number(y):  # exactly, not rounded to float32/int32
            equal = type(x) is type(y) and _host_bitwise_equal(np.asarray(x), np.asarray(y))
            same.append(jnp.bool_(equal))
            continue
        if jnp.shape(x) != jnp.shape(y) or _given_dtype(x) != _given_dtype(y):
            return jnp.bool_(False)
        if _given_dtype(x) == jax.dtypes.float0:  # no bits: equal shapes are all there is
            continue
        if _on_host(x) and _on_host(y):
            same.append(jnp.bool_(_host_bitwise_equal(np.asarray(x), np.asarray(y))))
            continue
        if _is_key(x):  # the same implementation (dtype, above): compare the key data
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = jnp.asarray(x), jnp.asarray(y)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):  # compare both parts' bits
            x, y = jnp.stack([x.real, x.imag]), jnp.stack([y.real, y.imag])
        if jnp.issubdtype(x.dtype, jnp.floating):
            bits = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
            x, y = lax.bitcast_convert_type(x, bits), lax.bitcast_convert_type(y, bits)
        same.append(jnp.array_equal(x, y))
    return functools.reduce(jnp.logical_and, same)
