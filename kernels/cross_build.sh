#!/usr/bin/env bash
# Cross-build of the CUDA extension (kernels/_C.cpython-312-x86_64-linux-gnu.so) on a machine without a GPU, for a
# device whose torch is TORCH_VERSION (default 2.11.0, the CUDA 13.0 wheel) under Python 3.12, sm_90a. The device
# then loads the carried .so instead of spending ~3-4 minutes building it (kernels/device_run.sh checks that it
# imports and that kernels/_C.sources.sha256, written here, matches the sources there: carry both). Needs nvcc (CUDA 13), g++, Python 3.12 headers and ~2 GB of disk for the torch wheel's headers and libs.
#   bash kernels/cross_build.sh [source.cu ...]     (default: every source; objects cached by mtime in .localbuild/obj)
# Environment: TORCH_DIR (an unpacked torch wheel; default: downloaded once into /tmp/torch-$TORCH_VERSION),
# PY312_INCLUDE (Python.h of 3.12), CUDA_HOME (default /usr/local/cuda), CUTLASS_DIR (CUTLASS 4.2 source tree:
# default from the nvidia-cutlass wheel, downloaded once), JOBS (parallel compiles, default 2).
set -eu
export LC_ALL=C  # one glob order for the sources' hash (kernels/_C.sources.sha256) on every machine
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [[ -z ${TORCH_DIR:-} ]]; then
  TORCH_DIR=/tmp/torch-$TORCH_VERSION/x/torch
  if [[ ! -f $TORCH_DIR/include/torch/extension.h ]]; then
    mkdir -p /tmp/torch-$TORCH_VERSION && (cd /tmp/torch-$TORCH_VERSION &&
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d . torch==$TORCH_VERSION &&
      unzip -q -o torch-*.whl 'torch/include/*' 'torch/lib/*' 'torch/version.py' -d x)
  fi
fi
PY312_INCLUDE=${PY312_INCLUDE:-$(python3.12 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')}
if [[ -z ${CUTLASS_DIR:-} ]]; then
  CUTLASS_DIR=/tmp/cutlass-4.2/cutlass_library/source
  if [[ ! -f $CUTLASS_DIR/include/cutlass/cutlass.h ]]; then
    mkdir -p /tmp/cutlass-4.2 && (cd /tmp/cutlass-4.2 &&
      python3 -m pip download -q --no-deps --only-binary=:all: -d . nvidia-cutlass==4.2.0.0 && unzip -q -o nvidia_cutlass-*.whl)
  fi
fi
INC="-I$TORCH_DIR/include -I$TORCH_DIR/include/torch/csrc/api/include -I$CUDA_HOME/include -I$PY312_INCLUDE -Ikernels/csrc
 -I$CUTLASS_DIR/include -I$CUTLASS_DIR/tools/util/include"
DEFS="-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 -DQAAS_WITH_CUTLASS -DNDEBUG"
# the flags of torch.utils.cpp_extension.CUDAExtension plus kernels/build.py's
NVFLAGS="-O3 -lineinfo --expt-relaxed-constexpr -Xptxas=-v -std=c++17 -D__CUDA_NO_HALF_OPERATORS__
 -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
 -gencode=arch=compute_90a,code=sm_90a --compiler-options -fPIC"
SRCS=$(python3 -c 'from kernels.build import SOURCES, CUTLASS_SOURCES; print(" ".join(SOURCES + CUTLASS_SOURCES))')
ONLY=" $* "
mkdir -p .localbuild/obj .localbuild/log
pids=()
for s in $SRCS; do
  o=.localbuild/obj/$s.o
  if [[ $# -gt 0 && $ONLY != *" $s "* && -f $o ]]; then continue; fi
  if [[ $# -eq 0 && -f $o && $o -nt kernels/csrc/$s ]] && ! find kernels/csrc -name '*.cuh' -newer "$o" | grep -q .; then continue; fi
  if [[ $s == *.cpp ]]; then
    g++ -c -O3 -std=c++17 -fPIC $DEFS $INC "kernels/csrc/$s" -o "$o" > ".localbuild/log/$s.log" 2>&1 &
  else
    "$CUDA_HOME/bin/nvcc" -c $NVFLAGS $DEFS $INC "kernels/csrc/$s" -o "$o" > ".localbuild/log/$s.log" 2>&1 &
  fi
  pids+=($!); echo "compiling $s"
  while (( $(jobs -rp | wc -l) >= ${JOBS:-2} )); do sleep 2; done
done
fail=0; for p in ${pids[@]+"${pids[@]}"}; do wait "$p" || fail=1; done
[[ $fail == 0 ]] || { grep -il error .localbuild/log/*.log; exit 1; }
g++ -shared -o kernels/_C.cpython-312-x86_64-linux-gnu.so $(for s in $SRCS; do echo .localbuild/obj/$s.o; done) \
  -L"$TORCH_DIR/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -lc10_cuda -ltorch_cuda -L"$CUDA_HOME/lib64" -lcudart
# what the .so was built from: kernels/device_run.sh uses a carried .so only when this matches its own sources
cat kernels/csrc/* kernels/build.py | sha256sum | cut -d' ' -f1 > kernels/_C.sources.sha256
grep -h -E "registers|spill" .localbuild/log/*.cu.log | sort | uniq -c | sort -rn | head -3
ls -la kernels/_C.cpython-312-x86_64-linux-gnu.so kernels/_C.sources.sha256
