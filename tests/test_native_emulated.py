"""The matvec kernel's AVX-512 and AVX512-BF16 paths, checked on any CPU: matvec.cc compiled
against a scalar stand-in for <immintrin.h> (tests/native_emulation) with each build's macros,
and run against a float64 reference by a C++ driver (every block size, tail and prefetch
bound). The CI machine's CPU runs only the AVX2 build, so without this the wider builds'
arithmetic would be checked only where such a CPU happens to run the tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pianist_jax import native_kernels

HERE = Path(__file__).with_name("native_emulation")
BUILDS = {"avx2": [], "avx512": ["-D__AVX512F__"],
          "avx512bf16": ["-D__AVX512F__", "-D__AVX512BF16__"]}


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_matvec_paths_match_reference(build, tmp_path):
    compiler = native_kernels._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    import jax

    exe = tmp_path / f"matvec_{build}"
    cmd = [compiler, "-O1", "-std=c++17", "-w", f"-I{HERE}", f"-I{native_kernels.NATIVE_DIR}",
           f"-I{jax.ffi.include_dir()}", *BUILDS[build], str(HERE / "matvec_emulated.cc"),
           "-o", str(exe), "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failures" in run.stdout and "1638 cases" in run.stdout, run.stdout
