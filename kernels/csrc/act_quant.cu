// Fused online transform + per-token symmetric activation quantization, in one kernel.
//
// One block handles whole rows (tokens), striding over rows so that the Kronecker factors are loaded
// into shared memory once per block. Per row:
//   1. load the row into shared memory as float32;
//   2. transform: none | block-diagonal Hadamard (in-place fast Walsh-Hadamard butterflies over blocks
//      of a power-of-two size hb, normalised by 1/sqrt(hb)) | Kronecker affine Y = P1^T X P2 with
//      X = row.reshape(n1, n2) (== x @ kron(P1, P2));
//   3. absmax over the row, scale = max(absmax * clip / qmax_signed, eps);
//   4. codes u = clamp(rint(v / scale), -h, h) + 2**(bits-1), int8 one per byte or int4 two per byte.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace qaas {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ src, float* dst, int K) {
  if constexpr (sizeof(T) == 2) {
    if ((K & 7) == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
      const uint4* s4 = reinterpret_cast<const uint4*>(src);
      for (int i = threadIdx.x; i < K / 8; i += blockDim.x) {
        uint4 v = __ldg(s4 + i);
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[i * 8 + j] = static_cast<float>(e[j]);
      }
      return;
    }
  }
  for (int i = threadIdx.x; i < K; i += blockDim.x) dst[i] = static_cast<float>(src[i]);
}

__device__ __forceinline__ float block_max(float v, float* red) {
  v = warp_max(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = (lane < (int)(blockDim.x >> 5)) ? red[lane] : 0.f;
    w = warp_max(w);
    if (lane == 0) red[32] = w;
  }
  __syncthreads();
  return red[32];
}

// MODE: 0 none, 1 block-diagonal Hadamard, 2 Kronecker.
template <typename T, int MODE, int BITS>
__global__ void __launch_bounds__(kThreads) act_quant_kernel(
    const T* __restrict__ x, int M, int K, const float* __restrict__ clip, int hb, float had_norm,
    const float* __restrict__ p1, const float* __restrict__ p2, int n1, int n2,
    uint8_t* __restrict__ codes, float* __restrict__ scales) {
  extern __shared__ float smem[];
  __shared__ float red[33];
  float* row = smem;                   // K
  float* tmp = smem + K;               // K (Kronecker only)
  float* sp1 = tmp + K;                // n1 * n1
  float* sp2 = sp1 + n1 * n1;          // n2 * n2
  if constexpr (MODE == 2) {
    for (int i = threadIdx.x; i < n1 * n1; i += blockDim.x) sp1[i] = p1[i];
    for (int i = threadIdx.x; i < n2 * n2; i += blockDim.x) sp2[i] = p2[i];
  }
  constexpr int half_q = (1 << (BITS - 1)) - 1;
  constexpr int zero_q = 1 << (BITS - 1);
  const float clip_ratio = __ldg(clip);

  for (int m = blockIdx.x; m < M; m += gridDim.x) {
    __syncthreads();  // previous row fully consumed
    load_row<T>(x + (size_t)m * K, row, K);
    __syncthreads();
    float norm = 1.f;
    if constexpr (MODE == 1) {
      for (int h = 1; h < hb; h <<= 1) {
        for (int p = threadIdx.x; p < K / 2; p += blockDim.x) {
          const int i = (p / h) * 2 * h + (p % h);
          const float a = row[i], b = row[i + h];
          row[i] = a + b;
          row[i + h] = a - b;
        }
        __syncthreads();
      }
      norm = had_norm;
    } else if constexpr (MODE == 2) {
      // tmp = X @ P2   (X: [n1, n2])
      for (int e = threadIdx.x; e < K; e += blockDim.x) {
        const int a = e / n2, j = e - a * n2;
        const float* xr = row + a * n2;
        float acc = 0.f;
        for (int b = 0; b < n2; ++b) acc = fmaf(xr[b], sp2[b * n2 + j], acc);
        tmp[e] = acc;
      }
      __syncthreads();
      // row = P1^T @ tmp
      for (int e = threadIdx.x; e < K; e += blockDim.x) {
        const int i = e / n2, j = e - i * n2;
        float acc = 0.f;
        for (int a = 0; a < n1; ++a) acc = fmaf(sp1[a * n1 + i], tmp[a * n2 + j], acc);
        row[e] = acc;
      }
      __syncthreads();
    }
    float amax = 0.f;
    for (int i = threadIdx.x; i < K; i += blockDim.x) amax = fmaxf(amax, fabsf(row[i] * norm));
    amax = block_max(amax, red);
    const float scale = fmaxf(amax * clip_ratio / (float)half_q, kEps);
    if (threadIdx.x == 0) scales[m] = scale;
    if constexpr (BITS == 8) {
      uint8_t* out = codes + (size_t)m * K;
      for (int i = threadIdx.x; i < K; i += blockDim.x) {
        float q = rintf((row[i] * norm) / scale);
        q = fminf(fmaxf(q, (float)-half_q), (float)half_q);
        out[i] = (uint8_t)((int)q + zero_q);
      }
    } else {
      uint8_t* out = codes + (size_t)m * (K / 2);
      for (int p = threadIdx.x; p < K / 2; p += blockDim.x) {
        float q0 = rintf((row[2 * p] * norm) / scale);
        float q1 = rintf((row[2 * p + 1] * norm) / scale);
        q0 = fminf(fmaxf(q0, (float)-half_q), (float)half_q);
        q1 = fminf(fmaxf(q1, (float)-half_q), (float)half_q);
        out[p] = (uint8_t)(((int)q0 + zero_q) | (((int)q1 + zero_q) << 4));
      }
    }
  }
}

template <typename T, int MODE, int BITS>
void launch(const at::Tensor& x, const at::Tensor& clip, int hb, const float* p1, const float* p2, int n1,
            int n2, at::Tensor& codes, at::Tensor& scales) {
  const int M = x.size(0), K = x.size(1);
  size_t floats = K;
  if (MODE == 2) floats = 2 * (size_t)K + (size_t)n1 * n1 + (size_t)n2 * n2;
  const size_t bytes = floats * sizeof(float);
  auto kernel = act_quant_kernel<T, MODE, BITS>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  }
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int per_sm = MODE == 2 ? 1 : 8;
  const int grid = std::max(1, std::min(M, sms * per_sm));
  const float had_norm = MODE == 1 ? (float)(1.0 / std::sqrt((double)hb)) : 1.f;
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), M, K, clip.data_ptr<float>(), hb, had_norm, p1, p2, n1, n2,
      codes.data_ptr<uint8_t>(), scales.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void dispatch_mode(int mode, int bits, const at::Tensor& x, const at::Tensor& clip, int hb, const float* p1,
                   const float* p2, int n1, int n2, at::Tensor& codes, at::Tensor& scales) {
#define QAAS_AQ(MODE_)                                                              \
  if (bits == 8) launch<T, MODE_, 8>(x, clip, hb, p1, p2, n1, n2, codes, scales);   \
  else launch<T, MODE_, 4>(x, clip, hb, p1, p2, n1, n2, codes, scales);
  if (mode == 0) { QAAS_AQ(0) }
  else if (mode == 1) { QAAS_AQ(1) }
  else { QAAS_AQ(2) }
#undef QAAS_AQ
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> act_quant_cuda(const at::Tensor& x, int64_t bits, const at::Tensor& clip,
                                                  int64_t mode, int64_t hb, const c10::optional<at::Tensor>& p1,
                                                  const c10::optional<at::Tensor>& p2) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "act_quant: x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(bits == 8 || bits == 4, "act_quant: bits must be 4 or 8");
  TORCH_CHECK(clip.is_cuda() && clip.numel() == 1 && clip.scalar_type() == at::kFloat,
              "act_quant: clip must be a float32 CUDA scalar tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(bits == 8 || K % 2 == 0, "act_quant: int4 needs an even row length");
  TORCH_CHECK(mode >= 0 && mode <= 2, "act_quant: mode must be 0 (none), 1 (hadamard) or 2 (kronecker)");
  const float* p1p = nullptr;
  const float* p2p = nullptr;
  int n1 = 0, n2 = 0;
  if (mode == 1) {
    TORCH_CHECK(hb >= 2 && (hb & (hb - 1)) == 0 && K % hb == 0, "act_quant: hadamard block must be a power of two dividing K");
  }
  if (mode == 2) {
    TORCH_CHECK(p1.has_value() && p2.has_value(), "act_quant: kronecker needs p1 and p2");
    TORCH_CHECK(p1->scalar_type() == at::kFloat && p2->scalar_type() == at::kFloat && p1->is_contiguous() &&
                    p2->is_contiguous() && p1->is_cuda() && p2->is_cuda(),
                "act_quant: p1/p2 must be contiguous float32 CUDA tensors");
    n1 = p1->size(0);
    n2 = p2->size(0);
    TORCH_CHECK(p1->dim() == 2 && p1->size(1) == n1 && p2->dim() == 2 && p2->size(1) == n2 && (int64_t)n1 * n2 == K,
                "act_quant: p1 [n1,n1], p2 [n2,n2] with n1*n2 == K");
    p1p = p1->data_ptr<float>();
    p2p = p2->data_ptr<float>();
  }
  auto codes = at::empty({M, bits == 8 ? K : K / 2}, x.options().dtype(at::kByte));
  auto scales = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {codes, scales};
  switch (x.scalar_type()) {
    case at::kHalf: dispatch_mode<at::Half>(mode, bits, x, clip, hb, p1p, p2p, n1, n2, codes, scales); break;
    case at::kBFloat16: dispatch_mode<at::BFloat16>(mode, bits, x, clip, hb, p1p, p2p, n1, n2, codes, scales); break;
    case at::kFloat: dispatch_mode<float>(mode, bits, x, clip, hb, p1p, p2p, n1, n2, codes, scales); break;
    default: TORCH_CHECK(false, "act_quant: x must be float16, bfloat16 or float32");
  }
  return {codes, scales};
}

}  // namespace qaas
