// W4A16: int4 weights (two per byte, per-group scale and zero, float32) x fp16 activations.
//
// Decode path (1..16 tokens): a memory-bound GEMV. Each warp owns kRows output rows; each lane streams
// 16-byte chunks (32 weights, always inside one group since group_size % 32 == 0) with several chunks
// in flight, dequantises exactly in fp32 ((u - z) via the 2**23 magic-number trick, no int->float
// conversion instruction), dots with the activations in fp32 and applies the group scale once per chunk.
// Prefill path: a dequantisation kernel to fp16 followed by cuBLAS (in Python).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"
#include "w4a16_common.cuh"

namespace qaas {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kRows = 2;    // output rows per warp
constexpr int kUnroll = 2;  // chunks per lane in flight per row

__device__ __forceinline__ float nib_minus_zero(uint32_t w, int shift, float magic_z) {
  // float with bits 0x4B000000 | u is exactly 2**23 + u; subtracting (2**23 + z) gives u - z exactly.
  return __int_as_float(((w >> shift) & 0xFu) | 0x4B000000u) - magic_z;
}

template <int NB>
__global__ void __launch_bounds__(kGemvThreads) w4a16_gemv_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qw, const float* __restrict__ scale,
    const float* __restrict__ zero, const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K,
    int group_size) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * (kGemvThreads / 32) + warp) * kRows;
  if (n0 >= N) return;
  const int nchunks = K / 32;
  const int G = K / group_size;
  float acc[kRows][NB];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.f;

  for (int c0 = lane; c0 < nchunks; c0 += 32 * kUnroll) {
    uint4 wv[kRows][kUnroll];
    float sc[kRows][kUnroll], mz[kRows][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int n = min(n0 + r, N - 1);
        if (c < nchunks) {
          wv[r][u] = __ldg(reinterpret_cast<const uint4*>(qw + (size_t)n * (K / 2)) + c);
          const int g = (c * 32) / group_size;
          sc[r][u] = __ldg(scale + (size_t)n * G + g);
          mz[r][u] = 8388608.f + __ldg(zero + (size_t)n * G + g);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + 32 * u;
      if (c >= nchunks) break;
      float wf[kRows][32];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const uint32_t* w32 = reinterpret_cast<const uint32_t*>(&wv[r][u]);
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int e = 0; e < 8; ++e) wf[r][q * 8 + e] = nib_minus_zero(w32[q], 4 * e, mz[r][u]);
      }
#pragma unroll
      for (int b = 0; b < NB; ++b) {
        if (b < B) {
          const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)b * K + (size_t)c * 32);
          float part[kRows];
#pragma unroll
          for (int r = 0; r < kRows; ++r) part[r] = 0.f;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint4 xv = __ldg(xp + q);
            const half2* h2 = reinterpret_cast<const half2*>(&xv);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float2 f = __half22float2(h2[e]);
#pragma unroll
              for (int r = 0; r < kRows; ++r) {
                part[r] = fmaf(wf[r][q * 8 + 2 * e], f.x, part[r]);
                part[r] = fmaf(wf[r][q * 8 + 2 * e + 1], f.y, part[r]);
              }
            }
          }
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r][b] = fmaf(sc[r][u], part[r], acc[r][b]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const float v = warp_sum(acc[r][b]);
      const int n = n0 + r;
      if (lane == 0 && b < B && n < N) {
        const float bv = bias ? __half2float(bias[n]) : 0.f;
        out[(size_t)b * N + n] = __float2half(v + bv);
      }
    }
  }
}

// Tensor-core decode path (group_size % 128 == 0, K % 128 == 0): mma.sync m16n8k16 f16 x f16 -> f32.
// A block owns 16 output rows and splits K between its warps; lane (g, t) loads 16 bytes (32 codes) of
// rows g and g+8 at k = 128*kb + 32*t, i.e. 4 lanes cover one 64-byte row segment (full sectors).
// Fragment math in w4a16_common.cuh; the group scale is applied in fp32 once per 128-k block: no
// rounding of the weights. This is the register-streaming kernel; w4a16_stream.cu streams the same
// tiles through shared memory with bulk copies (the default where it applies).
// Variants (v5): WARPS warps per block split K; UNROLL 128-k blocks per warp per round; DB = register
// double buffering of the next round. v4 was <4 warps, 4, DB>: 150 registers and ~8 warps per SM at
// N=4096 (256 blocks of 4 warps), latency-bound (ncu). More warps per block multiply the warps per SM and
// the bytes in flight; without DB the registers drop so they fit.
struct MmaVariant {
  int warps, unroll;
  bool db;
};
// (Run v5b also tried staging the block's scale/zero tile in shared memory: slower, removed.)
constexpr MmaVariant kMmaVariants[] = {{4, 4, true}, {8, 4, false}, {8, 2, false}, {16, 2, false}, {16, 1, false}};
constexpr int kNumMmaVariants = sizeof(kMmaVariants) / sizeof(kMmaVariants[0]);
constexpr int kDefaultMmaVariant = 4;    // 1..8 tokens (H100 runs v5, v6a, v6b: best at 1 token)
constexpr int kDefaultMmaVariant16 = 1;  // 9..16 tokens (runs v6a, v6b: best on all three 7B shapes at 16)
// Variants kNumMmaVariants.. : the bulk-copy streaming kernel (w4a16_stream.cu); where it does not apply
// (N % 16, alignment, a tile larger than shared memory) the call falls back to the default register variant.
struct StreamVariant {
  bool bulk;  // TMA bulk copies, else 16-byte cp.async
  bool pdl;   // programmatic dependent launch
};
constexpr StreamVariant kStreamVariants[] = {{true, false}, {false, false}, {false, true}};
constexpr int kNumVariants = kNumMmaVariants + sizeof(kStreamVariants) / sizeof(kStreamVariants[0]);
// H100 runs v6a/v6b: the streaming variants were slower standalone (9.1 / 8.7 vs 7.4 us at 4096^2, 1 token; with
// PDL 6.9 us in back-to-back chains). The register kernel stays the default.

template <int NT, int WARPS, int UNROLL, bool DB>
__global__ void __launch_bounds__(WARPS * 32) w4a16_mma_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qw, const float* __restrict__ scale,
    const float* __restrict__ zero, const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K,
    int group_size) {
  __shared__ float red[WARPS][16][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  const int rA = min(n0 + g, N - 1), rB = min(n0 + g + 8, N - 1);
  const int KB = K / 128, G = K / group_size;
  const uint4* wA = reinterpret_cast<const uint4*>(qw + (size_t)rA * (K / 2)) + t;
  const uint4* wB = reinterpret_cast<const uint4*>(qw + (size_t)rB * (K / 2)) + t;
  float acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;

  // With DB, the next round's weight/scale loads are issued before this round's tensor-core work.
  constexpr int NB = DB ? 2 : 1;
  uint4 va[NB][UNROLL], vb[NB][UNROLL];
  float sa[NB][UNROLL], sb[NB][UNROLL];
  uint32_t za[NB][UNROLL], zb[NB][UNROLL];
  auto load_round = [&](int base, int buf) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int kb = base + u;
      if (kb < KB) {
        va[buf][u] = __ldg(wA + kb * 4);
        vb[buf][u] = __ldg(wB + kb * 4);
        const int grp = (kb * 128) / group_size;
        sa[buf][u] = __ldg(scale + (size_t)rA * G + grp);
        sb[buf][u] = __ldg(scale + (size_t)rB * G + grp);
        za[buf][u] = w4::zero_pair(__ldg(zero + (size_t)rA * G + grp));
        zb[buf][u] = w4::zero_pair(__ldg(zero + (size_t)rB * G + grp));
      }
    }
  };
  auto compute_round = [&](int base, int buf) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int kb = base + u;
      if (kb >= KB) break;
      float part[NT][4];
      w4::kblock_mma<NT>(va[buf][u], vb[buf][u], za[buf][u], zb[buf][u], x, B, K, kb, g, t, part);
      w4::accumulate_scaled<NT>(acc, part, sa[buf][u], sb[buf][u]);
    }
  };
  constexpr int kStride = WARPS * UNROLL;
  if constexpr (DB) {
    // Two rounds per iteration so every buffer index is a compile-time constant (no local memory).
    load_round(warp * UNROLL, 0);
    for (int kb0 = warp * UNROLL; kb0 < KB; kb0 += 2 * kStride) {
      if (kb0 + kStride < KB) load_round(kb0 + kStride, 1);
      compute_round(kb0, 0);
      if (kb0 + kStride >= KB) break;
      if (kb0 + 2 * kStride < KB) load_round(kb0 + 2 * kStride, 0);
      compute_round(kb0 + kStride, 1);
    }
  } else {
    for (int kb0 = warp * UNROLL; kb0 < KB; kb0 += kStride) {
      load_round(kb0, 0);
      compute_round(kb0, 0);
    }
  }
  w4::store_partials<NT>(red[warp], acc, g, t);
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) {
    const int r = i >> 4, b = i & 15;
    const int n = n0 + r;
    if (b < B && b < NT * 8 && n < N) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) v += red[w][r][b];
      if (bias) v += __half2float(bias[n]);
      out[(size_t)b * N + n] = __float2half(v);
    }
  }
}

template <int NT>
void launch_mma_variant(int variant, int grid, cudaStream_t stream, const half* xp, const uint8_t* qw, const float* sc,
                        const float* zr, const half* bp, half* op, int M, int N, int K, int group_size) {
#define QAAS_MMA(W_, U_, DB_) \
  w4a16_mma_kernel<NT, W_, U_, DB_><<<grid, (W_) * 32, 0, stream>>>(xp, qw, sc, zr, bp, op, M, N, K, group_size)
  switch (variant) {
    case 0: QAAS_MMA(4, 4, true); break;
    case 1: QAAS_MMA(8, 4, false); break;
    case 2: QAAS_MMA(8, 2, false); break;
    case 3: QAAS_MMA(16, 2, false); break;
    default: QAAS_MMA(16, 1, false); break;
  }
#undef QAAS_MMA
}

// Dequantise int4 codes to fp16 [N, K]: each thread expands one 16-byte chunk (32 weights), thread i reading unit i
// (contiguous reads). TILED: the codes are in the decode kernel's tiled order (quant.quantizers.packing.
// tile_int4_rows, N a multiple of 16): unit ((tile * K/128 + kb) * 2 + h) * 32 + 4 g + t is chunk 4 kb + t of row
// 16 tile + 8 h + g (a warp's 32 units: 8 rows, each 4 consecutive chunks = 256 contiguous output bytes).
__global__ void dequant_w4_kernel(const uint8_t* __restrict__ qw, const float* __restrict__ scale,
                                  const float* __restrict__ zero, half* __restrict__ out, int N, int K,
                                  int group_size, bool tiled) {
  const size_t chunks_per_row = K / 32;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)N * chunks_per_row) return;
  size_t n, c;
  if (tiled) {
    const size_t block = idx >> 6, KB = K / 128;  // 64 units per 16-row x 128-k block
    n = (block / KB) * 16 + ((idx >> 5) & 1) * 8 + ((idx >> 2) & 7);
    c = (block % KB) * 4 + (idx & 3);
  } else {
    n = idx / chunks_per_row;
    c = idx % chunks_per_row;
  }
  const int G = K / group_size;
  const int g = (int)(c * 32) / group_size;
  const float s = scale[n * G + g];
  const float mz = 8388608.f + zero[n * G + g];
  const uint4 wv = __ldg(reinterpret_cast<const uint4*>(qw) + idx);
  const uint32_t* w32 = reinterpret_cast<const uint32_t*>(&wv);
  uint4 o[4];
  half2* oh = reinterpret_cast<half2*>(o);
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      oh[q * 4 + e] = __floats2half2_rn(nib_minus_zero(w32[q], 8 * e, mz) * s, nib_minus_zero(w32[q], 8 * e + 4, mz) * s);
  uint4* dst = reinterpret_cast<uint4*>(out + n * K + c * 32);
#pragma unroll
  for (int q = 0; q < 4; ++q) dst[q] = o[q];
}

void check_w4(const at::Tensor& qw, const at::Tensor& scale, const at::Tensor& zero, int64_t K, int64_t group_size) {
  TORCH_CHECK(qw.is_cuda() && qw.scalar_type() == at::kByte && qw.dim() == 2 && qw.is_contiguous(),
              "w4: qweight must be a contiguous uint8 CUDA tensor [N, K/2]");
  TORCH_CHECK(qw.size(1) * 2 == K, "w4: qweight has ", qw.size(1), " packed columns, expected K/2 = ", K / 2);
  TORCH_CHECK(K % 32 == 0 && group_size % 32 == 0 && K % group_size == 0,
              "w4: K and group_size must be multiples of 32, group_size dividing K");
  const int64_t N = qw.size(0), G = K / group_size;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  zero.is_contiguous() && scale.numel() == N * G && zero.numel() == N * G,
              "w4: scale/zero must be contiguous float32 [N, K/group_size]");
}

}  // namespace

at::Tensor w4a16_gemm_variant_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale,
                                   const at::Tensor& zero, int64_t group_size, const c10::optional<at::Tensor>& bias,
                                   int64_t variant) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kHalf,
              "w4a16: x must be a contiguous fp16 CUDA tensor [M, K]");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  check_w4(qw, scale, zero, K, group_size);
  TORCH_CHECK(M <= 16, "w4a16 gemv handles at most 16 rows; use dequant + matmul for more");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) == 0 && (reinterpret_cast<uintptr_t>(qw.data_ptr()) & 15) == 0,
              "w4a16: x and qweight must be 16-byte aligned");
  const half* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kHalf && bias->numel() == N && bias->is_contiguous(), "w4a16: bias must be fp16 [N]");
    bp = reinterpret_cast<const half*>(bias->data_ptr<at::Half>());
  }
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const half* xp = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  half* op = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  if (K % 128 == 0 && group_size % 128 == 0) {
    const int grid = (int)((N + 15) / 16);
    const int dflt = M <= 8 ? kDefaultMmaVariant : kDefaultMmaVariant16;
    int v = (variant >= 0 && variant < kNumVariants) ? (int)variant : dflt;
    if (v >= kNumMmaVariants) {
      const StreamVariant sv = kStreamVariants[v - kNumMmaVariants];
      if (w4::launch_stream_decode(M <= 8 ? 1 : 2, sv.bulk, sv.pdl, stream, xp, qw.data_ptr<uint8_t>(),
                                   scale.data_ptr<float>(), zero.data_ptr<float>(), bp, op, (int)M, (int)N, (int)K,
                                   (int)group_size)) {
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return out;
      }
      v = dflt;
    }
    if (M <= 8)
      launch_mma_variant<1>(v, grid, stream, xp, qw.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(),
                            bp, op, (int)M, (int)N, (int)K, (int)group_size);
    else
      launch_mma_variant<2>(v, grid, stream, xp, qw.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(),
                            bp, op, (int)M, (int)N, (int)K, (int)group_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  const int rows_per_block = (kGemvThreads / 32) * kRows;
  const int grid = (int)((N + rows_per_block - 1) / rows_per_block);
#define QAAS_GEMV(NB_)                                                                                          \
  w4a16_gemv_kernel<NB_><<<grid, kGemvThreads, 0, stream>>>(xp, qw.data_ptr<uint8_t>(), scale.data_ptr<float>(), \
                                                            zero.data_ptr<float>(), bp, op, (int)M, (int)N, (int)K, \
                                                            (int)group_size)
  if (M <= 1) QAAS_GEMV(1);
  else if (M <= 2) QAAS_GEMV(2);
  else if (M <= 4) QAAS_GEMV(4);
  else if (M <= 8) QAAS_GEMV(8);
  else QAAS_GEMV(16);
#undef QAAS_GEMV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scale, const at::Tensor& zero,
                           int64_t group_size, const c10::optional<at::Tensor>& bias) {
  return w4a16_gemm_variant_cuda(x, qw, scale, zero, group_size, bias, -1);
}

int64_t w4a16_num_variants() { return kNumVariants; }

// tiled: qw holds the decode kernel's tiled order (N and K multiples of 16 and 128: the same [N, K/2] shape).
at::Tensor dequant_w4_cuda(const at::Tensor& qw, const at::Tensor& scale, const at::Tensor& zero, int64_t group_size,
                           bool tiled) {
  const c10::cuda::CUDAGuard guard(qw.device());
  const int64_t N = qw.size(0), K = qw.size(1) * 2;
  check_w4(qw, scale, zero, K, group_size);
  TORCH_CHECK(!tiled || (N % 16 == 0 && K % 128 == 0), "dequant_w4: tiled codes need N % 16 == 0 and K % 128 == 0");
  auto out = at::empty({N, K}, qw.options().dtype(at::kHalf));
  const int64_t total = N * (K / 32);
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  dequant_w4_kernel<<<(unsigned)blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      qw.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(),
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), (int)N, (int)K, (int)group_size, tiled);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qaas
