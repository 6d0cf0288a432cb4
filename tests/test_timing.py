"""timing: median of synchronised runs."""

import itertools
import re

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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 2.5}, "repeats must be a positive int, got 2.5"),  # was range's TypeError
        ({"warmup": -1}, "warmup must be an int >= 0, got -1"),  # was silently no warmup
        ({"warmup": 1.5}, "warmup must be an int >= 0, got 1.5"),
    ],
)
def test_median_ms_rejects_bad_counts_by_name(kwargs, message):
    calls = []
    with pytest.raises(ValueError, match=re.escape(f"median_ms: {message}")):
        median_ms(lambda: calls.append(1), **kwargs)
    assert not calls  # refused before running anything
