"""Shared benchmark plumbing: environment record, result files, memory budget and the
deepest-depth search."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from revjax._validate import output_path_problem
from revjax.bench import environment  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(text: str) -> Path:
    """``argparse`` type of ``--out``: a folder for result files, created when missing. A path
    that cannot be one (a file, or below a file) is a usage error before any work, not a
    traceback when the first result is written."""
    problem = output_path_problem(text, directory=True)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--out`` option every benchmark script shares."""
    parser.add_argument(
        "--out", type=results_dir, default=None,
        help="folder for the result JSON (default: benchmarks/results); created if missing",
    )  # fmt: skip


#: ``--size`` values made for an accelerator (batch 8192, width 1024), not for a CPU.
ACCELERATOR_SIZES = frozenset({"gpu"})


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--force`` option of the scripts with an accelerator ``--size``."""
    parser.add_argument(
        "--force", action="store_true",
        help=f"run {'/'.join(sorted(ACCELERATOR_SIZES))} sizes even where JAX sees only a CPU",
    )  # fmt: skip


def refuse_accelerator_size_on_cpu(
    parser: argparse.ArgumentParser, size: str, backend: str, force: bool
) -> None:
    """Exit with a usage error (status 2) when an accelerator ``size`` would run on ``backend``
    ``"cpu"`` without ``--force``: the accelerator size, slow on a CPU, where nothing is timed."""
    if size in ACCELERATOR_SIZES and backend == "cpu" and not force:
        parser.error(
            f"--size {size} is sized for a GPU or TPU and JAX sees only a CPU; "
            "use --size cpu, or --force to run it anyway"
        )


def positive(kind: type) -> Callable[[str], Any]:
    """``argparse`` type: a finite ``kind`` (int or float) above 0 (``nan``, ``inf`` refused)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
        return value

    return parse


def write_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` to ``out_dir / name`` atomically (a temporary file, then a rename), so
    a run killed mid-write leaves the previous complete file, never a truncated one.

    A non-finite float (a diverged run's error) is kept as such, written as the ``NaN`` /
    ``Infinity`` tokens Python's ``json`` reads back (``benchmarks/report.py`` renders them as
    ``nan``/``inf``); turning it into ``null`` would lose which it was."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    partial = path.with_name(f".{name}.partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)
    return path


class ResultFile:
    """A result JSON rewritten after every unit of work (:meth:`save`), so a run stopped by a
    timeout or a crash keeps what it measured. ``payload["complete"]`` stays false until
    :meth:`finish`; ``benchmarks/report.py`` and ``plots.py`` mark such a file as a partial run.
    """

    def __init__(self, name: str, payload: dict[str, Any], out_dir: Path | None = None):
        self.name, self.out_dir = name, out_dir
        self.payload = payload
        payload["complete"] = False

    def save(self) -> Path:
        """Write the payload as it is now (still marked incomplete unless :meth:`finish` ran)."""
        return write_json(self.name, self.payload, self.out_dir)

    def finish(self, complete: bool = True) -> Path:
        """Write the payload a last time, marked ``complete`` (default: the run did it all)."""
        self.payload["complete"] = complete
        return self.save()


def budget_bytes(budget_gib: float) -> int:
    """JAX's device memory limit (``bytes_limit``), or ``budget_gib`` where there is none."""
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit") or budget_gib * 2**30)


def affine_guess(known: dict[int, int], budget: int) -> int:
    """Depth at which the line through the two shallowest ``known`` (depth -> bytes) points
    reaches ``budget``: exact when the footprint is affine in depth (a scanned stack's is)."""
    (d0, t0), (d1, t1) = sorted(known.items())[:2]
    slope = max((t1 - t0) / (d1 - d0), 1.0)
    return int(d0 + (budget - t0) // slope)


def deepest_fitting(total_at: Callable[[int], int], budget: int, max_depth: int, guess: int) -> int:
    """Largest ``d`` in ``[0, max_depth]`` with ``total_at(d) <= budget`` (``total_at``
    non-decreasing in ``d``; depth 0 always fits). Gallops from ``guess`` to bracket the answer,
    then bisects: two evaluations when ``guess`` is the answer."""
    fits = lambda d: d == 0 or total_at(d) <= budget
    guess = min(max(guess, 0), max_depth)
    if fits(guess):
        lo, step = guess, 1  # lo fits; find a depth that does not
        while lo + step <= max_depth and fits(lo + step):
            lo, step = lo + step, 2 * step
        hi = min(lo + step, max_depth + 1)  # does not fit, or past the cap
    else:
        hi, step = guess, 1  # hi does not fit; find one that does
        while hi - step > 0 and not fits(hi - step):
            hi, step = hi - step, 2 * step
        lo = max(hi - step, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
