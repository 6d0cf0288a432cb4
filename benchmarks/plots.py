"""PNG plots of benchmark results, drawn from the JSON in benchmarks/results/ (never re-measured).

    python benchmarks/plots.py        # writes <result>.png next to each result it knows

``python -m revjax bench`` runs it after the benchmarks. Each plot states the device and date
of its measurement in its title, and "PARTIAL RUN" for a result whose run stopped early
(``complete`` false: it draws what was measured).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from revjax._validate import output_path_problem

RESULTS = Path(__file__).resolve().parent / "results"


def _where(env: dict) -> str:
    return f"{env['device']}, {env['date']}"


def plot_train_lm(payload: dict, ax) -> None:
    for method, run in payload["runs"].items():
        ax.plot(run["steps"], run["eval_loss"], marker="o", label=f"{method}, held-out")
        ax.plot(run["steps"], run["train_loss"], linestyle=":", label=f"{method}, train batch")
    ax.axhline(payload["unigram_entropy_valid"], color="gray", linestyle="--", label="unigram")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")


def plot_transformer(payload: dict, ax) -> None:
    methods = list(dict.fromkeys(r["method"] for r in payload["rows"]))
    for method in methods:
        rows = [r for r in payload["rows"] if r["method"] == method and "temp" in r]
        deepest = payload["deepest_depth"].get(method, "not searched")
        ax.plot([r["depth"] for r in rows], [r["temp"] / 2**20 for r in rows], marker="o",
                label=f"{method} (deepest {deepest})")  # fmt: skip
    ax.set_xlabel("blocks L")
    ax.set_ylabel("training-step temp memory (MiB)")


def plot_moonwalk(payload: dict, ax) -> None:
    rows = [r for r in payload["rows"] if r["network"] == "revnet"]
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["depth"], r["temp_mib"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("couplings L (RevNet)")
    ax.set_ylabel("gradient temp memory (MiB)")


def plot_scan(payload: dict, ax) -> None:
    for method in dict.fromkeys(r["method"] for r in payload["rows"]):
        rows = [r for r in payload["rows"] if r["method"] == method]
        ax.plot([r["temp_mib"] for r in rows], [r["ms"] for r in rows], marker="o", label=method)
        for r in rows:
            ax.annotate(f"L={r['depth']}", (r["temp_mib"], r["ms"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("gradient temp memory (MiB)")
    ax.set_ylabel("step time (ms)")


#: Result file -> plot. Every benchmark's GPU-size result (``*_gpu_gpu.json``) is drawn like its
#: CPU one; the CPU size's scan timings are not (CPU times are not claims, DESIGN.md section 4).
PLOTS: dict[str, Callable] = {
    "train_lm_cpu.json": plot_train_lm,
    "transformer_cpu_cpu.json": plot_transformer,
    "transformer_gpu_gpu.json": plot_transformer,
    "moonwalk_cpu_cpu.json": plot_moonwalk,
    "moonwalk_gpu_gpu.json": plot_moonwalk,
    "scan_gpu_gpu.json": plot_scan,
    "scan_gpu_gpu_bfloat16.json": plot_scan,
}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", type=Path, default=RESULTS,
        help="folder of result JSON to plot (default: benchmarks/results)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the PNGs (default: --results)"
    )
    args = parser.parse_args(argv)
    if not args.results.is_dir():  # else nothing is drawn and nothing said
        parser.error(f"--results {args.results}: not a folder")
    out_dir = args.out or args.results
    problem = output_path_problem(out_dir, directory=True)
    if problem is not None:  # e.g. a path below a file: mkdir's traceback otherwise
        parser.error(f"--out {out_dir}: {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written, unreadable = [], []
    for name, plot in PLOTS.items():
        path = args.results / name
        if not path.exists():
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        try:  # a file that is not JSON, or lacks a field its plot reads
            payload = json.loads(path.read_text())
            plot(payload, ax)
            if not ax.has_data():  # a run stopped before its first row: no blank PNG
                plt.close(fig)
                print(f"skipped {path}: no rows to plot")
                continue
            partial = "" if payload.get("complete", True) else "PARTIAL RUN, "
            ax.set_title(f"{path.stem} ({partial}{_where(payload['env'])})", fontsize=9)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            plt.close(fig)
            unreadable.append(f"{path}: {type(err).__name__}: {err}")
            continue  # the other results are still worth drawing
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        target = out_dir / f"{path.stem}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
        print(f"wrote {target}")
    if unreadable:
        raise SystemExit("plots.py: not a result JSON, not plotted:\n  " + "\n  ".join(unreadable))
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
