"""precision: policies (compute/stream dtype, matmul precision) and exact fixed-point mode."""

import contextlib
import re

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import revjax as rj
from revjax.coupling import Coupling
from revjax.diagnostics import compare_gradients, reconstruction_report, relative_error
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp_stack, mlp, mlp_coupling
from revjax.precision import Policy, apply_policy, exact_policy, round_to_grid, to_stream
from revjax.scan import plain_scan

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


def small_stack(depth=4, width=8, hidden=16, batch=6, dtype=jnp.float32):
    params = init_mlp_stack(jax.random.key(0), depth, width, hidden, dtype=dtype)
    x = tuple(jax.random.normal(k, (batch, width)) for k in jax.random.split(jax.random.key(1)))
    return mlp_coupling(), params, x


def sum_of_squares(y):
    return 0.5 * sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in jax.tree.leaves(y))


# --- Policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, stream",
    [
        ({}, None),
        ({"compute_dtype": jnp.bfloat16}, F32),
        ({"compute_dtype": jnp.float16}, F32),
        ({"compute_dtype": jnp.float32}, F32),
        ({"compute_dtype": jnp.bfloat16, "stream_dtype": jnp.bfloat16}, BF16),
        ({"fraction_bits": 16}, F32),
        ({"fraction_bits": 16, "compute_dtype": "bfloat16"}, F32),
    ],
)
def test_policy_default_stream(kwargs, stream):
    assert Policy(**kwargs).stream_dtype == stream


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"compute_dtype": jnp.int32}, TypeError, "compute_dtype must be one of"),
        ({"stream_dtype": "not-a-dtype"}, TypeError, "not a dtype"),
        (
            {"compute_dtype": jnp.bfloat16, "stream_dtype": jnp.float16},
            ValueError,
            "float16 stream cannot hold bfloat16",
        ),
        (
            {"compute_dtype": jnp.float32, "stream_dtype": jnp.bfloat16},
            ValueError,
            "bfloat16 stream cannot hold float32",
        ),
        ({"stream_dtype": jnp.float64}, ValueError, "jax_enable_x64"),
        ({"matmul_precision": "fastest"}, ValueError, "not a jax.default_matmul_precision"),
        ({"matmul_precision": "DEFAULT"}, ValueError, "not a jax.default_matmul_precision"),
        ({"fraction_bits": 8, "stream_dtype": jnp.bfloat16}, ValueError, "float32 or float64"),
        ({"fraction_bits": 24}, ValueError, r"in \[0, 23\]"),
        ({"fraction_bits": -1}, ValueError, r"in \[0, 23\]"),
        ({"fraction_bits": 2.5}, TypeError, "must be an int"),
    ],
)
def test_unsupported_policies_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        Policy(**kwargs)


def test_a_narrow_stream_without_compute_dtype_rounds_branch_outputs_as_documented():
    """Policy(stream_dtype=bfloat16) alone is accepted although the explicit pair float32
    compute / bfloat16 stream is refused: without a compute dtype the branches' output dtype is
    unknown at construction. Their float32 outputs are rounded into the bfloat16 stream (the
    README's precision table says so); this pins it: the result is exactly the policy-free scan
    of a bfloat16 input, and not the float32 stream's."""
    block, params, x = small_stack()
    narrow = rj.reversible_scan(block, params, x, policy=Policy(stream_dtype=jnp.bfloat16))
    chex.assert_trees_all_equal_dtypes(narrow, (jnp.ones(1, BF16), jnp.ones(1, BF16)))
    by_hand = plain_scan(block, params, jax.tree.map(lambda a: a.astype(BF16), x))
    chex.assert_trees_all_equal(narrow, by_hand)
    wide = rj.reversible_scan(block, params, x)
    assert any(
        not np.array_equal(np.asarray(a, np.float32), np.asarray(b))
        for a, b in zip(narrow, wide, strict=True)
    )


def test_grid_range():
    assert exact_policy().grid_range == 2.0**12
    assert exact_policy(16).grid_range == 2.0**8
    assert exact_policy(0).grid_range == 2.0**24
    with pytest.raises(ValueError, match="only exact mode"):
        _ = Policy().grid_range


def test_compute_dtype_reaches_the_branches_and_the_stream_stays_float32():
    seen = []

    def branch(p, h):
        seen.append((h.dtype, p["w"].dtype))
        return jnp.tanh(h @ p["w"])

    block = rj.additive_coupling(branch, branch)
    w = {"w": 0.3 * jax.random.normal(jax.random.key(0), (3, 4, 4))}  # float32 master weights
    x = (jnp.ones((2, 4), jnp.bfloat16), jnp.ones((2, 4), jnp.bfloat16))
    policy = Policy(compute_dtype=jnp.bfloat16)
    y = rj.reversible_scan(block, (w, w), x, policy=policy)
    assert {d for pair in seen for d in pair} == {BF16}
    chex.assert_trees_all_equal_dtypes(y, (jnp.ones(1), jnp.ones(1)))  # float32 stream

    loss = lambda p, x_: sum_of_squares(rj.reversible_scan(block, p, x_, policy=policy))
    gp, gx = jax.grad(loss, argnums=(0, 1))((w, w), x)
    chex.assert_trees_all_equal_dtypes(gp, (w, w))  # float32 gradients for float32 params
    chex.assert_trees_all_equal_dtypes(gx, x)  # bf16 input gets a bf16 gradient


def _dot_precisions(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_precisions(sub)
    return found


def test_matmul_precision_applies_to_forward_and_backward():
    """The backward of a custom_vjp is traced when the pullback is called, here outside the
    caller's precision context: only the policy reaches it."""
    block, params, x = small_stack()
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for policy, expect_all_highest in ((Policy(matmul_precision="highest"), True), (None, False)):
        run = lambda p, policy=policy: rj.reversible_scan(block, p, x, policy=policy)
        with jax.default_matmul_precision("bfloat16"):
            fwd = jax.make_jaxpr(run)(params)
            y, pullback = jax.vjp(run, params)
        with jax.default_matmul_precision("default"):
            bwd = jax.make_jaxpr(pullback)(y)
        fwd_p, bwd_p = _dot_precisions(fwd.jaxpr), _dot_precisions(bwd.jaxpr)
        assert len(fwd_p) == 4 and len(bwd_p) == 12  # 2 matmuls per branch; fused backward
        assert all(p == highest for p in fwd_p + bwd_p) == expect_all_highest


def _dot_input_dtypes(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found += [v.aval.dtype for v in eqn.invars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_input_dtypes(sub)
    return found


def test_a_second_policy_keeps_the_first_policys_matmul_precision():
    """A block that already carries a matmul precision can take a compute dtype afterwards (it
    once raised a misleading "no map_branches" error) and keeps both."""
    block, params, x = small_stack()
    precise = apply_policy(block, Policy(matmul_precision="highest"))
    both = apply_policy(precise, Policy(compute_dtype=jnp.bfloat16))
    jaxpr = jax.make_jaxpr(both.forward)(jax.tree.map(lambda a: a[0], params), x).jaxpr
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert _dot_precisions(jaxpr) == [highest] * 4
    assert set(_dot_input_dtypes(jaxpr)) == {jnp.dtype(jnp.bfloat16)}
    # Where two composed policies set the same thing, the first-applied one wins (documented).
    later = apply_policy(precise, Policy(matmul_precision="bfloat16"))
    jaxpr = jax.make_jaxpr(later.forward)(jax.tree.map(lambda a: a[0], params), x).jaxpr
    assert _dot_precisions(jaxpr) == [highest] * 4


def test_hand_written_coupling_cannot_take_a_compute_dtype():
    block, params, x = small_stack()
    generic = Coupling(block.forward, block.inverse)
    with pytest.raises(TypeError, match="no map_branches"):
        rj.reversible_scan(generic, params, x, policy=Policy(compute_dtype=jnp.bfloat16))
    with pytest.raises(TypeError, match="block 1 is a hand-written Coupling"):
        apply_policy(rj.sequence(block, generic), Policy(compute_dtype=jnp.bfloat16))
    # A policy that does not reach inside the branches is fine.
    y = rj.reversible_scan(generic, params, x, policy=Policy(matmul_precision="highest"))
    assert float(relative_error(y, rj.reversible_scan(block, params, x))) <= 1e-6


def test_policy_must_be_a_policy():
    block, params, x = small_stack()
    with pytest.raises(TypeError, match=r"revjax\.precision\.Policy"):
        rj.reversible_scan(block, params, x, policy="bfloat16")


# --- exact mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction_bits", "error", "message"),
    [
        (130, ValueError, r"fraction_bits=130 is out of range for float32 x: .* \|F\| <= 126"),
        (-200, ValueError, "fraction_bits=-200 is out of range"),
        (2.0, TypeError, "fraction_bits must be a static int, got float"),
        (True, TypeError, "fraction_bits must be a static int, got bool"),
    ],
)
def test_round_to_grid_refuses_a_scale_that_is_not_a_normal_number(fraction_bits, error, message):
    """2^130 overflows float32 (and 2^-200 underflows): the public helper returned NaN."""
    with pytest.raises(error, match=message):
        round_to_grid(jnp.float32(1.0), fraction_bits)
    assert float(round_to_grid(jnp.float32(1.3), 126)) == pytest.approx(1.3)  # the edge works
    assert float(round_to_grid(jnp.float32(5.0), -2)) == 4.0  # a grid of 4


@pytest.mark.parametrize(
    "x, fraction_bits",
    [(jnp.float32(5.0), 126), (jnp.float32(3e8), 100), (jnp.float16(5.0), 14),
     (jnp.float32(-3.4e38), 1)],
)  # fmt: skip
def test_round_to_grid_returns_a_large_x_that_is_on_the_grid_as_it_is(x, fraction_bits):
    """x 2^F overflowed to inf for a finite x already on the grid (its spacing >= 2^-F):
    5.0 at F = 126 came back inf. The derivative stays 1."""
    assert round_to_grid(x, fraction_bits) == x
    assert float(jax.grad(lambda v: round_to_grid(v, fraction_bits).astype(jnp.float32))(x)) == 1


def test_round_to_grid_is_on_grid_with_straight_through_gradient():
    x = jax.random.normal(jax.random.key(0), (1000,)) * 10
    q = round_to_grid(x, 8)
    np.testing.assert_array_equal(q * 256, jnp.round(q * 256))
    assert float(jnp.max(jnp.abs(q - x))) <= 2.0**-9
    np.testing.assert_array_equal(round_to_grid(q, 8), q)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(round_to_grid(v, 8) * v))(x), q + x)


def test_exact_policy_rejects_affine_couplings():
    f = lambda p, h: (h * p, h)
    with pytest.raises(ValueError, match=r"exact mode needs additive couplings.*kind 'affine'"):
        apply_policy(rj.affine_coupling(f, f), exact_policy())


def test_exact_reconstruction_is_bit_identical():
    block, params, x = small_stack(depth=32, dtype=jnp.bfloat16)
    policy = exact_policy(16, compute_dtype=jnp.bfloat16)
    y = rj.reversible_scan(block, params, x, policy=policy)
    x_rec = rj.inverse_scan(block, params, y, policy=policy)
    np.testing.assert_array_equal(np.asarray(x_rec[0]), np.asarray(to_stream(x, policy)[0]))
    np.testing.assert_array_equal(np.asarray(x_rec[1]), np.asarray(to_stream(x, policy)[1]))
    report = reconstruction_report(block, params, x, policy=policy)
    assert float(jnp.max(report["relative_error"])) == 0.0


def test_exact_mode_with_a_layernorm_branch_reconstructs_exactly_and_does_not_drift():
    """Exactness is of the reconstruction: the backward pass sees bit for bit the activations
    backprop stores. The gradient arithmetic itself may be compiled in a different order in the
    two programs (here a LayerNorm's reductions), so it is not always bitwise equal; it stays
    at float32 rounding and does not compound with depth (measured 1.2e-7 at L = 4, 2.9e-7 at
    L = 64). A floating stream's error compounds instead (numerics tests above)."""

    def normed_mlp(p, h):
        centred = h - h.mean(-1, keepdims=True)
        normed = centred * jax.lax.rsqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
        return mlp(p, normed)

    block = rj.additive_coupling(normed_mlp, normed_mlp)
    policy = exact_policy(16)
    x = tuple(jax.random.normal(k, (16, 32)) for k in jax.random.split(jax.random.key(5)))
    for depth in (4, 64):
        params = init_mlp_stack(jax.random.key(0), depth, 32, 64)
        report = reconstruction_report(block, params, x, policy=policy)
        assert float(jnp.max(report["relative_error"])) == 0.0
        (row,) = compare_gradients(block, params, x, {"exact": {"policy": policy}})
        assert row["param_grad_error"] <= 1e-6 and row["input_grad_error"] <= 1e-6, row


@contextlib.contextmanager
def raises_overflow(pattern):
    """An OverflowError with ``pattern`` in its message; under jit JAX re-raises a callback's
    exception as its own runtime error whose text contains the original one."""
    with pytest.raises((OverflowError, jax.errors.JaxRuntimeError)) as info:
        yield
    assert isinstance(info.value, OverflowError) or "OverflowError" in str(info.value)
    assert re.search(pattern, str(info.value)), str(info.value)


def _constant_push(depth, push):
    """x1 grows by ``push`` per layer: f returns the layer's scalar parameter, g returns 0."""
    f = lambda c, h: jnp.full_like(h, c)
    g = lambda c, h: jnp.zeros_like(h)
    return rj.additive_coupling(f, g), (jnp.full((depth,), push), jnp.zeros((depth,)))


def test_exact_mode_takes_numpy_integers_and_empty_batches():
    assert exact_policy(np.int64(12)) == exact_policy(12)
    assert type(exact_policy(np.int32(12)).fraction_bits) is int
    block, params, x = small_stack()
    empty = jax.tree.map(lambda v: v[:0], x)  # zero-size batch once crashed the range check
    y = rj.reversible_scan(block, params, empty, policy=exact_policy(12))
    assert [v.shape for v in y] == [(0, 8), (0, 8)]


@pytest.mark.parametrize("scan", ["reversible", "plain", "grad"])
def test_exact_overflow_names_the_first_layer(scan):
    block, params = _constant_push(depth=6, push=100.0)
    x = (jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    policy = exact_policy(16)  # range +-256: layer 0 -> 100, layer 1 -> 200, layer 2 -> 300
    run = {
        "reversible": lambda: rj.reversible_scan(block, params, x, policy=policy),
        "plain": lambda: plain_scan(block, params, x, policy=policy),
        "grad": lambda: jax.grad(
            lambda p: sum_of_squares(rj.reversible_scan(block, p, x, policy=policy))
        )(params),
    }[scan]
    with raises_overflow(r"exact mode: the output of layer 2 has max \|x\| = 300"):
        jax.block_until_ready(jax.jit(run)())
    # Within range nothing is raised, and the sum is exact: 6 x 100 = 600 < 2^10.
    y = jax.jit(lambda: rj.reversible_scan(block, params, x, policy=exact_policy(14)))()
    assert float(jnp.max(y[0])) == 600.0


def test_exact_overflow_of_the_input_and_nan():
    block, params = _constant_push(depth=2, push=1.0)
    policy, zeros = exact_policy(16), jnp.zeros(2)
    with raises_overflow(r"exact mode: the input stream has max \|x\| = 300"):
        jax.block_until_ready(
            rj.reversible_scan(block, params, (jnp.full(2, 300.0), zeros), policy=policy)
        )
    nan_params = (params[0] * jnp.nan, params[1])
    with raises_overflow(r"the output of layer 0 has max \|x\| = nan"):
        jax.block_until_ready(rj.reversible_scan(block, nan_params, (zeros, zeros), policy=policy))


def test_a_float64_stream_just_inside_the_range_is_accepted():
    """The range check reduces in the stream's dtype: 8191.9999 rounds up to 8192 in float32,
    which once reported an in-range float64 stream as out of range (-8192, 8192)."""
    with jax.enable_x64(True):
        block, params = _constant_push(depth=2, push=0.0)
        policy = Policy(stream_dtype=jnp.float64, fraction_bits=40)
        assert policy.grid_range == 8192.0
        inside = (jnp.full((1, 2), 8191.9999, jnp.float64), jnp.zeros((1, 2), jnp.float64))
        assert float(jnp.float32(8191.9999)) == 8192.0  # what made the float32 check fail
        y = jax.block_until_ready(rj.reversible_scan(block, params, inside, policy=policy))
        assert y[0].dtype == jnp.float64
        # On the grid 2^-40: round(8191.9999 * 2^40) / 2^40, within 2^-41 of the input.
        assert abs(float(y[0][0, 0]) - 8191.9999) <= 2.0**-41
        outside = (jnp.full((1, 2), 8192.0, jnp.float64), jnp.zeros((1, 2), jnp.float64))
        with raises_overflow(r"the input stream has max \|x\| = 8192"):
            jax.block_until_ready(rj.reversible_scan(block, params, outside, policy=policy))


# --- acceptance on the reference network ---------------------------------------------------------
# GELU-MLP additive couplings, width 256, hidden 1024, batch 256, L = 64, bf16 params and compute,
# both weight matrices ~ N(0, (0.5/sqrt(width))^2). Errors: relative norm of the parameter
# gradient against plain backprop of the same mixed-precision network.

REF_DEPTH, REF_WIDTH, REF_HIDDEN, REF_BATCH = 64, 256, 1024, 256
BF16_STREAM = Policy(compute_dtype=jnp.bfloat16, stream_dtype=jnp.bfloat16)
F32_STREAM = Policy(compute_dtype=jnp.bfloat16)


def reference_network(depth=REF_DEPTH):
    params = init_mlp_stack(
        jax.random.key(0),
        depth,
        REF_WIDTH,
        REF_HIDDEN,
        std=0.5 / REF_WIDTH**0.5,
        dtype=jnp.bfloat16,
    )
    x = tuple(
        jax.random.normal(k, (REF_BATCH, REF_WIDTH)) for k in jax.random.split(jax.random.key(1))
    )
    return mlp_coupling(), params, x


@pytest.fixture(scope="module")
def reference_comparison():
    methods = {
        "bf16 stream": {"policy": BF16_STREAM},
        "f32 stream": {"policy": F32_STREAM},
        "f32 stream, anchors every 16": {"policy": F32_STREAM, "checkpoint_every": 16},
        # The stream reaches max |x| ~ 200 at L = 64, inside the default range 4096.
        "exact, bf16 compute": {"policy": exact_policy(compute_dtype=jnp.bfloat16)},
        "exact, f32 compute": {"policy": exact_policy(compute_dtype=jnp.float32)},
    }
    rows = compare_gradients(*reference_network(), methods)
    return {row["method"]: row for row in rows}


def test_reference_bf16_stream_error_is_reported(reference_comparison):
    """Measured 2.1 on CPU: a naive bf16 stream's gradient is garbage at L = 64, and the
    diagnostics say so instead of hiding it (the issue's prototype measured 1.8)."""
    row = reference_comparison["bf16 stream"]
    assert row["param_grad_error"] > 0.1 and not row["exact"]


def test_reference_float32_stream_is_ten_times_better(reference_comparison):
    """Measured 0.090 vs 2.1 (23x)."""
    f32 = reference_comparison["f32 stream"]["param_grad_error"]
    assert f32 <= reference_comparison["bf16 stream"]["param_grad_error"] / 10


def test_reference_anchors_every_16_bound_the_error(reference_comparison):
    """The issue's bound, 1e-2; measured 1.9e-3."""
    assert reference_comparison["f32 stream, anchors every 16"]["param_grad_error"] <= 1e-2


@pytest.mark.parametrize("method", ["exact, bf16 compute", "exact, f32 compute"])
def test_reference_exact_mode_is_bitwise_equal_to_backprop(reference_comparison, method):
    row = reference_comparison[method]
    assert row["exact"], row
    assert row["param_grad_error"] == 0.0 and row["input_grad_error"] == 0.0


def test_reference_anchor_memory_grows_as_depth_over_k():
    """Temp above the anchor-free stack is L/k float32 streams (within 10%), at k = 16 and 8."""
    block, params, x = reference_network()
    stream_bytes = 2 * REF_BATCH * REF_WIDTH * 4

    def temp(every):
        loss = lambda p: sum_of_squares(
            rj.reversible_scan(block, p, x, policy=F32_STREAM, checkpoint_every=every)
        )
        return compiled_memory(jax.grad(loss), params).temp_bytes

    base = temp(None)
    for every in (16, 8):
        extra, expected = temp(every) - base, (REF_DEPTH // every) * stream_bytes
        assert abs(extra - expected) <= 0.1 * expected, (every, extra, expected)


def _exact_hessian_case():
    """A 2-layer exact-mode stack, its loss through a scan, and the same network as a Python
    loop (the reference: straight-through rounding, no scan)."""
    block, params, x = small_stack(depth=2, width=4, hidden=8, batch=3)
    policy = exact_policy(16)
    loss_of = lambda y: jnp.sum(jnp.sin(y[0])) + jnp.sum(y[1] ** 3)

    def python_loop(p):
        quantised = apply_policy(block, policy)
        h = to_stream(x, policy)
        for layer in range(2):
            h = quantised.forward(jax.tree.map(lambda a, i=layer: a[i], p), h)
        return loss_of(h)

    def hvp(loss):
        v = jax.tree.map(jnp.ones_like, params)
        dot = lambda p: sum(jax.tree.leaves(jax.tree.map(jnp.vdot, p, v)))
        return jax.grad(lambda p: dot(jax.grad(loss)(p)))(params)

    scanned = lambda scan: lambda p: loss_of(scan(block, p, x, policy=policy))
    return hvp, scanned, python_loop


def test_exact_mode_second_derivatives_of_reversible_scan():
    hvp, scanned, python_loop = _exact_hessian_case()
    # float32 round-off of a second-order computation; measured ~1e-7.
    assert float(relative_error(hvp(scanned(rj.reversible_scan)), hvp(python_loop))) <= 1e-5


def test_exact_mode_second_derivatives_of_plain_scan():
    """Through ``plain_scan`` too: the straight-through rounding is written with
    ``stop_gradient``, not a ``custom_jvp`` with an identity tangent, whose second derivatives
    inside ``lax.scan`` JAX 0.10.2 got wrong (this test failed: relative error ~1)."""
    hvp, scanned, python_loop = _exact_hessian_case()
    # float32 round-off of a second-order computation, as for reversible_scan above.
    assert float(relative_error(hvp(scanned(plain_scan)), hvp(python_loop))) <= 1e-5


def test_exact_mode_needs_the_branch_output_bits_to_agree_between_forward_and_vjp():
    """The documented limit of exact mode (README, ``revjax.precision``): reconstruction is bit
    for bit only if the backward pass's vjp computes each branch output with the bits the
    forward pass had. An RMSNorm written ``h / jnp.sqrt(...)`` is compiled differently in the
    two programs on CPU, so some outputs land on another grid point: the gradient is then worse
    than a float32 stream's, and ``reconstruction_report`` (which inverts by ``block.inverse``)
    still shows 0. Written with ``lax.rsqrt`` it is not affected. If XLA stops rewriting the
    division, this fails: then update the README's caveat."""

    def rms_branch(divide):
        def branch(p, h):
            mean_square = jnp.mean(h * h, -1, keepdims=True) + 1e-6
            h = h / jnp.sqrt(mean_square) if divide else h * jax.lax.rsqrt(mean_square)
            return jnp.tanh(h @ p["w1"]) @ p["w2"]

        return branch

    depth, width, batch = 16, 32, 16
    k = jax.random.split(jax.random.key(0), 6)
    weights = lambda a, b: {
        "w1": jax.random.normal(a, (depth, width, width)) / width**0.5,
        "w2": jax.random.normal(b, (depth, width, width)) / width**0.5,
    }
    params = (weights(k[0], k[1]), weights(k[2], k[3]))
    x = (jax.random.normal(k[4], (batch, width)), jax.random.normal(k[5], (batch, width)))
    errors = {}
    for divide in (True, False):
        block = rj.additive_coupling(rms_branch(divide), rms_branch(divide))
        report = reconstruction_report(block, params, x, policy=exact_policy())
        assert float(jnp.max(report["relative_error"])) == 0.0  # blind to the mismatch
        for name, policy in (("exact", exact_policy()), ("float32", None)):
            loss = lambda scan, policy=policy, block=block: (
                lambda p: sum(jnp.sum(jnp.sin(v)) for v in scan(block, p, x, policy=policy))
            )
            g = jax.jit(jax.grad(loss(rj.reversible_scan)))(params)
            g_ref = jax.jit(jax.grad(loss(plain_scan)))(params)
            errors[divide, name] = float(relative_error(g, g_ref))
    # rsqrt: float32 rounding of the gradient arithmetic only, as for the LayerNorm above
    # (measured 3.3e-7); division: 1.1e-4 against the float32 stream's 1.3e-6.
    assert errors[False, "exact"] <= 1e-6, errors
    assert errors[True, "exact"] > 10 * errors[True, "float32"], errors
