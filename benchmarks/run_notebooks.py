"""Run every notebook top to bottom and record its wall time.

Each notebook in ``notebooks/`` is executed in a fresh Jupyter kernel (nbclient), exactly as
``tests/test_notebooks.py`` runs it, at its default size; the outputs are discarded (the files
stay stripped). The time per notebook covers kernel start, imports, JIT compilation and every
cell, which is what a reader waits for. The project's budget is 2 minutes per notebook on a
CPU; the JSON records whether each run met it.

``--jobs N`` runs N notebooks at a time (default 2, which shortens ``make bench``): each then
shares the machine with another, so its time is an upper bound of what it takes alone. The
JSON records ``jobs``.

    python benchmarks/run_notebooks.py     # writes benchmarks/results/notebooks_<backend>.json
    python benchmarks/run_notebooks.py --jobs 1    # one at a time
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_out_argument, environment, write_json

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
BUDGET_SECONDS = 120.0


def run_notebook(path: Path, timeout: int = 600) -> float:
    """Execute ``path`` in a new kernel (outputs kept in memory only); return wall seconds.

    Raises:
      nbclient.exceptions.CellExecutionError: a cell failed (the notebooks assert their results).
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--jobs", type=int, default=2, help="notebooks run at a time")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    # Each kernel is its own process; the pool's workers only wait for them.
    times = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        try:
            for path, seconds in zip(paths, pool.map(run_notebook, paths), strict=True):
                times.append(seconds)
                print(f"{path.name}: {seconds:.1f} s", flush=True)
        except BaseException:  # a failed notebook stops the run: start no other
            pool.shutdown(cancel_futures=True)
            raise
    rows = [
        {"notebook": path.name, "seconds": seconds, "within_budget": seconds < BUDGET_SECONDS}
        for path, seconds in zip(paths, times, strict=True)
    ]
    env = environment()
    payload = {
        "benchmark": "notebooks",
        "env": env,
        "cpu_count": os.cpu_count(),
        "budget_seconds": BUDGET_SECONDS,
        "jobs": args.jobs,
        "rows": rows,
    }
    path = write_json(f"notebooks_{env['backend']}.json", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
