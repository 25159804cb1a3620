// Entry point of the Hopper W8A8 GEMM (w8a8_sm90.cuh). Always compiled: without CUTLASS (QAAS_WITH_CUTLASS
// undefined) has_sm90_gemm() is false and a call fails with a clear message; dispatch never calls it then.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#ifdef QAAS_WITH_CUTLASS
#include "common.cuh"
#include "w8a8_sm90.cuh"
#endif

namespace qaas {
namespace {

// int4 codes (two per byte, element 2j in the low nibble) -> uint8 codes u + 120: zero point 8 becomes 128,
// so W4 weights feed the same s8 x u8 GEMM and a_corr = 128 * sum_k q correction as W8 weights.
__global__ void unpack_w4_u8_kernel(const uint4* __restrict__ in, uint4* __restrict__ out, size_t n16) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n16) return;
  const uint4 v = __ldg(in + i);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  uint32_t o[8];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t lo = w[q] & 0x0F0F0F0Fu, hi = (w[q] >> 4) & 0x0F0F0F0Fu;
    o[2 * q] = __byte_perm(lo, hi, 0x5140) + 0x78787878u;  // bytes <= 15 + 120: no carries
    o[2 * q + 1] = __byte_perm(lo, hi, 0x7362) + 0x78787878u;
  }
  out[2 * i] = make_uint4(o[0], o[1], o[2], o[3]);
  out[2 * i + 1] = make_uint4(o[4], o[5], o[6], o[7]);
}

}  // namespace

at::Tensor unpack_w4_u8_cuda(const at::Tensor& qw) {
  TORCH_CHECK(qw.is_cuda() && qw.dim() == 2 && qw.is_contiguous() && qw.scalar_type() == at::kByte,
              "unpack_w4_u8: qweight must be contiguous uint8 [N, K/2] on CUDA");
  TORCH_CHECK(qw.size(1) % 16 == 0, "unpack_w4_u8: K must be a multiple of 32");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(qw.data_ptr()) & 15) == 0, "unpack_w4_u8: qweight must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(qw.device());
  auto out = at::empty({qw.size(0), qw.size(1) * 2}, qw.options());
  const size_t n16 = (size_t)qw.numel() / 16;
  if (n16 == 0) return out;
  const int threads = 256;
  unpack_w4_u8_kernel<<<(unsigned)((n16 + threads - 1) / threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(qw.data_ptr<uint8_t>()), reinterpret_cast<uint4*>(out.data_ptr<uint8_t>()), n16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

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
  TORCH_CHECK(config >= -1 && config <= 3, "w8a8_gemm_sm90: config must be -1 (auto), 0, 1, 2 or 3");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({M, N}, a.options().dtype(at::kHalf));
  if (M == 0) return out;
#ifdef QAAS_WITH_CUTLASS
  const int sm_count = current_device_sm_count();
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
  // small M: 64-row tiles; prefill: 128x128 ping-pong, or 128x256 cooperative at long K (w8a8_sm90.cuh Cfg3)
  if (cfg < 0) cfg = M <= 64 ? 2 : (K >= 8192 ? 3 : 0);
  if (cfg == 0) sm90::run_cfg0(p, a);
  else if (cfg == 1) sm90::run_cfg1(p, a);
  else if (cfg == 2) sm90::run_cfg2(p, a);
  else sm90::run_cfg3(p, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
#else
  TORCH_CHECK(false, "w8a8_gemm_sm90: this build has no CUTLASS sm90 GEMM (install nvidia-cutlass and rebuild: "
                     "python -m kernels.build)");
  return out;
#endif
}

}  // namespace qaas
