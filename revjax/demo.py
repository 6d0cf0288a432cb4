"""``python -m revjax demo``: one reversible network trained three ways on real digits.

A classifier for scikit-learn's 8x8 digits: a linear embedding into two halves of width
``width``, ``depth`` additive GELU-MLP couplings, and a linear head. The same initial parameters
are trained with optax Adam by plain backprop, per-layer ``jax.checkpoint`` and
``revjax.reversible_scan``, and one table compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from revjax._validate import output_path_problem, positive_float, positive_int
from revjax.bench import environment
from revjax.data import load_digits
from revjax.diagnostics import format_table, relative_error
from revjax.memory import compiled_memory
from revjax.models.mlp import init_mlp_stack, mlp_coupling
from revjax.scan import plain_scan, reversible_scan
from revjax.timing import median_ms

METHODS = {
    "backprop": lambda block, p, x: plain_scan(block, p, x),
    "checkpoint": lambda block, p, x: plain_scan(block, p, x, remat=True),
    "reversible": lambda block, p, x: reversible_scan(block, p, x),
}
NUM_CLASSES = 10


def init_classifier(key: jax.Array, features: int, width: int, hidden: int, depth: int) -> dict:
    """Parameters ``{"embed", "stack", "head"}``: ``embed`` maps ``(batch, features)`` to the two
    halves ``(batch, 2 width)``, ``stack`` is ``depth`` GELU-MLP couplings (leading axis
    ``depth``), ``head`` maps ``(batch, 2 width)`` to 10 logits; LeCun-normal weights."""
    k_embed, k_stack, k_head = jax.random.split(key, 3)
    return {
        "embed": {
            "w": jax.random.normal(k_embed, (features, 2 * width)) / features**0.5,
            "b": jnp.zeros((2 * width,)),
        },
        "stack": init_mlp_stack(k_stack, depth, width, hidden),
        "head": {
            "w": jax.random.normal(k_head, (2 * width, NUM_CLASSES)) / (2 * width) ** 0.5,
            "b": jnp.zeros((NUM_CLASSES,)),
        },
    }


def make_loss(method: str):
    """``(loss_fn, logits_fn)`` of the classifier with its stack run by ``method`` (a key of
    ``METHODS``): ``logits_fn(params, x) -> (batch, 10)`` and ``loss_fn(params, x, labels)`` the
    mean softmax cross-entropy. The three methods compute the same function."""
    block = mlp_coupling()
    scan_fn = METHODS[method]

    def logits_fn(params: dict, x: jax.Array) -> jax.Array:
        h = x @ params["embed"]["w"] + params["embed"]["b"]
        y1, y2 = scan_fn(block, params["stack"], tuple(jnp.split(h, 2, axis=-1)))
        return jnp.concatenate([y1, y2], -1) @ params["head"]["w"] + params["head"]["b"]

    def loss_fn(params: dict, x: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), labels).mean()

    return loss_fn, logits_fn


def train(method: str, params: dict, data, *, epochs: int, batch: int, lr: float, seed: int):
    """Adam on ``data`` (a :class:`revjax.data.Split`) for ``epochs`` shuffled epochs, printing
    each epoch's train loss and test accuracy. Returns ``(params, test_accuracy, step_ms)``,
    ``step_ms`` the median time of one jitted training step after training."""
    loss_fn, logits_fn = make_loss(method)
    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    accuracy = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(logits_fn(p, x), -1) == y))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    n = len(data.x_train)
    for epoch in range(1, epochs + 1):
        order, losses = rng.permutation(n), []
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            params, opt_state, loss = step(params, opt_state, data.x_train[idx], data.y_train[idx])
            losses.append(loss)
        acc = float(accuracy(params, data.x_test, data.y_test))
        print(
            f"  [{method:>10s}] epoch {epoch:2d}/{epochs}  train loss {float(np.mean(losses)):.4f}"
            f"  test acc {acc:.3f}",
            flush=True,
        )
    x0, y0 = data.x_train[:batch], data.y_train[:batch]
    step_ms = median_ms(step, params, opt_state, x0, y0, repeats=10)
    return params, acc, step_ms


def gradient_memory_mib(
    method: str, features: int, width: int, hidden: int, depth: int, batch: int
) -> float:
    """Compiled temp memory (MiB) of the loss gradient at ``depth``; compiled, never run."""
    loss_fn, _ = make_loss(method)
    params = jax.eval_shape(
        lambda: init_classifier(jax.random.key(0), features, width, hidden, depth)
    )
    x = jax.ShapeDtypeStruct((batch, features), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return compiled_memory(jax.grad(loss_fn), params, x, labels).temp_mib


def run(
    depth: int = 8,
    deep: int = 64,
    width: int = 32,
    hidden: int = 128,
    epochs: int = 12,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    json_path: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Trains the classifier by each of ``METHODS`` from the same initial parameters and prints
    one table: test accuracy, gradient error vs backprop at initialisation, gradient temp
    memory at ``depth`` and ``deep`` layers, step time. Returns the table's rows (and writes
    them with the environment to ``json_path`` when given).

    Raises:
      ValueError: ``depth``, ``deep``, ``width``, ``hidden``, ``epochs`` or ``batch`` not a
        positive int (``epochs=0`` crashed after building everything), ``batch`` larger than
        the training set (no step was taken, and the table showed the untrained network), or
        ``lr`` not finite and > 0.
    """
    sizes = {"depth": depth, "deep": deep, "width": width, "hidden": hidden, "epochs": epochs}
    for name, value in (sizes | {"batch": batch}).items():
        positive_int(value, name, "demo.run")
    positive_float(lr, "lr", "demo.run")
    started = time.perf_counter()
    data = load_digits(seed=seed)
    if batch > len(data.x_train):
        raise ValueError(
            f"demo.run: batch={batch} is larger than the training set "
            f"({len(data.x_train)} examples): no training step would be taken"
        )
    features = data.x_train.shape[1]
    print(
        f"revjax demo: sklearn digits, {len(data.x_train)} train / {len(data.x_test)} test, "
        f"{depth} additive MLP couplings (halves {width} wide, hidden {hidden}), "
        f"backend {jax.default_backend()}",
        flush=True,
    )
    params0 = init_classifier(jax.random.key(seed), features, width, hidden, depth)
    x0, y0 = data.x_train[:batch], data.y_train[:batch]
    reference_grad = jax.grad(make_loss("backprop")[0])(params0, x0, y0)
    rows = []
    for method in METHODS:
        grad = jax.grad(make_loss(method)[0])(params0, x0, y0)
        _, acc, step_ms = train(method, params0, data, epochs=epochs, batch=batch, lr=lr, seed=seed)
        rows.append(
            {
                "method": method,
                "test_acc": acc,
                "grad_err": float(relative_error(grad, reference_grad)),
                "temp_shallow": gradient_memory_mib(method, features, width, hidden, depth, batch),
                "temp_deep": gradient_memory_mib(method, features, width, hidden, deep, batch),
                "step_ms": step_ms,
            }
        )
    print()
    print(
        format_table(
            rows,
            [
                ("method", "method", "s"),
                ("test_acc", "test acc", ".3f"),
                ("grad_err", "grad rel. err vs backprop", ".1e"),
                ("temp_shallow", f"grad temp MiB (L={depth})", ".2f"),
                ("temp_deep", f"grad temp MiB (L={deep})", ".2f"),
                ("step_ms", f"step ms ({jax.default_backend()})", ".2f"),
            ],
        )
    )
    seconds = time.perf_counter() - started
    print(
        f"\n(compiled temp memory from XLA's memory analysis; L={deep} is compiled, not trained; "
        f"{seconds:.0f} s in all)"
    )
    if json_path is not None:
        env = environment() | {"cpu_count": os.cpu_count()}  # with the date and versions
        record = {
            "settings": {"depth": depth, "deep": deep, "epochs": epochs, "seed": seed},
            "seconds": seconds,
            "env": env,
            "rows": rows,
        }
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m revjax demo [options]``; ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="python -m revjax demo", description=__doc__.splitlines()[0].replace("``", "")
    )
    parser.add_argument("--depth", type=int, default=8, help="layers trained (default: 8)")
    parser.add_argument(
        "--deep", type=int, default=64, help="second depth for the memory column (default: 64)"
    )
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default: 12)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of split, init, shuffling (default: 0)",
    )
    parser.add_argument("--json", default=None, help="also write the table and run time here")
    args = parser.parse_args(argv)
    for name in ("depth", "deep", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:  # NumPy's generator and jax.random.key both take these
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    problem = None if args.json is None else output_path_problem(args.json)
    if problem is not None:
        parser.error(f"--json {args.json}: {problem}")
    run(depth=args.depth, deep=args.deep, epochs=args.epochs, seed=args.seed, json_path=args.json)
