"""memory: compiled analysis reflects real buffer sizes; device peak is None on CPU."""

import jax
import jax.numpy as jnp
import pytest

from revjax.memory import compiled_memory, device_peak_bytes, memory_of


def test_argument_and_output_bytes_are_exact():
    a = jax.ShapeDtypeStruct((256, 128), jnp.float32)
    mem = compiled_memory(lambda x: (x * 2.0).sum(0), a)
    assert mem.argument_bytes == 256 * 128 * 4
    assert mem.output_bytes == 128 * 4


def test_temp_grows_with_stored_intermediates():
    """Backprop through a chain of matmul+tanh layers stores each layer's activation (matmuls
    are not fused away, unlike pure elementwise chains): temp grows with the chain's length."""

    def chain(n):
        def f(w, x):
            for i in range(n):
                x = jnp.tanh(x @ w[i])
            return x.sum()

        return jax.grad(f)

    x = jax.ShapeDtypeStruct((512, 256), jnp.float32)
    temp = lambda n: compiled_memory(chain(n), jax.ShapeDtypeStruct((n, 256, 256), jnp.float32), x)
    short, long = temp(2).temp_bytes, temp(16).temp_bytes
    assert long > 4 * short > 0, (short, long)
    assert temp(2).temp_mib == short / 2**20


def test_closed_over_arrays_count_as_temp_bytes_on_cpu():
    """The docstring once said closed-over arrays appear in no field; XLA:CPU counts them in
    ``temp_bytes`` (a probe found it), which would inflate an "activation" temp figure."""
    n = 256
    weight = jnp.ones((n, n))
    closed = compiled_memory(lambda a: a @ weight, jnp.ones((4, n)))
    passed = compiled_memory(lambda a, w: a @ w, jnp.ones((4, n)), weight)
    assert closed.temp_bytes - passed.temp_bytes >= 4 * n * n
    assert passed.argument_bytes - closed.argument_bytes == 4 * n * n


def test_accepts_jitted_functions_and_concrete_arrays():
    fn = jax.jit(lambda x, y: x @ y)
    mem = compiled_memory(fn, jnp.ones((8, 4)), y=jnp.ones((4, 2)))
    assert mem.output_bytes == 8 * 2 * 4


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU has no allocator statistics")
def test_device_peak_is_none_on_cpu():
    assert device_peak_bytes() is None


def test_device_peak_wants_a_device():
    with pytest.raises(TypeError, match=r"must be a jax\.Device .*got 'cpu'"):
        device_peak_bytes("cpu")  # was an AttributeError on str


def test_memory_of_wants_a_compiled_executable():
    fn = jax.jit(lambda x: x * 2)
    with pytest.raises(TypeError, match=r"memory_of: expected a compiled executable.*PjitFunction"):
        memory_of(fn)  # was AttributeError: no attribute 'memory_analysis'
    assert memory_of(fn.lower(jnp.ones(4)).compile()).output_bytes == 16


@pytest.mark.parametrize("fn", ["abc", 3, None])
def test_compiled_memory_wants_a_function(fn):
    """A str has a .lower attribute and was taken for a jitted function: "str.lower() takes
    no arguments"."""
    with pytest.raises(TypeError, match=r"compiled_memory: expected a function, got"):
        compiled_memory(fn, jnp.ones(3))
