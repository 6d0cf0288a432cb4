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
                f"L = {r['depth']}: {r['moonwalk']:.1f} ms vs {r['forward']:.1f} ms, "
                f"{r['speedup']:.0f}x faster"
                for r in speed
            )
            + "."
        )
    return text


def render_train_lm(payload: dict, filename: str) -> str:
    cfg, env, runs = payload["config"], payload["env"], payload["runs"]
    rev, twin = runs["reversible"], runs["backprop"]
    rows = [
        {
            "step": step,
            "rev_train": rev["train_loss"][i],
            "twin_train": twin["train_loss"][i],
            "rev_eval": rev["eval_loss"][i],
            "twin_eval": twin["eval_loss"][i],
        }
        for i, step in enumerate(rev["steps"])
    ]
    table = format_table(
        rows,
        [
            ("step", "step", "d"),
            ("rev_train", "train loss, reversible", ".4f"),
            ("twin_train", "train loss, twin", ".4f"),
            ("rev_eval", "eval loss, reversible", ".4f"),
            ("twin_eval", "eval loss, twin", ".4f"),
        ],
    )
    gap = payload["max_relative_gap"]
    return (
        f"Byte-level LM on {payload['corpus_bytes']['train']} bytes of the Python standard "
        f"library's source: depth {cfg['depth']}, width {cfg['dim']}, {cfg['heads']} heads, "
        f"context {cfg['seq_len']}, batch {cfg['batch']}, dropout {cfg['dropout']}, AdamW "
        f"(lr {cfg['lr']}), float32, seed "
        f"{cfg['seed']}. Losses in nats per byte; eval on {cfg['eval_batches']} held-out "
        f"batches. Measured on {_where(env)} by `benchmarks/train_lm.py` "
        f"(`benchmarks/results/{filename}`).\n\n{table}\n\n"
        f"Largest relative gap between the curves: {gap['train_loss']:.1e} (train), "
        f"{gap['eval_loss']:.1e} (eval). Unigram entropy of the held-out bytes: "
        f"{payload['unigram_entropy_valid']:.4f} nats."
    )


def render_transformer(payload: dict, filename: str) -> str:
    cfg, env = payload["config"], payload["env"]
    columns = [
        ("method", "method", "s"),
        ("depth", "L", "d"),
        ("temp_mib", "train-step temp MiB", ".1f"),
        ("total_mib", "total MiB (args + outputs - donated + temp)", ".1f"),
    ]
    if any("tokens_per_s" in r for r in payload["rows"]):
        columns += [("tokens_per_s", "tokens/s", ".0f"), ("peak_gib", "peak GiB", ".2f")]
    rows = [
        r
        | {"temp_mib": r["temp"] / 2**20, "total_mib": r["total"] / 2**20}
        | ({"peak_gib": r["peak_bytes"] / 2**30} if r.get("peak_bytes") else {})
        for r in payload["rows"]
    ]
    cap = cfg["max_depth"]
    deepest_by = payload["deepest_depth"]
    deepest = ", ".join(f"{m} {'>= ' if d >= cap else ''}{d}" for m, d in deepest_by.items())
    temp = {(r["method"], r["depth"]): r["temp"] for r in payload["rows"]}
    shallow, deep = min(cfg["depths"]), max(cfg["depths"])
    growth = ", ".join(
        f"{m} {temp[(m, deep)] / temp[(m, shallow)]:.2f}x"
        for m in dict.fromkeys(k[0] for k in temp)
    )
    rev = deepest_by["reversible"]
    ratios = ", ".join(
        f"{rev / d:.1f}x deeper than {m}" for m, d in deepest_by.items() if m != "reversible"
    )
    return (
        f"One AdamW training step of the reversible transformer, width {cfg['dim']}, "
        f"{cfg['heads']} heads, sequence {cfg['seq']}, batch {cfg['batch']}, float32. Measured "
        f"on {_where(env)} by `benchmarks/bench_transformer.py --size {payload['size']}` "
        f"(`benchmarks/results/{filename}`).\n\n{format_table(rows, columns)}\n\n"
        f"Deepest model whose compiled training step (state donated) fits in "
        f"{payload['budget_bytes'] / 2**30:.1f} GiB, searched up to {cap}: {deepest} blocks "
        f"(reversible {ratios}). Temp memory from L = {shallow} to L = {deep}: {growth}."
    )


def render_memory_depth(payload: dict, filename: str) -> str:
    cfg, env = payload["config"], payload["env"]
    methods = list(dict.fromkeys(r["method"] for r in payload["rows"]))
    depths = sorted({r["depth"] for r in payload["rows"]})
    temp = {(r["method"], r["depth"]): r["temp_mib"] for r in payload["rows"]}
    rows = [{"L": d, **{m: temp[(m, d)] for m in methods}} for d in depths]
    table = format_table(rows, [("L", "L", "d")] + [(m, m, ".2f") for m in methods])
    return (
        f"Compiled temp memory (MiB) of the gradient of L additive GELU-MLP couplings, halves "
        f"{cfg['width']} wide, hidden {cfg['hidden']}, batch {cfg['batch']}, {cfg['dtype']}; "
        f"anchors and nested groups every k layers, k the largest divisor of L not above "
        f"sqrt(L). Measured on {_where(env)} by `benchmarks/memory_depth.py` "
        f"(`benchmarks/results/{filename}`, plot alongside as PNG).\n\n{table}"
    )


def render_bench_suite(payload: dict, filename: str) -> str:
    env = payload["env"]
    slowest = max(payload["scripts"], key=lambda t: t["seconds"])
    return (
        f"The last `python -m revjax bench --size {payload['size']}` took "
        f"{payload['total_seconds'] / 60:.1f} minutes on {_where(env)} with "
        f"{payload['cpu_count']} CPU cores (slowest: `{slowest['command']}`, "
        f"{slowest['seconds']:.0f} s; per script in `benchmarks/results/{filename}`)."
    )


RENDERERS = {
    "scan": ("scan_gpu_gpu.json", render_scan),
    "scan_bf16": ("scan_gpu_gpu_bfloat16.json", render_scan),
    "numerics_depth_cpu": ("numerics_depth_cpu_cpu.json", render_numerics_depth),
    "numerics_depth_gpu": ("numerics_depth_gpu_gpu.json", render_numerics_depth),
    "moonwalk_cpu": ("moonwalk_cpu_cpu.json", render_moonwalk),
    "memory_depth": ("memory_depth_cpu.json", render_memory_depth),
    "bench_suite": ("bench_suite_cpu_cpu.json", render_bench_suite),
    "train_lm": ("train_lm_cpu.json", render_train_lm),
    "transformer_cpu": ("transformer_cpu_cpu.json", render_transformer),
    "transformer_gpu": ("transformer_gpu_gpu.json", render_transformer),
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
