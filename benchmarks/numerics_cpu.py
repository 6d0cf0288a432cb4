"""CPU measurements behind the README's numerics statements (float32/bfloat16 drift, anchors).

Same configurations as the tests (which assert looser bounds): an additive GELU-MLP stack,
halves 32 wide, hidden 64, batch 64; and, for the layer-wise inverses (``tests/test_layers.py``),
a 16-layer bfloat16 chain (actnorm, leaky ReLU 0.5, conv1x1) 16 channels wide next to additive
MLP couplings of the same width.

    python benchmarks/numerics_cpu.py      # writes benchmarks/results/numerics_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_out_argument, environment, write_json
from revjax import layers, reversible_scan, sequence
from revjax.diagnostics import reconstruction_report, relative_error
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.scan import plain_scan

WIDTH, HIDDEN, BATCH = 32, 64, 64


def _stream(dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(1))
    shape = (BATCH, WIDTH)
    return (jax.random.normal(k1, shape, dtype), jax.random.normal(k2, shape, dtype))


def _loss(scan_fn, **options):
    block = mlp_coupling()

    def loss(params, x):
        y1, y2 = scan_fn(block, params, x, **options)
        return jnp.sum(jnp.tanh(y1) * y2) + 0.5 * jnp.sum(y2**2)

    return loss


def gradient_drift(depth: int, scale: float, checkpoint_every: int | None = None) -> dict:
    params, x = init_mlp_stack(jax.random.key(0), depth, WIDTH, HIDDEN, scale=scale), _stream()
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


def snr(dtype, depth: int = 16) -> dict:
    """Reconstruction SNR of a ``depth``-layer stack after one and after all inverse steps."""
    params = init_mlp_stack(jax.random.key(0), depth, WIDTH, HIDDEN, dtype=dtype)
    report = reconstruction_report(mlp_coupling(), params, _stream(dtype))
    return {
        "dtype": jnp.dtype(dtype).name,
        "depth": depth,
        "snr_db_after_1_step": float(report["snr_db"][-1]),
        "snr_db_after_all_steps": float(report["snr_db"][0]),
        "max_relative_error": float(report["relative_error"].max()),
    }


def _ends(snr_db: jax.Array) -> dict:
    """SNR (dB) of the reconstructed input after one inverse step and after all of them."""
    return {"snr_db_after_1_step": float(snr_db[-1]), "snr_db_after_all_steps": float(snr_db[0])}


def layerwise_snr(depth: int = 16, channels: int = 16, batch: int = 64) -> dict:
    """Hascoet et al.'s comparison in bfloat16, the setup of ``tests/test_layers.py``: a chain of
    layer-wise inverses (actnorm, leaky ReLU 0.5, conv1x1) vs additive MLP couplings (halves
    ``channels / 2`` wide, hidden 16) on the same input. One computation, compiled without XLA's
    backend optimisations: for these tiny stacks they cost seconds of compile time and change
    none of the values."""
    dt, half = jnp.bfloat16, channels // 2
    chain = sequence(layers.actnorm(), layers.leaky_relu(0.5), layers.conv1x1())

    def snr_db():
        keys = jax.random.split(jax.random.key(0), depth)
        actnorm = {
            "log_scale": 0.1 * jax.random.normal(keys[0], (depth, channels)),
            "bias": jnp.zeros((depth, channels)),
        }
        conv = jax.vmap(lambda k: layers.init_conv1x1(k, channels, 0.1))(keys)
        chain_params = jax.tree.map(lambda a: a.astype(dt), (actnorm, None, conv))
        x = jax.random.normal(jax.random.key(1), (batch, channels)).astype(dt)
        coupling_params = init_mlp_stack(jax.random.key(0), depth, half, 16, dtype=dt)
        halves = (x[:, :half], x[:, half:])
        return (
            reconstruction_report(chain, chain_params, x)["snr_db"],
            reconstruction_report(mlp_coupling(), coupling_params, halves)["snr_db"],
        )

    fast_compile = {"xla_backend_optimization_level": 0}
    chain_db, coupling_db = jax.jit(snr_db).lower().compile(compiler_options=fast_compile)()
    return {
        "depth": depth,
        "channels": channels,
        "batch": batch,
        "dtype": jnp.dtype(dt).name,
        "chain": _ends(chain_db),
        "coupling": _ends(coupling_db),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    args = parser.parse_args(argv)
    with jax.default_matmul_precision("highest"):
        payload = {
            "benchmark": "numerics_cpu",
            "env": environment(),
            "config": {"width": WIDTH, "hidden": HIDDEN, "batch": BATCH},
            "gradient_drift": [
                gradient_drift(16, 0.5),
                gradient_drift(16, 1.0),
                gradient_drift(32, 1.0),
                gradient_drift(32, 1.0, checkpoint_every=4),
            ],
            "reconstruction_snr": [snr(jnp.float32), snr(jnp.bfloat16)],
            "layerwise_vs_coupling_snr": layerwise_snr(),
        }
    for row in payload["gradient_drift"] + payload["reconstruction_snr"]:
        print(row)
    print(payload["layerwise_vs_coupling_snr"])
    print(f"wrote {write_json('numerics_cpu.json', payload, args.out)}")


if __name__ == "__main__":
    main()
