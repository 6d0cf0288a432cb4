"""Measured memory: XLA's compiled memory analysis (any backend) and device peak bytes (GPU).

``compiled_memory(fn, *args)`` compiles ``jax.jit(fn)`` for the given arguments and reads
``memory_analysis()``. ``temp_bytes`` is the scratch memory XLA allocates besides arguments and
outputs: for a gradient computation it is where stored activations live, so it is the number to
compare across depths. (On CPU ``peak_memory_in_bytes`` ignores temporaries; it is not reported.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax


@dataclass(frozen=True)
class CompiledMemory:
    """Bytes of a compiled executable, as reported by XLA's memory analysis."""

    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    generated_code_bytes: int

    @property
    def temp_mib(self) -> float:
        return self.temp_bytes / 2**20

    @property
    def footprint_bytes(self) -> int:
        """Arguments + outputs + temps - donated (aliased) bytes: the executable's planned peak,
        what must fit in device memory to run it. Arrays the function closes over become
        constants of the executable, not arguments: XLA:CPU counts them in ``temp_bytes``
        (a closed-over ``n x n`` float32 matrix adds ``4 n^2`` bytes, ``tests/test_memory.py``),
        so a temp figure meant to hold only activations needs the weights passed as
        arguments."""
        return self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes


def compiled_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CompiledMemory:
    """Compiles ``jax.jit(fn)`` at ``args``/``kwargs`` (arrays or ``jax.ShapeDtypeStruct``s).

    Nothing is executed, so abstract arguments measure sizes that would not fit in memory.
    ``fn`` may already be jitted; keyword arguments are traced, not static.

    Raises:
      TypeError: ``fn`` is not callable.
    """
    if not callable(fn):  # a str has .lower too, which was taken for a jitted function's
        raise TypeError(f"compiled_memory: expected a function, got {type(fn).__name__} {fn!r}")
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return memory_of(jitted.lower(*args, **kwargs).compile())


def memory_of(compiled: jax.stages.Compiled) -> CompiledMemory:
    """The memory analysis of an already compiled executable (``jax.jit(f).lower(...).compile()``),
    for callers that also run it and should not compile twice."""
    if not hasattr(compiled, "memory_analysis"):
        raise TypeError(
            "memory_of: expected a compiled executable, jax.jit(f).lower(*args).compile(), got "
            f"{type(compiled).__name__}; for a function use compiled_memory(f, *args)"
        )
    analysis = compiled.memory_analysis()
    if analysis is None:  # some backends do not implement it
        raise RuntimeError(f"XLA on {jax.default_backend()} returned no memory analysis")
    return CompiledMemory(
        temp_bytes=int(analysis.temp_size_in_bytes),
        argument_bytes=int(analysis.argument_size_in_bytes),
        output_bytes=int(analysis.output_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        generated_code_bytes=int(analysis.generated_code_size_in_bytes),
    )


def device_peak_bytes(device: jax.Device | None = None) -> int | None:
    """``peak_bytes_in_use`` of ``device`` (default: the first device), or None where the
    backend keeps no allocator statistics (CPU). It is a high-water mark over the whole life of
    the process, so to attribute it to one computation run that in a fresh process (as
    ``benchmarks/bench_transformer.py`` does)."""
    device = device if device is not None else jax.devices()[0]
    if not hasattr(device, "memory_stats"):
        raise TypeError(
            f"device_peak_bytes: device must be a jax.Device (e.g. jax.devices()[0]), got "
            f"{device!r}"
        )
    stats = device.memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


__all__ = [
    "CompiledMemory",
    "compiled_memory",
    "device_peak_bytes",
    "memory_of",
]
