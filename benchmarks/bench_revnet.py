"""Activation memory per input pixel (Hascoet et al.'s metric) of the RevNet CNN vs its twin.

Compiled temp memory of the gradient of ``revjax.models.revnet`` (2 stages, hidden 32, batch 256
of 8x8x1 images) divided by the number of input values ``N H W C``, for 2, 8 and 32 couplings per
stage: the ResNet-like twin (plain backprop), the RevNet (``reversible_scan`` per stage, which
stores each stage's output) and the fully invertible variant (``across_stages=True``: one
reconstruction through all stages and downsamplings). XLA memory analysis, any backend.

    python benchmarks/bench_revnet.py      # writes benchmarks/results/revnet_<backend>.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_out_argument, environment, write_json
from revjax.memory import compiled_memory
from revjax.models.revnet import init_revnet, revnet_logits

BATCH, SHAPE = 256, (8, 8, 1)


VARIANTS = {
    "ResNet-like twin (backprop)": {"reversible": False},
    "RevNet (reversible_scan per stage)": {},
    "fully invertible (one reconstruction across stages)": {"across_stages": True},
}


def bytes_per_pixel(blocks: int, options: dict) -> float:
    params = jax.eval_shape(lambda: init_revnet(jax.random.key(0), blocks=blocks, hidden=32))
    x = jax.ShapeDtypeStruct((BATCH, *SHAPE), jnp.float32)
    loss = lambda p, x_: jnp.sum(revnet_logits(p, x_, **options) ** 2)
    temp = compiled_memory(jax.grad(loss), params, x).temp_bytes
    return temp / (BATCH * math.prod(SHAPE))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    args = parser.parse_args(argv)
    rows = [
        {
            "blocks_per_stage": blocks,
            "variant": name,
            "bytes_per_input_pixel": bytes_per_pixel(blocks, options),
        }
        for blocks in (2, 8, 32)
        for name, options in VARIANTS.items()
    ]
    for row in rows:
        print(row)
    env = environment()
    payload = {"benchmark": "revnet_memory", "env": env, "batch": BATCH, "rows": rows}
    path = write_json(f"revnet_{env['backend']}.json", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
