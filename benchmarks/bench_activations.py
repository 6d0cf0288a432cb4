"""Inverted GELU vs jax.nn.gelu vs dots_saveable checkpointing in a residual MLP stack.

16 residual blocks ``h + gelu(h W1 + b1) W2 + b2`` in a ``lax.scan``
(``revjax.models.mlp.residual_mlp_loss``; width 256, hidden 1024, batch 512, float32): compiled
temp memory of the gradient on any backend, and on GPU/TPU the median step time of 10 runs
(DESIGN.md section 4: no CPU timings). The JSON is rewritten after every variant, marked
``complete`` only at the end.

    python benchmarks/bench_activations.py          # writes activations_<backend>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ResultFile, add_out_argument, environment
from revjax import activations
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp, residual_mlp_loss
from revjax.timing import median_ms

DEPTH, WIDTH, HIDDEN, BATCH = 16, 256, 1024, 512
VARIANTS = {
    "jax.nn.gelu": (jax.nn.gelu, None),
    "revjax.activations.gelu": (activations.gelu, None),
    "jax.nn.gelu + dots_saveable": (jax.nn.gelu, jax.checkpoint_policies.dots_saveable),
    "jax.nn.silu": (jax.nn.silu, None),
    "revjax.activations.silu": (activations.silu, None),
}


def inputs():
    params = init_mlp(jax.random.key(0), DEPTH, WIDTH, HIDDEN)
    return params, jax.random.normal(jax.random.key(1), (BATCH, WIDTH))


def derivative_recovery() -> list[dict]:
    """Max |f'(recovered x) - f'(x)| on the test grid (400001 points over [-20, 20]), away from
    the minimum (|x - x_min| > 0.1) and everywhere, per function and dtype."""
    grid = jnp.linspace(-20.0, 20.0, 400_001, dtype=jnp.float32)
    out = []
    for fn, x_min in activations.MINIMA.items():
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            x = grid.astype(dtype)
            error = activations.derivative_error(fn, x)
            far = jnp.abs(x.astype(jnp.float32) - x_min) > 0.1
            out.append(
                {
                    "function": fn,
                    "dtype": jnp.dtype(dtype).name,
                    "max_error_far_from_minimum": float(jnp.max(jnp.where(far, error, 0.0))),
                    "max_error": float(jnp.max(error)),
                }
            )
            print(out[-1], flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    args = parser.parse_args(argv)
    params, x = inputs()
    timed = jax.default_backend() != "cpu"
    env = environment()
    payload = {
        "benchmark": "activations",
        "env": env,
        "config": {"depth": DEPTH, "width": WIDTH, "hidden": HIDDEN, "batch": BATCH},
        "rows": [],
        "derivative_recovery": [],
    }
    result = ResultFile(f"activations_{env['backend']}.json", payload, args.out)
    for name, (activation, policy) in VARIANTS.items():  # written after every variant
        fn = jax.jit(jax.grad(residual_mlp_loss(activation, checkpoint_policy=policy)))
        payload["rows"].append(
            {
                "variant": name,
                "temp_mib": compiled_memory(fn, params, x).temp_mib,
                "ms": median_ms(fn, params, x) if timed else None,
            }
        )
        print(payload["rows"][-1], flush=True)
        result.save()
    payload["derivative_recovery"] = derivative_recovery()
    path = result.finish()
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
