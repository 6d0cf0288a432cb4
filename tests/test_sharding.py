"""revjax under jax.sharding: data, tensor (Megatron) and 2-D parallelism on 8 CPU devices.

The measurements run in a subprocess (tests/sharding_worker.py) that starts JAX with
``--xla_force_host_platform_device_count=8``; the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")
LAYOUTS = ("data", "tensor", "2d")
COLLECTIVES_THAT_GATHER = ("all-gather", "all-to-all", "reduce-scatter", "collective-permute")
STREAM_BYTES = 2 * 64 * 16 * 4  # both halves of the float32 stream: 64 rows x 16


def assert_no_gathers(found: dict[str, list[int]]) -> None:
    """A silent gather of activations or parameters would appear as one of these."""
    assert all(not found[kind] for kind in COLLECTIVES_THAT_GATHER), found


@pytest.fixture(scope="module")
def results() -> dict:
    proc = subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reversible_scan_gradients_equal_single_device(results, layout):
    # float32: only the order of the sharded reductions differs; measured 1e-7 to 3e-7.
    assert results["scan"][layout]["grad_error"] <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shardings_are_kept(results, layout):
    run = results["scan"][layout]
    if layout != "data":  # the hidden axis really is split (else 2d would be data parallel)
        # up kernel, up bias and down kernel, in f and in g
        assert sum("model" in spec for spec in run["param_grad_specs"]) >= 6, run
    assert run["param_grads_like_params"], run["param_grad_specs"]
    assert run["input_grads_like_inputs"], run["input_grad_specs"]
    assert run["outputs_like_inputs"], run["output_specs"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_has_no_gathers_and_only_layer_sized_reductions(results, layout):
    """A silent gather of whole activations or parameters would show up as an all-gather (or
    an all-to-all / permute); the only collectives are all-reduces of one layer's parameter
    gradients (data parallel) and of branch outputs (Megatron partial sums), never of the whole
    stack (16 layers)."""
    found = results["scan"][layout]["collectives"]
    assert_no_gathers(found)
    assert found["all-reduce"], found  # the partitioner did have to combine something
    shapes = results["scan"]["param_shapes"]  # leading axis L = 16
    layer_param_bytes = 4 * sum(math.prod(shape[1:]) for shape in shapes)
    assert max(found["all-reduce"]) <= max(layer_param_bytes, STREAM_BYTES)


def test_data_parallel_memory_per_device(results):
    """Issue criterion: per-device temp of the reversible gradient at L = 64 on 8 devices is at
    most 1/4 of the single-device one (the batch is split 8 ways; parameters are replicated)."""
    memory = results["memory"]
    assert memory["data_parallel_temp"] <= memory["single_temp"] / 4, memory


def test_explicit_sharding_mode_data_parallel(results):
    run = results["scan"]["data_explicit"]
    assert run["grad_error"] <= 1e-5
    assert run["anchored_grad_error"] <= 1e-5  # checkpoint_every=4 once failed to compile
    assert all("data" in spec for spec in run["input_grad_specs"])
    assert run["param_grads_replicated"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nnx_stack_with_partitioned_parameters(results, layout):
    run = results["nnx"][layout]
    if layout != "data":  # on the (8, 1) mesh the size-1 "model" axis shards nothing
        assert run["hidden_sharded"] >= 6  # up kernel, up bias, down kernel in f and in g
    assert run["grads_like_params"], run["param_specs"]
    assert run["input_grad_like_input"] and run["outputs_like_input"]
    # float32 with dropout, 6 layers: round-off only; measured 5e-7.
    assert run["grad_error"] <= 1e-5
    assert_no_gathers(run["collectives"])
    # LayerNorm (2 x 16), up (16 x 64 + 64), down (64 x 16 + 16) in f and g, float32.
    layer_param_bytes = 4 * 2 * (2 * 16 + 16 * 64 + 64 + 64 * 16 + 16)
    assert max(run["collectives"]["all-reduce"]) <= max(layer_param_bytes, STREAM_BYTES)


def test_nnx_stack_refuses_partitioning_the_mesh_cannot_divide(results):
    """Hidden size 20 over an 8-way "model" axis: nnx.vmap kept those weights replicated on
    every device without a word (a plain nnx.Linear raises IndivisibleError)."""
    refusal = results["nnx"]["uneven_refusal"]
    assert refusal is not None
    assert re.search(
        r"Stack\(KernelShardedBlock\): f\.down\.kernel of shape \(2, 20, 5\) is partitioned .*"
        r"axis 1 \(20\) is not divisible by mesh axis 'model' of size 8",
        refusal,
    ), refusal


def test_reversible_transformer_tensor_and_data_parallel(results):
    run = results["transformer"]
    assert run["hidden_sharded"] >= 7  # q, k, v, out, up kernel and bias, down kernel
    assert run["grads_like_params"]
    # Joint relative error over all parameters. Per leaf the largest is on the query/key
    # kernels (measured 6e-6), whose gradients are small at initialisation (near-uniform
    # attention) so round-off of the sharded reductions weighs more; joint measured 3e-6.
    assert run["joint_grad_error"] <= 1e-5
    # Per leaf (a wrong leaf with a small gradient hides in the joint norm): 2e-5, a 3x margin
    # over the query/key kernels' measured 6e-6, for the reason above.
    assert run["grad_error"] <= 2e-5
    assert_no_gathers(run["collectives"])
    assert run["restore_keeps_shardings"]  # revjax.nnx.restore_state, same values and specs


def test_reversible_transformer_on_an_explicit_mesh_and_refused_layouts(results):
    run = results["transformer"]
    assert run["explicit_data_joint_grad_error"] <= 1e-5
    assert run["explicit_data_grad_error"] <= 2e-5  # per leaf; see the test above
    assert "dim=20 not divisible by the size 8 of mesh axis 'model'" in run["refusals"]["uneven"]
    assert "AxisType.Explicit axis" in run["refusals"]["explicit"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ["moonwalk", "mixed_moonwalk", "revbackprop"])
def test_moonwalk_methods_sharded(results, layout, method):
    run = results["moonwalk"][layout][method]
    assert run["grad_error"] <= 1e-5  # measured 1.5e-7 to 2.6e-7
    assert run["grads_like_params"]
    assert_no_gathers(run["collectives"])
    # Pure Moonwalk's input gradient carries one forward-mode tangent per input coordinate
    # (2 x 16) through the network, so its all-reduces are up to that many streams; the other
    # methods reduce one layer's gradients or one stream at a time.
    tangents = 2 * 16 if method == "moonwalk" else 1
    layer_param_bytes = 4 * 2 * (16 * 64 + 64 + 64 * 16 + 16)
    bound = max(layer_param_bytes, (tangents + 1) * STREAM_BYTES)
    assert max(run["collectives"]["all-reduce"], default=0) <= bound


@pytest.mark.parametrize("method", ["mixed_moonwalk", "revbackprop"])
def test_moonwalk_methods_on_an_explicit_mesh(results, method):
    """Data parallel on an Explicit mesh (pure Moonwalk is not supported there, README)."""
    assert results["moonwalk"]["explicit_data"][method] <= 1e-5


def test_run_time_checks_raise_on_a_sharded_batch():
    """Pure Moonwalk's coupled-examples check and exact mode's range check raise from a host
    callback. With the batch over 8 devices the first was raised on
    one device only: the process aborted on XLA's collective timeout (exit 134, about 40 s),
    an error no caller could catch. Every device raises now, each a catchable error."""
    proc = subprocess.run(
        [sys.executable, str(WORKER), "errors"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "the loss of example 0 depends on the input of another" in found["coupled_loss"]
    assert "exact mode: the input stream has max |x|" in found["exact_range"]


def test_example_script_trains_on_a_2d_mesh():
    """The README's recipe (examples/sharded_training.py) on 8 simulated devices."""
    script = Path(__file__).resolve().parents[1] / "examples" / "sharded_training.py"
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, str(script), "--mesh", "2,4", "--steps", "12"],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "model": 4}
    # The MLP's up-projection (layers, dim, hidden) is split 4 ways along hidden.
    assert report["up_kernel"]["spec"] == "P(None, None, 'model')"
    layers, dim, hidden = report["up_kernel"]["shape"]
    assert report["up_kernel_per_device"] == [layers, dim, hidden // 4]
    losses = report["losses"]
    assert max(losses[-3:]) < losses[0] - 1.0  # it trains (starts near log 256 = 5.5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mesh", "8"], "--mesh takes two positive ints DATA,MODEL"),
        (["--mesh", "2,0"], "--mesh takes two positive ints"),
        (["--mesh", "2,4"], r"--mesh 2,4 needs 8 devices, there are 1 .*device_count=N"),
        (["--mesh", "3,1", "--batch", "16"], "--batch 16 must be divisible by .* --mesh \\(3\\)"),
        # These passed the parser: a NumPy error, library tracebacks, an empty "training".
        (["--mesh", "1,1", "--batch", "0"], "--batch: must be >= 1, got 0"),
        (["--mesh", "1,1", "--depth", "0"], "--depth: must be >= 1, got 0"),
        (["--mesh", "1,1", "--steps", "-1"], "--steps: must be >= 1, got -1"),
        (["--mesh", "1,1", "--heads", "3"], "dim=64 is not divisible by heads=3"),
    ],
)
def test_example_script_names_a_bad_mesh(argv, message):
    """Each once failed inside JAX (an unpacking error, a device-count or IndivisibleError);
    run in a subprocess with the default single CPU device, so --mesh 3,1 fits but the batch
    does not divide."""
    script = Path(__file__).resolve().parents[1] / "examples" / "sharded_training.py"
    env = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    if argv[1] == "3,1":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    proc = subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]


def test_example_script_runs_as_two_processes(tmp_path):
    """The multi-host path (jax.distributed.initialize, process-local batches): two processes
    with 4 CPU devices each form one 2 x 4 mesh, as two hosts would."""
    script = Path(__file__).resolve().parents[1] / "examples" / "sharded_training.py"
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    args = ["--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    command = [sys.executable, str(script), *args, "--steps", "6", "--process-id"]
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    # Output to files, not pipes: a full pipe could block one process while the other waits
    # for it in a collective.
    with logs[0].open("w") as log0, logs[1].open("w") as log1:
        procs = [
            subprocess.Popen([*command, str(i)], stdout=log, stderr=subprocess.STDOUT, env=env)
            for i, log in enumerate((log0, log1))
        ]
        try:
            for proc in procs:
                proc.wait(timeout=600)
        finally:
            for proc in procs:
                proc.kill()
    outputs = [log.read_text() for log in logs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
    report = json.loads(outputs[0].strip().splitlines()[-1])  # process 0 reports
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "model": 4}
    assert report["losses"][-1] < report["losses"][0] - 1.0


ACTIVATION_CASES = ("rows", "hidden", "short_rows", "ragged_hidden")


@pytest.mark.parametrize("mesh", ["explicit", "auto"])
@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_inverted_activation_gradient_on_a_sharded_input(results, mesh, case):
    """The bit mask was packed over the flattened array: with the hidden units split over
    devices (or a row shorter than a byte) the gradient failed to trace on an Explicit mesh
    (ShardingTypeError from the flattening reshape) and all-gathered the unpacked mask on an
    Auto mesh. Packed along the last axis, each device packs its own piece."""
    run = results["activations"][f"{mesh}_{case}"]
    assert isinstance(run["grad_error"], float), run  # traced and ran
    assert run["grad_error"] <= 1e-5, run  # float32 recovery round-off (module docstring)
    if mesh == "explicit" or case != "ragged_hidden":
        # jax.nn.gelu's gradient has no collectives; neither has this one. (An Auto mesh with a
        # last axis split into pieces that are not whole bytes still moves data: README.)
        assert not any(run["collectives"].values()), run
