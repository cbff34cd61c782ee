"""Compile a Pallas kernel for sm_90a with Triton, without a GPU, and read its resources.

Shared by the `--triton-check` of `benchmarks.attention` and `benchmarks.paged_attention`.
The kernel is lowered for "cuda" (Pallas builds Triton IR), the IR is captured by
wrapping a private jax function (`pallas_call_registration.lowering.
lower_jaxpr_to_triton_module`; jax 0.10.2), compiled with the `triton` package
(pip install triton==3.6.0, the GPU image's) and its ptxas run with ``-v`` for the
register and spill counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile

import jax

# Shared memory per block on an H100 / H200.
MAX_SHARED = 227 * 1024


@dataclasses.dataclass
class CompileReport:
    shared: int  # bytes of shared memory per block
    registers: str | None  # per thread, as ptxas prints it
    spilled: str | None  # bytes of spill stores, as ptxas prints it

    @property
    def ok(self) -> bool:
        """Fits the shared memory of an H100 and spills no register."""
        return self.shared <= MAX_SHARED and self.spilled == "0"

    def describe(self) -> str:
        return (f"shared {self.shared:6} B, {self.registers} registers, "
                f"{self.spilled} bytes spilled")


@contextlib.contextmanager
def sm90_compiler():
    """Yields compile(fn, shapes, num_warps, num_stages) -> CompileReport, where `fn`
    is called as fn(*shapes, sm_scale=0.1) on jax.ShapeDtypeStructs and must lower to
    one Triton kernel. Restores the wrapped jax function on exit."""
    import triton
    from jax._src.pallas.triton import pallas_call_registration as registration
    from triton.backends.compiler import GPUTarget

    captured: list[str] = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        result = lower(*a, **kw)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")

    def compile_kernel(fn, shapes, num_warps: int, num_stages: int) -> CompileReport:
        captured.clear()
        jax.jit(functools.partial(fn, sm_scale=0.1)).trace(*shapes).lower(
            lowering_platforms=("cuda",))
        with tempfile.TemporaryDirectory() as tmp:
            ttir = os.path.join(tmp, "kernel.ttir")
            with open(ttir, "w") as f:
                f.write(captured[0])
            kernel = triton.compile(ttir, target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=num_warps, num_stages=num_stages))
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                                    capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", report)
        spills = re.search(r"(\d+) bytes spill stores", report)
        return CompileReport(shared=kernel.metadata.shared,
                             registers=regs and regs.group(1),
                             spilled=spills and spills.group(1))

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield compile_kernel
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower


def triton_version() -> str:
    import triton

    return triton.__version__
