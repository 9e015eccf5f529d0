"""Choose OpenBLAS's CPU kernels where the OpenBLAS that FAISS bundles cannot tell.

The ``faiss-cpu`` wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15.1). It picks its
kernels by CPU model and does not know models released after it, Sapphire Rapids among them:
there it falls back to its generic SSE3 kernels ("Prescott"), and FAISS's exact search of 256
queries over 100,000 entries takes twice as long as a torch matrix product instead of half
as long. OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when it loads; :func:`choose_openblas_core`
sets it from the CPU's instruction-set flags before FAISS is imported (the bank module calls it
right before its ``import faiss``). A value the user has set is left alone.
"""

from __future__ import annotations

import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
"""The AVX-512 subsets OpenBLAS's SkylakeX kernels use."""
HASWELL_FLAGS = frozenset({"avx2", "fma"})
"""What its Haswell (AVX2) kernels use."""


def openblas_core_for(flags: set[str] | frozenset[str]) -> str | None:
    """The OpenBLAS core type whose kernels a CPU with these ``/proc/cpuinfo`` flags runs:
    ``SkylakeX`` (AVX-512), ``Haswell`` (AVX2 + FMA), or None (leave OpenBLAS to decide)."""
    if SKYLAKEX_FLAGS <= flags:
        return "SkylakeX"
    if HASWELL_FLAGS <= flags:
        return "Haswell"
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``cpuinfo`` (empty if unreadable)."""
    try:
        with cpuinfo.open() as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_openblas_core(
    environ: MutableMapping[str, str] = os.environ, cpuinfo: Path = Path("/proc/cpuinfo")
) -> str | None:
    """Set ``OPENBLAS_CORETYPE`` in ``environ`` from the CPU's flags (x86-64 Linux only),
    unless it is set already. Returns the value in force afterwards (None: not set)."""
    if "OPENBLAS_CORETYPE" in environ:
        return environ["OPENBLAS_CORETYPE"]
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    core = openblas_core_for(cpu_flags(cpuinfo))
    if core is not None:
        environ["OPENBLAS_CORETYPE"] = core
    return core
