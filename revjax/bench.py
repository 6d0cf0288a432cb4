"""``python -m revjax bench``: run every benchmark and regenerate the README's results.

The benchmark scripts live in the source checkout (``benchmarks/``), not in the installed
package, so this command works from a clone (``make bench`` calls it). After the benchmarks it
draws the PNG plots (``benchmarks/plots.py``) and refreshes the README (``report.py``).
``--size cpu`` (default) runs everything at CPU sizes; ``--size gpu`` runs the GPU-size
benchmarks (timings, peak memory), which need an accelerator. ``--list`` prints the commands
without running them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Script and arguments, per size. Every script writes JSON into benchmarks/results/.
SUITES: dict[str, list[list[str]]] = {
    "cpu": [
        ["bench_scan.py", "--size", "cpu"],
        ["numerics_cpu.py"],
        ["count_gemms.py"],
        ["numerics_depth.py", "--size", "cpu"],
        ["bench_activations.py"],
        ["bench_revnet.py"],
        ["bench_moonwalk.py", "--size", "cpu"],
        ["memory_depth.py"],
        ["train_lm.py"],
        ["bench_transformer.py", "--size", "cpu"],
        ["run_notebooks.py"],
    ],
    "gpu": [
        ["bench_scan.py", "--size", "gpu", "--dtype", "float32"],
        ["bench_scan.py", "--size", "gpu", "--dtype", "bfloat16"],
        ["numerics_depth.py", "--size", "gpu"],
        ["bench_moonwalk.py", "--size", "gpu"],
        ["bench_activations.py"],
        ["bench_transformer.py", "--size", "gpu"],
    ],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m revjax bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--list", action="store_true", help="print the commands only")
    parser.add_argument(
        "--force", action="store_true", help="run the GPU sizes even without an accelerator"
    )
    args = parser.parse_args(argv)
    if args.size == "gpu" and not (args.list or args.force):
        import jax

        if jax.default_backend() == "cpu":
            print("error: --size gpu needs a GPU or TPU (jax sees only a CPU); use --force "
                  "to run anyway", file=sys.stderr)  # fmt: skip
            return 2
    scripts = ROOT / "benchmarks"
    if not (scripts / "report.py").exists():
        print(f"error: {scripts} not found; run from a source checkout of revjax", file=sys.stderr)
        return 2
    commands = [[sys.executable, str(scripts / name), *rest] for name, *rest in SUITES[args.size]]
    plots = [sys.executable, str(scripts / "plots.py")]
    report = [sys.executable, str(scripts / "report.py")]
    if args.list:
        for command in [*commands, plots, report]:
            print(_shown(command))
        return 0
    timings = []
    for command in commands:
        start = time.perf_counter()
        print(f"[revjax bench] {_shown(command)}", flush=True)
        result = subprocess.run(command, check=False)
        if result.returncode:
            print(f"error: {_shown(command)} exited with {result.returncode}", file=sys.stderr)
            return result.returncode
        timings.append({"command": _shown(command), "seconds": time.perf_counter() - start})
        print(f"[revjax bench] {_shown(command)}: {timings[-1]['seconds']:.0f} s", flush=True)
    _record(scripts, args.size, timings)
    failed = subprocess.run(plots, check=False).returncode
    return failed or subprocess.run(report, check=False).returncode


def _shown(command: list[str]) -> str:
    return " ".join(Path(part).name if part.endswith(".py") else part for part in command[1:])


def _record(scripts: Path, size: str, timings: list[dict]) -> None:
    """Writes ``bench_suite_<size>_<backend>.json``: how long each benchmark took."""
    sys.path.insert(0, str(scripts.parent))
    from benchmarks.common import environment, write_json

    env = environment()
    total = sum(t["seconds"] for t in timings)
    payload = {"benchmark": "bench_suite", "size": size, "scripts": timings,
               "total_seconds": total, "cpu_count": os.cpu_count(), "env": env}  # fmt: skip
    write_json(f"bench_suite_{size}_{env['backend']}.json", payload)
