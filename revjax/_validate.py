"""Argument checks shared by the public entry points, so every one words its errors alike.

Each check names the caller (``where``) and the argument; ``positive_int`` returns the value as a
Python ``int`` (a NumPy integer is accepted), so equal settings compare and hash equal.
"""

import math
import numbers
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(value: object, name: str, where: str) -> int:
    """``int(value)`` when ``value`` is an integer >= 1 (Python or NumPy; ``bool`` refused).

    Raises:
      ValueError: ``value`` is not such an integer; the message names ``where`` and ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    return int(value)


def real_scalar(value: object) -> float | None:
    """``value`` as a Python float when it is one real number (Python, NumPy or concrete JAX
    scalar; not ``bool``, a string, ``None``, complex, an array or a traced value), else None."""
    if isinstance(value, bool | str) or value is None or np.ndim(value) != 0:
        return None
    try:
        array = np.asarray(value)
    except TypeError:  # a tracer: not concrete
        return None
    return float(array) if array.dtype.kind in "iuf" else None


def positive_float(value: object, name: str, where: str) -> float:
    """``float(value)`` when ``value`` is a finite real number > 0 (see ``real_scalar``).

    Raises:
      ValueError: it is not; the message names ``where``, ``name`` and the value.
    """
    number = real_scalar(value)
    if number is None or not (math.isfinite(number) and number > 0):
        raise ValueError(f"{where}: {name} must be finite and > 0, got {value!r}")
    return number


def check_representable_in(value: float, dtype: Any, name: str, where: str, why: str) -> None:
    """Refuse a finite number > 0 that rounds to 0 (``1e-8`` in float16) or overflows to inf
    (``1e5`` in float16) in the floating ``dtype`` it is used in; non-floating dtypes pass.
    Dtypes are static, so this runs at trace time, under ``jit`` and in a scan's body too.

    Raises:
      ValueError: it does not fit; the message names ``where``, ``name``, the value, the dtype
        and ``why`` that is fatal.
    """
    if not jnp.issubdtype(dtype, jnp.floating):
        return
    with np.errstate(over="ignore"):  # the overflow is what is checked for
        rounded = float(np.asarray(value, dtype))
    if rounded == 0 or math.isinf(rounded):
        outcome = "rounds to 0" if rounded == 0 else "overflows to inf"
        raise ValueError(f"{where}: {name}={value} {outcome} in {np.dtype(dtype)}, so {why}")


def check_dropout_rate(rate: float, where: str) -> None:
    """Refuse a dropout rate outside ``[0, 1)`` (NaN included; rate 1 would divide by zero in
    inverted dropout), and one that is not a real number: ``bool`` (``dropout=False`` was
    taken as rate 0), a string, ``None``, a complex number or an array with more than one
    element. A Python, NumPy or concrete JAX scalar is accepted.

    Raises:
      ValueError: not such a number with ``0 <= rate < 1``; the message names ``where`` and
        the rate.
    """
    real = not isinstance(rate, bool | str) and rate is not None and np.ndim(rate) == 0
    real = real and np.asarray(rate).dtype.kind in "iuf"  # no bool, complex, object
    if not (real and 0.0 <= rate < 1.0):
        raise ValueError(f"{where}: dropout rate must lie in [0, 1), got {rate!r}")


def output_path_problem(path: str | os.PathLike, *, directory: bool = False) -> str | None:
    """Why ``path`` cannot be written, or None: checked before a long run, so a bad output path
    fails in a second instead of after the work. ``directory``: ``path`` is a folder that will
    be created if missing (``mkdir -p``); else a file to create or overwrite.

    A permission check (``os.access``) is skipped where it cannot tell (running as root)."""
    path = Path(path).resolve()
    if directory:
        if path.exists() and not path.is_dir():
            return f"{path} exists and is not a directory"
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            return f"{existing} is a file, so the directory {path} cannot be created"
        if not os.access(existing, os.W_OK):
            return f"directory {existing} is not writable"
        return None
    if path.is_dir():
        return f"{path} is a directory; name a file"
    if not path.parent.is_dir():
        existing = next(p for p in path.parents if p.exists())
        if not existing.is_dir():
            return f"{existing} is a file, so {path} cannot be created"
        return f"directory {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    return None


def raise_on_host(callback: Any, *scalars: Any) -> None:
    """Run ``callback(*scalars)`` on the host when the computation runs; it raises to report.

    ``scalars`` must be reduced on the device (every device of a sharded computation holds
    them whole), and every device calls ``callback`` (``partitioned=True``), so all raise
    alike. Called from one device only, a raise left the others waiting in the next
    collective: a data-parallel pure Moonwalk with a batch-coupled loss aborted the process
    (XLA's termination timeout) instead of raising. Under ``jax.jit`` the exception reaches
    the caller wrapped in ``jax.errors.JaxRuntimeError``, with its message.
    """
    jax.debug.callback(callback, *scalars, partitioned=True)
