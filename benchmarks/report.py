"""Renders benchmarks/results/*.json into the README between ``<!-- results:NAME -->`` markers.

Every number in the README's results section comes from here, never typed by hand:

    python benchmarks/report.py            # rewrite README.md in place
    python benchmarks/report.py --check    # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.numerics_depth import METHODS as DEPTH_METHODS  # noqa: E402
from revjax.diagnostics import format_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _where(env: dict) -> str:
    return f"{env['device']} ({env['backend']}), jax {env['jax']}, {env['date']}"


def render_scan(payload: dict, filename: str) -> str:
    cfg, env = payload["config"], payload["env"]
    dtype = cfg.get("dtype", "float32")
    table = format_table(
        payload["rows"],
        [
            ("method", "method", "s"),
            ("depth", "L", "d"),
            ("temp_mib", "grad temp MiB", ".1f"),
            ("temp_ratio_to_backprop", "temp / backprop", ".4f"),
            ("ms", "step ms", ".2f"),
            ("time_ratio_to_backprop", "time / backprop", ".3f"),
            ("time_ratio_to_checkpoint", "time / checkpoint", ".3f"),
            ("grad_rel_err_default", "grad err, default matmul prec.", ".1e"),
            ("grad_rel_err_highest", "grad err, highest", ".1e"),
        ],
    )
    return (
        f"Gradient step of L additive GELU-MLP couplings, {cfg['rows']} rows, halves "
        f"{cfg['width']} wide, hidden {cfg['hidden']}, {dtype} parameters, stream and compute. "
        f"Measured on {_where(env)} by `benchmarks/bench_scan.py --size {payload['size']} "
        f"--dtype {dtype}` (`benchmarks/results/{filename}`); time is the median of "
        f"{cfg['repeats']} runs.\n\n{table}"
    )


def render_numerics_depth(payload: dict, filename: str) -> str:
    size, env, rows = payload["size"], payload["env"], payload["rows"]
    order = list(DEPTH_METHODS)
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=order.index)
    timed = any(r.get("time_vs_bf16_backprop") is not None for r in rows)

    def cell(r):
        if r["overflow"]:
            return "overflow"
        text = "0 (bitwise)" if r["bitwise_equal"] else f"{r['grad_rel_err']:.1e}"
        if r["method"] == "exact":
            text += f", F={r['fraction_bits']}"
        if timed:
            text += f"; {r['time_vs_bf16_backprop']:.2f}x"
        return text

    table = format_table(
        [
            {"depth": d, **{m: cell(r) for r in rows if r["depth"] == d for m in [r["method"]]}}
            for d in dict.fromkeys(r["depth"] for r in rows)
        ],
        [("depth", "L", "d"), *((m, m, "") for m in methods)],
    )
    what = "relative error of the parameter gradient vs plain backprop of the same network"
    if timed:
        what += "; step time as a ratio to plain bf16 backprop"
    return (
        f"Reference network (additive GELU-MLP couplings, bf16 params and compute, weights "
        f"N(0, (0.5/sqrt(width))^2)), batch {size['batch']}, halves {size['width']} wide, hidden "
        f"{size['hidden']}: {what}. Exact mode uses the most fraction bits F whose range "
        f"2^(24-F) holds twice the stream's peak. Measured on {_where(env)} by "
        f"`benchmarks/numerics_depth.py` (`benchmarks/results/{filename}`, plot alongside as "
        f"PNG).\n\n{table}"
    )


def render_moonwalk(payload: dict, filename: str) -> str:
    size, env, rows = payload["size"], payload["env"], payload["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tables = []
    for network in dict.fromkeys(r["network"] for r in rows):
        pivot = [
            {
                "depth": d,
                **{
                    r["method"]: r["temp_mib"]
                    for r in rows
                    if r["network"] == network and r["depth"] == d
                },
            }
            for d in dict.fromkeys(r["depth"] for r in rows if r["network"] == network)
        ]
        columns = [("depth", "L", "d"), *((m, m, ".3f") for m in methods)]
        tables.append(f"**{network}** (grad temp MiB)\n\n" + format_table(pivot, columns))
    text = (
        f"Compiled temp memory of each gradient method vs depth, batch {size['batch']}, RevNet "
        f"halves {size['width']} wide (hidden {size['hidden']}), submersive MLP width "
        f"{2 * size['width']}; measured on {_where(env)} by `benchmarks/bench_moonwalk.py` "
        f"(`benchmarks/results/{filename}`).\n\n" + "\n\n".join(tables)
    )
    speed = payload.get("moonwalk_vs_forward_mode")
    if speed:
        text += "\n\nPure-forward Moonwalk vs exact forward mode on the RevNet (wall time on " + (
            f"{env['backend']}): "
            + "; ".join(
                f"L = {r['depth']}: {r['forward']:.1f} ms vs {r['moonwalk']:.1f} ms, "
                f"{r['speedup']:.0f}x"
                for r in speed
            )
            + "."
        )
    return text


RENDERERS = {
    "scan": ("scan_gpu_gpu.json", render_scan),
    "scan_bf16": ("scan_gpu_gpu_bfloat16.json", render_scan),
    "numerics_depth_cpu": ("numerics_depth_cpu_cpu.json", render_numerics_depth),
    "numerics_depth_gpu": ("numerics_depth_gpu_gpu.json", render_numerics_depth),
    "moonwalk_cpu": ("moonwalk_cpu_cpu.json", render_moonwalk),
}


def render_readme(text: str) -> str:
    for name, (filename, render) in RENDERERS.items():
        path = RESULTS / filename
        if not path.exists():
            continue
        block = render(json.loads(path.read_text()), filename)
        pattern = re.compile(
            rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S
        )
        text = pattern.sub(lambda m, b=block: m.group(1) + b + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render_readme(old)
    if args.check:
        if new != old:
            print("README.md results are stale: run python benchmarks/report.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
