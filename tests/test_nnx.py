"""Tests of revjax.nnx: Stack, and the branches it runs as pure functions (revjax/_nnx_branch.py);
the decorator's checks and single blocks: test_nnx_block.py; state files: test_nnx_state.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from nnx_helpers import (
    BATCH,
    DEPTH,
    DIM,
    Block,
    Noisy,
    inputs,
    loss_of,
    make_stack,
    max_relative_error,
)
from reconstruction_checks import check_reconstruction_across_depth

import revjax.nnx as rnnx
from revjax.memory import compiled_memory
from revjax.precision import Policy


def reseeded_branch(branch: nnx.Module, key) -> nnx.Module:
    """The documented key contract: stream i of a branch gets fold_in(branch_key, i), count 0."""
    streams = [node for _, node in nnx.iter_graph(branch) if isinstance(node, nnx.RngStream)]
    for i, stream in enumerate(streams):
        stream.key.set_value(jax.random.fold_in(key, i))
        stream.count.set_value(jnp.zeros((), jnp.uint32))
    return branch


def loop_twin_loss(stack: rnnx.Stack, x, key):
    """A plain NNX twin written independently of revjax: a Python loop over the layers, each
    block rebuilt from layer l's slice of the stacked state and called as ordinary NNX code."""
    graphdef, state = nnx.split(stack.blocks)
    x1, x2 = x
    for layer in range(stack.depth):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], state))
        if key is not None:
            kf, kg = jax.random.split(jax.random.fold_in(key, layer))
            reseeded_branch(block.f, kf)
            reseeded_branch(block.g, kg)
        x1 = x1 + block.f(x2)
        x2 = x2 + block.g(x1)
    return jnp.sum(jnp.sin(x1) * x2) + jnp.sum(x1**2)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_gradients_equal_plain_nnx_twin(rate):
    stack, x = make_stack(rate), inputs()
    key = jax.random.key(7) if rate else None
    grads = nnx.grad(loss_of, argnums=(0, 1))(stack, x, key)
    twin = nnx.grad(loop_twin_loss, argnums=(0, 1))(stack, x, key)
    # float32 reconstruction round-off over 5 layers is ~1e-7 relative; 1e-5 is the bound.
    assert max_relative_error(grads, twin) <= 1e-5
    # The masks really are random: a different key changes the gradient.
    if rate:
        other = nnx.grad(loss_of)(stack, x, jax.random.key(8))
        assert max_relative_error(other, grads[0]) > 1e-2


@pytest.mark.parametrize("method", ["backprop", "checkpoint"])
def test_twin_methods_agree(method):
    stack, x, key = make_stack(0.3), inputs(), jax.random.key(3)
    reversible = nnx.grad(loss_of)(stack, x, key)
    twin = nnx.view(stack, method=method)
    assert twin.method == method and stack.method == "reversible"
    # Same parameters (the view shares the arrays) and the same keys: gradients agree to
    # reconstruction round-off (float32, 5 layers).
    assert max_relative_error(reversible, nnx.grad(loss_of)(twin, x, key)) <= 1e-5


def test_anchors_and_policy_pass_through():
    x, key = inputs(), jax.random.key(3)
    plain = nnx.grad(loss_of)(make_stack(0.3), x, key)
    anchored = nnx.grad(loss_of)(make_stack(0.3, checkpoint_every=1), x, key)
    # checkpoint_every=1 stores every layer's output: no reconstruction, so only the order of
    # floating-point additions differs from the reversible gradient.
    assert max_relative_error(anchored, plain) <= 1e-5
    # The option reaches the scan: anchors every 2 of 16 layers keep L / k = 8 stream pairs
    # more (measured 8.00 pairs of 512 x DIM float32).
    stream_pair = 2 * 512 * DIM * 4
    extra = gradient_temp_bytes(16, "reversible", checkpoint_every=2) - gradient_temp_bytes(
        16, "reversible"
    )
    assert 7 * stream_pair <= extra <= 9 * stream_pair, (extra, stream_pair)
    with pytest.raises(
        ValueError, match=r"Stack\(Block\): checkpoint_every=2 must be a positive divisor"
    ):
        make_stack(checkpoint_every=2)(x)
    bf16 = make_stack(policy=Policy(compute_dtype=jnp.bfloat16))
    y = bf16(x)
    assert all(leaf.dtype == jnp.float32 for leaf in y)  # float32 stream by default
    y32 = make_stack()(x)
    # bf16 branches (8 mantissa bits) over 5 layers: relative error ~1e-2, far from 0 and 1.
    assert 1e-5 < max_relative_error(y, y32) < 5e-2


def test_optimizer_step_under_jit_matches_twin():
    x, key = inputs(), jax.random.key(2)

    @nnx.jit
    def train_step(model, optimizer, x, key):
        loss, grads = nnx.value_and_grad(loss_of)(model, x, key)
        optimizer.update(model, grads)
        return loss

    results = []
    for method in ("reversible", "backprop"):
        model = make_stack(0.3, method=method)
        optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
        losses = [float(train_step(model, optimizer, x, key)) for _ in range(3)]
        results.append((losses, nnx.state(model, nnx.Param)))
    (loss_rev, params_rev), (loss_bp, params_bp) = results
    assert loss_rev[-1] < loss_rev[0]  # it trains
    np.testing.assert_allclose(loss_rev, loss_bp, rtol=1e-5)
    # Adam normalises each update, so 3 steps of lr 1e-2 move parameters by up to 3e-2 and
    # round-off-level gradient differences stay round-off-level in the parameters.
    assert max_relative_error(params_rev, params_bp) <= 1e-5


def test_split_merge_and_jit_keep_the_module_ordinary():
    stack, x, key = make_stack(0.3), inputs(), jax.random.key(4)
    graphdef, state = nnx.split(stack)
    rebuilt = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(rebuilt(x, key=key)[0], stack(x, key=key)[0])
    jitted = nnx.jit(lambda m, x, k: m(x, key=k))(stack, x, key)
    np.testing.assert_allclose(jitted[0], stack(x, key=key)[0], rtol=1e-6, atol=1e-6)
    params = nnx.state(stack.blocks, nnx.Param)
    assert all(leaf.shape[0] == DEPTH for leaf in jax.tree.leaves(params))
    # The layers were initialised independently (split_rngs), not copies of one layer.
    kernel = stack.blocks.f.up.kernel[...]
    assert float(jnp.abs(kernel[0] - kernel[1]).max()) > 1e-3


def test_own_stream_draws_fresh_masks_and_explicit_keys_replay():
    stack, x = make_stack(0.5), inputs()
    first, second = stack(x)[0], stack(x)[0]
    assert float(jnp.abs(first - second).max()) > 1e-3  # the stack's stream advanced
    key = jax.random.key(9)
    np.testing.assert_array_equal(stack(x, key=key)[0], stack(x, key=key)[0])


def test_inverse_reconstructs_the_input():
    stack, x, key = make_stack(0.3), inputs(), jax.random.key(5)
    x_rec = stack.inverse(stack(x, key=key), key=key)
    # float32 round-off of 5 layers of reconstruction.
    assert max_relative_error(x_rec, x) <= 1e-5
    with pytest.raises(ValueError, match="pass the key"):
        stack.inverse(stack(x, key=key))
    # Only the stack flagged deterministic while its dropout layers are live: the flag turns
    # them off for its calls (it was once ignored, and this inverse refused), so the forward
    # and the inverse agree without a key.
    view = nnx.view(stack, only=rnnx.Stack, deterministic=True)
    assert not view.blocks.f.dropout.deterministic
    assert max_relative_error(view.inverse(view(x)), x) <= 1e-5
    stack.eval()
    x_rec = stack.inverse(stack(x))
    assert max_relative_error(x_rec, x) <= 1e-5


class CallTimeDropout(nnx.Module):
    """Dropout whose mode is passed at call time (``deterministic=None`` at construction)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=None, rngs=rngs)

    def __call__(self, h):
        return self.dropout(self.linear(h), deterministic=False)


class Experts(nnx.Module):
    """Three sub-layers made by nnx.vmap under nnx.split_rngs, each with dropout: the branch's
    RNG streams have their own axis (3,)."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=0, out_axes=0)
        def make(r):
            return nnx.Sequential(nnx.Linear(dim, dim, rngs=r), nnx.Dropout(0.5, rngs=r))

        self.experts = make(rngs)

    def __call__(self, h):
        run = nnx.vmap(lambda e, h_: e(jnp.tanh(h_)), in_axes=(0, None), out_axes=0)
        return run(self.experts, h).mean(0)


def test_a_branch_of_vmapped_sub_layers_with_dropout_runs_in_a_stack():
    """Each such stream was rebuilt from one scalar key in place of its (3,) keys: the stack
    failed in every mode ("vmap was requested to map its argument along axis 0"), also with
    method='backprop'. Each now gets its own keys; gradients equal the backprop twin's."""

    @rnnx.reversible
    class ExpertBlock(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = Experts(dim, rngs), Experts(dim, rngs)

    stack, x, key = rnnx.Stack(ExpertBlock, 2, DIM, rngs=nnx.Rngs(0)), inputs(), jax.random.key(3)
    loss = lambda m: loss_of(m, x, key)
    grads = nnx.grad(loss)(stack)
    reference = nnx.grad(loss)(nnx.view(stack, method="backprop"))
    assert max_relative_error(grads, reference) <= 1e-5  # measured 1.2e-7
    # The three experts draw different masks (one key each, not one key for all).
    from revjax._nnx_branch import _fresh_streams, stream_template

    streams = nnx.state(Experts(DIM, nnx.Rngs(0)), nnx.RngState)
    keys = [
        leaf
        for leaf in jax.tree.leaves(_fresh_streams(stream_template(streams, False), key))
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    ]
    data = jax.random.key_data(keys[0]).reshape(3, -1)
    assert keys[0].shape == (3,) and len({tuple(map(int, row)) for row in data}) == 3


class CondDropout(nnx.Module):
    """Dropout inside nnx.cond: a nested computation that draws only in training mode."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.linear, self.drop = nnx.Linear(dim, dim, rngs=rngs), nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, h):
        branches = (lambda m, h_: m.drop(jnp.tanh(m.linear(h_))), lambda m, h_: m.drop(h_))
        return nnx.cond(jnp.sum(h) > -1e9, *branches, self, h)


def test_dropout_inside_a_nested_computation_is_seen_only_when_it_draws():
    """A live nested computation counted as using all its inputs, so in eval mode this branch
    was taken as drawing: inverse() without a key refused ('they draw even in eval mode'),
    a single block could never be inverted, and the stack's stream advanced on every call."""

    @rnnx.reversible
    class CondBlock(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = CondDropout(dim, rngs), CondDropout(dim, rngs)

    stack, x = rnnx.Stack(CondBlock, 2, DIM, rngs=nnx.Rngs(0)), inputs()
    assert rnnx.draws_random(*stack.coupling(), x)  # training mode: it draws
    stack.eval()
    assert not rnnx.draws_random(*stack.coupling(), x)
    y = stack(x)
    assert max_relative_error(stack.inverse(y), x) <= 1e-5
    assert int(stack.rngs.count[...]) == 0
    block = CondBlock(DIM, rngs=nnx.Rngs(0))
    block.eval()
    assert max_relative_error(block.inverse(block(x)), x) <= 1e-5


@pytest.mark.parametrize("branch", [Noisy, CallTimeDropout])
def test_any_random_branch_gets_fresh_draws_and_replays_with_a_key(branch):
    """Randomness is found in the traced computation, not from module attributes: a branch
    that draws noise (or dropout with a call-time mode) gets a fresh key per call, never a
    fixed one, and its inverse needs the forward's key."""

    @rnnx.reversible
    class RandomBlock(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = branch(dim, rngs=rngs), branch(dim, rngs=rngs)

    stack, x = rnnx.Stack(RandomBlock, 3, DIM, rngs=nnx.Rngs(0)), inputs()
    assert rnnx.draws_random(*stack.coupling(), x)
    first, second = stack(x)[0], stack(x)[0]
    assert float(jnp.abs(first - second).max()) > 1e-3
    key = jax.random.key(4)
    with pytest.raises(ValueError, match="other random draws; pass the key="):
        stack.inverse(stack(x, key=key))
    assert max_relative_error(stack.inverse(stack(x, key=key), key=key), x) <= 1e-5
    assert not rnnx.draws_random(*make_stack(0.0).coupling(), x)
    # Eval mode does not stop these draws: the refusal no longer says "call model.eval()".
    stack.eval()
    with pytest.raises(ValueError, match="even in eval mode") as info:
        stack.inverse(stack(x, key=key))
    assert "eval() first" not in str(info.value)


def test_the_inverse_suggests_eval_mode_only_where_it_helps():
    stack, x, key = make_stack(0.5), inputs(), jax.random.key(2)
    with pytest.raises(ValueError, match=r"pass the key= .*, or call model\.eval\(\) first"):
        stack.inverse(stack(x, key=key))
    block = Block(DIM, 0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"call \.eval\(\) first"):
        block.inverse(block(x))


def test_eval_mode_turns_dropout_off_and_keeps_the_method():
    stack, x = make_stack(0.5), inputs()
    stack.eval()
    count = int(stack.rngs.count[...])
    stack(x)
    assert int(stack.rngs.count[...]) == count  # no key drawn when nothing is random
    assert stack.deterministic and stack.blocks.f.dropout.deterministic
    y_a, y_b = stack(x, key=jax.random.key(0)), stack(x, key=jax.random.key(1))
    np.testing.assert_array_equal(y_a[0], y_b[0])  # dropout is off
    # Eval mode once ran a plain scan: a gradient taken in eval mode (fine-tuning without
    # dropout) silently stored every block's activations. The method is kept.
    jaxpr = str(jax.make_jaxpr(lambda x: stack(x, key=jax.random.key(0)))(x))
    assert "custom_vjp" in jaxpr
    twin = nnx.view(stack, method="backprop")
    grads = nnx.grad(loss_of)(stack, x, None)
    assert max_relative_error(grads, nnx.grad(loss_of)(twin, x, None)) <= 1e-5


def test_the_deterministic_attribute_turns_dropout_off():
    """``Stack.deterministic`` was documented as a settable attribute that turns dropout off,
    but calls never read it: ``stack.deterministic = True`` left dropout on."""
    stack, x = make_stack(0.5), inputs()
    reference = make_stack(0.5)
    reference.eval()
    stack.deterministic = True
    count = int(stack.rngs.count[...])
    y_a, y_b = stack(x), stack(x, key=jax.random.key(1))
    assert int(stack.rngs.count[...]) == count  # nothing random: no key drawn
    np.testing.assert_array_equal(y_a[0], y_b[0])
    np.testing.assert_array_equal(y_a[0], reference(x)[0])  # what eval mode computes
    assert not stack.blocks.f.dropout.deterministic  # the layers' own flags are untouched
    assert max_relative_error(stack.inverse(y_a), x) <= 1e-5  # no key needed
    grads = nnx.grad(loss_of)(stack, x, None)
    assert max_relative_error(grads, nnx.grad(loss_of)(reference, x, None)) <= 1e-6
    stack.deterministic = False  # the layers' flags (training mode) are in charge again
    assert float(jnp.abs(stack(x)[0] - y_a[0]).max()) > 1e-3


def test_coupling_runs_without_a_key_when_nothing_is_random():
    """``Stack.coupling()`` without ``key=`` failed on any block with an RNG stream (e.g.
    Dropout) with "unexpected PRNG key type NoneType", even in eval mode."""
    from revjax.diagnostics import reconstruction_report
    from revjax.scan import inverse_scan, reversible_scan

    stack, x, key = make_stack(0.5), inputs(), jax.random.key(3)
    stack.eval()
    y = reversible_scan(*stack.coupling(), x)
    np.testing.assert_allclose(y[0], stack(x)[0], rtol=1e-6, atol=1e-6)
    assert max_relative_error(inverse_scan(*stack.coupling(), y), x) <= 1e-5
    reconstruction_report(*stack.coupling(), x)
    # Dropout of rate 0 in training mode draws nothing either.
    plain = make_stack(0.0)
    np.testing.assert_allclose(
        reversible_scan(*plain.coupling(), x)[0], plain(x)[0], rtol=1e-6, atol=1e-6
    )
    # Active dropout needs the key: refused by name without one, the stack's output with it.
    stack.train()
    with pytest.raises(ValueError, match=r"Stack\(Block\): branch f draws random .*pass key="):
        reversible_scan(*stack.coupling(), x)
    np.testing.assert_array_equal(
        reversible_scan(*stack.coupling(), x, key=key)[0], stack(x, key=key)[0]
    )


def test_the_twin_shares_parameters_not_modes():
    """README: a view taken before ``model.eval()`` keeps its dropout on until ``twin.eval()``."""
    stack, x = make_stack(0.5), inputs()
    twin = nnx.view(stack, method="backprop")
    stack.eval()
    y_eval = stack(x)
    y_twin = twin(x, key=jax.random.key(0))  # dropout still on in the twin
    assert float(jnp.max(jnp.abs(y_twin[0] - y_eval[0]))) > 0.1
    twin.eval()
    assert max_relative_error(twin(x), y_eval) <= 1e-5


def test_forward_mode_in_eval_mode_points_to_the_twin():
    """Eval mode keeps the reversible method, whose custom_vjp has no forward-mode rule: the
    error says which view supports jvp, and that view does."""
    stack, x = make_stack(0.5), inputs()
    stack.eval()
    with pytest.raises(TypeError, match=r'forward-mode.*nnx\.view\(model, method="backprop"\)'):
        jax.jvp(lambda v: stack(v), (x,), (x,))
    twin = nnx.view(stack, method="backprop")
    x_dot = inputs(seed=7)
    _, tangent = jax.jvp(lambda v: twin(v), (x,), (x_dot,))
    # The jvp is right: <J x_dot, c> = <x_dot, J^T c> with the reverse mode tested elsewhere.
    cotangent = inputs(seed=8)
    (pulled,) = jax.vjp(lambda v: twin(v), x)[1](cotangent)
    dot = lambda a, b: sum(float(jnp.vdot(u, v)) for u, v in zip(a, b, strict=True))
    np.testing.assert_allclose(dot(tangent, cotangent), dot(x_dot, pulled), rtol=1e-5)


def gradient_temp_bytes(depth: int, method: str, batch: int = 512, **options) -> int:
    """Compiled temp bytes of an eval-mode gradient of a ``depth``-layer stack."""
    stack = nnx.view(make_stack(0.5, depth=depth, **options), deterministic=True, method=method)
    graphdef, state = nnx.split(stack)
    x = (jax.ShapeDtypeStruct((batch, DIM), jnp.float32),) * 2

    def grad(state, x):
        return nnx.grad(loss_of)(nnx.merge(graphdef, state), x, None)

    return compiled_memory(grad, state, x).temp_bytes


def test_eval_mode_gradient_memory_is_flat_in_depth():
    """The compiled temp memory of an eval-mode gradient, at L = 2 and L = 16."""
    reversible = [gradient_temp_bytes(depth, "reversible") for depth in (2, 16)]
    twin = [gradient_temp_bytes(depth, "backprop") for depth in (2, 16)]
    assert reversible[1] <= 1.2 * reversible[0]  # parameter-sized growth only
    assert twin[1] > 3 * twin[0]  # the plain scan stores every block's activations


# --------------------------------------------------------------------------- bad use


def test_branch_changing_the_half_shape_names_block_and_branch():
    @rnnx.reversible
    class Widening(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = nnx.Linear(dim, dim + 1, rngs=rngs)
            self.g = nnx.Linear(dim, dim, rngs=rngs)

    stack = rnnx.Stack(Widening, 2, DIM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Stack\(Widening\).*f must return.*\(6, 8\).*\(6, 9\)"):
        stack(inputs())


def test_an_exception_inside_a_branch_keeps_the_note_naming_the_branch():
    """Stack re-raises with its own name in front; the coupling's note (branch and shapes)
    was left on ``__cause__`` only, so ``str``/logs lost it."""

    @rnnx.reversible
    class Linear(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = nnx.Linear(dim, dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)

    stack = rnnx.Stack(Linear, 2, DIM, rngs=nnx.Rngs(0))
    halves = (jnp.ones((BATCH, DIM + 1)), jnp.ones((BATCH, DIM + 1)))  # Linear expects DIM
    with pytest.raises(TypeError, match=r"^Stack\(Linear\): dot_general") as info:
        stack(halves)
    notes = getattr(info.value, "__notes__", [])
    assert any("branch f" in note and f"({BATCH}, {DIM + 1})" in note for note in notes), notes


def test_an_instance_instead_of_the_block_class_is_refused():
    with pytest.raises(TypeError, match=r"pass the block class, not an instance: Stack\(Block,"):
        rnnx.Stack(Block(DIM, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))  # was an AttributeError


@pytest.mark.parametrize("depth", [0, -1, 2.0, True])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="depth must be a positive int"):
        rnnx.Stack(Block, depth, DIM, rngs=nnx.Rngs(0))


def test_numpy_depth_and_bad_options_at_construction():
    assert rnnx.Stack(Block, np.int64(2), DIM, rngs=nnx.Rngs(0)).depth == 2
    # A bad anchor interval or policy is refused when the stack is built, not at its first call.
    with pytest.raises(ValueError, match=r"Stack\(Block\): checkpoint_every=3 .* L=4"):
        rnnx.Stack(Block, 4, DIM, checkpoint_every=3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"Stack\(Block\): policy must be a .*Policy"):
        rnnx.Stack(Block, 4, DIM, policy="bfloat16", rngs=nnx.Rngs(0))


def test_stack_works_under_nnx_capture():
    stack, x = make_stack(), inputs()
    y, _ = nnx.capture(stack, nnx.Intermediate)(x)
    np.testing.assert_allclose(y[0], stack(x)[0], rtol=1e-6)


class Sowing(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, h):
        h = self.linear(h)
        self.sow(nnx.Intermediate, "pre_activation", h)
        return jnp.tanh(h)


# Flax 0.12.8 deprecates sow() outside nnx.capture(); the "plain" case calls it so on purpose,
# since a stack must refuse such values whichever way they are sown.
@pytest.mark.filterwarnings(r"ignore:Using 'Module\.sow\(\)' outside of 'nnx\.capture\(\)'")
@pytest.mark.parametrize("method", ["reversible", "backprop"])
@pytest.mark.parametrize("captured", [False, True], ids=["plain", "nnx.capture"])
def test_values_sown_inside_the_scan_are_refused_by_name(method, captured):
    """Sown values are made inside the scan: they came back as leaked tracers (UnexpectedTracer
    Error far from the cause) under nnx.capture, and were dropped silently without it."""

    @rnnx.reversible
    class SowingBlock(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = Sowing(dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)

    stack, x = rnnx.Stack(SowingBlock, 2, DIM, rngs=nnx.Rngs(0), method=method), inputs()
    call = nnx.capture(stack, nnx.Intermediate) if captured else stack
    # The path names the sown value, or nnx.capture's slot for it.
    sown = r"(pre_activation|__captures__\.\d+)', 'Intermediate'"
    with pytest.raises(TypeError, match=rf"Stack\(SowingBlock\): branch f created state .*{sown}"):
        call(x)
    block = SowingBlock(DIM, rngs=nnx.Rngs(0))  # outside a stack, capture works as usual
    _, sown = nnx.capture(block, nnx.Intermediate)(x)
    assert jax.tree.leaves(sown)[0].shape == (BATCH, DIM)


class CountingCalls(nnx.Module):
    """Writes one of its own Params on every call."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(dim, dim, rngs=rngs)
        self.calls = nnx.Param(jnp.zeros(()))

    def __call__(self, h):
        self.calls[...] = self.calls[...] + 1.0
        return jnp.tanh(self.linear(h))


@pytest.mark.parametrize("method", ["reversible", "backprop"])
def test_writes_to_a_branch_parameter_are_refused_by_name(method):
    """A branch writing one of its Params ran, and the write was silently lost (the stack's
    parameters are scanned inputs); found by a probe."""

    @rnnx.reversible
    class CountingBlock(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f, self.g = CountingCalls(dim, rngs=rngs), nnx.Linear(dim, dim, rngs=rngs)

    stack, x = rnnx.Stack(CountingBlock, 2, DIM, rngs=nnx.Rngs(0), method=method), inputs()
    message = r"Stack\(CountingBlock\): branch f wrote to its parameters while running .*calls"
    with pytest.raises(TypeError, match=message):
        stack(x)
    with pytest.raises(TypeError, match=message):
        nnx.grad(lambda m: jnp.sum(m(x)[0]))(stack)


class Wrapped(nnx.Module):
    """A branch running its layer through a Flax transform (nnx.remat or nnx.jit), which
    hands the layer's state back as new values; ``write`` also changes a Param inside it."""

    def __init__(self, dim: int, transform, *, write: bool = False, rngs: nnx.Rngs):
        self.inner = CountingCalls(dim, rngs=rngs) if write else nnx.Linear(dim, dim, rngs=rngs)
        self.transform = transform

    def __call__(self, h):
        return self.transform(lambda m, h_: jnp.tanh(m(h_)))(self.inner, h)


@pytest.mark.parametrize("transform", [nnx.remat, nnx.jit], ids=["remat", "jit"])
def test_flax_transforms_inside_a_branch_are_not_taken_for_writes(transform):
    """Both returned the unchanged parameters as new values, which the stack took for writes:
    'branch f wrote to its parameters' for a branch that writes nothing. A real write inside
    the transform is still refused."""

    def block_of(write):
        @rnnx.reversible
        class TransformBlock(nnx.Module):
            def __init__(self, dim, *, rngs):
                self.f = Wrapped(dim, transform, write=write, rngs=rngs)
                self.g = Wrapped(dim, transform, rngs=rngs)

        return rnnx.Stack(TransformBlock, 2, DIM, rngs=nnx.Rngs(0))

    stack, x = block_of(False), inputs()
    loss = lambda m: jnp.sum(jnp.sin(m(x)[0]) * m(x)[1])
    grads = nnx.grad(loss)(stack)
    reference = nnx.grad(loss)(nnx.view(stack, method="backprop"))
    assert max_relative_error(grads, reference) <= 1e-5
    with pytest.raises(TypeError, match=r"branch f wrote to its parameters .*inner\.calls"):
        block_of(True)(x)


def test_a_missing_rng_stream_names_the_option():
    """Dropout on a custom stream: the stack forks ``rng_stream`` (default "dropout")."""

    @rnnx.reversible
    class CustomStream(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.f = nnx.Dropout(0.5, rng_collection="drop", rngs=rngs)
            self.g = nnx.Linear(dim, dim, rngs=rngs)

    rngs = lambda: nnx.Rngs(params=0, drop=1)
    with pytest.raises(ValueError, match=r"no stream 'dropout'.*\['drop', 'params'\].*rng_stream="):
        rnnx.Stack(CustomStream, 2, DIM, rngs=rngs())
    stack = rnnx.Stack(CustomStream, 2, DIM, rngs=rngs(), rng_stream="drop")
    first, second = stack(inputs())[0], stack(inputs())[0]
    assert float(jnp.abs(first - second).max()) > 1e-3  # fresh masks per call


def test_a_stream_the_blocks_need_at_construction_is_named_with_those_there_are():
    """nnx.Dropout(rngs=rngs) asks for its stream when it is built, before the stack's own
    check: Flax's KeyError now carries a note naming the stack and the streams rngs has."""
    with pytest.raises(KeyError, match="dropout") as info:
        rnnx.Stack(Block, 2, DIM, 0.5, rngs=nnx.Rngs(params=0))
    assert any("revjax.nnx.Stack(Block)" in n and "['params']" in n for n in info.value.__notes__)


def test_stack_reconstruction_float32_and_bfloat16_across_depth():
    """DESIGN's numerics rule for the NNX Stack (pre-norm MLP blocks, through
    ``Stack.coupling()``; tests/reconstruction_checks.py)."""
    check_reconstruction_across_depth(lambda depth: (*make_stack(depth=depth).coupling(), inputs()))
