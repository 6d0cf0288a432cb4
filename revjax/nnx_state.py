"""Saving and restoring the state of Flax NNX graph nodes (a model, ``(model, optimizer)``).

:func:`save_state` writes every variable of a node as msgpack keyed by its path (PRNG keys as
their key data); :func:`restore_state` loads such a file back into a node of the same structure,
all or nothing, keeping each array's sharding. Both are re-exported by :mod:`revjax.nnx`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization
from jax.tree_util import keystr


def _flat_state(node: Any) -> dict[str, nnx.Variable]:
    """Every variable of ``node`` keyed by its ``/``-joined path; two paths that join to one
    key (a dict key containing ``/``) raise ``ValueError`` instead of one overwriting the
    other."""
    flat: dict[str, nnx.Variable] = {}
    for path, var in nnx.to_flat_state(nnx.state(node)):
        name = "/".join(map(str, path))
        if name in flat:
            raise ValueError(
                f"save_state/restore_state: two variables are both stored as {name!r} (a key "
                "containing '/'); rename one"
            )
        flat[name] = var
    return flat


def _is_key(value: Any) -> bool:
    return isinstance(value, jax.Array | jax.ShapeDtypeStruct) and jnp.issubdtype(
        value.dtype, jax.dtypes.prng_key
    )


def _stored_form(name: str, leaf: Any) -> np.ndarray:
    """One leaf of a variable's value as the array :func:`save_state` writes (key data for PRNG
    keys, NumPy arrays for Python scalars); a leaf that is no number (a string, an int past
    64 bits) raises ``TypeError`` naming the variable."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise TypeError(
            f"save_state: {name} is abstract ({leaf.dtype}{list(leaf.shape)}, a node built by "
            "nnx.eval_shape), so it has no values to save; save a concrete node, or fill this "
            "one with restore_state"
        )
    if _is_key(leaf):
        leaf = jax.random.key_data(leaf)
    try:
        stored = np.asarray(jax.device_get(leaf))
    except OverflowError:  # an int beyond 64 bits
        stored = np.asarray(leaf, dtype=object)
    if stored.dtype.kind in "OUS":  # objects, strings: msgpack takes arrays of numbers only
        raise TypeError(
            f"save_state: {name} holds a value of type {type(leaf).__name__} ({stored.dtype} "
            "as an array), not an array or a number that fits 64 bits; keep such values out "
            "of nnx variables"
        )
    return stored


def _stored_value(name: str, value: Any) -> np.ndarray | dict[str, np.ndarray]:
    """A variable's value as written: one array for an array or scalar (the common case, and
    the format of earlier files), else a dict of its leaves keyed by their path in the value
    (``jax.tree_util.keystr``: ``"[0]"``, ``"['a']"``; ``{}`` for a value with none: ``None``,
    an empty tuple, optax's ``MaskedNode`` of a frozen parameter)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(value)
    if jax.tree_util.treedef_is_leaf(treedef) and leaves:
        return _stored_form(name, value)
    return {keystr(path): _stored_form(name, leaf) for path, leaf in leaves}


def _weak(leaf: Any) -> bool:
    """Whether ``leaf`` is weakly typed: ``nnx.eval_shape`` makes a Python-scalar variable
    (``nnx.Variable(3)``) an abstract weak int32/float32, while its file holds int64/float64."""
    return bool(getattr(leaf, "weak_type", False))


def _same_spec(value: np.ndarray, expected: jax.ShapeDtypeStruct) -> bool:
    """The stored ``value`` has ``expected``'s shape and dtype (for a weakly typed abstract
    scalar: the same dtype once canonicalised, as JAX would convert it)."""
    if value.shape != expected.shape:
        return False
    if expected.weak_type:
        canonical = jax.dtypes.canonicalize_dtype
        return canonical(value.dtype) == canonical(expected.dtype)
    return value.dtype == expected.dtype


def _unrepresentable(value: np.ndarray, expected: jax.ShapeDtypeStruct) -> Any:
    """An entry of ``value`` that JAX's conversion to ``expected``'s canonical dtype would
    change past rounding (an int that wraps, a finite float that becomes inf), else ``None``.
    Only a weakly typed abstract scalar converts: other leaves keep the stored dtype."""
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(expected.dtype))
    if not expected.weak_type or value.dtype == dtype or value.size == 0:
        return None
    if np.issubdtype(dtype, np.integer) and np.issubdtype(value.dtype, np.integer):
        info = np.iinfo(dtype)
        bad = (value < info.min) | (value > info.max)
    elif np.issubdtype(dtype, np.floating) and np.issubdtype(value.dtype, np.floating):
        with np.errstate(over="ignore"):
            bad = np.isfinite(value) & ~np.isfinite(value.astype(dtype))
    else:
        return None
    return value[bad].flat[0].item() if bad.any() else None


def _stored_spec(leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype of ``_stored_form(leaf)``, without copying a device array to the host
    (and for an abstract leaf, a ``jax.ShapeDtypeStruct`` from ``nnx.eval_shape``)."""
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
        if _is_key(leaf):
            return jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=_weak(leaf))
    stored = np.asarray(leaf)
    return jax.ShapeDtypeStruct(stored.shape, stored.dtype)


def save_state(node: Any, path: str | Path) -> None:
    """Writes every variable of ``node`` to ``path`` as msgpack, keyed by the variable's path.

    ``node`` is any NNX graph node: a module, or e.g. ``(model, optimizer)`` to save parameters,
    optimiser moments and RNG streams together. PRNG keys are stored as their key data; a
    variable holding a pytree (a tuple sown by ``sow``, optax's empty ``MaskedNode`` for a
    parameter that ``optax.masked``/``multi_transform`` freezes, ``None``) as its leaves. The
    file is written to a temporary name and renamed, so an interrupted save leaves the
    previous file whole.

    Raises:
      TypeError: a variable holds something that is not an array or number (e.g. a string),
        naming it.
    """
    flat = {name: _stored_value(name, var.get_value()) for name, var in _flat_state(node).items()}
    path = Path(path)
    data = serialization.msgpack_serialize(flat)
    # A temporary of its own in the same folder (two savers never share one), flushed to disk
    # before the rename, so the file at ``path`` is always one whole save.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        partial = Path(f.name)
    try:
        partial.write_bytes(data)
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _restored_leaf(current: Any, value: np.ndarray) -> Any:
    """``value`` (checked to have ``current``'s stored shape and dtype) in ``current``'s form:
    a NumPy array stays one, a Python or NumPy scalar stays one, a (possibly abstract) JAX
    array is placed with its sharding, a PRNG key gets its implementation back."""
    if isinstance(current, np.ndarray):
        return value
    if not isinstance(current, jax.Array | jax.ShapeDtypeStruct):
        return type(current)(value.item())
    if _is_key(current):
        # An abstract key (nnx.eval_shape) has no key_impl; its dtype carries the impl.
        impl = current.dtype._impl if isinstance(current, jax.ShapeDtypeStruct) else None
        value = jax.random.wrap_key_data(value, impl=impl or jax.random.key_impl(current))
    sharding = getattr(current, "sharding", None)
    return jnp.asarray(value) if sharding is None else jax.device_put(value, sharding)


def restore_state(node: Any, path: str | Path) -> None:
    """Loads :func:`save_state`'s file into ``node`` (same structure as when saved) in place.

    All or nothing: every variable is checked before any is written, so a file that does not
    match leaves ``node`` untouched. Each array keeps the sharding the node's variable had
    (a tensor-parallel model stays sharded); Python scalars stay Python scalars. ``node`` may
    be abstract (built by ``nnx.eval_shape``, so never initialised): its variables then get
    arrays, placed by the shardings the abstract values carry.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: the file is not msgpack written by :func:`save_state`, or its variables
        differ from the module's (missing or extra paths, or a
        different shape, dtype or number of leaves), naming the first differences; or a
        Python scalar saved from a concrete module does not fit the dtype an abstract
        module's scalar takes (an int past int32, a float past float32 without x64).
    """
    raw = Path(path).read_bytes()  # FileNotFoundError names the path
    try:
        saved = serialization.msgpack_restore(raw)
    except Exception as err:  # msgpack's own errors ("unpack(b) received extra data") name no file
        raise ValueError(
            f"restore_state: {path} is not a checkpoint written by save_state (msgpack: {err})"
        ) from err
    if not isinstance(saved, dict):
        raise ValueError(
            f"restore_state: {path} is not a checkpoint written by save_state (it holds a "
            f"{type(saved).__name__}, not variables by path)"
        )
    target = _flat_state(node)
    missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or extra:
        raise ValueError(
            f"restore_state: {path} does not match the module: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    updates = []
    for name, var in target.items():  # check everything first: nothing is written on error
        current, stored = var.get_value(), saved[name]
        leaves, treedef = jax.tree.flatten(current)
        whole = jax.tree_util.treedef_is_leaf(treedef) and leaves
        paths = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(current)[0]]
        if isinstance(stored, dict):  # a pytree's leaves, by their paths in the value
            found = f"leaves {sorted(stored)}"
            values = [stored.get(p) for p in paths]
        else:
            found, values = "one array", [stored]
        if bool(whole) != (found == "one array") or (not whole and set(stored) != set(paths)):
            expected = (
                "one array" if whole else f"{type(current).__name__} of leaves {sorted(paths)}"
            )
            raise ValueError(
                f"restore_state: {name} is {found} in {path} but {expected} in the module"
            )
        for leaf, value in zip(leaves, values, strict=True):
            expected = _stored_spec(leaf)
            if not isinstance(value, np.ndarray) or not _same_spec(value, expected):
                shown = f"{value.dtype}{list(value.shape)}" if hasattr(value, "shape") else value
                raise ValueError(
                    f"restore_state: {name} is {shown} in {path} but "
                    f"{expected.dtype}{list(expected.shape)} in the module"
                )
            bad = _unrepresentable(value, expected)
            if bad is not None:  # JAX's conversion would wrap it or make it inf, silently
                canonical = jax.dtypes.canonicalize_dtype(expected.dtype)
                raise ValueError(
                    f"restore_state: {name} is {bad} in {path}, which {canonical} cannot hold; "
                    "the module is abstract, so this Python scalar would become a JAX array of "
                    f"that dtype. Restore into a concrete module (it keeps Python scalars), or "
                    "enable jax_enable_x64"
                )
        new = [_restored_leaf(leaf, value) for leaf, value in zip(leaves, values, strict=True)]
        updates.append((var, new[0] if whole else jax.tree.unflatten(treedef, new)))
    for var, new in updates:
        var.set_value(new)


__all__ = ["restore_state", "save_state"]
