"""diagnostics: tables, per-layer reconstruction report, gradient comparison (the pytree
metrics it re-exports are tested in test_tree_metrics.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revjax.coupling import additive_coupling
from revjax.diagnostics import (
    format_table,
    reconstruction_report,
)
from revjax.models.mlp import init_mlp_stack, mlp_coupling


def test_format_table():
    text = format_table(
        [{"m": "x", "v": 1.23456}, {"m": "y", "v": None}],
        [("m", "method", "s"), ("v", "value", ".2f")],
    )
    assert text.splitlines() == ["| method | value |", "|---|---|", "| x | 1.23 |", "| y | - |"]


def _reference_stack(dtype, depth=16):
    params = init_mlp_stack(jax.random.key(0), depth, 32, 64, dtype=dtype)
    x = tuple(jax.random.normal(k, (64, 32), dtype) for k in jax.random.split(jax.random.key(1)))
    return mlp_coupling(), params, x


def test_reconstruction_report_float32_is_near_exact():
    report = reconstruction_report(*_reference_stack(jnp.float32))
    assert report["relative_error"].shape == (16,)
    # float32 round-off over at most 16 inverse steps (measured <= 2e-7).
    assert float(report["relative_error"].max()) <= 1e-6
    assert [int(s) for s in report["steps"]] == list(range(16, 0, -1))


def test_reconstruction_snr_falls_with_depth_in_bfloat16():
    """Known case: a bf16 stream loses SNR with every inverse step (measured 57 dB after one
    step, 40 dB after sixteen); the error is reported, not hidden."""
    report = reconstruction_report(*_reference_stack(jnp.bfloat16))
    snr_db, steps = np.asarray(report["snr_db"]), np.asarray(report["steps"])
    assert np.corrcoef(snr_db, steps)[0, 1] < -0.9
    assert snr_db[0] < snr_db[-1] - 10.0
    assert float(report["relative_error"][0]) > 1e-3


def test_reconstruction_report_restarts_at_anchors():
    stack = _reference_stack(jnp.bfloat16)
    free = reconstruction_report(*stack)
    anchored = reconstruction_report(*stack, checkpoint_every=4)
    assert [int(s) for s in anchored["steps"][:4]] == [4, 3, 2, 1]
    assert np.min(anchored["snr_db"]) > np.min(free["snr_db"]) + 5.0


def _identity_stack(depth: int, scale: float):
    """A parameter-free coupling stack (f = g = 0) fed ``scale * x``: exact reconstruction."""
    zero = lambda p, v: jnp.zeros_like(v)
    params = (jnp.zeros((depth, 1)), jnp.zeros((depth, 1)))  # (params_f, params_g)
    x = (scale * jnp.ones((4, 8)), scale * jnp.ones((4, 8)))
    return additive_coupling(zero, zero), params, x


def test_reconstruction_report_flags_non_finite_layers():
    """A NaN in the stream once read as a perfect reconstruction (SNR inf); now it is NaN."""
    block, params, x = _identity_stack(3, 1.0)
    report = reconstruction_report(block, params, (x[0].at[0, 0].set(jnp.nan), x[1]))
    for key in ("relative_error", "snr", "snr_db"):
        assert np.all(np.isnan(np.asarray(report[key]))), key


def test_reconstruction_report_of_huge_streams_does_not_overflow():
    """Squares of 1e30 overflow float32; an exact reconstruction must stay exact (error 0, SNR
    inf), and a broken one must show its true error, not 0."""
    block, params, x = _identity_stack(3, 1e30)
    report = reconstruction_report(block, params, x)
    np.testing.assert_array_equal(np.asarray(report["relative_error"]), 0.0)
    assert np.all(np.isinf(np.asarray(report["snr_db"])))
    drifting = block._replace(inverse=lambda p, y: jax.tree.map(lambda v: 1.001 * v, y))
    report = reconstruction_report(drifting, params, x)
    # Layer L-1 is one inverse step from the output: error 1.001 - 1, in float32.
    assert float(report["relative_error"][-1]) == pytest.approx(1e-3, rel=1e-3)
    assert float(report["snr_db"][-1]) == pytest.approx(60.0, rel=1e-3)


def test_reconstruction_report_zero_input_reconstructed_as_nonzero():
    """A zero input whose reconstruction is nonzero: error inf and SNR 0, consistently (the
    error was once the absolute error, contradicting the SNR)."""
    block, params, x = _identity_stack(2, 0.0)
    shifted = block._replace(inverse=lambda p, y: jax.tree.map(lambda v: v + 1.0, y))
    report = reconstruction_report(shifted, params, x)
    assert np.all(np.isinf(np.asarray(report["relative_error"])))
    np.testing.assert_array_equal(np.asarray(report["snr"]), 0.0)
    assert np.all(np.asarray(report["snr_db"]) == -np.inf)


@pytest.mark.parametrize("methods", [["float32"], {"float32": "default"}])
def test_compare_gradients_names_the_expected_methods_mapping(methods):
    """A list of names used to fail with "'list' object has no attribute 'items'"."""
    from revjax.diagnostics import compare_gradients

    with pytest.raises(TypeError, match=r"methods maps a name to reversible_scan options"):
        compare_gradients(*_reference_stack(jnp.float32, depth=2), methods)


def test_reconstruction_report_of_a_float64_stream_is_measured_in_float64():
    """A float64 stream's tiny reconstruction errors read as exact (SNR inf) in float32 norms;
    they are measured in float64: a drift of 1e-12 per inverse step shows."""
    with jax.enable_x64(True):
        block, params, x = _identity_stack(3, 1.0)
        x = jax.tree.map(lambda v: v.astype(jnp.float64), x)
        drifting = block._replace(inverse=lambda p, y: jax.tree.map(lambda v: v * (1 + 1e-12), y))
        report = reconstruction_report(drifting, params, x)
        errors = np.asarray(report["relative_error"])
        assert report["relative_error"].dtype == jnp.float64
        # steps = 3, 2, 1 inverse steps from the output: error ~ steps * 1e-12.
        np.testing.assert_allclose(errors, [3e-12, 2e-12, 1e-12], rtol=1e-3)
        assert np.all(np.isfinite(np.asarray(report["snr_db"])))
