"""benchmarks/memory_depth.py measures the right computations: all six methods give backprop's
gradient (so its memory table compares like with like)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import memory_depth as bench
from revjax.diagnostics import relative_error
from revjax.models.mlp import init_mlp_stack


@pytest.mark.parametrize("depth", [8, 12])  # 12: groups of k = 3, not a power of two
def test_every_method_computes_the_backprop_gradient(depth):
    params = init_mlp_stack(jax.random.key(0), depth, bench.WIDTH, bench.HIDDEN)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = tuple(jax.random.normal(k, (16, bench.WIDTH)) for k in (k1, k2))
    reference = jax.jit(bench.gradient("backprop", depth))(params, x)
    for method in bench.METHODS[1:]:
        grads = jax.jit(bench.gradient(method, depth))(params, x)
        # float32 round-off of reconstruction / recomputation over <= 12 layers.
        assert float(relative_error(grads, reference)) <= 1e-5, method
