"""Reversible transformer vs its twins: training-step memory, throughput, deepest trainable model.

For each method of :class:`revjax.nnx.Stack` (``reversible``; ``backprop``, the plain twin;
``checkpoint``, the twin with ``jax.checkpoint`` per block, i.e. ``nnx.remat``) and each depth:
the compiled temp memory of one AdamW training step (XLA memory analysis, any backend) and, on a
GPU, tokens per second (median of >= 10 steps after warm-up) and the device's peak bytes.
The deepest trainable model is found by bisection on depth over *compiled* memory
(arguments + outputs + temps, nothing executed) against a budget: the GPU's ``bytes_limit``,
or ``--budget-gib`` on CPU.

    python benchmarks/bench_transformer.py --size cpu    # memory only, ~2 minutes on 2 cores
    python benchmarks/bench_transformer.py --size gpu    # width 1024, seq 2048, timings

Writes ``transformer_<size>_<backend>.json`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_json
from revjax.memory import compiled_memory, device_peak_bytes
from revjax.models.lm_training import functional_train_step
from revjax.models.transformer import ReversibleTransformer
from revjax.timing import median_ms

METHODS = ("reversible", "backprop", "checkpoint")
SIZES = {
    "cpu": dict(dim=64, heads=4, seq=256, batch=8, depths=(4, 16), max_depth=16384, time=False),
    "gpu": dict(dim=1024, heads=16, seq=2048, batch=8, depths=(4, 12), max_depth=1024, time=True),
}


def build(size: dict, depth: int, method: str):
    """Model, optimiser, and the pure training step ``(state, tokens) -> (loss, state)``."""
    model = ReversibleTransformer(
        256, size["dim"], depth, size["heads"], size["seq"], method=method, rngs=nnx.Rngs(0)
    )
    return functional_train_step(model, nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param))


def compiled_bytes(size: dict, depth: int, method: str) -> dict[str, int]:
    """Compiled memory of one training step at ``depth``, without allocating the model."""
    holder = {}

    def init():
        step, state = build(size, depth, method)
        holder["step"] = step
        return state

    state = jax.eval_shape(init)
    tokens = jax.ShapeDtypeStruct((size["batch"], size["seq"] + 1), jnp.int32)
    # Donated state, as in training: the updated parameters and moments reuse its buffers.
    mem = compiled_memory(jax.jit(holder["step"], donate_argnums=0), state, tokens)
    return {
        "temp": mem.temp_bytes,
        "total": mem.temp_bytes + mem.argument_bytes + mem.output_bytes - mem.alias_bytes,
    }


def deepest(size: dict, method: str, budget: int) -> int:
    """Largest depth whose compiled training step fits in ``budget`` bytes (bisection)."""
    lo, hi = 0, size["max_depth"]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if compiled_bytes(size, mid, method)["total"] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def timed(size: dict, depth: int, method: str) -> dict[str, float | None]:
    step, state = build(size, depth, method)
    tokens = jax.random.randint(jax.random.key(0), (size["batch"], size["seq"] + 1), 0, 256)
    jitted = jax.jit(step, donate_argnums=0)
    holder = {"state": state}

    def run(tokens):
        loss, holder["state"] = jitted(holder["state"], tokens)
        return loss

    ms = median_ms(run, tokens, repeats=10, warmup=2)
    return {
        "ms": ms,
        "tokens_per_s": size["batch"] * size["seq"] / (ms / 1e3),
        "peak_bytes": device_peak_bytes(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="memory budget on CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    stats = jax.devices()[0].memory_stats() or {}
    budget = int(stats.get("bytes_limit") or args.budget_gib * 2**30)

    rows = []
    for method in METHODS:
        for depth in size["depths"]:
            row = {"method": method, "depth": depth, **compiled_bytes(size, depth, method)}
            if size["time"] and jax.default_backend() == "gpu":
                row |= timed(size, depth, method)
            rows.append(row)
            print(row, flush=True)
    deepest_rows = {method: deepest(size, method, budget) for method in METHODS}
    print("deepest trainable depth:", deepest_rows, flush=True)
    env = environment()
    payload = {
        "benchmark": "transformer",
        "size": args.size,
        "config": {k: v for k, v in size.items() if k != "time"},
        "budget_bytes": budget,
        "rows": rows,
        "deepest_depth": deepest_rows,
        "env": env,
    }
    path = write_json(f"transformer_{args.size}_{env['backend']}.json", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
