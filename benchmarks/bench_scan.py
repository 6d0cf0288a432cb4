"""reversible_scan vs plain backprop vs per-layer jax.checkpoint: memory, time, gradient error.

Network: L additive couplings of GELU-MLP branches, each half of the stream ``width`` wide,
hidden ``hidden``, ``rows`` rows, float32 parameters and stream. For each method and depth it
records the compiled temp memory of the gradient step (XLA memory analysis), the median step
time (GPU only; CPU timings are recorded but not claims), and the gradient's relative error
against plain backprop at JAX's default matmul precision and at ``highest``. The JSON is
rewritten after every depth, marked ``complete`` only at the end.

    python benchmarks/bench_scan.py --size cpu      # small, minutes on a laptop CPU
    python benchmarks/bench_scan.py --size gpu      # N=8192, width 1024, hidden 4096, L in {8,32}
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ResultFile,
    add_force_argument,
    add_out_argument,
    environment,
    refuse_accelerator_size_on_cpu,
)
from revjax import reversible_scan
from revjax.diagnostics import format_table, relative_error
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.precision import LowPrecisionStreamWarning
from revjax.scan import plain_scan
from revjax.timing import median_ms

SIZES = {
    "cpu": {"rows": 512, "width": 128, "hidden": 512, "depths": [8, 32], "repeats": 5},
    "gpu": {"rows": 8192, "width": 1024, "hidden": 4096, "depths": [8, 32], "repeats": 10},
}

METHODS = {
    "backprop": lambda b, p, x: plain_scan(b, p, x),
    "checkpoint": lambda b, p, x: plain_scan(b, p, x, remat=True),
    "reversible": lambda b, p, x: reversible_scan(b, p, x),
    "reversible_k8": lambda b, p, x: reversible_scan(b, p, x, checkpoint_every=8),
}


def grad_fn(method):
    block = mlp_coupling()

    def loss(params, x):
        y1, y2 = METHODS[method](block, params, x)
        return jnp.mean(y1 * y2) + jnp.mean(jnp.tanh(y1))

    return jax.jit(jax.grad(loss))


def run(size: str, out_dir: Path | None, dtype: str = "float32") -> dict:
    cfg = {**SIZES[size], "dtype": dtype}
    env = environment()
    payload = {"benchmark": "bench_scan", "size": size, "config": cfg, "env": env, "rows": []}
    suffix = "" if dtype == "float32" else f"_{dtype}"
    result = ResultFile(f"scan_{size}_{env['backend']}{suffix}.json", payload, out_dir)
    rows = payload["rows"]
    for depth in cfg["depths"]:  # written after every depth: see ResultFile
        k_p, k_1, k_2 = jax.random.split(jax.random.key(depth), 3)
        params = init_mlp_stack(k_p, depth, cfg["width"], cfg["hidden"], dtype=dtype)
        x = (
            jax.random.normal(k_1, (cfg["rows"], cfg["width"]), dtype),
            jax.random.normal(k_2, (cfg["rows"], cfg["width"]), dtype),
        )
        grads, grads_highest, per_method = {}, {}, {}
        for method in METHODS:
            fn = grad_fn(method)
            mem = compiled_memory(fn, params, x)
            ms = median_ms(fn, params, x, repeats=cfg["repeats"])
            grads[method] = fn(params, x)
            with jax.default_matmul_precision("highest"):
                grads_highest[method] = grad_fn(method)(params, x)
            per_method[method] = {"temp_mib": mem.temp_mib, "ms": ms}
            print(
                f"L={depth:4d} {method:>11s}: temp {mem.temp_mib:10.1f} MiB  {ms:9.2f} ms",
                flush=True,
            )
        for method, r in per_method.items():
            rows.append(
                {
                    "method": method,
                    "depth": depth,
                    **r,
                    "temp_ratio_to_backprop": r["temp_mib"] / per_method["backprop"]["temp_mib"],
                    "time_ratio_to_backprop": r["ms"] / per_method["backprop"]["ms"],
                    "time_ratio_to_checkpoint": r["ms"] / per_method["checkpoint"]["ms"],
                    "grad_rel_err_default": float(relative_error(grads[method], grads["backprop"])),
                    "grad_rel_err_highest": float(
                        relative_error(grads_highest[method], grads_highest["backprop"])
                    ),
                }
            )
        result.save()
    path = result.finish()
    print(
        format_table(
            rows,
            [
                ("method", "method", "s"),
                ("depth", "L", "d"),
                ("temp_mib", "temp MiB", ".1f"),
                ("ms", "ms", ".2f"),
                ("time_ratio_to_backprop", "time / backprop", ".2f"),
                ("time_ratio_to_checkpoint", "time / checkpoint", ".2f"),
                ("temp_ratio_to_backprop", "temp / backprop", ".4f"),
                ("grad_rel_err_default", "grad err (default prec.)", ".1e"),
                ("grad_rel_err_highest", "grad err (highest)", ".1e"),
            ],
        )
    )
    print(f"wrote {path}")
    return payload


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="cpu",
        help="cpu: a small stack for orientation; gpu: the H100 size (default: cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of parameters, stream and compute",
    )
    add_out_argument(parser)
    add_force_argument(parser)
    args = parser.parse_args(argv)
    refuse_accelerator_size_on_cpu(parser, args.size, jax.default_backend(), args.force)
    with warnings.catch_warnings():
        # --dtype bfloat16 times a bfloat16 stream on purpose (its error is recorded too).
        warnings.simplefilter("ignore", LowPrecisionStreamWarning)
        run(args.size, args.out, args.dtype)


if __name__ == "__main__":
    main()
