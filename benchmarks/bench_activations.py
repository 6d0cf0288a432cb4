"""Inverted GELU vs jax.nn.gelu vs dots_saveable checkpointing in a residual MLP stack.

16 residual blocks ``h + gelu(h W1 + b1) W2 + b2`` in a ``lax.scan`` (width 256, hidden 1024,
batch 512, float32): compiled temp memory of the gradient on any backend, and on GPU/TPU the
median step time of 10 runs (DESIGN.md section 4: no CPU timings).

    python benchmarks/bench_activations.py          # writes activations_<backend>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_json
from revjax import activations
from revjax.memory import compiled_memory
from revjax.timing import median_ms

DEPTH, WIDTH, HIDDEN, BATCH = 16, 256, 1024, 512
VARIANTS = {
    "jax.nn.gelu": (jax.nn.gelu, None),
    "revjax.activations.gelu": (activations.gelu, None),
    "jax.nn.gelu + dots_saveable": (jax.nn.gelu, jax.checkpoint_policies.dots_saveable),
    "jax.nn.silu": (jax.nn.silu, None),
    "revjax.activations.silu": (activations.silu, None),
}


def gradient(activation, policy):
    def block(h, p):
        return h + activation(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    if policy is not None:
        block = jax.checkpoint(block, policy=policy, prevent_cse=False)

    def loss(p, x):
        y, _ = jax.lax.scan(lambda h, p_: (block(h, p_), None), x, p)
        return jnp.sum(y**2)

    return jax.jit(jax.grad(loss))


def inputs():
    k = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(k[0], (DEPTH, WIDTH, HIDDEN)) * 0.5 / WIDTH**0.5,
        "b1": jnp.zeros((DEPTH, HIDDEN)),
        "w2": jax.random.normal(k[1], (DEPTH, HIDDEN, WIDTH)) * 0.5 / HIDDEN**0.5,
        "b2": jnp.zeros((DEPTH, WIDTH)),
    }
    return params, jax.random.normal(k[2], (BATCH, WIDTH))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    params, x = inputs()
    timed = jax.default_backend() != "cpu"
    rows = []
    for name, (activation, policy) in VARIANTS.items():
        fn = gradient(activation, policy)
        rows.append(
            {
                "variant": name,
                "temp_mib": compiled_memory(fn, params, x).temp_mib,
                "ms": median_ms(fn, params, x) if timed else None,
            }
        )
        print(rows[-1], flush=True)
    env = environment()
    payload = {
        "benchmark": "activations",
        "env": env,
        "config": {"depth": DEPTH, "width": WIDTH, "hidden": HIDDEN, "batch": BATCH},
        "rows": rows,
    }
    path = write_json(f"activations_{env['backend']}.json", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
