"""Renders benchmarks/results/*.json into the README between ``<!-- results:NAME -->`` markers.

Every number in the README's results section comes from here, never typed by hand:

    python benchmarks/report.py            # rewrite README.md in place
    python benchmarks/report.py --check    # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.numerics_depth import METHODS as DEPTH_METHODS  # noqa: E402
from revjax.diagnostics import format_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _where(env: dict) -> str:
    commit = f", commit {env['commit']}" if env.get("commit") else ""
    return f"{env['device']} ({env['backend']}), jax {env['jax']}, {env['date']}{commit}"


def _same_setup(a: dict, b: dict) -> bool:
    """Same device, backend, jax, commit and day: two files one label may name (the minute of
    day differs between scripts of one run)."""
    keys = ("device", "backend", "jax", "commit")
    day = lambda env: str(env.get("date", "")).split(" ")[0]
    return all(a.get(k) == b.get(k) for k in keys) and day(a) == day(b)


def _source(env: dict, script: str, *filenames: str) -> str:
    """``measured on <device> by `benchmarks/<script>` (`benchmarks/results/<file>`, ...)``."""
    files = ", ".join(f"`benchmarks/results/{f}`" for f in filenames)
    return f"measured on {_where(env)} by `benchmarks/{script}` ({files})"


def _num(x: float, sig: int = 2) -> str:
    """``x`` to ``sig`` significant digits: plain between 0.1 and 10^4 (``0.22``, ``2.1``,
    ``210``), else scientific without exponent padding (``2.9e-6``, ``1.1e-2``, ``3.1e7``);
    ``inf``/``nan`` as such (a diverged run writes them)."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    mantissa, power = f"{x:.{sig - 1}e}".split("e")
    exponent = int(power)
    if -1 <= exponent < 4:
        decimals = sig - 1 - exponent
        return f"{round(x, decimals):.{max(decimals, 0)}f}"
    return f"{mantissa}e{exponent}"


def _span(values: list[float], fmt=_num) -> str:
    """``lo to hi`` of formatted values (one value when they format the same)."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo} to {hi}"


def _series(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


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
        f"{_partial(payload)}Gradient step of L additive GELU-MLP couplings, {cfg['rows']} "
        f"rows, halves {cfg['width']} wide, hidden {cfg['hidden']}, {dtype} parameters, stream "
        f"and compute. Measured on {_where(env)} by `benchmarks/bench_scan.py --size "
        f"{payload['size']} --dtype {dtype}` (`benchmarks/results/{filename}`); time is the "
        f"median of {cfg['repeats']} runs. Each gradient error is measured against plain "
        f"backprop of the same {dtype} network in the same run.\n\n{table}"
    )


def render_numerics_depth(payload: dict, filename: str) -> str:
    size, env, rows = payload["size"], payload["env"], payload["rows"]
    order = list(DEPTH_METHODS)
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=order.index)
    timed = any(r.get("time_vs_bf16_backprop") is not None for r in rows)
    check = payload.get("equivalence")
    # The CPU size checkpoints every reference on purpose (and checks it changes nothing):
    # tag only references checkpointed because plain backprop did not fit.
    substituted = check is not None and all(check["bitwise_equal"].values())

    def cell(r):
        if r["overflow"]:
            return "overflow"
        if r.get("oom"):
            return "out of memory"
        text = "0 (bitwise)" if r["bitwise_equal"] else f"{r['grad_rel_err']:.1e}"
        if r["method"] == "exact":
            text += f", F={r['fraction_bits']}"
        if r.get("reference") == "checkpoint" and not substituted:
            text += " (ref. checkpointed)"
        if timed:
            ratio = r.get("time_vs_bf16_backprop")
            text += "; -" if ratio is None else f"; {ratio:.2f}x"
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
        what += "; step time as a ratio to plain bf16 backprop (- where that does not fit)"
    if substituted:
        changes = []
        if size.get("param_dtype", "bfloat16") != "bfloat16":
            changes.append(f"the bf16 weights are held in {size['param_dtype']} arrays")
        if size.get("reference", "backprop") != "backprop":
            changes.append("the reference is checkpointed per layer")
        what += (
            f"; to run faster on this {env['backend'].upper()} {_series(changes)}, which gives "
            f"every method's gradient and reference bit for bit (checked against the literal "
            f"network at L = {check['depth']} by the script)"
        )
    elif any(r.get("reference") == "checkpoint" for r in rows):
        what += (
            "; where plain backprop does not fit in device memory the reference is the same "
            "network with `jax.checkpoint` per layer (ref. checkpointed)"
        )
    return (
        f"{_partial(payload)}Reference network (additive GELU-MLP couplings, bf16 params and "
        f"compute, weights "
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
    timed = any(r.get("ms") is not None for r in rows)
    quantities = [("temp_mib", "grad temp MiB", ".3f")]
    if timed:
        quantities.append(("ms", "ms per gradient, median of 10", ".2f"))
    if all("grad_error" in r for r in rows):
        quantities.append(("grad_error", "gradient relative error vs backprop", ".1e"))
    for network in dict.fromkeys(r["network"] for r in rows):
        for key, label, fmt in quantities:
            pivot = [
                {
                    "depth": d,
                    **{
                        r["method"]: r[key]
                        for r in rows
                        if r["network"] == network and r["depth"] == d
                    },
                }
                for d in dict.fromkeys(r["depth"] for r in rows if r["network"] == network)
            ]
            columns = [("depth", "L", "d"), *((m, m, fmt) for m in methods)]
            tables.append(f"**{network}** ({label})\n\n" + format_table(pivot, columns))
    text = (
        f"{_partial(payload)}Compiled temp memory of each gradient method vs depth, batch "
        f"{size['batch']}, RevNet "
        f"halves {size['width']} wide (hidden {size['hidden']}), submersive MLP width "
        f"{2 * size['width']} (`leaky_relu({payload.get('slope', 0.1)})`); measured on "
        f"{_where(env)} by `benchmarks/bench_moonwalk.py` "
        f"(`benchmarks/results/{filename}`).\n\n" + "\n\n".join(tables)
    )
    speed = payload.get("moonwalk_vs_forward_mode")
    if speed:
        runs = speed[0].get("repeats")  # older files did not record it
        median = f", median of {runs} runs" if runs else ""
        caveat = "; on a CPU for orientation only" if env["backend"] == "cpu" else ""
        net = payload.get("speedup_network")  # older files measured at the CPU size only
        on = (
            f"a RevNet with halves {net['width']} wide (hidden {net['hidden']}, batch "
            f"{net['batch']}; exact forward mode takes one JVP per parameter)"
            if net
            else "the RevNet"
        )
        text += f"\n\nPure-forward Moonwalk vs exact forward mode on {on} (wall time on " + (
            f"{env['backend']}{median}{caveat}): "
            + "; ".join(
                f"L = {r['depth']}: {r['moonwalk']:.1f} ms vs {r['forward']:.1f} ms, "
                f"{r['speedup']:.0f}x faster"
                for r in speed
            )
            + "."
        )
    ratios = _mixed_moonwalk_time_ratios(rows)
    if ratios:
        text += (
            "\n\nMixed Moonwalk's gradient time as a multiple of backprop's (same rows): "
            + "; ".join(
                f"{network} " + ", ".join(f"L = {d}: {q:.2f}x" for d, q in by_depth)
                for network, by_depth in ratios.items()
            )
            + "."
        )
    return text


def _mixed_moonwalk_time_ratios(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per network, ``(depth, mixed_moonwalk ms / backprop ms)`` where both were timed."""
    ms = {(r["network"], r["depth"], r["method"]): r.get("ms") for r in rows}
    out: dict[str, list[tuple[int, float]]] = {}
    for network, depth, method in ms:
        mixed, plain = ms[network, depth, method], ms.get((network, depth, "backprop"))
        if method == "mixed_moonwalk" and mixed is not None and plain:
            out.setdefault(network, []).append((depth, mixed / plain))
    return out


def render_train_lm(payload: dict, filename: str) -> str:
    cfg, env, runs = payload["config"], payload["env"], payload["runs"]
    rev, twin = runs["reversible"], runs["backprop"]
    at = lambda run, key: dict(zip(run["steps"], run[key], strict=True))
    # Paired by step: a resumed reversible run logs only the steps after its checkpoint.
    rows = [
        {
            "step": step,
            "rev_train": at(rev, "train_loss").get(step),
            "twin_train": at(twin, "train_loss").get(step),
            "rev_eval": at(rev, "eval_loss").get(step),
            "twin_eval": at(twin, "eval_loss").get(step),
        }
        for step in sorted({*rev["steps"], *twin["steps"]})
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


def _partial(payload: dict) -> str:
    """A warning for a payload whose run stopped early (``complete`` false), else nothing."""
    if payload.get("complete", True):
        return ""
    return "**Partial run** (it stopped early; below is what it measured). "


def render_transformer(payload: dict, filename: str) -> str:
    """Training-step memory (and GPU throughput) per method and depth, and the deepest depth
    that fits; rows that failed or were not run say why."""
    cfg, env = payload["config"], payload["env"]
    columns = [
        ("method", "method", "s"),
        ("depth", "L", "d"),
        ("temp_mib", "train-step temp MiB", ".1f"),
        ("total_mib", "total MiB (args + outputs - donated + temp)", ".1f"),
    ]
    if any("tokens_per_s" in r for r in payload["rows"]):
        columns += [("tokens_per_s", "tokens/s", ".0f"), ("peak_gib", "peak GiB", ".2f")]
    if any("failed" in r or "not_run" in r for r in payload["rows"]):
        columns.append(("note", "note", "s"))
    rows = [
        r
        | ({"temp_mib": r["temp"] / 2**20, "total_mib": r["total"] / 2**20} if "temp" in r else {})
        | ({"peak_gib": r["peak_bytes"] / 2**30} if r.get("peak_bytes") else {})
        | {"note": r.get("failed") or r.get("not_run") or ""}
        for r in payload["rows"]
    ]
    text = (
        f"{_partial(payload)}One AdamW training step of the reversible transformer, width "
        f"{cfg['dim']}, {cfg['heads']} heads, sequence {cfg['seq']}, batch {cfg['batch']}, "
        f"float32. Measured on {_where(env)} by `benchmarks/bench_transformer.py --size "
        f"{payload['size']}` (`benchmarks/results/{filename}`).\n\n{format_table(rows, columns)}"
    )
    cap = cfg["max_depth"]
    found = {m: d for m, d in payload["deepest_depth"].items() if isinstance(d, int)}
    if payload["deepest_depth"]:
        deepest = "; ".join(
            [", ".join(f"{m} {'>= ' if d >= cap else ''}{d}" for m, d in found.items())
             + " blocks"] * bool(found)
            + [f"{m}: search failed ({d})" for m, d in payload["deepest_depth"].items()
               if m not in found]
        )  # fmt: skip
        text += (
            f"\n\nDeepest model whose compiled training step (state donated) fits in "
            f"{payload['budget_bytes'] / 2**30:.1f} GiB, searched up to {cap}: {deepest}"
        )
        rev = found.get("reversible")
        ratios = [f"{rev / d:.1f}x deeper than {m}" for m, d in found.items()
                  if m != "reversible" and rev is not None and d > 0]  # fmt: skip
        text += f" (reversible {', '.join(ratios)})." if ratios else "."
    temp = {(r["method"], r["depth"]): r["temp"] for r in payload["rows"] if "temp" in r}
    shallow, deep = min(cfg["depths"]), max(cfg["depths"])
    growth = [
        f"{m} {temp[(m, deep)] / temp[(m, shallow)]:.2f}x"
        for m in dict.fromkeys(k[0] for k in temp)
        if (m, deep) in temp and (m, shallow) in temp
    ]
    if growth:
        text += f" Temp memory from L = {shallow} to L = {deep}: {', '.join(growth)}."
    return text


def render_memory_depth(payload: dict, filename: str) -> str:
    cfg, env = payload["config"], payload["env"]
    methods = list(dict.fromkeys(r["method"] for r in payload["rows"]))
    depths = sorted({r["depth"] for r in payload["rows"]})
    temp = {(r["method"], r["depth"]): r["temp_mib"] for r in payload["rows"]}
    rows = [{"L": d, **{m: temp.get((m, d)) for m in methods}} for d in depths]  # partial: -
    table = format_table(rows, [("L", "L", "d")] + [(m, m, ".2f") for m in methods])
    return (
        f"{_partial(payload)}Compiled temp memory (MiB) of the gradient of L additive GELU-MLP "
        f"couplings, halves {cfg['width']} wide, hidden {cfg['hidden']}, batch {cfg['batch']}, "
        f"{cfg['dtype']}; "
        f"anchors and nested groups every k layers, k the largest divisor of L not above "
        f"sqrt(L). Measured on {_where(env)} by `benchmarks/memory_depth.py` "
        f"(`benchmarks/results/{filename}`, plot alongside as PNG).\n\n{table}"
        + (_render_deepest_depth(payload) if payload.get("deepest_depth") else "")
    )


def _render_deepest_depth(payload: dict) -> str:
    """The deepest stack per method within the memory budget, and what each layer costs."""
    deepest, rows = payload["deepest_depth"], payload["rows"]
    footprint = {(r["method"], r["depth"]): r["footprint_mib"] for r in rows}
    base = deepest.get("backprop")  # a partial run may lack searches or depths: "-" there
    table = format_table(
        [
            {
                "method": m,
                "deepest": d,
                "ratio": d / base if base else None,
                "per_layer": (footprint[(m, 256)] - footprint[(m, 128)]) / 128
                if (m, 256) in footprint and (m, 128) in footprint
                else None,
            }
            for m, d in deepest.items()
        ],
        [
            ("method", "method", "s"),
            ("deepest", "deepest L", "d"),
            ("ratio", "vs backprop", ".2f"),
            ("per_layer", "MiB per layer (L = 128 to 256)", ".3f"),
        ],
    )
    params = 2 * payload["config"]["param_bytes_per_layer"] / 2**20
    return (
        f"\n\nDeepest stack whose gradient fits {payload['budget_bytes'] / 2**30:.1f} GiB "
        f"(compiled footprint: parameters, gradients and temps; nothing executed; an optimiser's "
        f"state would come on top; the two k ~ sqrt(L) methods searched over L = k^2). Every "
        f"method holds {params:.3f} MiB of parameters and gradients per layer, which bounds "
        f"the depth once activations are gone:\n\n{table}"
    )


def render_bench_suite(payload: dict, filename: str) -> str:
    env = payload["env"]
    slowest = max(payload["scripts"], key=lambda t: t["seconds"])
    concurrent = payload.get("concurrent") or []
    shared = (
        f"; the {len(concurrent)} scripts that time nothing "
        f"({_series([f'`{c}`' for c in concurrent])}) ran {payload['jobs']} at a time, the "
        f"others alone"
        if concurrent
        else ""
    )
    return (
        f"The last `python -m revjax bench --size {payload['size']}` took "
        f"{payload['total_seconds'] / 60:.1f} minutes on {_where(env)} with "
        f"{payload['cpu_count']} CPU cores (slowest: `{slowest['command']}`, "
        f"{slowest['seconds']:.0f} s{shared}; per script in `benchmarks/results/{filename}`)."
    )


def render_numerics_drift(payload: dict, filename: str) -> str:
    """Gradient drift of ``reversible_scan`` in float32 with and without anchors."""
    drift, width = payload["gradient_drift"], payload["config"]["width"]
    small = [r for r in drift if r["scale"] < 1 and r["checkpoint_every"] is None]
    unit = [r for r in drift if r["scale"] == 1 and r["checkpoint_every"] is None]
    anchored = [r for r in drift if r["checkpoint_every"]]
    at = lambda rows, fmt: ", ".join(f"{fmt(r)} at L = {r['depth']}" for r in rows)
    anchors = "; ".join(
        f"anchors every {r['checkpoint_every']} layers ({r['depth'] // r['checkpoint_every']} "
        f"extra streams of memory) bring it back to {_num(r['grad_rel_err'])} at "
        f"L = {r['depth']}"
        for r in anchored
    )
    return (
        f"In float32 with branch weights of scale {small[0]['scale']}/sqrt(fan_in) the gradient "
        f"error against plain backprop is {at(small, lambda r: _num(r['grad_rel_err']))} (the "
        f"tests bound it at 1e-5). Unit-gain branches let the stream grow (max |y| "
        f"{at(unit, lambda r: format(r['max_abs_output'], '.0f'))}, halves {width} wide) and the "
        f"error with it: {at(unit, lambda r: _num(r['grad_rel_err']))}; {anchors} (the tests "
        f"assert > 1e-2 without anchors and <= 1e-4 with them). All "
        f"{_source(payload['env'], 'numerics_cpu.py', filename)}."
    )


def render_reconstruction_snr(payload: dict, filename: str) -> str:
    """Per-layer reconstruction SNR of the float32 and bfloat16 stacks (Diagnostics)."""
    by_dtype = {r["dtype"]: r for r in payload["reconstruction_snr"]}
    bf16, f32 = by_dtype["bfloat16"], by_dtype["float32"]
    return (
        f"A {bf16['depth']}-layer bfloat16 stack (halves {payload['config']['width']} wide) falls "
        f"from {bf16['snr_db_after_1_step']:.0f} dB after one step to "
        f"{bf16['snr_db_after_all_steps']:.0f} dB after {bf16['depth']}, while float32 stays at "
        f"or below {_num(f32['max_relative_error'])} relative error "
        f"({_source(payload['env'], 'numerics_cpu.py', filename)})."
    )


def render_layerwise_snr(payload: dict, filename: str) -> str:
    """Layer-wise inverses vs couplings: SNR after one and after all inverse steps."""
    snr = payload["layerwise_vs_coupling_snr"]
    chain, coupling = snr["chain"], snr["coupling"]
    return (
        f"In {snr['dtype']} at L = {snr['depth']}, {snr['channels']} channels wide, a chain "
        f"(actnorm, leaky ReLU 0.5, conv1x1) falls from {chain['snr_db_after_1_step']:.0f} dB "
        f"after one inverse step to {chain['snr_db_after_all_steps']:.0f} dB after "
        f"{snr['depth']}, additive MLP couplings of the same width from "
        f"{coupling['snr_db_after_1_step']:.0f} dB to {coupling['snr_db_after_all_steps']:.0f} dB "
        f"({_source(payload['env'], 'numerics_cpu.py', filename)}; `tests/test_layers.py` "
        f"asserts couplings above 35 dB, the chain below 0 dB and a drop over 3x the couplings')."
    )


#: The depth of the numerics reference network of ``tests/test_precision.py``.
REFERENCE_DEPTH = 64


def render_precision_reference(payload: dict, filename: str) -> str:
    """The reference network's gradient errors at L = 64, from the error-vs-depth benchmark."""
    depths = sorted({r["depth"] for r in payload["rows"]})
    depth = REFERENCE_DEPTH if REFERENCE_DEPTH in depths else depths[-1]
    rows = {r["method"]: r for r in payload["rows"] if r["depth"] == depth}
    names = {
        "bf16 stream": "bf16 stream",
        "f32 stream": "float32 stream",
        "f32 stream, k=16": "float32 stream with anchors every 16 layers",
        "f32 stream, k=8": "every 8 layers",
        "exact": "exact mode",
    }

    def value(r: dict) -> str:
        if r["overflow"]:
            return "overflow"
        return "0 (bitwise)" if r["bitwise_equal"] else _num(r["grad_rel_err"])

    errors = [f"{names[m]} {value(r)}" for m, r in rows.items()]
    return (
        f"The same network at batch {payload['size']['batch']}, "
        f"{_source(payload['env'], 'numerics_depth.py', filename)}, gives at L = {depth}: "
        f"{_series(errors)}; the error-vs-depth table is under Results."
    )


def render_numerics_depth_summary(payload: dict, filename: str) -> str:
    """The prose under the error-vs-depth table: stream growth, ratios, anchors, exact mode."""
    rows, depths = payload["rows"], sorted({r["depth"] for r in payload["rows"]})
    err = {(r["method"], r["depth"]): r for r in rows if "grad_rel_err" in r}
    peak = {r["depth"]: r["stream_peak"] for r in rows}
    shown = list(dict.fromkeys([depths[0], REFERENCE_DEPTH, depths[-1]]) & peak.keys())
    growth = _series([f"~{_num(peak[d])} at L = {d}" for d in sorted(shown)])
    f32 = lambda d: err[("f32 stream", d)]["grad_rel_err"]
    bf16 = lambda d: err[("bf16 stream", d)]["grad_rel_err"]
    sane = [d for d in depths if f32(d) < 1]  # NaN (a diverged gradient) is not
    lost = next((d for d in depths if not f32(d) < 1 and not bf16(d) < 1), None)
    # 0: reconstruction was exact; a non-finite bf16 error has no ratio (it is lost, below).
    ratios = [bf16(d) / f32(d) for d in sane if f32(d) > 0 and math.isfinite(bf16(d))]
    anchored = [r for r in err.values() if ", k=" in r["method"]]
    ks = sorted({int(r["method"].split("k=")[1]) for r in anchored})
    exact = [d for d in depths if ("exact", d) in err and err[("exact", d)]["bitwise_equal"]]
    inexact = [err[("exact", d)] for d in depths if ("exact", d) in err and d not in exact]
    overflow = [r["depth"] for r in rows if r["method"] == "exact" and r["overflow"]]
    exact_f32 = [f"L = {d}" for d in sane if err[("f32 stream", d)].get("bitwise_equal")]
    if not sane:
        better = (
            "a float32 stream is already meaningless (relative error above 1, or not finite) "
            f"at L = {depths[0]}"
        )
    elif ratios:
        better = (
            f"a float32 stream is {_span(ratios, lambda x: f'{x:.0f}')} times better than a "
            f"bf16 one up to L = {sane[-1]}"
            + (f" (its gradient bitwise exact at {_series(exact_f32)})" if exact_f32 else "")
        )
    else:
        better = f"a float32 stream is exact up to L = {sane[-1]}"
    lost_text = (
        f", but both are meaningless (relative error above 1, or not finite) by L = {lost}"
        if lost
        else ""
    )
    return (
        f"{_partial(payload)}Without anchors the reconstruction error compounds with depth on "
        f"this expansive stack (the max |x| of its float32 stream is {growth}): {better}"
        f"{lost_text}. "
        + _anchors_summary(anchored, ks)
        + _exact_mode_summary(exact, inexact, overflow, payload["env"])
        + f". All {_source(payload['env'], 'numerics_depth.py', filename)}."
    )


def _nan_last(x: float) -> float:
    """A sort key that ranks NaN above every number (``max`` then picks it)."""
    return math.inf if math.isnan(x) else x


def _anchors_summary(anchored: list[dict], ks: list[int]) -> str:
    """What anchors every k layers did to the float32-stream error, non-finite ones named."""
    finite = [r["grad_rel_err"] for r in anchored if math.isfinite(r["grad_rel_err"])]
    lost = sorted({r["depth"] for r in anchored if not math.isfinite(r["grad_rel_err"])})
    every = _series([str(k) for k in ks]).replace(" and ", " or ")
    if lost:
        return (
            f"Anchors every {every} layers did not keep the float32-stream error finite (at "
            f"L = {_series([str(d) for d in lost])} it was not), for `L / k` streams of memory. "
        )
    return (
        f"Anchors every {every} layers keep the float32-stream error between "
        f"{_num(min(finite))} and {_num(max(finite))} at every depth up to "
        f"{max(r['depth'] for r in anchored)}, for `L / k` streams of memory. "
    )


def _exact_mode_summary(exact: list[int], inexact: list[dict], overflow: list[int], env) -> str:
    """What exact mode did: bitwise equal to backprop at the depths ``exact``; ``inexact`` are
    its measured rows that were not (on a GPU the two gradients' matmuls need not round alike,
    so bitwise equality is not guaranteed there); ``overflow``: the depths its range could not
    hold the stream."""
    at = lambda depths: _series([f"L = {d}" for d in depths])
    overflowed = f" (L = {_series([str(d) for d in overflow])})" if overflow else ""
    if exact and not inexact:
        return (
            f"Exact mode is bitwise exact whenever its range can hold the stream (up to "
            f"L = {exact[-1]} here, with fewer fraction bits as the stream grows) and says "
            f'"overflow" when not{overflowed}'
        )
    if not inexact:
        return f'Exact mode gave no gradient at any depth ("overflow"{overflowed} or out of memory)'
    # NaN first: max() would skip it depending on the order.
    worst = max(inexact, key=lambda r: _nan_last(r["grad_rel_err"]))
    if exact:
        text = f"Exact mode is bitwise exact at {at(exact)} but not at "
    else:
        text = (
            f"Exact mode was not bitwise equal to plain backprop at any depth on {env['device']} "
            f"({env['backend']}), where the two gradients' matmuls need not round alike: not at "
        )
    text += (
        f"{at([r['depth'] for r in inexact])} (largest relative error "
        f"{_num(worst['grad_rel_err'])}, at L = {worst['depth']})"
    )
    return text + (f'; it says "overflow" where its range cannot hold the stream{overflowed}'
                   if overflow else "")  # fmt: skip


def render_revnet_memory(payload: dict, filename: str) -> str:
    """Activation memory per input pixel of the RevNet, its twin and the fully invertible trunk."""
    rows = payload["rows"]
    blocks = list(dict.fromkeys(r["blocks_per_stage"] for r in rows))
    per = lambda prefix: [
        r["bytes_per_input_pixel"] for r in rows if r["variant"].startswith(prefix)
    ]
    revnet, twin, full = per("RevNet"), per("ResNet-like"), per("fully invertible")
    blocks_text = _series([str(b) for b in blocks])

    def amounts(values: list[float]) -> str:
        same = len({f"{v:.0f}" for v in values}) == 1
        return f"{values[0]:.0f}" if same else _series([f"{v:.0f}" for v in values])

    if [f"{v:.0f}" for v in full] == [f"{v:.0f}" for v in revnet]:
        full_text = (
            f"The fully invertible variant also needs {amounts(full)} bytes here: the stage "
            "outputs the per-stage variant keeps (each the size of the float32 input batch) fit "
            "inside one block's backward working set, so XLA's peak does not change."
        )
    else:
        full_text = f"The fully invertible variant needs {amounts(full)} bytes."
    return (
        f"Activation memory per input pixel (Hascoet et al.'s metric; gradient temp memory over "
        f"`N H W C`, batch {payload['batch']}; "
        f"{_source(payload['env'], 'bench_revnet.py', filename)}): {amounts(revnet)} bytes for "
        f"the RevNet at {blocks_text} blocks per stage, against {amounts(twin)} bytes for the "
        f"ResNet-like twin. {full_text}"
    )


def render_activation_recovery(payload: dict, filename: str) -> str:
    """Worst derivative-recovery error of the inverted activations, per dtype."""
    rows = payload["derivative_recovery"]
    worst = lambda dtype, key: max(r[key] for r in rows if r["dtype"] == dtype)
    functions = _series(list(dict.fromkeys(r["function"] for r in rows)))
    float16 = (  # recorded since session 15; older JSON has float32 and bfloat16 only
        f"; float16 at most {_num(worst('float16', 'max_error_far_from_minimum'))} away from "
        f"the minimum and {_num(worst('float16', 'max_error'))} at it (revjax's own bounds "
        f"2e-3 / 1e-2, same test file)"
        if any(r["dtype"] == "float16" for r in rows)
        else ""
    )
    return (
        f"Recovered derivative vs the true one on the tests' dense grid over [-20, 20], worst "
        f"case over {functions} ({_source(payload['env'], 'bench_activations.py', filename)}; "
        f"the issue's bounds 1e-5 / 1e-3 / 1e-2 are asserted in `tests/test_activations.py`): "
        f"float32 at most {_num(worst('float32', 'max_error_far_from_minimum'))} away from the "
        f"minimum (`|x - x_min| > 0.1`) and {_num(worst('float32', 'max_error'))} at it; "
        f"bfloat16 at most {_num(worst('bfloat16', 'max_error_far_from_minimum'))} away from "
        f"the minimum{float16}."
    )


def render_activation_memory(payload: dict, filename: str) -> str:
    """Compiled gradient memory of the residual MLP stack per activation variant."""
    cfg = payload["config"]
    mib = {r["variant"]: r["temp_mib"] for r in payload["rows"]}
    gelu, inverted = mib["jax.nn.gelu"], mib["revjax.activations.gelu"]
    return (
        f"Compiled temp memory of the gradient of {cfg['depth']} residual MLP blocks (width "
        f"{cfg['width']}, hidden {cfg['hidden']}, batch {cfg['batch']}, float32; "
        f"{_source(payload['env'], 'bench_activations.py', filename)}): {gelu:.3g} MiB with "
        f"`jax.nn.gelu`, {inverted:.3g} MiB with `activations.gelu` ({inverted / gelu:.2f}x), and "
        f"{mib['jax.nn.gelu + dots_saveable']:.3g} MiB with "
        f"`jax.checkpoint(policy=dots_saveable)`, which gets there by recomputing GELU from the "
        f"saved matmul output; SiLU: {mib['jax.nn.silu']:.3g} MiB vs "
        f"{mib['revjax.activations.silu']:.3g} MiB."
    )


def render_activation_times(payload: dict, filename: str) -> str:
    """Memory and step time of every activation variant (a GPU run of bench_activations)."""
    cfg = payload["config"]
    table = format_table(
        payload["rows"],
        [("variant", "variant", "s"), ("temp_mib", "grad temp MiB", ".1f"),
         ("ms", "gradient step ms", ".2f")],
    )  # fmt: skip
    return (
        f"{_partial(payload)}Gradient of {cfg['depth']} residual MLP blocks (width "
        f"{cfg['width']}, hidden {cfg['hidden']}, batch {cfg['batch']}, float32), "
        f"{_source(payload['env'], 'bench_activations.py', filename)}; time is the median of "
        f"jitted gradient steps.\n\n{table}"
    )


def _percent_change(ratios: list[float], more: str, less: str) -> str:
    """``2 to 6% slower`` from ratios to a baseline (``more`` above 1, ``less`` below)."""
    pct = [100 * (r - 1) for r in ratios]
    if min(pct) >= 0:
        return f"{_span(pct, lambda x: f'{x:.0f}')}% {more}"
    if max(pct) <= 0:
        return f"{_span([-p for p in pct], lambda x: f'{x:.0f}')}% {less}"
    return f"between {-min(pct):.0f}% {less} and {max(pct):.0f}% {more}"


def render_scan_summary(payloads: dict, filenames: tuple) -> str:
    """The prose under the GPU scan tables: memory ratios, anchors, time, matmuls, errors."""
    f32_name, bf16_name, gemm_name = filenames
    f32, bf16, gemms = (payloads[f] for f in filenames)
    row = lambda p, m, d: next(r for r in p["rows"] if r["method"] == m and r["depth"] == d)
    depths = f32["config"]["depths"]
    deep = max(depths)
    anchored = next(r["method"] for r in f32["rows"] if r["method"].startswith("reversible_k"))
    every = int(anchored.removeprefix("reversible_k"))
    cfg, env = f32["config"], f32["env"]
    stream_mib = 2 * cfg["rows"] * cfg["width"] * 4 / 2**20  # two float32 halves
    extra = row(f32, anchored, deep)["temp_mib"] - row(f32, "reversible", deep)["temp_mib"]
    streams = extra / stream_mib
    exactly = "exactly " if abs(streams - round(streams)) < 0.01 else ""
    flat = [row(f32, "reversible", d)["temp_mib"] for d in depths]
    same = (
        f"the same at {_series([f'L = {d}' for d in depths])}"
        if max(flat) <= 1.01 * min(flat)
        else _series([f"{t:.0f} MiB at L = {d}" for t, d in zip(flat, depths, strict=True)])
    )
    slow = row(f32, anchored, deep)["ms"] / row(f32, "reversible", deep)["ms"]
    bf16_err = lambda m: _num(row(bf16, m, deep)["grad_rel_err_default"])
    rev = [r for p in (f32, bf16) for r in p["rows"] if r["method"] == "reversible"]
    timing = _percent_change([r["time_ratio_to_checkpoint"] for r in rev], "slower", "faster")
    both_faster = all(
        r["time_ratio_to_backprop"] < 1
        for p in (f32, bf16)
        for r in p["rows"]
        if r["method"] in ("checkpoint", "reversible")
    )
    counts = gemms["matmuls_per_layer"]
    errors = lambda p, key: _span([r[key] for r in p["rows"] if r["method"] == "reversible"])
    source = (
        _source(env, "bench_scan.py", f32_name, bf16_name)
        if _same_setup(env, bf16["env"])
        else f"{_source(env, 'bench_scan.py', f32_name)}; bfloat16 "
        f"{_source(bf16['env'], 'bench_scan.py', bf16_name)}"
    )
    return (
        f"On the {env['device']} at L = {deep}, `reversible_scan` needs "
        f"1/{1 / row(f32, 'reversible', deep)['temp_ratio_to_backprop']:.0f} of plain "
        f"backprop's gradient temp memory in float32 and "
        f"1/{1 / row(bf16, 'reversible', deep)['temp_ratio_to_backprop']:.0f} in bfloat16, and "
        f"its temp memory is {same} (one layer's working set plus cuBLAS workspace; the "
        f"workspace XLA's autotuner picks varies between runs). Anchors every {every} layers add "
        f"{exactly}{streams:.0f} streams ({extra:.0f} MiB in float32) at L = {deep} and about "
        f"{100 * (slow - 1):.0f}% time, and lower the bfloat16 gradient error from "
        f"{bf16_err('reversible')} to {bf16_err(anchored)} ({source}).\n\n"
        f"On the same GPU `reversible_scan` is {timing} than per-layer `jax.checkpoint` "
        f"(float32 and bfloat16, {_series([f'L = {d}' for d in depths])}), and this is inherent "
        f"to the method, not to the implementation: a reconstructing backward needs every "
        f"branch's *output* (to subtract it), while a checkpointed recompute can skip the last "
        f"matmul of `g`, whose result the vjp does not use. The optimised HLO of the gradient "
        f"step has {counts['reversible']} matmuls per layer (forward and backward) for "
        f"`reversible_scan` against {counts['checkpoint']} for checkpointing, "
        f"{100 * (counts['reversible'] / counts['checkpoint'] - 1):.1f}% more matmul work "
        f"(counted on {gemms['env']['backend']} by `benchmarks/count_gemms.py`, "
        f"`benchmarks/results/{gemm_name}`); the activation traffic that reversibility saves "
        f"recovers part of it."
        + (
            " Both are faster than plain backprop, which moves every activation through HBM."
            if both_faster
            else ""
        )
        + "\n\nThe gradient error of `reversible_scan` on that GPU at JAX's default float32 "
        f"matmul precision (TF32-like rounding of matmul inputs) is "
        f'{errors(f32, "grad_rel_err_default")}; with `jax.default_matmul_precision("highest")` '
        f"it is {errors(f32, 'grad_rel_err_highest')}. In bfloat16 (stream included) it is "
        f"{errors(bf16, 'grad_rel_err_default')} against plain backprop of the same bfloat16 "
        f"network (same files); a float32 stream is the remedy "
        f"(precision policies above)."
    )


def render_notebooks(payload: dict, filename: str) -> str:
    """Wall time of each notebook run top to bottom, against the per-notebook budget."""
    times = ", ".join(f"`{r['notebook']}` {r['seconds']:.0f} s" for r in payload["rows"])
    met = all(r["within_budget"] for r in payload["rows"])
    verdict = "all within" if met else "NOT all within"
    jobs = payload.get("jobs", 1)
    others = payload["env"].get("concurrent_jobs", 1) - 1  # other benchmarks running meanwhile
    together = [f"{jobs} notebooks at a time"] if jobs > 1 else []
    together += [f"beside {others} other benchmark{'s' * (others > 1)}"] if others > 0 else []
    shared = (
        f", {' and '.join(together)} (so each time is an upper bound of its time alone)"
        if together
        else ""
    )
    return (
        f"Run times top to bottom at the default sizes, including kernel start and compilation "
        f"(`benchmarks/run_notebooks.py` on {_where(payload['env'])} with "
        f"{payload['cpu_count']} CPU cores{shared}, `benchmarks/results/{filename}`): {times}; "
        f"{verdict} the {payload['budget_seconds'] / 60:.0f}-minute budget."
    )


RENDERERS = {
    "scan": ("scan_gpu_gpu.json", render_scan),
    "scan_bf16": ("scan_gpu_gpu_bfloat16.json", render_scan),
    "numerics_depth_cpu": ("numerics_depth_cpu_cpu.json", render_numerics_depth),
    "numerics_depth_gpu": ("numerics_depth_gpu_gpu.json", render_numerics_depth),
    "moonwalk_cpu": ("moonwalk_cpu_cpu.json", render_moonwalk),
    "moonwalk_gpu": ("moonwalk_gpu_gpu.json", render_moonwalk),
    "activations_gpu": ("activations_gpu.json", render_activation_times),
    "memory_depth": ("memory_depth_cpu.json", render_memory_depth),
    "memory_depth_gpu": ("memory_depth_gpu.json", render_memory_depth),
    "bench_suite": ("bench_suite_cpu_cpu.json", render_bench_suite),
    "notebooks": ("notebooks_cpu.json", render_notebooks),
    "train_lm": ("train_lm_cpu.json", render_train_lm),
    "transformer_cpu": ("transformer_cpu_cpu.json", render_transformer),
    "transformer_gpu": ("transformer_gpu_gpu.json", render_transformer),
    "numerics_drift": ("numerics_cpu.json", render_numerics_drift),
    "reconstruction_snr": ("numerics_cpu.json", render_reconstruction_snr),
    "layerwise_snr": ("numerics_cpu.json", render_layerwise_snr),
    "precision_reference": ("numerics_depth_cpu_cpu.json", render_precision_reference),
    "numerics_depth_summary": ("numerics_depth_cpu_cpu.json", render_numerics_depth_summary),
    "revnet_memory": ("revnet_cpu.json", render_revnet_memory),
    "activation_recovery": ("activations_cpu.json", render_activation_recovery),
    "activation_memory": ("activations_cpu.json", render_activation_memory),
    "scan_summary": (
        # The matmul counts of the GPU's HLO where count_gemms.py ran there, else the CPU's.
        (
            "scan_gpu_gpu.json",
            "scan_gpu_gpu_bfloat16.json",
            ("gemm_count_gpu.json", "gemm_count_cpu.json"),
        ),
        render_scan_summary,
    ),
}
"""Marker name -> (result file, renderer). A renderer gets the parsed JSON and the file's name;
with a tuple of files it gets ``{name: parsed JSON}`` and the tuple, and runs only when all
exist. A tuple inside that tuple lists alternatives, the first that exists taken."""


def _resolve(filename: str | tuple) -> str | tuple[str, ...] | None:
    """``filename`` with every tuple of alternatives replaced by the first that exists in
    ``RESULTS`` (None when none does)."""
    if isinstance(filename, str):
        return filename
    chosen = tuple(
        n if isinstance(n, str) else next((a for a in n if (RESULTS / a).exists()), None)
        for n in filename
    )
    return None if None in chosen else chosen


def _load(filename: str | tuple[str, ...]) -> dict | None:
    """The parsed result file(s) for a renderer, or None when one is missing."""
    names = (filename,) if isinstance(filename, str) else filename
    if not all((RESULTS / n).exists() for n in names):
        return None
    payloads = {n: json.loads((RESULTS / n).read_text()) for n in names}
    return payloads[filename] if isinstance(filename, str) else payloads


def _render_block(render, payload: dict, filename: str | tuple[str, ...]) -> str:
    """``render(payload, filename)``, marked as a partial run when any of its files is one (a
    run stopped early: ``complete`` false); a summary that needs what a partial run did not
    measure says so instead of failing."""
    by_name = {filename: payload} if isinstance(filename, str) else payload
    partial = [n for n, p in by_name.items() if not p.get("complete", True)]
    if not partial:
        return render(payload, filename)
    try:
        block = render(payload, filename)
    except (KeyError, IndexError, ValueError, StopIteration, ZeroDivisionError):
        files = ", ".join(f"`benchmarks/results/{n}`" for n in partial)
        return (
            f"**Partial run** ({files} stopped early): it did not measure what this summary "
            f"needs; rerun its benchmark to complete it."
        )
    return block if block.startswith("**Partial run**") else _partial({"complete": False}) + block


def render_readme(text: str) -> str:
    """``text`` with every results block rendered from its JSON; a block whose JSON is
    missing is emptied (text left there would be checked against nothing)."""
    for name, (filename, render) in RENDERERS.items():
        filename = _resolve(filename)
        payload = None if filename is None else _load(filename)
        block = "" if payload is None else _render_block(render, payload, filename) + "\n"
        pattern = re.compile(
            rf"(<!-- results:{name} -->\n)(?:.*?\n)?(<!-- /results:{name} -->)", re.S
        )
        text = pattern.sub(lambda m, b=block: m.group(1) + b + m.group(2), text)
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
