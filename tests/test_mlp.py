"""models.mlp: initialisers draw well-spread weights in any dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revjax.models.mlp import init_mlp, init_mlp_stack, mlp, mlp_coupling


def test_bfloat16_weights_are_drawn_in_float32_then_cast():
    """jax.random.normal in bfloat16 has only 128 distinct values (max |z| 2.9); drawing in
    float32 and casting gives thousands, with Gaussian tails, and equals the float32 draw
    rounded to bfloat16."""
    direct = np.asarray(jax.random.normal(jax.random.key(0), (100_000,), jnp.bfloat16), np.float32)
    assert len(np.unique(direct)) <= 128
    bf16 = init_mlp(jax.random.key(0), 4, 64, 256, dtype=jnp.bfloat16)
    f32 = init_mlp(jax.random.key(0), 4, 64, 256, dtype=jnp.float32)
    w = np.asarray(bf16["w1"], np.float32).ravel()
    assert len(np.unique(w)) > 1000
    np.testing.assert_array_equal(bf16["w1"], f32["w1"].astype(jnp.bfloat16))
    assert np.abs(w).max() / w.std() > 3.5  # a 65536-sample Gaussian reaches about 4.4 sigma


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.5])
def test_dropout_rate_outside_zero_one_is_refused(rate):
    """Rate 1 once gave NaN gradients (0/0), 1.5 acted as 1, -0.5 silently disabled dropout."""
    with pytest.raises(ValueError, match=f"dropout rate must lie in \\[0, 1\\), got {rate}"):
        mlp_coupling(rate)
    params = jax.tree.map(lambda a: a[0], init_mlp_stack(jax.random.key(0), 1, 4, 8)[0])
    with pytest.raises(ValueError, match="mlp: dropout rate"):
        mlp(params, jnp.ones((2, 4)), jax.random.key(1), dropout=rate)


def test_residual_mlp_loss_checkpoint_policy_recomputes_instead_of_storing():
    """``checkpoint_policy`` wraps each block in ``jax.checkpoint``: the same gradient, less
    compiled temp memory when nothing is saveable."""
    from revjax.memory import compiled_memory
    from revjax.models.mlp import residual_mlp_loss

    params = init_mlp(jax.random.key(0), 8, 32, 128)
    x = jax.random.normal(jax.random.key(1), (64, 32))
    remat = residual_mlp_loss(checkpoint_policy=jax.checkpoint_policies.nothing_saveable)
    plain = residual_mlp_loss()
    g, g_ref = jax.grad(remat)(params, x), jax.grad(plain)(params, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # same ops, float32 round-off
    memory = lambda loss: compiled_memory(jax.grad(loss), params, x).temp_bytes
    assert memory(remat) < memory(plain)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": float("nan")}, "scale must be a finite number >= 0, got nan"),
        ({"std": float("inf")}, "std must be a finite number >= 0, got inf"),
        ({"scale": -0.5}, "scale must be a finite number >= 0, got -0.5"),
        ({"dtype": jnp.int32}, "dtype must be floating, got int32"),
    ],
)
def test_bad_initialisations_are_refused(kwargs, message):
    """NaN and inf gave non-finite weights, int32 all-zero weights, without an error."""
    with pytest.raises(ValueError, match=f"init_mlp: {message}"):
        init_mlp(jax.random.key(0), 2, 4, 8, **kwargs)
    # Zero branches (the identity map at initialisation) stay allowed.
    assert not bool(jnp.any(init_mlp(jax.random.key(0), 1, 4, 8, std=0.0)["w1"]))


@pytest.mark.parametrize(
    ("name", "value"), [("num_layers", 0), ("width", -1), ("hidden", 0), ("width", 2.0)]
)
def test_bad_sizes_are_refused_by_name(name, value):
    """``width=-1`` failed inside XLA (an MLIRError) and ``num_layers=0`` built an empty stack."""
    sizes = {"num_layers": 2, "width": 4, "hidden": 8} | {name: value}
    with pytest.raises(ValueError, match=f"init_mlp: {name} must be a positive int"):
        init_mlp(jax.random.key(0), **sizes)
