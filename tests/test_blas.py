"""OpenBLAS kernel choice for the OpenBLAS bundled with FAISS."""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jras_core.blas import choose_openblas_core, cpu_flags, openblas_core_for

AVX512 = {"sse2", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def test_core_follows_the_instruction_sets():
    assert openblas_core_for(frozenset(AVX512)) == "SkylakeX"
    assert openblas_core_for(frozenset(AVX512 - {"avx512bw"})) == "Haswell"  # AVX-512 without BW: AVX2 kernels
    assert openblas_core_for(frozenset({"sse2", "avx", "avx2", "fma"})) == "Haswell"
    assert openblas_core_for(frozenset({"sse2", "avx"})) is None


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="x86-64 Linux only")
def test_choice_is_set_once_and_a_users_value_kept(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: " + " ".join(sorted(AVX512)) + "\n")
    assert cpu_flags(cpuinfo) == frozenset(AVX512)
    env: dict[str, str] = {}
    assert choose_openblas_core(env, cpuinfo) == "SkylakeX" and env == {"OPENBLAS_CORETYPE": "SkylakeX"}
    env = {"OPENBLAS_CORETYPE": "Zen"}
    assert choose_openblas_core(env, cpuinfo) == "Zen" and env == {"OPENBLAS_CORETYPE": "Zen"}
    env = {}
    assert choose_openblas_core(env, tmp_path / "missing") is None and env == {}


@pytest.mark.slow
def test_faiss_loads_the_chosen_kernels():
    """In a fresh process, FAISS loaded through the bank module runs the OpenBLAS kernels
    chosen from this CPU's flags; importing jras_core alone changes no environment."""
    core = openblas_core_for(cpu_flags())
    import faiss

    libs = glob.glob(str(Path(faiss.__file__).parent.parent / "faiss_cpu.libs" / "libopenblas*.so*"))
    if core is None or platform.system() != "Linux" or not libs:
        pytest.skip("no kernel choice on this CPU, or FAISS without a bundled OpenBLAS")
    code = (
        "import ctypes, os, jras_core\n"
        "assert 'OPENBLAS_CORETYPE' not in os.environ\n"
        "from jras_core.retrieval.bank import faiss\n"
        f"lib = ctypes.CDLL({libs[0]!r}, mode=ctypes.RTLD_GLOBAL)\n"
        "lib.openblas_get_corename.restype = ctypes.c_char_p\n"
        "print(lib.openblas_get_corename().decode())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == core.lower()
