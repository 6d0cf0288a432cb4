"""timing: median of synchronised runs."""

import jax.numpy as jnp
import pytest

from revjax.timing import median_ms


def test_median_ms_counts_calls_and_is_positive():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    ms = median_ms(fn, jnp.ones(3), repeats=5, warmup=2)
    assert len(calls) == 7 and ms > 0


def test_median_ms_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        median_ms(lambda: 0, repeats=0)
