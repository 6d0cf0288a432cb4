"""Moonwalk and its baselines: compiled temp memory and step time vs depth on two networks.

* ``revnet``: L additive GELU-MLP couplings (``stack(from_coupling(mlp_coupling()))``);
* ``submersive``: L blocks ``submersive_linear -> leaky_relu(0.9)`` of constant width (square,
  so invertible layer by layer, but not couplings: RevBackprop does not apply). The slope is
  0.9 because the vijp sweep amplifies round-off by ``1 / slope`` per layer: at slope 0.1 the
  Moonwalk gradients of this network are garbage beyond about 8 layers (see the README), and
  memory or time measured on a garbage gradient would mean nothing.

Every row also records the gradient's relative error against backprop (and, for the Moonwalk
methods, the sweep's ``drift`` self-check), so no row times a wrong gradient unnoticed.

For every depth and method: compiled temp memory of the gradient and its footprint (arguments
+ outputs + temps, the executable's planned peak; XLA's memory analysis, any backend) and, on
GPU/TPU only (DESIGN.md section 4), the median time of 10 jitted calls. (The allocator's peak
is not recorded: it is a process-wide high-water mark that cannot be reset, so after the first
large method every later row would report that method's peak.) Exact
forward mode costs one JVP per parameter, so it is run only on the ``--size cpu`` networks (a
few thousand parameters per layer); there the script also reports pure-forward Moonwalk's
speed-up over it at 6 and 60 layers (the paper reports 27x and 110x on a CIFAR RevNet),
measured first, on a small RevNet at every size. The JSON is written after the speed-up and
after every (network, depth), marked ``complete`` only at the end.

    python benchmarks/bench_moonwalk.py --size cpu
    python benchmarks/bench_moonwalk.py --size gpu
"""

from __future__ import annotations

import argparse
import sys
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
from revjax import moonwalk as mw
from revjax.diagnostics import relative_error
from revjax.memory import memory_of
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.timing import median_ms

DEPTHS = [6, 12, 24, 60]
SLOPE = 0.9  # leaky ReLU slope of the submersive network (module doc)
SIZES = {
    # timed_runs: the speed-up's median is over this many runs after one warm-up call. DESIGN's
    # 10 on the GPU; 3 on a CPU, whose times are for orientation only (exact forward mode at
    # L = 60 takes seconds per run there, and `make bench` must stay under 10 minutes).
    "cpu": {
        "batch": 16,
        "width": 8,
        "hidden": 16,
        "depths": DEPTHS,
        "forward": True,
        "timed_runs": 3,
    },
    "gpu": {
        "batch": 256,
        "width": 256,
        "hidden": 1024,
        "depths": DEPTHS,
        "forward": False,
        "timed_runs": 10,
    },
}


#: The network of the Moonwalk-vs-forward-mode speed-up (the CPU size's, at every size).
SPEEDUP_NETWORK = {k: SIZES["cpu"][k] for k in ("batch", "width", "hidden")}


def revnet(depth: int, size: dict):
    params = init_mlp_stack(jax.random.key(0), depth, size["width"], size["hidden"])
    shape = (size["batch"], size["width"])
    x = tuple(jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(1)))
    loss = lambda y: 0.5 * jnp.sum(y[0] ** 2 + y[1] ** 2, axis=-1)
    return mw.stack(mw.from_coupling(mlp_coupling())), params, x, loss


def submersive(depth: int, size: dict):
    width = 2 * size["width"]  # the same stream width as the RevNet's two halves
    keys = jax.random.split(jax.random.key(0), depth)
    params = (jax.vmap(lambda k: mw.init_submersive_linear(k, width, width))(keys), None)
    x = jax.random.normal(jax.random.key(1), (size["batch"], width))
    loss = lambda y: 0.5 * jnp.sum(y**2, axis=-1)
    return mw.stack(mw.chain(mw.submersive_linear(), mw.leaky_relu(SLOPE))), params, x, loss


NETWORKS = {"revnet": revnet, "submersive": submersive}


def measure(network: str, depth: int, size: dict, timed: bool) -> list[dict]:
    """One row per method. Each method is compiled once: its memory is read from, and its
    gradient and time taken with, the same executable (the Moonwalk methods' gradients and
    drift from a second, self-checking one). Backprop runs first and is the reference."""
    net, params, x, loss = NETWORKS[network](depth, size)
    assert mw.METHODS[0] == "backprop", mw.METHODS
    reference, rows = None, []
    for method in mw.METHODS:
        if method == "revbackprop" and network == "submersive":
            continue  # not couplings: value_and_grad raises TypeError
        if method == "forward" and not size["forward"]:
            continue
        fn = jax.jit(mw.value_and_grad(net, loss, method=method, num_tangents=16))
        key = jax.random.key(2)
        compiled = fn.lower(params, x, key=key).compile()
        mem = memory_of(compiled)
        drift = None
        if method in ("moonwalk", "mixed_moonwalk"):
            checked = mw.value_and_grad(net, loss, method=method, with_drift=True)
            _, grads, drift = jax.jit(checked)(params, x)
            drift = float(drift)
        else:
            _, grads = compiled(params, x, key=key)
        reference = grads if reference is None else reference
        run = lambda p, x_, f=compiled, k=key: f(p, x_, key=k)
        ms = median_ms(run, params, x) if timed else None
        rows.append(
            {
                "network": network,
                "depth": depth,
                "method": method,
                "params": sum(a.size for a in jax.tree.leaves(params)),
                "temp_mib": mem.temp_mib,
                # The executable's planned peak: arguments + outputs + temps - aliased.
                "footprint_mib": (
                    mem.temp_bytes + mem.argument_bytes + mem.output_bytes - mem.alias_bytes
                )
                / 2**20,
                "ms": ms,
                "grad_error": float(relative_error(grads, reference)),
                "drift": drift,
            }
        )
        print(rows[-1], flush=True)
    return rows


def speedups(runs: int) -> list[dict]:
    """Pure-forward Moonwalk vs exact forward mode (wall time on this backend, median of
    ``runs``) on the RevNet of :data:`SPEEDUP_NETWORK` at 6 and 60 layers, at every size:
    exact forward mode takes one JVP per parameter, so only a small network is feasible."""
    out = []
    for depth in (6, 60):
        net, params, x, loss = revnet(depth, SPEEDUP_NETWORK)
        times = {}
        for method in ("moonwalk", "forward"):
            fn = jax.jit(mw.value_and_grad(net, loss, method=method))
            times[method] = median_ms(fn, params, x, repeats=runs, warmup=1)
        speedup = times["forward"] / times["moonwalk"]
        out.append({"depth": depth, **times, "speedup": speedup, "repeats": runs})
        print(out[-1], flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="cpu",
        help="cpu: a small network, compiled memory of every method; gpu: a larger one, also "
        "timed, without exact forward mode; both time Moonwalk vs exact forward mode on the "
        "small network (default: cpu)",
    )  # fmt: skip
    add_out_argument(parser)
    add_force_argument(parser)
    args = parser.parse_args(argv)
    refuse_accelerator_size_on_cpu(parser, args.size, jax.default_backend(), args.force)
    size = SIZES[args.size]
    timed = jax.default_backend() != "cpu"
    env = environment()
    payload = {
        "benchmark": "moonwalk",
        "env": env,
        "size": size,
        "slope": SLOPE,
        "rows": [],
        "moonwalk_vs_forward_mode": None,
        "note": "times are wall-clock on this backend; on CPU they are indicative only",
    }
    result = ResultFile(f"moonwalk_{args.size}_{env['backend']}.json", payload, args.out)
    # The speed-up first (a few seconds): a run stopped by a device call's time limit during
    # the rows (dozens of compiles at the GPU size) keeps it.
    payload["speedup_network"] = SPEEDUP_NETWORK
    payload["moonwalk_vs_forward_mode"] = speedups(size["timed_runs"])
    result.save()
    for network in NETWORKS:
        for depth in size["depths"]:  # written after every (network, depth): see ResultFile
            payload["rows"] += measure(network, depth, size, timed)
            result.save()
    path = result.finish()
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
