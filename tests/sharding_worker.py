"""Sharded runs on 8 simulated CPU devices, for tests/test_sharding.py.

Run as a separate process (``python tests/sharding_worker.py``): it sets
``--xla_force_host_platform_device_count=8`` before JAX starts, so the rest of the test suite
keeps its single CPU device. Prints one JSON object (the measurements) as its last line.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import functools
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import revjax as rj
from revjax import moonwalk as mw
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.precision import exact_policy

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
WIDTH, HIDDEN = 16, 64
AUTO = (AxisType.Auto, AxisType.Auto)


def relative_error(a, b) -> float:
    """Largest per-leaf ``||a - b|| / ||b||``, computed on the host (a and b may live on
    different devices)."""
    a, b = jax.device_get(a), jax.device_get(b)
    errors = jax.tree.map(lambda u, v: float(np.linalg.norm(u - v) / np.linalg.norm(v)), a, b)
    return float(np.max(jax.tree.leaves(errors)))  # np.max keeps a NaN leaf; max() may drop it


def collectives(compiled_text: str) -> dict[str, list[int]]:
    """Result sizes in bytes of every collective in the optimised HLO, by kind."""
    found = {kind: [] for kind in COLLECTIVES}
    for line in compiled_text.splitlines():
        for kind in COLLECTIVES:
            match = re.search(rf"= (.*?) {kind}(?:-start)?\(", line)
            if match:
                shapes = re.findall(r"([a-z]+\d*|pred)\[([\d,]*)\]", match.group(1))
                size = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2}
                size |= {"f16": 2, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
                total = 0
                for dtype, dims in shapes:
                    n = 1
                    for d in filter(None, dims.split(",")):
                        n *= int(d)
                    total += n * size.get(dtype, 8)  # unknown: count generously
                found[kind].append(total)
    return found


def put(mesh, array: jax.Array, spec: P) -> jax.Array:
    return jax.device_put(array, NamedSharding(mesh, spec))


def specs(tree) -> list[str]:
    return [str(leaf.sharding.spec) for leaf in jax.tree.leaves(tree)]


def same_shardings(tree, like) -> bool:
    """Every leaf of ``tree`` is laid out like the matching leaf of ``like`` (specs compared
    as layouts, so ``P("data")`` and ``P("data", None)`` agree)."""
    return all(
        a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(like), strict=True)
    )


# --------------------------------------------------------------------------- reversible_scan


def mlp_problem(depth: int, rows: int):
    params = init_mlp_stack(jax.random.key(0), depth, WIDTH, HIDDEN)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = (jax.random.normal(k1, (rows, WIDTH)), jax.random.normal(k2, (rows, WIDTH)))
    return mlp_coupling(), params, x


def scan_loss(block, checkpoint_every=None):
    def loss(params, x):
        y1, y2 = rj.reversible_scan(block, params, x, checkpoint_every=checkpoint_every)
        return jnp.sum(y1 * y2) + jnp.sum(jnp.tanh(y1))

    return loss


LAYOUTS = {
    # name: (mesh shape, axis names, batch spec, spec of w1-like and w2-like parameter leaves)
    "data": ((8,), ("data",), P("data"), P(), P()),
    "tensor": ((8,), ("model",), P(), P(None, None, "model"), P(None, "model", None)),
    "2d": ((2, 4), ("data", "model"), P("data"), P(None, None, "model"), P(None, "model", None)),
}


def param_specs(params, up: P, down: P):
    """Megatron-style: the hidden axis of the up-projection (and its bias) and of the
    down-projection's input is sharded; everything else replicated."""

    def spec(leaf):
        if leaf.ndim == 3 and leaf.shape[-1] == HIDDEN:
            return up
        if leaf.ndim == 3 and leaf.shape[1] == HIDDEN:
            return down
        if leaf.ndim == 2 and leaf.shape[-1] == HIDDEN and up != P():
            return P(None, "model")
        return P()

    return jax.tree.map(spec, params)


def check_scan() -> dict:
    block, params, x = mlp_problem(depth=16, rows=64)
    loss = scan_loss(block)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    reference = grad(params, x)
    out = {"param_shapes": [list(a.shape) for a in jax.tree.leaves(params)]}
    for name, (shape, axes, batch, up, down) in LAYOUTS.items():
        mesh = jax.make_mesh(shape, axes, axis_types=AUTO[: len(axes)])
        wanted = param_specs(params, up, down)
        p = jax.tree.map(functools.partial(put, mesh), params, wanted)
        xs = jax.tree.map(functools.partial(put, mesh, spec=batch), x)
        grads = grad(p, xs)
        y = jax.jit(lambda p, x: rj.reversible_scan(block, p, x))(p, xs)
        out[name] = {
            "grad_error": relative_error(grads, reference),
            "param_grads_like_params": same_shardings(grads[0], p),
            "input_grads_like_inputs": same_shardings(grads[1], xs),
            "outputs_like_inputs": same_shardings(y, xs),
            "wanted_param_specs": [str(s) for s in jax.tree.leaves(wanted)],
            "param_grad_specs": specs(grads[0]),
            "input_grad_specs": specs(grads[1]),
            "output_specs": specs(y),
            "batch_spec": str(batch),
            "collectives": collectives(grad.lower(p, xs).compile().as_text()),
        }
    # Explicit axes (sharding in types): data parallel needs no change in user code.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        xs = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))), x)
        p = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), params)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, xs)
        # Anchors: their buffer once came out unsharded and the write of the batch-sharded
        # stream into it was refused (a ShardingTypeError).
        anchored = jax.jit(jax.grad(scan_loss(block, checkpoint_every=4), argnums=(0, 1)))(p, xs)
        out["data_explicit"] = {
            "grad_error": relative_error(grads, reference),
            "anchored_grad_error": relative_error(anchored, reference),
            "input_grad_specs": specs(grads[1]),
            "param_grads_replicated": same_shardings(grads[0], p),
        }
    return out


def check_memory() -> dict:
    """Per-device compiled temp of the reversible gradient at L = 64, data parallel."""
    block, params, x = mlp_problem(depth=64, rows=8192)
    loss = scan_loss(block)
    grad = jax.grad(loss, argnums=(0, 1))
    single = compiled_memory(grad, params, x).temp_bytes
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    abstract = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s))
    p = jax.tree.map(lambda a: abstract(a, P()), params)
    xs = jax.tree.map(lambda a: abstract(a, P("data")), x)
    sharded = compiled_memory(grad, p, xs).temp_bytes
    return {"single_temp": single, "data_parallel_temp": sharded}


# --------------------------------------------------------------------------- NNX stack

INIT = nnx.initializers.lecun_normal()


class ShardedMlp(nnx.Module):
    """Megatron MLP branch: hidden axis sharded over "model" by partitioning metadata."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(
            dim,
            4 * dim,
            kernel_init=nnx.with_partitioning(INIT, (None, "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("model",)),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            4 * dim, dim, kernel_init=nnx.with_partitioning(INIT, ("model", None)), rngs=rngs
        )
        self.dropout = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.down(jax.nn.gelu(self.up(self.norm(x)))))


@rj.nnx.reversible
class ShardedBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.f = ShardedMlp(dim, rngs=rngs)
        self.g = ShardedMlp(dim, rngs=rngs)


class KernelShardedMlp(nnx.Module):
    """Partitioned kernels, unpartitioned biases: the case nnx.vmap replicated silently."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(
            dim, 4 * dim, kernel_init=nnx.with_partitioning(INIT, (None, "model")), rngs=rngs
        )
        self.down = nnx.Linear(
            4 * dim, dim, kernel_init=nnx.with_partitioning(INIT, ("model", None)), rngs=rngs
        )

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


@rj.nnx.reversible
class KernelShardedBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.f = KernelShardedMlp(dim, rngs=rngs)
        self.g = KernelShardedMlp(dim, rngs=rngs)


def nnx_loss(model, x, key):
    y1, y2 = model((x, x), key=key)
    return jnp.sum(y1 * y2)


#: The NNX modules name the axes "data" and "model"; a size-1 axis means "not split".
MESHES_2D = {"data": (8, 1), "tensor": (1, 8), "2d": (2, 4)}


def check_nnx() -> dict:
    out = {}
    x = jax.random.normal(jax.random.key(1), (64, WIDTH))
    key = jax.random.key(2)
    for layout, shape in MESHES_2D.items():
        mesh = jax.make_mesh(shape, ("data", "model"), axis_types=AUTO)
        with jax.set_mesh(mesh):
            model = rj.nnx.Stack(ShardedBlock, 6, WIDTH, rngs=nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        # The single-device twin: the same state gathered onto one device.
        graphdef, state = nnx.split(model)
        single = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
        grad = nnx.jit(nnx.grad(nnx_loss, argnums=(0, 1)))
        reference = grad(single, x, key)
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            grads = grad(model, xs, key)
            y = nnx.jit(lambda m, x: m((x, x), key=key))(model, xs)
            graphdef, state = nnx.split(model)

            def pure_grad(state, x, graphdef=graphdef):
                return nnx.grad(nnx_loss, argnums=(0, 1))(nnx.merge(graphdef, state), x, key)

            hlo = jax.jit(pure_grad).lower(state, xs).compile().as_text()
        out[layout] = {
            "grad_error": relative_error(grads, reference),
            "param_specs": specs(params),
            "grads_like_params": same_shardings(grads[0], params),
            "input_grad_like_input": same_shardings(grads[1], xs),
            "outputs_like_input": same_shardings(y, (xs, xs)),
            "hidden_sharded": sum("model" in s for s in specs(params)),
            "collectives": collectives(hlo),
        }
    # A hidden size (4 x 5 = 20) the 8-way model axis does not divide: nnx.vmap left such
    # kernels replicated on every device, silently; the stack refuses them.
    uneven = jax.make_mesh((1, 8), ("data", "model"), axis_types=AUTO)
    try:
        with jax.set_mesh(uneven):
            rj.nnx.Stack(KernelShardedBlock, 2, 5, rngs=nnx.Rngs(0))
        out["uneven_refusal"] = None
    except ValueError as err:
        out["uneven_refusal"] = str(err)
    return out


def check_transformer() -> dict:
    """The reversible transformer, heads and hidden units over "model", batch over "data"."""
    from revjax.models.transformer import ReversibleTransformer, next_token_loss

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO)
    with jax.set_mesh(mesh):
        model = ReversibleTransformer(
            256, 32, 3, 4, 16, dropout=0.1, tensor_parallel="model", rngs=nnx.Rngs(0)
        )
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
    key = jax.random.key(2)
    graphdef, state = nnx.split(model)
    single = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    grad = nnx.jit(nnx.grad(next_token_loss))
    reference = grad(single, tokens, key)
    params = nnx.state(model, nnx.Param)
    with jax.set_mesh(mesh):
        sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
        grads = grad(model, sharded_tokens, key)
        graphdef, state = nnx.split(model)

        def pure_grad(state, tokens):
            return nnx.grad(next_token_loss)(nnx.merge(graphdef, state), tokens, key)

        hlo = jax.jit(pure_grad).lower(state, sharded_tokens).compile().as_text()
    leaves = lambda tree: [np.ravel(a) for a in jax.tree.leaves(jax.device_get(tree))]
    joint = lambda a, b: float(
        np.linalg.norm(np.concatenate(leaves(a)) - np.concatenate(leaves(b)))
        / np.linalg.norm(np.concatenate(leaves(b)))
    )
    # A checkpoint restored into a tensor-parallel model keeps its shardings (restore_state
    # once replaced every array by an unsharded one, silently undoing tensor parallelism).
    from revjax.nnx import restore_state, save_state

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tp.msgpack"
        save_state(model, path)
        with jax.set_mesh(mesh):
            restored = ReversibleTransformer(
                256, 32, 3, 4, 16, dropout=0.1, tensor_parallel="model", rngs=nnx.Rngs(5)
            )
        restore_state(restored, path)
    restored_params = nnx.state(restored, nnx.Param)
    restore_keeps_shardings = same_shardings(restored_params, params) and all(
        bool(np.array_equal(a, b))
        for a, b in zip(jax.tree.leaves(restored_params), jax.tree.leaves(params), strict=True)
    )
    # Data parallel on an Explicit mesh (jax.make_mesh's default axis type): the embedding
    # gather once failed there for want of an out_sharding.
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(explicit):
        model_dp = ReversibleTransformer(256, 32, 3, 4, 16, dropout=0.1, rngs=nnx.Rngs(0))
        explicit_tokens = jax.device_put(tokens, NamedSharding(explicit, P("data")))
        explicit_grads = grad(model_dp, explicit_tokens, key)
    reference_dp = grad(
        ReversibleTransformer(256, 32, 3, 4, 16, dropout=0.1, rngs=nnx.Rngs(0)), tokens, key
    )
    # Tensor parallelism that cannot shard is refused at construction, not silently replicated.
    refusals = {}
    uneven = jax.make_mesh((1, 8), ("data", "model"), axis_types=AUTO)
    explicit_tp = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    for name, mesh_, dim in (("uneven", uneven, 20), ("explicit", explicit_tp, 32)):
        try:
            with jax.set_mesh(mesh_):
                ReversibleTransformer(256, dim, 1, 4, 16, tensor_parallel="model", rngs=nnx.Rngs(0))
            refusals[name] = None
        except ValueError as err:
            refusals[name] = str(err)
    return {
        "grad_error": relative_error(grads, reference),
        "joint_grad_error": joint(grads, reference),
        "grads_like_params": same_shardings(grads, params),
        "hidden_sharded": sum("model" in s for s in specs(params)),
        "collectives": collectives(hlo),
        "explicit_data_grad_error": relative_error(explicit_grads, reference_dp),
        "explicit_data_joint_grad_error": joint(explicit_grads, reference_dp),
        "restore_keeps_shardings": restore_keeps_shardings,
        "refusals": refusals,
    }


# --------------------------------------------------------------------------- Moonwalk


def check_moonwalk() -> dict:
    params = init_mlp_stack(jax.random.key(0), 8, WIDTH, HIDDEN)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = (jax.random.normal(k1, (64, WIDTH)), jax.random.normal(k2, (64, WIDTH)))
    net = mw.stack(mw.from_coupling(mlp_coupling()))
    loss = lambda y: jnp.sum(jnp.tanh(y[0]) * y[1], axis=-1)
    out = {}
    for layout, (shape, axes, batch, up, down) in LAYOUTS.items():
        mesh = jax.make_mesh(shape, axes, axis_types=AUTO[: len(axes)])
        p = jax.tree.map(functools.partial(put, mesh), params, param_specs(params, up, down))
        xs = jax.tree.map(functools.partial(put, mesh, spec=batch), x)
        out[layout] = {}
        for method in ("moonwalk", "mixed_moonwalk", "revbackprop"):
            fn = jax.jit(mw.value_and_grad(net, loss, method=method))
            _, reference = fn(params, x)
            _, grads = fn(p, xs)
            out[layout][method] = {
                "grad_error": relative_error(grads, reference),
                "grads_like_params": same_shardings(grads, p),
                "collectives": collectives(fn.lower(p, xs).compile().as_text()),
            }
    # Data parallel on an Explicit mesh. Pure Moonwalk is not among them: its chunked JVPs
    # (lax.map) carry tangents whose sharding type changes in the loop, which JAX refuses.
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    p = jax.tree.map(lambda a: put(explicit, a, P()), params)
    xs = jax.tree.map(lambda a: put(explicit, a, P("data")), x)
    out["explicit_data"] = {}
    for method in ("mixed_moonwalk", "revbackprop"):
        fn = jax.jit(mw.value_and_grad(net, loss, method=method))
        _, reference = fn(params, x)
        with jax.set_mesh(explicit):
            _, grads = fn(p, xs)
        out["explicit_data"][method] = relative_error(grads, reference)
    return out


#: Inverted-activation inputs on an 8-device mesh: (shape, spec, whether each device's piece
#: of the last axis is whole bytes). Hidden units split over devices (tensor parallel) and a
#: last axis too short to fill a byte are the cases that once failed or gathered.
ACTIVATION_CASES = {
    "rows": ((16, 64), P("m", None), True),
    "hidden": ((16, 64), P(None, "m"), True),
    "short_rows": ((8, 5), P("m", None), True),
    "ragged_hidden": ((4, 24), P(None, "m"), False),  # 3 per device: kept unpacked
}


def check_activations() -> dict:
    """activations.gelu's gradient on sharded inputs against jax.nn.gelu's, on an Explicit
    and an Auto mesh: its error and the compiled program's collectives (jax.nn's has none)."""
    from revjax import activations as act

    out = {}
    for kind in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((8,), ("m",), axis_types=(kind,))
        for name, (shape, spec, _) in ACTIVATION_CASES.items():
            x = jax.random.normal(jax.random.key(0), shape)
            reference = jax.grad(lambda v: jnp.sum(jax.nn.gelu(v) ** 2))(x)
            grad = jax.jit(jax.grad(lambda v: jnp.sum(act.gelu(v) ** 2)))
            with jax.set_mesh(mesh):
                sharded = put(mesh, x, spec)
                try:  # a failure to trace is the finding, not the end of the worker
                    error = relative_error(grad(sharded), reference)
                    found = collectives(grad.lower(sharded).compile().as_text())
                except Exception as err:
                    error, found = f"{type(err).__name__}: {str(err)[:200]}", None
            out[f"{kind.name.lower()}_{name}"] = {"grad_error": error, "collectives": found}
    return out


def check_run_time_errors() -> dict:
    """Run-time checks on a batch split over 8 devices: each message (None if nothing raised).
    (dense()'s mixing check is not here: with a batch-mixing forward on a sharded batch it
    hangs, README known limits.)

    Run in a process of its own (``sharding_worker.py errors``): before every device raised,
    one device raised and the others waited in the next all-reduce until XLA aborted the
    process, so these could not share a process with the measurements."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    params = init_mlp_stack(jax.random.key(0), 4, WIDTH, HIDDEN)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = (jax.random.normal(k1, (16, WIDTH)), jax.random.normal(k2, (16, WIDTH)))
    xs = jax.tree.map(lambda a: put(mesh, a, P("data")), x)

    def message(fn, *args):
        try:
            jax.block_until_ready(fn(*args))
        except Exception as err:  # the message is what is checked
            return f"{type(err).__name__}: {err}"
        return None

    coupled = lambda y: jnp.sum(y[0] * y[1], axis=-1) - jnp.mean(y[0][:, 0])
    net = mw.stack(mw.from_coupling(mlp_coupling()))
    exact = exact_policy(20)  # float32 range 2^(24 - 20) = 16: |x| of 100 is outside
    wide = jax.tree.map(lambda a: 100.0 * a, xs)
    return {
        "coupled_loss": message(
            jax.jit(mw.value_and_grad(net, coupled, method="moonwalk")), params, xs
        ),
        "exact_range": message(
            jax.jit(jax.grad(lambda p: jnp.sum(rj.reversible_scan(
                mlp_coupling(), p, wide, policy=exact)[0]))),
            params,
        ),
    }  # fmt: skip


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    if sys.argv[1:] == ["errors"]:
        print(json.dumps(check_run_time_errors()))
        sys.exit(0)
    results = {
        "scan": check_scan(),
        "memory": check_memory(),
        "nnx": check_nnx(),
        "transformer": check_transformer(),
        "moonwalk": check_moonwalk(),
        "activations": check_activations(),
    }
    print(json.dumps(results))
