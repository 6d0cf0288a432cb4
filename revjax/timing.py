"""Wall-clock timing of jitted functions, synchronised with the device."""

from __future__ import annotations

import numbers
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from revjax._validate import positive_int


def median_ms(fn: Callable[..., Any], *args: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds over ``repeats`` runs.

    The first ``warmup`` calls (compilation, autotuning) are not timed; every call is
    synchronised with ``jax.block_until_ready``. Only GPU/TPU timings are claims: CPU numbers on
    a shared 2-core machine are for orientation.

    Raises:
      ValueError: ``repeats`` not an int >= 1 or ``warmup`` not an int >= 0.
    """
    positive_int(repeats, "repeats", "median_ms")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"median_ms: warmup must be an int >= 0, got {warmup!r}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


__all__ = [
    "median_ms",
]
