"""Ahead-of-time build of the CUDA extension into ``kernels/_C*.so``.

Usage (repository root, on a machine with nvcc and CUDA torch): ``python -m kernels.build``.
Targets Hopper (``sm_90a``) by default; override with ``TORCH_CUDA_ARCH_LIST``. Without CUDA the build
is refused with a clear message and the package keeps working on its pure-torch references.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["bindings.cpp", "act_quant.cu", "w4a16.cu", "int8_gemm.cu"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v", "-std=c++17"]


def build(verbose: bool = True) -> None:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not torch.version.cuda:
        raise SystemExit(
            "kernels.build: no CUDA toolkit / CUDA build of torch here; the qaas ops fall back to their "
            "pure-torch references (kernels.reference) and kernels.dispatch.supports() returns False."
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        setup(
            name="qaas_kernels",
            ext_modules=[
                CUDAExtension(
                    "kernels._C",
                    [str((CSRC / s).relative_to(ROOT)) for s in SOURCES],
                    extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": NVCC_FLAGS},
                )
            ],
            cmdclass={"build_ext": BuildExtension},
            script_args=["build_ext", "--inplace"] + ([] if verbose else ["-q"]),
        )
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    build(verbose="-q" not in sys.argv)
