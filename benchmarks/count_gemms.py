"""Counts matmuls in the optimised HLO of the gradient step of the bench_scan network.

Evidence for the README's timing explanation: a reconstructing backward recomputes every branch
output, a checkpointed one can skip the last matmul of g. Counts cuBLAS GEMM custom-calls on GPU
and ``dot`` instructions elsewhere.

    python benchmarks/count_gemms.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_scan import grad_fn
from benchmarks.common import environment, write_json
from revjax.models.mlp import init_mlp_stack

GEMM = re.compile(r"custom_call_target=\"__cublas\S*matmul\"| dot\(")


def count_matmuls(hlo: str) -> int:
    """Matmul instructions in an optimised HLO module. Each loop body appears once, so for a
    scanned network this is the matmul count of one layer's forward plus backward."""
    return len(GEMM.findall(hlo))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    depth, width, hidden, rows = 4, 128, 512, 256
    params = init_mlp_stack(jax.random.key(0), depth, width, hidden)
    x = (jax.random.normal(jax.random.key(1), (rows, width)),) * 2
    counts = {}
    for method in ("checkpoint", "reversible"):
        counts[method] = count_matmuls(grad_fn(method).lower(params, x).compile().as_text())
        print(f"{method:>11s}: {counts[method]} matmuls per layer (forward + backward)")
    payload = {"benchmark": "count_gemms", "env": environment(), "matmuls_per_layer": counts}
    path = write_json(f"gemm_count_{jax.default_backend()}.json", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
