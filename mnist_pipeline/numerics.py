"""The numeric settings every stage makes before torch loads: half of the portable arithmetic.

ATen, torch's kernel library, holds each element-wise and reduction kernel (the normalization,
ReLU, cross-entropy's exp and log, the optimizer's update) compiled for several instruction sets
and runs the widest the CPU has: its AVX-512 kernels round differently from its AVX2 ones. Pinned
to the AVX2 kernels, which every x86-64 CPU of the last ten years runs, ATen runs the same
instructions on every such machine, Intel or AMD, with AVX-512 or without, and IEEE arithmetic
gives the same bits. Torch reads the setting when it first picks a kernel, so it must be in the
environment before torch loads: `stages/__init__.py` applies it, before any stage imports
anything, and `exact.check_portable_kernels` refuses a portable run that started without it.
On the MLP's small tensors the AVX2 kernels cost nothing measurable against the AVX-512 ones.

The other half is in exact.py: matrix products whose bits do not depend on the BLAS library.
This module imports no torch, so that it can run first.
"""

import os
import platform
from pathlib import Path

# The environment that pins ATen to its AVX2 kernels, on x86-64 (elsewhere the names differ, and
# identity across machines is not claimed).
KERNELS = {"ATEN_CPU_CAPABILITY": "avx2"}
X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# The instruction-set extensions that decide which kernels torch, MKL and oneDNN run.
ISA_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")


def describe_cpu() -> str:
    """This CPU as far as the arithmetic cares: model, vendor, the ISA extensions that pick kernels, cores."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        fields = (line.split(":", 1) for line in lines if ":" in line)
        info = {key.strip(): value.strip() for key, value in fields}
    except OSError:  # not Linux
        info = {}
    flags = set(info.get("flags", info.get("Features", "")).split())
    extensions = " ".join(name for name in ISA_EXTENSIONS if name in flags) or "none of " + " ".join(ISA_EXTENSIONS)
    model = info.get("model name") or platform.processor() or platform.machine()
    where = f"{info['vendor_id']}, family {info['cpu family']} model {info['model']}, " if "vendor_id" in info else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({where}{extensions}; {cores} cores)"


def pin_kernels() -> None:
    """Put the settings into this process's environment, and so into every process it starts."""
    if X86_64:
        os.environ.update(KERNELS)
