// Entry point of the Hopper W8A8 GEMM (w8a8_sm90.cuh). Always compiled: without CUTLASS (QAAS_WITH_CUTLASS
// undefined) has_sm90_gemm() is false and a call fails with a clear message; dispatch never calls it then.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#ifdef QAAS_WITH_CUTLASS
#include "w8a8_sm90.cuh"
#endif

namespace qaas {

bool has_sm90_gemm() {
#ifdef QAAS_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

at::Tensor w8a8_gemm_sm90_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& a_corr,
                               const at::Tensor& w, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                               int64_t config) {
  TORCH_CHECK(a.is_cuda() && a.dim() == 2 && a.is_contiguous() && a.scalar_type() == at::kChar,
              "w8a8_gemm_sm90: a must be a contiguous int8 CUDA tensor [M, K]");
  TORCH_CHECK(w.is_cuda() && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kByte,
              "w8a8_gemm_sm90: w must be contiguous uint8 codes [N, K]");
  const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "w8a8_gemm_sm90: K mismatch (a has ", K, ", w has ", w.size(1), ")");
  TORCH_CHECK(K % 16 == 0 && N % 16 == 0, "w8a8_gemm_sm90: K and N must be multiples of 16");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.numel() == M && a_scale.is_contiguous() &&
                  a_corr.scalar_type() == at::kInt && a_corr.numel() == M && a_corr.is_contiguous(),
              "w8a8_gemm_sm90: a_scale float32 [M] and a_corr int32 [M]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == N && w_scale.is_contiguous(),
              "w8a8_gemm_sm90: w_scale float32 [N]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kHalf && bias->numel() == N && bias->is_contiguous(),
                "w8a8_gemm_sm90: bias must be fp16 [N]");
  }
  TORCH_CHECK(config >= -1 && config <= 2, "w8a8_gemm_sm90: config must be -1 (auto), 0, 1 or 2");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({M, N}, a.options().dtype(at::kHalf));
  if (M == 0) return out;
#ifdef QAAS_WITH_CUTLASS
  static int sm_count = [] {
    int dev = 0, n = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }();
  sm90::GemmProblem p{a.data_ptr<int8_t>(),
                      a_scale.data_ptr<float>(),
                      a_corr.data_ptr<int32_t>(),
                      w.data_ptr<uint8_t>(),
                      w_scale.data_ptr<float>(),
                      bias.has_value() ? reinterpret_cast<const cutlass::half_t*>(bias->data_ptr<at::Half>()) : nullptr,
                      reinterpret_cast<cutlass::half_t*>(out.data_ptr<at::Half>()),
                      (int)M,
                      (int)N,
                      (int)K,
                      sm_count};
  int cfg = (int)config;
  if (cfg < 0) cfg = M <= 64 ? 2 : 0;  // small M: 64-row tiles; prefill: 128x128 ping-pong
  if (cfg == 0) sm90::run_cfg0(p, a);
  else if (cfg == 1) sm90::run_cfg1(p, a);
  else sm90::run_cfg2(p, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
#else
  TORCH_CHECK(false, "w8a8_gemm_sm90: this build has no CUTLASS sm90 GEMM (install nvidia-cutlass and rebuild: "
                     "python -m kernels.build)");
  return out;
#endif
}

}  // namespace qaas
