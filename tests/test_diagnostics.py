"""diagnostics: relative error and tables."""

import jax.numpy as jnp
import pytest

from revjax.diagnostics import format_table, relative_error


def test_relative_error_is_joint_norm_over_leaves():
    ref = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    approx = {"a": jnp.array([3.0, 1.0]), "b": jnp.array([4.0])}
    assert float(relative_error(approx, ref)) == pytest.approx(1.0 / 5.0)
    assert float(relative_error(ref, ref)) == 0.0


def test_relative_error_zero_reference():
    assert float(relative_error(jnp.zeros(3), jnp.zeros(3))) == 0.0
    assert float(relative_error(jnp.ones(3), jnp.zeros(3))) == float("inf")


def test_relative_error_rejects_different_structures():
    with pytest.raises(ValueError, match="structure"):
        relative_error({"a": jnp.ones(2)}, (jnp.ones(2),))


def test_format_table():
    text = format_table(
        [{"m": "x", "v": 1.23456}, {"m": "y", "v": None}],
        [("m", "method", "s"), ("v", "value", ".2f")],
    )
    assert text.splitlines() == ["| method | value |", "|---|---|", "| x | 1.23 |", "| y | - |"]
