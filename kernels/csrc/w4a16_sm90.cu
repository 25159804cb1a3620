// Host side of the Hopper W4A16 GEMM (w4a16_sm90.cuh): argument checks, the configuration by token count, and the
// reordering of the codes into the layout every configuration reads.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#ifdef QAAS_WITH_CUTLASS
#include "common.cuh"
#include "w4a16_sm90.cuh"
#endif

namespace qaas {

#ifdef QAAS_WITH_CUTLASS
namespace sm90 {

namespace {
// One thread per source code: its nibble OR-ed into the reordered destination (zeroed first). A one-time conversion per
// layer, so simplicity wins over speed here.
template <class LayoutDst>
__global__ void w4_reorder_kernel(const uint8_t* __restrict__ src, uint32_t* __restrict__ dst, LayoutDst layout_dst,
                                  int N, int K) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)N * K) return;
  const int n = (int)(i / K), k = (int)(i % K);
  const uint32_t code = (src[i >> 1] >> (4 * (k & 1))) & 0xFu;
  const int64_t d = layout_dst(n, k, 0);  // destination nibble
  if (code) atomicOr(dst + (d >> 3), code << (4 * (d & 7)));
}
}  // namespace

void w4_reorder(const uint8_t* src, uint8_t* dst, int N, int K, cudaStream_t stream) {
  auto layout_dst = tile_to_shape(W4LayoutAtom{}, make_shape(N, K, 1));
  C10_CUDA_CHECK(cudaMemsetAsync(dst, 0, (size_t)N * K / 2, stream));
  const int64_t total = (int64_t)N * K;
  w4_reorder_kernel<<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(src, reinterpret_cast<uint32_t*>(dst),
                                                                        layout_dst, N, K);
}

}  // namespace sm90
#endif

int64_t w4a16_sm90_num_configs() {
#ifdef QAAS_WITH_CUTLASS
  return sm90::kW4Configs;
#else
  return 0;
#endif
}

at::Tensor w4a16_sm90_reorder_cuda(const at::Tensor& codes) {
  TORCH_CHECK(codes.is_cuda() && codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte,
              "w4a16_sm90_reorder: codes must be contiguous uint8 [N, K/2] on CUDA");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(N % 16 == 0 && K % 64 == 0, "w4a16_sm90_reorder: N must be a multiple of 16 and K of 64");
  const c10::cuda::CUDAGuard guard(codes.device());
  auto out = at::empty_like(codes);
#ifdef QAAS_WITH_CUTLASS
  if (N > 0)
    sm90::w4_reorder(codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), (int)N, (int)K,
                     c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
#else
  TORCH_CHECK(false, "w4a16_sm90_reorder: the extension was built without CUTLASS");
  return out;
#endif
}

// x [M, K] fp16 times the int4 codes [N, K/2] (u * scale + zero per group: scale / zero fp16 [G, N]), + bias.
// config -1: by M; splits: -1 CUTLASS's heuristic, 1 data-parallel, > 1 split-K slices.
at::Tensor w4a16_gemm_sm90_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                const at::Tensor& zero, int64_t group_size, const c10::optional<at::Tensor>& bias,
                                int64_t config, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kHalf,
              "w4a16_gemm_sm90: x must be a contiguous fp16 CUDA tensor [M, K]");
  TORCH_CHECK(codes.is_cuda() && codes.dim() == 2 && codes.is_contiguous() && codes.scalar_type() == at::kByte,
              "w4a16_gemm_sm90: codes must be contiguous uint8 [N, K/2]");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.size(1) * 2 == K, "w4a16_gemm_sm90: K mismatch (x has ", K, ", codes ", codes.size(1) * 2, ")");
  TORCH_CHECK(K % 64 == 0 && N % 16 == 0 && group_size % 64 == 0 && K % group_size == 0,
              "w4a16_gemm_sm90: K must be a multiple of 64, N of 16, group_size of 64 dividing K");
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == G && t->size(1) == N,
                "w4a16_gemm_sm90: scale and zero must be contiguous fp16 [K / group_size, N]");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kHalf && bias->numel() == N && bias->is_contiguous(),
                "w4a16_gemm_sm90: bias must be fp16 [N]");
  TORCH_CHECK(config >= -1 && config < w4a16_sm90_num_configs(), "w4a16_gemm_sm90: config must be -1..",
              w4a16_sm90_num_configs() - 1);
  TORCH_CHECK(splits == -1 || splits >= 1, "w4a16_gemm_sm90: splits must be -1 or >= 1");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
#ifdef QAAS_WITH_CUTLASS
  const int sm_count = current_device_sm_count();
  // By token count (H200 run v14b, the three 7B shapes at 17 .. 2048 tokens): k tiles of 128 and as many tokens per tile
  // as the input has, up to 128 (<= 32 tokens: the best configuration or within 1% on all three shapes; 64: best on two,
  // 2% off on the third; 128 .. 512: within 13%, at 512 best or within 1%), 256-token tiles of 64 k past 512 tokens
  // (best at 1024 and 2048 on all three). Groups that are not a multiple of 128 take the k-64 twins.
  const bool k128 = group_size % 128 == 0;
  const int cfg = config >= 0 ? (int)config
                  : M <= 32   ? (k128 ? 4 : 0)
                  : M <= 64   ? (k128 ? 5 : 1)
                  : M <= 512  ? (k128 ? 6 : 2)
                              : 3;
  TORCH_CHECK(cfg < 4 || k128, "w4a16_gemm_sm90: configurations 4-6 (k tiles of 128) need group_size a multiple of 128");
  sm90::W4A16Problem p{codes.data_ptr<uint8_t>(),
                       reinterpret_cast<const cutlass::half_t*>(x.data_ptr<at::Half>()),
                       reinterpret_cast<const cutlass::half_t*>(scale.data_ptr<at::Half>()),
                       reinterpret_cast<const cutlass::half_t*>(zero.data_ptr<at::Half>()),
                       bias.has_value() ? reinterpret_cast<const cutlass::half_t*>(bias->data_ptr<at::Half>()) : nullptr,
                       reinterpret_cast<cutlass::half_t*>(out.data_ptr<at::Half>()),
                       (int)M, (int)N, (int)K, (int)group_size, (int)splits, sm_count};
  switch (cfg) {
    case 0: sm90::w4_run_cfg0(p, x); break;
    case 1: sm90::w4_run_cfg1(p, x); break;
    case 2: sm90::w4_run_cfg2(p, x); break;
    case 3: sm90::w4_run_cfg3(p, x); break;
    case 4: sm90::w4_run_cfg4(p, x); break;
    case 5: sm90::w4_run_cfg5(p, x); break;
    default: sm90::w4_run_cfg6(p, x);
  }
  return out;
#else
  TORCH_CHECK(false, "w4a16_gemm_sm90: the extension was built without CUTLASS");
  return out;
#endif
}

}  // namespace qaas
