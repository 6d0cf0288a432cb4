"""Saving and restoring the state of Flax NNX graph nodes (a model, ``(model, optimizer)``).

:func:`save_state` writes every variable of a node as msgpack keyed by its path (PRNG keys as
their key data); :func:`restore_state` loads such a file back into a node of the same structure,
all or nothing, keeping each array's sharding. Both are re-exported by :mod:`revjax.nnx`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization


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


def _stored_form(value: Any) -> np.ndarray:
    """A variable's value as the array :func:`save_state` writes (key data for PRNG keys,
    NumPy arrays for Python scalars)."""
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    return np.asarray(jax.device_get(value))


def _stored_spec(value: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype of ``_stored_form(value)``, without copying a device array to the host."""
    if isinstance(value, jax.Array):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            return jax.eval_shape(jax.random.key_data, value)
        return jax.ShapeDtypeStruct(value.shape, value.dtype)
    stored = np.asarray(value)
    return jax.ShapeDtypeStruct(stored.shape, stored.dtype)


def save_state(node: Any, path: str | Path) -> None:
    """Writes every variable of ``node`` to ``path`` as msgpack, keyed by the variable's path.

    ``node`` is any NNX graph node: a module, or e.g. ``(model, optimizer)`` to save parameters,
    optimiser moments and RNG streams together. PRNG keys are stored as their key data.
    """
    flat = {name: _stored_form(var.get_value()) for name, var in _flat_state(node).items()}
    Path(path).write_bytes(serialization.msgpack_serialize(flat))


def restore_state(node: Any, path: str | Path) -> None:
    """Loads :func:`save_state`'s file into ``node`` (same structure as when saved) in place.

    All or nothing: every variable is checked before any is written, so a file that does not
    match leaves ``node`` untouched. Each array keeps the sharding the node's variable had
    (a tensor-parallel model stays sharded); Python scalars stay Python scalars.

    Raises:
      ValueError: the file's variables differ from the module's (missing or extra paths, or a
        different shape or dtype), naming the first differences.
    """
    saved = serialization.msgpack_restore(Path(path).read_bytes())
    target = _flat_state(node)
    missing, extra = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or extra:
        raise ValueError(
            f"restore_state: {path} does not match the module: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    updates = []
    for name, var in target.items():  # check everything first: nothing is written on error
        current, value = var.get_value(), saved[name]
        expected = _stored_spec(current)
        if value.shape != expected.shape or value.dtype != expected.dtype:
            raise ValueError(
                f"restore_state: {name} is {value.dtype}{list(value.shape)} in {path} but "
                f"{expected.dtype}{list(expected.shape)} in the module"
            )
        if isinstance(current, np.ndarray):  # a NumPy array stays one
            new = value
        elif not isinstance(current, jax.Array):  # a Python or NumPy scalar stays one
            new = type(current)(value.item())
        else:
            if jnp.issubdtype(current.dtype, jax.dtypes.prng_key):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(current))
            new = jax.device_put(value, current.sharding)
        updates.append((var, new))
    for var, new in updates:
        var.set_value(new)


__all__ = ["restore_state", "save_state"]
