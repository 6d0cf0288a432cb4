import gc
import os

# Tests compare against float32 references; keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import hypothesis
import jax
import pytest

hypothesis.settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drops JAX's compilation caches after each test module.

    An XLA:CPU executable holds a few memory mappings (its JIT-compiled code) for as long as a
    cache keeps it (tests/test_conftest.py measures it). Kept for the whole suite, they neared
    Linux's default ``vm.max_map_count`` of 65,530; past that limit the code allocator's mmap
    fails and XLA segfaults mid-compile, which it did twice, in tests/test_transformer.py, once
    a change added a few more programs. Test modules share no executables, so clearing the
    caches between them frees the mappings at no cost in coverage.
    """
    yield
    jax.clear_caches()
    gc.collect()
