"""CPU measurements behind the README's numerics statements (float32/bfloat16 drift, anchors).

Same configurations as the tests (which assert looser bounds): an additive GELU-MLP stack,
halves 32 wide, hidden 64, batch 64.

    python benchmarks/numerics_cpu.py      # writes benchmarks/results/numerics_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_json
from revjax import reversible_scan
from revjax.diagnostics import reconstruction_report, relative_error
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.scan import plain_scan


def _stream(dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(1))
    return (jax.random.normal(k1, (64, 32), dtype), jax.random.normal(k2, (64, 32), dtype))


def _loss(scan_fn, **options):
    block = mlp_coupling()

    def loss(params, x):
        y1, y2 = scan_fn(block, params, x, **options)
        return jnp.sum(jnp.tanh(y1) * y2) + 0.5 * jnp.sum(y2**2)

    return loss


def gradient_drift(depth: int, scale: float, checkpoint_every: int | None = None) -> dict:
    params, x = init_mlp_stack(jax.random.key(0), depth, 32, 64, scale=scale), _stream()
    grad = jax.grad(_loss(reversible_scan, checkpoint_every=checkpoint_every))(params, x)
    reference = jax.grad(_loss(plain_scan))(params, x)
    y = plain_scan(mlp_coupling(), params, x)
    return {
        "depth": depth,
        "scale": scale,
        "checkpoint_every": checkpoint_every,
        "grad_rel_err": float(relative_error(grad, reference)),
        "max_abs_output": float(max(jnp.abs(v).max() for v in y)),
    }


def snr(dtype) -> dict:
    params = init_mlp_stack(jax.random.key(0), 16, 32, 64, dtype=dtype)
    report = reconstruction_report(mlp_coupling(), params, _stream(dtype))
    return {
        "dtype": jnp.dtype(dtype).name,
        "snr_db_after_1_step": float(report["snr_db"][-1]),
        "snr_db_after_16_steps": float(report["snr_db"][0]),
        "max_relative_error": float(report["relative_error"].max()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with jax.default_matmul_precision("highest"):
        payload = {
            "benchmark": "numerics_cpu",
            "env": environment(),
            "gradient_drift": [
                gradient_drift(16, 0.5),
                gradient_drift(16, 1.0),
                gradient_drift(32, 1.0),
                gradient_drift(32, 1.0, checkpoint_every=4),
            ],
            "reconstruction_snr": [snr(jnp.float32), snr(jnp.bfloat16)],
        }
    for row in payload["gradient_drift"] + payload["reconstruction_snr"]:
        print(row)
    print(f"wrote {write_json('numerics_cpu.json', payload, args.out)}")


if __name__ == "__main__":
    main()
