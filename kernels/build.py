"""Ahead-of-time build of the CUDA extension into ``kernels/_C*.so``.

Usage (repository root, on a machine with nvcc and CUDA torch): ``python -m kernels.build``.
Targets Hopper (``sm_90a``) by default; override with ``TORCH_CUDA_ARCH_LIST``. Without CUDA the build
is refused with a clear message and the package keeps working on its pure-torch references.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["bindings.cpp", "act_quant.cu", "w4a16.cu", "w4a16_stream.cu", "w4a16_packed.cu", "w4a16_folded.cu", "w4a16_batched.cu", "w4a16_sm90.cu", "probes.cu", "int8_gemm.cu", "w8a8_sm90.cu", "kv_attention.cu"]
CUTLASS_SOURCES = [f"w8a8_sm90_cfg{i}.cu" for i in range(4)] + [
    f"w4a16_sm90_cfg{i}.cu" for i in range(7)
]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v", "-std=c++17"]
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"


def cutlass_include_dirs() -> list[Path]:
    """CUTLASS headers for the Hopper W8A8 GEMM: ``$QAAS_CUTLASS_DIR`` (a CUTLASS checkout), else the
    ``nvidia-cutlass`` wheel's copy (``pip install nvidia-cutlass==4.2.0.0``); empty when neither is there, and the
    extension is built without that GEMM (``has_sm90_gemm()`` is then False)."""
    roots: list[Path] = []
    env = os.environ.get("QAAS_CUTLASS_DIR")
    if env:
        roots.append(Path(env))
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported (it needs no import here)
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p) / "source" for p in spec.submodule_search_locations)
    for root in roots:
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return [root / "include", root / "tools" / "util" / "include"]
    return []


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

    sources = list(SOURCES)
    nvcc_flags = list(NVCC_FLAGS)
    include_dirs = cutlass_include_dirs()
    if include_dirs:
        sources += CUTLASS_SOURCES
        nvcc_flags += ["-DQAAS_WITH_CUTLASS", "-DNDEBUG"]
        print(f"kernels.build: CUTLASS headers from {include_dirs[0]}: building the sm90 W8A8 GEMM")
    else:
        print(f"kernels.build: no CUTLASS headers (pip install {CUTLASS_PIN} or set QAAS_CUTLASS_DIR): "
              "building without the sm90 W8A8 GEMM")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        setup(
            name="qaas_kernels",
            ext_modules=[
                CUDAExtension(
                    "kernels._C",
                    [str((CSRC / s).relative_to(ROOT)) for s in sources],
                    include_dirs=[str(d) for d in include_dirs],
                    extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
                )
            ],
            cmdclass={"build_ext": BuildExtension},
            script_args=["build_ext", "--inplace"] + ([] if verbose else ["-q"]),
        )
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    build(verbose="-q" not in sys.argv)
