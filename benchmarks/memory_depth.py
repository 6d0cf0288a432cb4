"""Activation memory of the gradient vs depth, for every memory-saving method.

Compiled temp memory (XLA memory analysis: nothing is executed, so any depth costs only compile
time) of the gradient of L additive GELU-MLP couplings (halves 64 wide, hidden 256, batch 256,
float32) for L = 8 .. 256:

* backprop: ``lax.scan``, every activation stored;
* checkpoint: ``jax.checkpoint`` per layer (stores each layer's input);
* sqrt(L) nested checkpointing: the stack split into groups of k ~ sqrt(L) layers; the forward
  pass stores only group inputs (L / k streams), the backward recomputes one group at a time
  storing its activations (k layers' worth);
* reversible: ``reversible_scan``;
* reversible + anchors: ``reversible_scan(checkpoint_every=k)``, k ~ sqrt(L);
* mixed Moonwalk: ``revjax.moonwalk`` (reverse pass of residuals, then the vijp forward sweep).

Then, per method, the deepest stack whose gradient fits a memory budget (JAX's device memory
limit on a GPU, ``--budget-gib`` on CPU): the largest L whose compiled footprint (parameters +
gradients + temps; an optimiser would add its state) is within the budget, found by
:func:`benchmarks.common.deepest_fitting` from the line through the L = 128 and 256
footprints. The two methods with groups of k ~ sqrt(L) layers are searched over perfect
squares L = k^2 (k the largest divisor of L not above sqrt(L) makes their footprint jump
between neighbouring L, e.g. k = 1 for a prime L). The JSON is rewritten after every row and
every search, marked ``complete`` only at the end; ``--resume`` continues such a file where it
stopped (a time limit split the H100 run in two).

    python benchmarks/memory_depth.py     # writes memory_depth_<backend>.json and .png
    python benchmarks/memory_depth.py --out DIR --resume   # measure only what DIR's JSON lacks
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS,
    ResultFile,
    add_out_argument,
    affine_guess,
    budget_bytes,
    deepest_fitting,
    environment,
    positive,
)
from revjax import moonwalk as mw
from revjax.compare import anchor_interval_for
from revjax.memory import CompiledMemory, compiled_memory
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.scan import plain_scan, reversible_scan

WIDTH, HIDDEN, BATCH = 64, 256, 256
DEPTHS = (8, 16, 32, 64, 128, 256)
BLOCK = mlp_coupling()


def per_example(y):
    return jnp.sum(jnp.tanh(y[0]) * y[1], axis=-1)


def nested_checkpoint_scan(params, x, group: int):
    """``L`` layers as ``L / group`` checkpointed groups of ``group`` plain layers."""
    depth = jax.tree.leaves(params)[0].shape[0]
    grouped = jax.tree.map(lambda a: a.reshape(depth // group, group, *a.shape[1:]), params)

    @jax.checkpoint
    def run_group(x_, group_params):
        return lax.scan(lambda h, p: (BLOCK.forward(p, h), None), x_, group_params)[0]

    return lax.scan(lambda h, p: (run_group(h, p), None), x, grouped)[0]


def gradient(method: str, depth: int):
    k = anchor_interval_for(depth)
    if method == "mixed Moonwalk":
        fn = mw.value_and_grad(
            mw.stack(mw.from_coupling(BLOCK)), per_example, method="mixed_moonwalk"
        )
        return lambda p, x: fn(p, x)[1]
    forward = {
        "backprop": lambda p, x: plain_scan(BLOCK, p, x),
        "checkpoint": lambda p, x: plain_scan(BLOCK, p, x, remat=True),
        "sqrt(L) nested checkpointing": lambda p, x: nested_checkpoint_scan(p, x, k),
        "reversible": lambda p, x: reversible_scan(BLOCK, p, x),
        "reversible + anchors": lambda p, x: reversible_scan(BLOCK, p, x, checkpoint_every=k),
    }[method]
    return jax.grad(lambda p, x: jnp.mean(per_example(forward(p, x))))


METHODS = (
    "backprop",
    "checkpoint",
    "sqrt(L) nested checkpointing",
    "reversible",
    "reversible + anchors",
    "mixed Moonwalk",
)


SQUARE_DEPTHS = ("sqrt(L) nested checkpointing", "reversible + anchors")
MAX_DEPTH = 1 << 20


@functools.cache
def memory(method: str, depth: int) -> CompiledMemory:
    """Compiled memory of the gradient at ``depth`` (abstract arguments: nothing allocated)."""
    params = jax.eval_shape(lambda: init_mlp_stack(jax.random.key(0), depth, WIDTH, HIDDEN))
    x = (jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32),) * 2
    return compiled_memory(gradient(method, depth), params, x)


def deepest(method: str, budget: int, max_depth: int = MAX_DEPTH) -> int:
    """Largest L <= ``max_depth`` whose gradient footprint fits ``budget`` bytes (a perfect
    square for the k ~ sqrt(L) methods, searched over k)."""
    if method in SQUARE_DEPTHS:
        depth_of = lambda k: k * k
        guess = math.isqrt(max(affine_guess(_footprints(method, (64, 256)), budget), 0))
        index_max = math.isqrt(max_depth)
    else:
        depth_of = lambda d: d
        guess = affine_guess(_footprints(method, (128, 256)), budget)
        index_max = max_depth
    fits_at = lambda n: memory(method, depth_of(n)).footprint_bytes
    return depth_of(deepest_fitting(fits_at, budget, index_max, guess))


def param_bytes_per_layer() -> int:
    params = jax.eval_shape(lambda: init_mlp_stack(jax.random.key(0), 1, WIDTH, HIDDEN))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))


def _footprints(method: str, depths: tuple[int, ...]) -> dict[int, int]:
    return {d: memory(method, d).footprint_bytes for d in depths}


def plot(rows: list[dict], path: Path, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method in METHODS:
        points = [(r["depth"], r["temp_mib"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("layers L")
    ax.set_ylabel("gradient temp memory (MiB)")
    where = f"{env['device']}, {env['date']}"  # as the plots of plots.py say it
    # Two lines at plots.py's size: on one the device and date ran past the figure's edge.
    ax.set_title(
        f"{WIDTH}-wide halves, hidden {HIDDEN}, batch {BATCH}, float32\n{where}", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument(
        "--budget-gib", type=positive(float), default=1.0,
        help="memory budget where JAX reports no device limit, e.g. a CPU (default: 1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run whose JSON is in --out: keep its rows and searches (same "
        "network, budget, device and jax version) and measure only what it lacks",
    )  # fmt: skip
    args = parser.parse_args(argv)
    budget = budget_bytes(args.budget_gib)
    env = environment()
    payload = {
        "benchmark": "memory_depth",
        "config": {
            "width": WIDTH,
            "hidden": HIDDEN,
            "batch": BATCH,
            "dtype": "float32",
            "param_bytes_per_layer": param_bytes_per_layer(),
        },
        "rows": [],
        "budget_bytes": budget,
        "deepest_depth": {},
        "env": env,
    }
    name = f"memory_depth_{env['backend']}.json"
    if args.resume:
        earlier = earlier_run(Path(args.out or RESULTS) / name, payload)
        payload["rows"], payload["deepest_depth"] = earlier["rows"], earlier["deepest_depth"]
        payload["resumed_from"] = earlier.get("resumed_from", earlier["env"])  # the first run
    result = ResultFile(name, payload, args.out)
    rows = payload["rows"]
    done = {(r["method"], r["depth"]) for r in rows}
    for depth in DEPTHS:  # written after every row and every search: see ResultFile
        for method in METHODS:
            if (method, depth) in done:
                continue
            mem = memory(method, depth)
            rows.append(
                {
                    "method": method,
                    "depth": depth,
                    "temp_mib": mem.temp_mib,
                    "footprint_mib": mem.footprint_bytes / 2**20,
                }
            )
            print(rows[-1], flush=True)
            result.save()
    for method in METHODS:
        if method in payload["deepest_depth"]:
            continue
        payload["deepest_depth"][method] = deepest(method, budget)
        print("deepest within budget:", method, payload["deepest_depth"][method], flush=True)
        result.save()
    path = result.finish()
    plot(rows, Path(args.out or RESULTS) / f"memory_depth_{env['backend']}.png", env)
    print(f"wrote {path}")
    return payload


def earlier_run(path: Path, payload: dict) -> dict:
    """The run recorded at ``path``, checked to measure what ``payload`` sets out to (network,
    budget, device and jax version) and to be incomplete, so that resuming it mixes nothing."""
    try:
        earlier = json.loads(path.read_text())
        rows, searches, env = earlier["rows"], earlier["deepest_depth"], earlier["env"]
        {(r["method"], r["depth"]) for r in rows}, dict(searches), env["device"], env["date"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(
            f"memory_depth: --resume needs a memory_depth result at {path} "
            f"({type(err).__name__}: {err}); run without --resume to measure afresh"
        ) from None
    mine = (payload["config"], payload["budget_bytes"], payload["env"]["device"],
            payload["env"]["jax"])  # fmt: skip
    theirs = (earlier.get("config"), earlier.get("budget_bytes"), env["device"], env.get("jax"))
    if mine != theirs:
        raise SystemExit(
            f"memory_depth: --resume of {path}, measured as (config, budget, device, jax) = "
            f"{theirs}, but this run is {mine}"
        )
    if earlier.get("complete"):  # resuming would only re-stamp its date and commit
        raise SystemExit(f"memory_depth: {path} is complete; there is nothing to resume")
    return earlier


if __name__ == "__main__":
    main()
