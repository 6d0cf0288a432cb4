"""Train the reversible transformer on many devices: data + tensor parallel with jax.sharding.

The recipe, in three annotations on top of single-device code:

1. a mesh, e.g. ``jax.make_mesh((data, model), ("data", "model"))`` with Auto axes;
2. the model built under ``jax.set_mesh(mesh)`` with ``tensor_parallel="model"``: attention
   heads and MLP hidden units carry partitioning metadata, so NNX places each parameter
   sharded over "model" (Megatron-LM) and replicated over "data";
3. each batch placed with ``NamedSharding(mesh, P("data"))``: rows split over "data".

``nnx.jit`` then lets XLA's SPMD partitioner do the rest; ``reversible_scan``'s custom backward
keeps every sharding (checked in tests/test_sharding.py). Multi-host: start one process per host
with ``--distributed`` (``jax.distributed.initialize()`` reads the cluster from the
environment on SLURM, Open MPI or Cloud TPU, or takes ``--coordinator HOST:PORT
--num-processes N --process-id I``); each process builds the global batch's layout with
``jax.make_array_from_callback``, supplying only the rows its devices hold.

    # 8 simulated CPU devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_training.py
    # 2 processes x 4 CPU devices on one machine (what two hosts would run):
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python examples/sharded_training.py --distributed --coordinator localhost:12355 \
        --num-processes 2 --process-id 0    # and --process-id 1 in a second shell
    python examples/sharded_training.py --mesh 4,2 --steps 100    # on 8 accelerators
"""

from __future__ import annotations

import argparse
import json

import jax
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from revjax.data import load_stdlib_text
from revjax.models.lm_training import sample_batch
from revjax.models.transformer import ReversibleTransformer, next_token_loss


def _mesh_shape(parser: argparse.ArgumentParser, mesh: str, batch: int) -> tuple[int, int]:
    """``(data, model)`` from ``--mesh D,M``; exits with a usage error naming ``--mesh`` or
    ``--batch`` when the mesh is malformed, needs more devices than there are, or does not
    divide the batch (JAX would fail later, and less clearly)."""
    parts = mesh.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        parser.error(f"--mesh takes two positive ints DATA,MODEL (e.g. 2,4), got {mesh!r}")
    data, model_axis = (int(p) for p in parts)
    if data * model_axis > jax.device_count():
        parser.error(
            f"--mesh {data},{model_axis} needs {data * model_axis} devices, there are "
            f"{jax.device_count()} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "simulates N)"
        )
    if batch % data:
        parser.error(f"--batch {batch} must be divisible by the data axis of --mesh ({data})")
    return data, model_axis


def _positive_int(text: str) -> int:
    """``argparse`` type: an int >= 1 (a batch, depth or step count of 0 has nothing to run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="2,4", help="devices along (data, model)")
    parser.add_argument("--steps", type=_positive_int, default=20)
    parser.add_argument("--batch", type=_positive_int, default=16, help="global batch (rows)")
    parser.add_argument("--seq-len", type=_positive_int, default=64)
    parser.add_argument("--dim", type=_positive_int, default=64)
    parser.add_argument("--depth", type=_positive_int, default=4)
    parser.add_argument("--heads", type=_positive_int, default=4)
    parser.add_argument("--distributed", action="store_true", help="multi-host initialisation")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (else auto-detected)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )

    data, model_axis = _mesh_shape(parser, args.mesh, args.batch)
    mesh = jax.make_mesh((data, model_axis), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        try:  # the model names a bad combination, e.g. --dim not divisible by --heads
            model = ReversibleTransformer(
                256, args.dim, args.depth, args.heads, args.seq_len,
                dropout=0.1, tensor_parallel="model", rngs=nnx.Rngs(0),
            )  # fmt: skip
        except ValueError as err:
            parser.error(str(err))
        optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens, key):
        loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens, key)
        optimizer.update(model, grads)
        return loss

    rows = NamedSharding(mesh, P("data"))
    corpus = load_stdlib_text(300_000).train
    global_shape = (args.batch, args.seq_len + 1)
    losses = []
    with jax.set_mesh(mesh):
        for step in range(args.steps):
            # Every process draws the same global batch from (seed, step) and hands JAX only
            # the rows its own devices hold, whatever the mesh layout across hosts.
            batch = sample_batch(corpus, args.batch, args.seq_len, 0, step)
            tokens = jax.make_array_from_callback(global_shape, rows, batch.__getitem__)
            losses.append(train_step(model, optimizer, tokens, jax.random.key(step)))
    losses = [float(x) for x in jax.device_get(losses)]  # one host sync, at the end
    kernel = model.stack.blocks.g.up.kernel[...]
    report = {
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "losses": [round(x, 4) for x in losses],
        "up_kernel": {"shape": list(kernel.shape), "spec": str(kernel.sharding.spec)},
        "up_kernel_per_device": list(kernel.addressable_shards[0].data.shape),
    }
    if jax.process_index() == 0:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
