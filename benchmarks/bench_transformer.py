"""Reversible transformer vs its twins: training-step memory, throughput, deepest trainable model.

For each method of :class:`revjax.nnx.Stack` (``reversible``; ``backprop``, the plain twin;
``checkpoint``, the twin with ``jax.checkpoint`` per block, i.e. ``nnx.remat``) and each depth:
the compiled memory of one AdamW training step with the state donated (XLA memory analysis, any
backend: ``temp`` and ``total`` = arguments + outputs + temps - donated) and, on a GPU, tokens
per second (median of 10 steps after warm-up) and the device allocator's peak bytes.

On a GPU every timed row runs in its own process: the allocator's peak (``peak_bytes_in_use``)
is a process-wide high-water mark that cannot be reset, so only a fresh process measures one
configuration's peak; a row that runs out of device memory is recorded as such instead of
ending the run, and a row whose compiled footprint exceeds the budget is not run at all. The
JSON is rewritten after every row.

The deepest trainable model is the largest depth whose compiled step fits the budget (the GPU's
``bytes_limit``, or ``--budget-gib`` on CPU), nothing executed. The footprint of a scanned stack
is affine in depth, so the search starts from the line through the two measured depths and
gallops/bisects from there: two compiles when the line is exact.

    python benchmarks/bench_transformer.py --size cpu    # memory only
    python benchmarks/bench_transformer.py --size gpu    # width 1024, seq 2048, timings
    python benchmarks/bench_transformer.py --size smoke  # tiny; the GPU size's code path
    python benchmarks/bench_transformer.py --size gpu --budget-s 540  # stop in time, keep rows

``--budget-s S`` bounds the whole run (GPU path): every child's timeout is cut to the time left,
and when too little is left the run stops starting children, writes the JSON it has (marked
incomplete) and exits with status 1.

Writes ``transformer_<size>_<backend>.json`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ResultFile,
    add_force_argument,
    add_out_argument,
    affine_guess,
    budget_bytes,
    deepest_fitting,
    environment,
    positive,
    refuse_accelerator_size_on_cpu,
)
from revjax.memory import CompiledMemory, compiled_memory, device_peak_bytes, memory_of
from revjax.models.lm_training import functional_train_step
from revjax.models.transformer import ReversibleTransformer
from revjax.timing import median_ms

METHODS = ("reversible", "backprop", "checkpoint")
SIZES = {
    "cpu": dict(dim=64, heads=4, seq=256, batch=8, depths=(4, 16), max_depth=16384, time=False),
    # Plain backprop holds every block's float32 attention scores: ~57 GiB at L = 8, ~82 GiB
    # (more than an 80 GB H100) at L = 12.
    "gpu": dict(dim=1024, heads=16, seq=2048, batch=8, depths=(4, 8), max_depth=1024, time=True),
    # Tiny, with the GPU size's code path (child processes), for checking it on any machine.
    "smoke": dict(dim=16, heads=2, seq=16, batch=2, depths=(1, 2), max_depth=64, time=True),
}
#: Longest a child process may run: a row (compile, warm-up, 10 timed steps) or a search.
CHILD_TIMEOUT_S = {"probe": 300, "row": 300, "deepest": 600}
#: With ``--budget-s``: seconds kept back for writing the JSON and exiting, and the least time
#: worth giving a child (with less left, the run stops and writes what it has).
RESERVE_S, MIN_CHILD_S = 10.0, 20.0
_clock = time.monotonic  # the clock of --budget-s (a fake one in the tests)


def build(size: dict, depth: int, method: str) -> tuple[Callable, Any]:
    """The pure training step ``(state, tokens) -> (loss, state)`` of a fresh model and AdamW
    optimiser, and its initial state."""
    model = ReversibleTransformer(
        256, size["dim"], depth, size["heads"], size["seq"], method=method, rngs=nnx.Rngs(0)
    )
    return functional_train_step(model, nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param))


def _footprint(mem: CompiledMemory) -> dict[str, int]:
    return {"temp": mem.temp_bytes, "total": mem.footprint_bytes}


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
    return _footprint(compiled_memory(jax.jit(holder["step"], donate_argnums=0), state, tokens))


def deepest(size: dict, method: str, budget: int, known: dict[int, int]) -> int:
    """Deepest depth whose compiled step fits ``budget``; ``known`` maps depths to totals
    already compiled (at least two), which fix the affine first guess."""
    cache = dict(known)

    def total_at(depth: int) -> int:
        if depth not in cache:
            cache[depth] = compiled_bytes(size, depth, method)["total"]
        return cache[depth]

    for depth in size["depths"]:  # two measured points fix the first guess
        if len(cache) < 2:
            total_at(depth)
    return deepest_fitting(total_at, budget, size["max_depth"], affine_guess(cache, budget))


def run_row(size: dict, depth: int, method: str, budget: int) -> dict:
    """Compile one training step on real arrays (one compile serves memory and timing) and, on a
    GPU and if its footprint fits ``budget``, time it and read the allocator's peak."""
    step, state = build(size, depth, method)
    tokens = jax.random.randint(jax.random.key(0), (size["batch"], size["seq"] + 1), 0, 256)
    compiled = jax.jit(step, donate_argnums=0).lower(state, tokens).compile()
    row = {"method": method, "depth": depth, **_footprint(memory_of(compiled))}
    if not (size["time"] and jax.default_backend() == "gpu"):
        return row
    if row["total"] > budget:
        return row | {"not_run": "compiled footprint exceeds the memory budget"}
    holder = {"state": state}

    def train(tokens):
        loss, holder["state"] = compiled(holder["state"], tokens)
        return loss

    ms = median_ms(train, tokens, repeats=10, warmup=2)
    return row | {
        "ms": ms,
        "tokens_per_s": size["batch"] * size["seq"] / (ms / 1e3),
        "peak_bytes": device_peak_bytes(),
    }


def in_child(size_name: str, task: list[str], budget_gib: float, timeout: float) -> dict:
    """Run ``task`` (``probe``, ``row METHOD DEPTH`` or ``deepest METHOD KNOWN_JSON``) in a
    fresh process and return its JSON answer; an out-of-memory, crash or timeout comes back as
    ``{"failed": reason}``, never raised."""
    command = [sys.executable, __file__, "--size", size_name, "--budget-gib", str(budget_gib),
               "--task", *task]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timeout after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):  # the answer, even if teardown failed
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    text = (done.stdout + done.stderr).strip()
    if "RESOURCE_EXHAUSTED" in text:
        return {"failed": "out of memory"}
    return {"failed": f"exit {done.returncode}: {text[-300:]}"}


def child_task(size: dict, task: list[str], budget: int) -> dict:
    """The answer of one child process: a row or a deepest depth, with this process's
    environment record and memory budget."""
    kind, method = task[0], (task[1:] or [None])[0]
    if kind == "probe":
        answer = {}
    elif kind == "row":
        answer = run_row(size, int(task[2]), method, budget)
    elif kind == "deepest":
        known = {int(d): t for d, t in json.loads(task[2]).items()}
        answer = {"deepest": deepest(size, method, budget, known)}
    else:
        raise ValueError(f"bench_transformer: unknown task {kind!r}")
    return answer | {"env": environment(), "budget_bytes": budget}


class Deadline:
    """The time left of ``budget_s`` seconds from now (no limit when None), as child timeouts."""

    def __init__(self, budget_s: float | None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.end = None if budget_s is None else clock() + budget_s

    def timeout(self, kind: str) -> float | None:
        """Timeout for a child of ``kind`` (its usual limit, cut to the time left less
        ``RESERVE_S``), or None when less than ``MIN_CHILD_S`` would be left for it."""
        usual = CHILD_TIMEOUT_S[kind]
        if self.end is None:
            return usual
        left = self.end - self.clock() - RESERVE_S
        return min(usual, left) if left >= MIN_CHILD_S else None


class OutOfTime(Exception):
    """The ``--budget-s`` budget is spent: stop starting child processes."""


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="cpu",
        help="cpu: compiled memory only; gpu (and smoke, its small twin): timed, each row in "
        "its own process (default: cpu)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-gib", type=positive(float), default=4.0,
        help="memory budget where JAX reports no device limit, e.g. a CPU (default: 4.0)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-s", type=float, default=None,
        help="seconds the whole run may take (gpu and smoke sizes; at least "
        f"{RESERVE_S + MIN_CHILD_S:g}): children are stopped in time and the JSON written "
        "with what was measured (default: no limit)",
    )  # fmt: skip
    add_out_argument(parser)
    add_force_argument(parser)
    parser.add_argument("--task", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s is not None and not args.budget_s >= RESERVE_S + MIN_CHILD_S:
        # Less leaves no child process its minimum time: nothing could be measured.
        parser.error(
            f"--budget-s must be at least {RESERVE_S + MIN_CHILD_S:g} seconds (the time kept "
            f"for writing results plus one measurement's minimum), got {args.budget_s}"
        )
    size = SIZES[args.size]
    if args.task:  # a child process of in_child
        print(json.dumps(child_task(size, args.task, budget_bytes(args.budget_gib))), flush=True)
        return None
    # GPU size: every compile and run happens in a child process, so this one never initialises
    # a JAX backend (which would hold device memory) and each timed row has its own peak.
    isolated = size["time"]
    deadline = Deadline(args.budget_s, _clock)

    def child(task: list[str]) -> dict:
        timeout = deadline.timeout(task[0])
        if timeout is None:
            raise OutOfTime
        return in_child(args.size, task, args.budget_gib, timeout)

    if isolated:
        try:
            probe = child(["probe"])
        except OutOfTime:
            probe = {"failed": f"--budget-s {args.budget_s} leaves no time"}
        if "failed" in probe:
            sys.exit(f"error: the probe process failed: {probe['failed']}")  # exit status 1
        env, budget = probe["env"], probe["budget_bytes"]
        # The backend is known only now: this process never starts one (see above).
        refuse_accelerator_size_on_cpu(parser, args.size, env["backend"], args.force)
    else:
        env, budget = environment(), budget_bytes(args.budget_gib)
    name = f"transformer_{args.size}_{env['backend']}.json"
    payload = {
        "benchmark": "transformer",
        "size": args.size,
        "config": {k: v for k, v in size.items() if k != "time"},
        "budget_bytes": budget,
        "rows": [],
        "deepest_depth": {},
        "env": env,
    }
    result = ResultFile(name, payload, args.out)
    try:
        _measure(size, payload, result, isolated, child, budget)
    except OutOfTime:
        payload["stopped"] = f"time budget spent (--budget-s {args.budget_s:g})"
        path = result.finish(complete=False)
        print(f"stopped: {payload['stopped']}; wrote {path} with what was measured", flush=True)
        return payload
    path = result.finish()
    print(f"wrote {path}")
    return payload


def _measure(size, payload, result, isolated, child, budget) -> None:
    """Every row, then every deepest-depth search, into ``payload``; the JSON is rewritten after
    each. ``child`` raises :class:`OutOfTime` when the time budget is spent."""
    for method in METHODS:
        for depth in size["depths"]:
            if isolated:
                answer = child(["row", method, str(depth)])
                skip = {"env", "budget_bytes"}  # the probe's record describes the run
                row = {"method": method, "depth": depth}
                row |= {k: v for k, v in answer.items() if k not in skip}
            else:
                row = {"method": method, "depth": depth, **compiled_bytes(size, depth, method)}
            payload["rows"].append(row)
            print(row, flush=True)
            result.save()
    for method in METHODS:
        known = {r["depth"]: r["total"] for r in payload["rows"]
                 if r["method"] == method and "total" in r}  # fmt: skip
        if isolated:
            answer = child(["deepest", method, json.dumps(known)])
            payload["deepest_depth"][method] = answer.get("deepest", answer.get("failed"))
        else:
            payload["deepest_depth"][method] = deepest(size, method, budget, known)
        print("deepest trainable depth:", method, payload["deepest_depth"][method], flush=True)
        result.save()


def exit_status(result: dict | None) -> int:
    """The script's exit status: 1 when ``--budget-s`` stopped the run, else 0."""
    return 0 if result is None or result["complete"] else 1


if __name__ == "__main__":
    sys.exit(exit_status(main()))
