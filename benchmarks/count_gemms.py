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
from benchmarks.common import add_out_argument, environment, write_json
from revjax.models.mlp import init_mlp_stack

# cuBLAS GEMM custom-calls (``__cublas$gemm``, ``__cublas$lt$matmul...``) on GPU, and ``dot``
# instructions elsewhere, also those fused into Triton GEMM fusions (the fusion call itself
# holds no ``dot``, so nothing is counted twice).
GEMM = re.compile(r'custom_call_target="__cublas\$(?:gemm|lt\$matmul)[^"]*"| dot\(')


def count_matmuls(hlo: str) -> int:
    """Matmul instructions in an optimised HLO module."""
    return len(GEMM.findall(hlo))


def matmuls_per_layer(counts: dict[int, int]) -> int:
    """The per-layer matmul count from whole-module counts at two or more depths.

    The scanned network's loop body appears once in the HLO, so the count must not change with
    depth; if it does, XLA unrolled the loop and a single module count is not per layer, and a
    count of zero means the pattern missed this backend's GEMMs. Both raise rather than write a
    wrong number.
    """
    if len(set(counts.values())) != 1:
        raise RuntimeError(
            f"count_gemms: matmul counts change with depth ({counts}); the layer loop was "
            "unrolled, so the count is not per layer"
        )
    (count,) = set(counts.values())
    if count == 0:
        raise RuntimeError("count_gemms: no matmul found in the optimised HLO; update GEMM")
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    args = parser.parse_args(argv)
    width, hidden, rows = 128, 512, 256
    x = (jax.random.normal(jax.random.key(1), (rows, width)),) * 2
    counts = {}
    for method in ("checkpoint", "reversible"):
        by_depth = {}
        for depth in (4, 7):
            params = init_mlp_stack(jax.random.key(0), depth, width, hidden)
            by_depth[depth] = count_matmuls(grad_fn(method).lower(params, x).compile().as_text())
        counts[method] = matmuls_per_layer(by_depth)
        print(f"{method:>11s}: {counts[method]} matmuls per layer (forward + backward)")
    payload = {"benchmark": "count_gemms", "env": environment(), "matmuls_per_layer": counts}
    path = write_json(f"gemm_count_{jax.default_backend()}.json", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
