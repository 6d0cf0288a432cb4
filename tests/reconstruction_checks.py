"""DESIGN's numerics rule, "every path that reconstructs has a test of its error against stored
activations, at float32 and bfloat16, across depth", as one check the tests of each path call.

``reconstruction_report`` runs the stack forward storing every layer's input, then inverts from
the output layer by layer, as the backward pass does, and returns each layer's relative error.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from revjax.diagnostics import reconstruction_report
from revjax.precision import Policy, _cast_floats

# Measured over the paths that call this (additive MLP, affine, RevNet stage, NNX Stack,
# transformer stack; L = 2 and 16, CPU): float32 at most 1.6e-6 (the transformer at L = 16);
# a bfloat16 stream about 1e-3 to 6e-2, growing with the number of inverse steps; bfloat16
# compute on a float32 stream at most 2.8e-4 (affine at L = 16: a reconstructed input one
# float32 ulp off can round to another bfloat16 branch input). A broken inverse gives ~1.
FLOAT32_BOUND = 1e-5
BFLOAT16_STREAM_BOUND = 0.2
BFLOAT16_COMPUTE_BOUND = 1e-3


def _errors(block, params, x, dtype, policy=None) -> np.ndarray:
    params, x = _cast_floats(params, dtype), _cast_floats(x, dtype)
    report = reconstruction_report(block, params, x, policy=policy)
    return np.asarray(report["relative_error"])  # index 0: after L inverse steps; -1: after 1


def check_reconstruction_across_depth(make: Callable[[int], tuple], depths=(2, 16)) -> None:
    """``make(depth) -> (block, params, x)`` in float32. At each depth: the float32 stream
    reconstructs to ``FLOAT32_BOUND``; a bfloat16 stream (params and input cast) drifts
    visibly (> 1e-4, so the check really ran in bfloat16) but within
    ``BFLOAT16_STREAM_BOUND``; bfloat16 compute on a float32 stream stays within
    ``BFLOAT16_COMPUTE_BOUND``. Across depth: the bfloat16 stream's error after all ``L``
    inverse steps exceeds its error after one, and grows from the shallow stack to the deep."""
    deepest = []
    for depth in depths:
        block, params, x = make(depth)
        f32 = _errors(block, params, x, jnp.float32)
        assert f32.shape == (depth,) and f32.max() <= FLOAT32_BOUND, (depth, f32)
        bf16 = _errors(block, params, x, jnp.bfloat16)
        assert 1e-4 < bf16.min() and bf16.max() <= BFLOAT16_STREAM_BOUND, (depth, bf16)
        if depth > 1:
            assert bf16[0] > bf16[-1], (depth, bf16)
        mixed = _errors(block, params, x, jnp.float32, Policy(compute_dtype=jnp.bfloat16))
        assert mixed.max() <= BFLOAT16_COMPUTE_BOUND, (depth, mixed)
        deepest.append(bf16[0])
    assert deepest == sorted(deepest) and deepest[0] < deepest[-1], deepest
