"""timing: median of synchronised runs."""

import itertools

import jax.numpy as jnp
import pytest

from revjax import timing
from revjax.timing import median_ms


def test_median_ms_is_the_median_of_the_timed_synchronised_calls(monkeypatch):
    """A fake clock (no wall-clock dependence): runs of 5, 1, 9, 2 and 3 ms have median 3 ms
    (their mean is 4, the first 5); the 2 warmup calls are synchronised but not timed."""
    ticks = itertools.accumulate([0.0, 5e-3, 0.0, 1e-3, 0.0, 9e-3, 0.0, 2e-3, 0.0, 3e-3])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    calls, synchronised = [], []
    monkeypatch.setattr(timing.jax, "block_until_ready", lambda out: synchronised.append(out))

    def fn(x):
        calls.append(1)
        return x + 1

    ms = median_ms(fn, jnp.ones(3), repeats=5, warmup=2)
    assert ms == pytest.approx(3.0)
    assert len(calls) == 7 and len(synchronised) == 7
    assert all(float(out[0]) == 2.0 for out in synchronised)  # fn's outputs, each waited on


def test_median_ms_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        median_ms(lambda: 0, repeats=0)
