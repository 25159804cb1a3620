// Host side shared by the CUTLASS sm90 GEMMs (w8a8_sm90.cuh, w4a16_sm90.cuh): one launch: can_implement, a workspace
// from torch's caching allocator (so the launch can be captured in a CUDA graph), initialize and run on the current
// stream. (Their tile schedulers' SM count: common.cuh current_device_sm_count.)
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <string>

#include "cutlass/cutlass.h"

namespace qaas {
namespace sm90 {

// Runs the CUTLASS device-level GEMM `Gemm` with `args` on the current stream of `like`'s device. Errors name the op
// (`name`), the problem (M x N x K, the group size where `group` > 0) and `hint`; the message is only built on error.
template <class Gemm>
void run_gemm(const typename Gemm::Arguments& args, const at::Tensor& like, const char* name, int M, int N, int K,
              int group, const char* hint) {
  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, name, ": CUTLASS cannot run this problem (M=", M,
              " N=", N, " K=", K, group > 0 ? " group=" + std::to_string(group) : std::string(), "; ", hint, ")");
  const size_t ws_bytes = Gemm::get_workspace_size(args);
  at::Tensor workspace;
  void* ws = nullptr;
  if (ws_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(ws_bytes)}, like.options().dtype(at::kByte));
    ws = workspace.data_ptr();
  }
  auto stream = c10::cuda::getCurrentCUDAStream(like.get_device()).stream();
  TORCH_CHECK(gemm.initialize(args, ws, stream) == cutlass::Status::kSuccess, name, ": initialize failed");
  TORCH_CHECK(gemm.run(stream) == cutlass::Status::kSuccess, name, ": launch failed");
}

}  // namespace sm90
}  // namespace qaas
