"""Tests for revjax/_validate.py: the argument checks shared by the public entry points."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from revjax._validate import (
    check_dropout_rate,
    check_representable_in,
    output_path_problem,
    positive_int,
)


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(2)])
def test_positive_int_returns_a_python_int(value):
    out = positive_int(value, "depth", "where")
    assert type(out) is int and out == int(value)


@pytest.mark.parametrize("value", [0, -2, True, 2.0, "3", None, np.float32(4)])
def test_positive_int_refuses_with_caller_and_argument_named(value):
    with pytest.raises(ValueError, match=r"^Stack\(Block\): depth must be a positive int, got "):
        positive_int(value, "depth", "Stack(Block)")


@pytest.mark.parametrize(
    "value, dtype", [(1e-8, jnp.float32), (1e-4, jnp.float16), (1e-8, jnp.int32), (1e-8, bool)]
)
def test_representable_in_accepts_a_number_representable_in_the_dtype(value, dtype):
    check_representable_in(value, dtype, "slope", "where", "why")  # ints and bools are not rounded


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_representable_in_refuses_a_number_that_rounds_to_zero(dtype):
    # 1e-50 is below the smallest subnormal of both (float16 6e-8, bfloat16 9e-41).
    with pytest.raises(
        ValueError, match=r"^where: slope=1e-50 rounds to 0 in (b)?float16, so why$"
    ):
        check_representable_in(1e-50, dtype, "slope", "where", "why")


@pytest.mark.parametrize("rate", [0.0, 0.5, np.float32(0.25), 0, jnp.float32(0.1)])
def test_dropout_rate_in_unit_interval_accepted(rate):
    check_dropout_rate(rate, "mlp")


# A bool once passed as rate 0.0 (False) and a string failed with a bare comparison TypeError.
@pytest.mark.parametrize(
    "rate", [1.0, -0.1, math.nan, 1.5, False, True, "0.1", None, 0.1 + 0j, np.array([0.1, 0.2])]
)
def test_dropout_rate_outside_unit_interval_refused(rate):
    with pytest.raises(ValueError, match=r"^mlp: dropout rate must lie in \[0, 1\), got "):
        check_dropout_rate(rate, "mlp")


def test_output_path_problem_for_a_file(tmp_path):
    assert output_path_problem(tmp_path / "new.json") is None
    (tmp_path / "old.json").write_text("{}")
    assert output_path_problem(tmp_path / "old.json") is None  # overwritten
    assert output_path_problem(tmp_path) == f"{tmp_path} is a directory; name a file"
    missing = tmp_path / "no" / "x.json"
    assert output_path_problem(missing) == f"directory {tmp_path / 'no'} does not exist"
    # Below a file: said "directory ... does not exist" although it exists, as a file.
    afile = tmp_path / "afile"
    afile.write_text("")
    assert output_path_problem(afile / "x.json") == (
        f"{afile} is a file, so {afile / 'x.json'} cannot be created"
    )


def test_output_path_problem_for_a_directory(tmp_path):
    assert output_path_problem(tmp_path, directory=True) is None
    assert output_path_problem(tmp_path / "a" / "b", directory=True) is None  # mkdir -p
    afile = tmp_path / "afile"
    afile.write_text("")
    assert output_path_problem(afile, directory=True) == f"{afile} exists and is not a directory"
    assert output_path_problem(afile / "sub", directory=True) == (
        f"{afile} is a file, so the directory {afile / 'sub'} cannot be created"
    )


def test_output_path_problem_for_paths_without_write_permission(tmp_path, monkeypatch):
    """os.access says no (faked, so the test also means something when CI runs as root)."""
    import revjax._validate as validate

    monkeypatch.setattr(validate.os, "access", lambda *args, **kwargs: False)
    target = tmp_path / "out.json"
    assert output_path_problem(target) == f"{target} is not writable"
    folder = tmp_path / "new" / "dir"
    assert output_path_problem(folder, directory=True) == f"directory {tmp_path} is not writable"
