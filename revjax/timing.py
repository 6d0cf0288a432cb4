"""Wall-clock timing of jitted functions, synchronised with the device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_ms(fn: Callable[..., Any], *args: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds over ``repeats`` runs.

    The first ``warmup`` calls (compilation, autotuning) are not timed; every call is
    synchronised with ``jax.block_until_ready``. Only GPU/TPU timings are claims: CPU numbers on
    a shared 2-core machine are for orientation.
    """
    if repeats < 1:
        raise ValueError(f"median_ms: repeats must be >= 1, got {repeats}")
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
