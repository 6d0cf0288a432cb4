"""``python -m revjax bench``: run every benchmark and regenerate the README's results.

The benchmark scripts live in the source checkout (``benchmarks/``), not in the installed
package, so this command works from a clone (``make bench`` calls it). After the benchmarks it
draws the PNG plots (``benchmarks/plots.py``) and refreshes the README (``report.py``).
``--size cpu`` (default) runs everything at CPU sizes; ``--size gpu`` runs the GPU-size
benchmarks (timings, peak memory), which need an accelerator. ``--list`` prints the commands
without running them; ``--only SCRIPT ...`` runs part of the suite; ``--out DIR`` writes the
JSON to ``DIR`` and leaves the README alone (for a device whose results are copied back);
``--timeout S`` bounds each script. A failing script does not stop the others; the command
then exits with 1 and names it (1 also when the README refresh fails).

The CPU suite's scripts that record no wall time (memory analyses, numerics, compile-only
counts: :data:`SHARED`) run first, two at a time and longest first (by the last recorded run),
so ``make bench`` takes less of a 2-core machine's time; each of them sees
:data:`CONCURRENT_ENV` set to the number running at once, and ``benchmarks/common.py`` records
it with its results. The timed scripts then run one at a time, alone on the machine. On a GPU
every script runs alone (two processes would compete for the device's memory). Compute-bound
scripts (``train_lm.py``, the notebooks) stay in the second phase even where they time
nothing: beside another benchmark they only slow each other down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from revjax._validate import output_path_problem

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
        ["count_gemms.py"],  # on the GPU's HLO: cuBLAS calls, for the scan summary
        ["numerics_depth.py", "--size", "gpu"],
        ["bench_moonwalk.py", "--size", "gpu"],
        ["bench_activations.py"],
        ["memory_depth.py"],
        ["bench_transformer.py", "--size", "gpu"],
    ],
}


#: Per size, the scripts that time nothing there: safe to run two at a time (see module doc).
SHARED: dict[str, set[str]] = {
    "cpu": {"numerics_cpu.py", "count_gemms.py", "numerics_depth.py", "bench_revnet.py",
            "memory_depth.py", "bench_transformer.py"},
    "gpu": set(),
}  # fmt: skip
CONCURRENT_JOBS = 2
#: Set for every script of the shared phase: how many scripts run at once (see module doc).
CONCURRENT_ENV = "REVJAX_BENCH_CONCURRENT_JOBS"


def environment() -> dict[str, Any]:
    """Where and with what a result was measured: date (UTC), backend, device and count, jax,
    jaxlib, flax and Python versions, the default matmul precision, ``concurrent_jobs``
    (benchmark scripts running at once, this one included; 1: alone or run by hand) and the
    revjax ``commit`` measured (:func:`source_commit`). Every result JSON of ``benchmarks/``
    and ``python -m revjax demo --json`` records it as ``env``. Imports JAX and initialises its
    backend: call it in the process that measures."""
    import datetime
    import platform

    import flax
    import jax

    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        # None: JAX's default, which on a GPU rounds float32 matmul inputs TF32-like.
        "default_matmul_precision": jax.config.jax_default_matmul_precision,
        "concurrent_jobs": int(os.environ.get(CONCURRENT_ENV, "1")),
        "commit": source_commit(),
    }


#: Names the commit of a copy of the sources that is not a git checkout (a device machine's).
COMMIT_ENV = "REVJAX_COMMIT"


def source_commit() -> str | None:
    """The revjax commit being measured: ``git rev-parse --short HEAD`` of the checkout, with
    ``+dirty`` when a file under ``revjax/`` or ``benchmarks/`` differs from it or is new (not
    ignored); the results themselves (``benchmarks/results/``) do not count, or every script
    after a suite's first would say dirty. Where the sources are not a git checkout (a copy on
    a device machine), :data:`COMMIT_ENV` if set, else None. A result's numbers belong to the
    code of this commit. Read-only: git's optional index refresh is off, so the user's own git
    commands never meet a lock taken by a benchmark."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            paths = ["revjax", "benchmarks", ":(exclude)benchmarks/results"]
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--untracked-files=normal", "--", *paths],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get(COMMIT_ENV) or None


def main(argv: list[str] | None = None) -> int:
    """``python -m revjax bench [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m revjax bench", description=__doc__.splitlines()[0].replace("``", "")
    )
    parser.add_argument(
        "--size", choices=sorted(SUITES), default="cpu",
        help="cpu: the CPU sizes; gpu: the accelerator sizes, needs a GPU or TPU (default: cpu)",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the commands only")
    parser.add_argument(
        "--force", action="store_true", help="run the GPU sizes even without an accelerator"
    )
    parser.add_argument(
        "--only", nargs="+", metavar="SCRIPT", help="run only these scripts of the suite"
    )
    parser.add_argument(
        "--out", type=Path, default=None,
        help="write every script's JSON here instead of benchmarks/results (no README refresh)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds each script may run (default: none)"
    )
    args = parser.parse_args(argv)
    if args.force and args.size != "gpu":  # nothing to force: accepted, it did nothing
        parser.error(f"--force applies to --size gpu only, got --size {args.size}")
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    problem = None if args.out is None else output_path_problem(args.out, directory=True)
    if problem is not None:
        parser.error(f"--out {args.out}: {problem}")
    suite = SUITES[args.size]
    if args.only:
        known = {name for name, *_ in suite}
        unknown = sorted(set(args.only) - known)
        if unknown:
            print(f"error: {unknown} not in the {args.size} suite; choose from {sorted(known)}",
                  file=sys.stderr)  # fmt: skip
            return 2
        suite = [entry for entry in suite if entry[0] in args.only]
    if args.size == "gpu" and not (args.list or args.force):
        if _backend_in_a_child() == "cpu":
            print("error: --size gpu needs a GPU or TPU (jax sees only a CPU); use --force "
                  "to run anyway", file=sys.stderr)  # fmt: skip
            return 2
    scripts = ROOT / "benchmarks"
    if not (scripts / "report.py").exists():
        print(f"error: {scripts} not found; run from a source checkout of revjax", file=sys.stderr)
        return 2
    out = [] if args.out is None else ["--out", str(args.out)]
    # The scripts check their own --size too: --force passes that check on as well.
    force = ["--force"] if args.force and args.size == "gpu" else []
    commands = [
        [sys.executable, str(scripts / name), *rest, *(force if "--size" in rest else []), *out]
        for name, *rest in suite
    ]
    plots = [sys.executable, str(scripts / "plots.py")]
    report = [sys.executable, str(scripts / "report.py")]
    refresh = [] if args.out is not None else [plots, report]
    if args.list:
        for command in [*commands, *refresh]:
            print(_shown(command))
        return 0
    shared = [c for (name, *_), c in zip(suite, commands, strict=True) if name in SHARED[args.size]]
    alone = [c for c in commands if c not in shared]
    shared = longest_first(shared, _last_seconds(args.size, args.out))
    start = time.perf_counter()
    outcomes = _run_all(shared, args.timeout, CONCURRENT_JOBS) + _run_all(alone, args.timeout, 1)
    wall = time.perf_counter() - start
    order = {_shown(c): i for i, c in enumerate(commands)}
    timings, failures = [], []
    for command, seconds, failure in sorted(outcomes, key=lambda o: order[o[0]]):
        if failure:  # the others ran on: they are still worth having
            failures.append(f"{command}: {failure}")
        else:
            timings.append({"command": command, "seconds": seconds})
    if not args.only and not failures:  # the suite's total is only meaningful for a full run
        concurrent = [_shown(c) for c in shared]
        _record(args.size, timings, wall, concurrent, args.out)
    codes = [subprocess.run(command, check=False).returncode for command in refresh]
    if failures:
        print("failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    # A refresh killed by a signal has a negative code: any non-zero code is a failure.
    return 1 if any(codes) else 0


def _backend_in_a_child() -> str:
    """JAX's default backend, asked of a separate process: initialising a backend here would
    hold device memory for the whole suite while the benchmarks run in child processes."""
    probe = "import jax; print(jax.default_backend())"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else "unknown"


def _script(command: list[str]) -> str:
    """The benchmark script's file name (a suite names each script once)."""
    return Path(command[1]).name


def _last_seconds(size: str, out: Path | None) -> dict[str, float]:
    """Seconds per script in the last recorded full run of the ``size`` suite, read from
    ``bench_suite_<size>_*.json`` in ``out`` (default ``benchmarks/results``); empty if none."""
    seconds: dict[str, float] = {}
    records = Path(out or ROOT / "benchmarks" / "results").glob(f"bench_suite_{size}_*.json")
    for path in sorted(records, key=lambda p: p.stat().st_mtime):  # the newest wins
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            for entry in json.loads(path.read_text())["scripts"]:
                seconds[entry["command"].split()[0]] = float(entry["seconds"])
    return seconds


def longest_first(commands: list[list[str]], seconds: dict[str, float]) -> list[list[str]]:
    """``commands`` with the longest (by ``seconds``, per script name) first, so that two
    slots finish close together; a script never timed counts as longest, and ties keep the
    suite's order."""
    return sorted(commands, key=lambda c: -seconds.get(_script(c), float("inf")))


def _run_all(
    commands: list[list[str]], timeout: float | None, jobs: int
) -> list[tuple[str, float, str | None]]:
    """Run the benchmarks, ``jobs`` at a time, in the given order; returns ``(command, seconds,
    failure)`` per command in the order they finished (``failure`` None on success, else why:
    its exit code or the timeout). Each sees :data:`CONCURRENT_ENV` set to the number of slots
    it shares, ``jobs``, or fewer when there are fewer commands (one shared script runs
    alone). A script past ``timeout`` seconds is killed with its whole process group, so
    processes it started do not keep the device; Ctrl-C kills every running group."""
    waiting, running, done = list(commands), {}, []
    env = {**os.environ, CONCURRENT_ENV: str(max(1, min(jobs, len(commands))))}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                command = waiting.pop(0)
                print(f"[revjax bench] {_shown(command)}", flush=True)
                # Its own process group (session), killed as a whole: see the docstring.
                process = subprocess.Popen(command, start_new_session=True, env=env)
                running[process] = (command, time.perf_counter())
            time.sleep(0.05)
            for process, (command, start) in list(running.items()):
                seconds = time.perf_counter() - start
                code = process.poll()
                if code is None and (timeout is None or seconds < timeout):
                    continue
                if code is None:
                    _kill_group(process)
                failure = (
                    f"timed out after {timeout:g} s"
                    if code is None
                    else (f"exit {code}" if code else None)
                )
                del running[process]
                done.append((_shown(command), seconds, failure))
                if failure:
                    print(f"error: {_shown(command)}: {failure}", file=sys.stderr, flush=True)
                else:
                    print(f"[revjax bench] {_shown(command)}: {seconds:.0f} s", flush=True)
    except KeyboardInterrupt:  # Ctrl-C no longer reaches the groups by itself
        for process in running:
            _kill_group(process)
        raise
    return done


def _kill_group(process: subprocess.Popen) -> None:
    """Kill ``process``'s whole group and reap it (a group already gone is fine: the process
    may have exited between its last poll and now)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _shown(command: list[str]) -> str:
    return " ".join(Path(part).name if part.endswith(".py") else part for part in command[1:])


def _record(
    size: str, timings: list[dict], wall: float, concurrent: list[str], out: Path | None
) -> None:
    """Writes ``bench_suite_<size>_<backend>.json``: how long each benchmark took, the suite's
    wall time (``total_seconds``) and which scripts shared the machine, in the order they
    started (``concurrent``)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import write_json

    env = environment()
    payload = {"benchmark": "bench_suite", "size": size, "scripts": timings,
               "total_seconds": wall, "concurrent": concurrent, "jobs": CONCURRENT_JOBS,
               "cpu_count": os.cpu_count(), "env": env}  # fmt: skip
    write_json(f"bench_suite_{size}_{env['backend']}.json", payload, out)
