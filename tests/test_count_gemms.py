"""benchmarks/count_gemms.py: the GEMM pattern on every backend's HLO, per-layer guards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.count_gemms import count_matmuls, matmuls_per_layer


def test_gemm_pattern_matches_cpu_and_gpu_hlo():
    """Lines in the shape of optimised HLO on CPU (``dot``) and GPU (cuBLAS custom-calls, of
    which ``__cublas$gemm`` was once missed); convolutions and fusion calls are not GEMMs."""
    hlo = "\n".join(
        [
            "  %dot.1 = f32[8,8]{1,0} dot(f32[8,4]{1,0} %a, f32[4,8]{1,0} %b)",
            '  %cc.2 = (f32[8,8], s8[0]) custom-call(%a, %b), custom_call_target="__cublas$gemm"',
            '  %cc.3 = bf16[8,8] custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"',
            '  %cc.4 = f32[1] custom-call(%x), custom_call_target="__cudnn$convForward"',
            "  %fusion.5 = f32[8,8] fusion(%a, %b), kind=kCustom, calls=%triton_gemm_computation",
        ]
    )
    assert count_matmuls(hlo) == 3


def test_per_layer_count_refuses_unrolled_loops_and_empty_counts():
    assert matmuls_per_layer({4: 16, 7: 16}) == 16
    with pytest.raises(RuntimeError, match="unrolled"):
        matmuls_per_layer({4: 64, 7: 112})
    with pytest.raises(RuntimeError, match="no matmul"):
        matmuls_per_layer({4: 0, 7: 0})
