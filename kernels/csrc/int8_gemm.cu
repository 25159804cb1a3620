// Integer GEMM on int8 tensor cores (mma.sync m16n8k32 s8.s8.s32) with the dequantisation epilogue
//   out[m, n] = (sum_k qa[m, k] * qw[n, k]) * a_scale[m] * w_scale[n] + bias[n]      (fp16 out)
// where qa / qw are the signed values of symmetric codes (u - 2**(b-1)). Operands come as stored:
// int8 codes one per byte, or int4 codes two per byte (W4A8: weights int4; W4A4: both), unpacked to
// int8 in the global->shared copy. Both operands are K-major ("TN"), which is what mma.row.col wants.
//
// Tiling: 128x128 block tile, 64-deep k tile, 8 warps as 2 (M) x 4 (N), warp tile 64x32 (4x4 mma
// tiles). Global loads for tile k+1 are issued into registers before the tensor-core work on tile k
// (register double buffering), then stored to the other shared-memory stage: one barrier per k tile.
// Shared rows are padded by 16 bytes so ldmatrix phases are bank-conflict free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common.cuh"

namespace qaas {
namespace {

constexpr int BM = 128, BN = 128, BK = 64;
constexpr int kPad = 16;
constexpr int kLd = BK + kPad;  // bytes per shared row
constexpr int kGemmThreads = 256;

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Register staging for one operand tile of 128 rows x 64 k (as signed int8 after conversion).
// int8 source: 2 x 16 bytes per thread; int4 source: 1 x 16 packed bytes per thread (32 codes).
template <int BITS>
struct TileLoader {
  static constexpr int kVec = BITS == 8 ? 2 : 1;
  uint4 reg[kVec];

  __device__ __forceinline__ void load(const uint8_t* __restrict__ src, int rows, int row0, int ld_bytes, int k0) {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int c = t + i * kGemmThreads;
      int row, col;
      if (BITS == 8) { row = c >> 2; col = (c & 3) * 16 + k0; }
      else { row = c >> 1; col = (c & 1) * 16 + k0 / 2; }
      const int grow = row0 + row;
      if (grow < rows) reg[i] = __ldg(reinterpret_cast<const uint4*>(src + (size_t)grow * ld_bytes + col));
      else reg[i] = make_uint4(0x80808080u, 0x80808080u, 0x80808080u, 0x80808080u) ;
    }
  }

  __device__ __forceinline__ void store(uint8_t* smem) const {
    const int t = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int c = t + i * kGemmThreads;
      if (BITS == 8) {
        const int row = c >> 2, col = (c & 3) * 16;
        uint4 v = reg[i];
        v.x ^= 0x80808080u; v.y ^= 0x80808080u; v.z ^= 0x80808080u; v.w ^= 0x80808080u;
        *reinterpret_cast<uint4*>(smem + row * kLd + col) = v;
      } else {
        const int row = c >> 1, col = (c & 1) * 32;
        uint4 o0, o1;
        unpack8_int4_signed(reg[i].x, o0.x, o0.y);
        unpack8_int4_signed(reg[i].y, o0.z, o0.w);
        unpack8_int4_signed(reg[i].z, o1.x, o1.y);
        unpack8_int4_signed(reg[i].w, o1.z, o1.w);
        *reinterpret_cast<uint4*>(smem + row * kLd + col) = o0;
        *reinterpret_cast<uint4*>(smem + row * kLd + col + 16) = o1;
      }
    }
  }
};

template <int ABITS, int WBITS>
__global__ void __launch_bounds__(kGemmThreads) int8_gemm_kernel(
    const uint8_t* __restrict__ A, const float* __restrict__ a_scale, const uint8_t* __restrict__ W,
    const float* __restrict__ w_scale, const half* __restrict__ bias, half* __restrict__ out, int M, int N, int K) {
  __shared__ __align__(16) uint8_t sA[2][BM * kLd];
  __shared__ __align__(16) uint8_t sB[2][BN * kLd];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
  const int lda = ABITS == 8 ? K : K / 2;
  const int ldw = WBITS == 8 ? K : K / 2;

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  TileLoader<ABITS> la;
  TileLoader<WBITS> lb;
  la.load(A, M, bm, lda, 0);
  lb.load(W, N, bn, ldw, 0);
  la.store(sA[0]);
  lb.store(sB[0]);
  __syncthreads();

  const int KT = K / BK;
  // ldmatrix lane addressing (see the m16n8k32 fragment layouts).
  const int a_row = lane & 15, a_col = (lane >> 4) * 16;
  const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 16;

  for (int kt = 0; kt < KT; ++kt) {
    const int cur = kt & 1;
    if (kt + 1 < KT) {
      la.load(A, M, bm, lda, (kt + 1) * BK);
      lb.load(W, N, bn, ldw, (kt + 1) * BK);
    }
    const uint32_t sa_base = (uint32_t)__cvta_generic_to_shared(sA[cur]);
    const uint32_t sb_base = (uint32_t)__cvta_generic_to_shared(sB[cur]);
#pragma unroll
    for (int ks = 0; ks < BK; ks += 32) {
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = warp_m * 64 + mi * 16 + a_row;
        ldmatrix_x4(sa_base + r * kLd + ks + a_col, af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int r = warp_n * 32 + nj * 16 + b_row;
        ldmatrix_x4(sb_base + r * kLd + ks + b_col, bf[2 * nj][0], bf[2 * nj][1], bf[2 * nj + 1][0], bf[2 * nj + 1][1]);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          mma_s8(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[ni][0], bf[ni][1]);
    }
    if (kt + 1 < KT) {
      la.store(sA[cur ^ 1]);
      lb.store(sB[cur ^ 1]);
    }
    __syncthreads();
  }

  // Epilogue: int32 -> float, per-token x per-channel scale, bias, fp16.
  const int g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
    const int col = bn + warp_n * 32 + ni * 8 + tig * 2;
    if (col >= N) continue;
    const float ws0 = __ldg(w_scale + col), ws1 = __ldg(w_scale + col + 1);
    const float b0 = bias ? __half2float(bias[col]) : 0.f;
    const float b1 = bias ? __half2float(bias[col + 1]) : 0.f;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = bm + warp_m * 64 + mi * 16 + g + hf * 8;
        if (row < M) {
          const float as = __ldg(a_scale + row);
          const float v0 = (float)acc[mi][ni][2 * hf] * as * ws0 + b0;
          const float v1 = (float)acc[mi][ni][2 * hf + 1] * as * ws1 + b1;
          *reinterpret_cast<half2*>(out + (size_t)row * N + col) = __floats2half2_rn(v0, v1);
        }
      }
    }
  }
}

// W8A8 (both operands int8 codes): cp.async 16-byte copies straight into a kStages-deep shared ring
// (zero-fill past M / N), the unsigned->signed flip (^0x80) applied to the ldmatrix fragments.
// 4 warps (2 x 2), each a 64 x 64 warp tile (4 x 8 mma tiles): 8 ldmatrix.x4 per 32 mma, half the
// shared-memory traffic per mma of the 64 x 32 tile of the int4-operand kernel above.
constexpr int kStages = 4;
constexpr int kStageBytes = (BM + BN) * kLd;
constexpr int kAsyncThreads = 128;

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N_>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N_)); }

__global__ void __launch_bounds__(kAsyncThreads) int8_gemm_async_kernel(
    const uint8_t* __restrict__ A, const float* __restrict__ a_scale, const uint8_t* __restrict__ W,
    const float* __restrict__ w_scale, const half* __restrict__ bias, half* __restrict__ out, int M, int N, int K) {
  extern __shared__ __align__(16) uint8_t gsm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int bm = blockIdx.y * BM, bn = blockIdx.x * BN;
  const uint32_t smem0 = (uint32_t)__cvta_generic_to_shared(gsm);
  const int KT = K / BK;

  auto load_stage = [&](int stage, int kt) {
    const uint32_t sa = smem0 + stage * kStageBytes;
    const uint32_t sb = sa + BM * kLd;
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = threadIdx.x + i * kAsyncThreads;
      const int row = c >> 2, col = (c & 3) * 16;
      const int ga = min(bm + row, M - 1), gb = min(bn + row, N - 1);
      cp_async16(sa + row * kLd + col, A + (size_t)ga * K + k0 + col, bm + row < M);
      cp_async16(sb + row * kLd + col, W + (size_t)gb * K + k0 + col, bn + row < N);
    }
  };

  int acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < KT) load_stage(st, st);
    cp_async_commit();
  }
  const int a_row = lane & 15, a_col = (lane >> 4) * 16;
  const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 16;

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) load_stage(nk % kStages, nk);
      cp_async_commit();
    }
    const uint32_t sa_base = smem0 + (kt % kStages) * kStageBytes;
    const uint32_t sb_base = sa_base + BM * kLd;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 32) {
      uint32_t af[4][4], bf[8][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int r = warp_m * 64 + mi * 16 + a_row;
        ldmatrix_x4(sa_base + r * kLd + ks + a_col, af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
#pragma unroll
        for (int e = 0; e < 4; ++e) af[mi][e] ^= 0x80808080u;
      }
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        const int r = warp_n * 64 + nj * 16 + b_row;
        ldmatrix_x4(sb_base + r * kLd + ks + b_col, bf[2 * nj][0], bf[2 * nj][1], bf[2 * nj + 1][0], bf[2 * nj + 1][1]);
      }
#pragma unroll
      for (int ni = 0; ni < 8; ++ni) {
        bf[ni][0] ^= 0x80808080u;
        bf[ni][1] ^= 0x80808080u;
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
          mma_s8(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bf[ni][0], bf[ni][1]);
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int ni = 0; ni < 8; ++ni) {
    const int col = bn + warp_n * 64 + ni * 8 + tig * 2;
    if (col >= N) continue;
    const float ws0 = __ldg(w_scale + col), ws1 = __ldg(w_scale + col + 1);
    const float b0 = bias ? __half2float(bias[col]) : 0.f;
    const float b1 = bias ? __half2float(bias[col + 1]) : 0.f;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = bm + warp_m * 64 + mi * 16 + g + hf * 8;
        if (row < M) {
          const float as = __ldg(a_scale + row);
          const float v0 = (float)acc[mi][ni][2 * hf] * as * ws0 + b0;
          const float v1 = (float)acc[mi][ni][2 * hf + 1] * as * ws1 + b1;
          *reinterpret_cast<half2*>(out + (size_t)row * N + col) = __floats2half2_rn(v0, v1);
        }
      }
    }
  }
}

// Separate epilogue for the torch._int_mm baseline: int32 [M, N] -> fp16 with the same scaling.
__global__ void scale_epilogue_kernel(const int* __restrict__ acc, const float* __restrict__ a_scale,
                                      const float* __restrict__ w_scale, const half* __restrict__ bias,
                                      half* __restrict__ out, int M, int N) {
  const size_t idx4 = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (idx4 >= (size_t)M * N) return;
  const int row = (int)(idx4 / N), col = (int)(idx4 % N);
  const int4 v = *reinterpret_cast<const int4*>(acc + idx4);
  const float as = a_scale[row];
  const int vals[4] = {v.x, v.y, v.z, v.w};
  half h[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float bv = bias ? __half2float(bias[col + e]) : 0.f;
    h[e] = __float2half((float)vals[e] * as * w_scale[col + e] + bv);
  }
  *reinterpret_cast<uint2*>(out + idx4) = *reinterpret_cast<const uint2*>(h);
}

}  // namespace

at::Tensor int8_gemm_cuda(const at::Tensor& a, int64_t a_bits, const at::Tensor& a_scale, const at::Tensor& w,
                          int64_t w_bits, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.is_cuda() && w.is_cuda() && a.scalar_type() == at::kByte && w.scalar_type() == at::kByte &&
                  a.is_contiguous() && w.is_contiguous() && a.dim() == 2 && w.dim() == 2,
              "int8_gemm: codes must be contiguous uint8 CUDA tensors");
  TORCH_CHECK((a_bits == 8 || a_bits == 4) && (w_bits == 8 || w_bits == 4), "int8_gemm: bits must be 4 or 8");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), N = w.size(0);
  const int64_t K = a_bits == 8 ? a.size(1) : a.size(1) * 2;
  TORCH_CHECK((w_bits == 8 ? w.size(1) : w.size(1) * 2) == K, "int8_gemm: K mismatch between activations and weights");
  TORCH_CHECK(K % BK == 0, "int8_gemm: K must be a multiple of ", BK);
  TORCH_CHECK(N % 2 == 0, "int8_gemm: N must be even");
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.numel() == M && a_scale.is_contiguous(),
              "int8_gemm: a_scale must be float32 [M]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == N && w_scale.is_contiguous(),
              "int8_gemm: w_scale must be float32 [N]");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(a.data_ptr()) & 15) == 0 && (reinterpret_cast<uintptr_t>(w.data_ptr()) & 15) == 0,
              "int8_gemm: operands must be 16-byte aligned");
  const half* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kHalf && bias->numel() == N && bias->is_contiguous(), "int8_gemm: bias must be fp16 [N]");
    bp = reinterpret_cast<const half*>(bias->data_ptr<at::Half>());
  }
  auto out = at::empty({M, N}, a.options().dtype(at::kHalf));
  if (M == 0 || N == 0) return out;
  dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)((M + BM - 1) / BM));
  auto stream = c10::cuda::getCurrentCUDAStream();
  half* op = reinterpret_cast<half*>(out.data_ptr<at::Half>());
#define QAAS_GEMM(AB, WB)                                                                                \
  int8_gemm_kernel<AB, WB><<<grid, kGemmThreads, 0, stream>>>(a.data_ptr<uint8_t>(), a_scale.data_ptr<float>(), \
                                                              w.data_ptr<uint8_t>(), w_scale.data_ptr<float>(), bp, op, \
                                                              (int)M, (int)N, (int)K)
  if (a_bits == 8 && w_bits == 8) {
    const int smem = kStages * kStageBytes;
    C10_CUDA_CHECK(cudaFuncSetAttribute(int8_gemm_async_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int8_gemm_async_kernel<<<grid, kAsyncThreads, smem, stream>>>(a.data_ptr<uint8_t>(), a_scale.data_ptr<float>(),
                                                                 w.data_ptr<uint8_t>(), w_scale.data_ptr<float>(), bp, op,
                                                                 (int)M, (int)N, (int)K);
  } else if (a_bits == 8 && w_bits == 4) QAAS_GEMM(8, 4);
  else if (a_bits == 4 && w_bits == 4) QAAS_GEMM(4, 4);
  else QAAS_GEMM(4, 8);
#undef QAAS_GEMM
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor scale_epilogue_cuda(const at::Tensor& acc, const at::Tensor& a_scale, const at::Tensor& w_scale,
                               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(acc.is_cuda() && acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2,
              "scale_epilogue: acc must be a contiguous int32 CUDA tensor");
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(N % 4 == 0, "scale_epilogue: N must be a multiple of 4");
  TORCH_CHECK(a_scale.numel() == M && w_scale.numel() == N && a_scale.scalar_type() == at::kFloat &&
                  w_scale.scalar_type() == at::kFloat,
              "scale_epilogue: scales must be float32 [M] and [N]");
  const half* bp = nullptr;
  if (bias.has_value()) bp = reinterpret_cast<const half*>(bias->data_ptr<at::Half>());
  auto out = at::empty({M, N}, acc.options().dtype(at::kHalf));
  const int64_t total4 = M * N / 4;
  if (total4 == 0) return out;
  const int threads = 256;
  scale_epilogue_kernel<<<(unsigned)((total4 + threads - 1) / threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      acc.data_ptr<int>(), a_scale.data_ptr<float>(), w_scale.data_ptr<float>(), bp,
      reinterpret_cast<half*>(out.data_ptr<at::Half>()), (int)M, (int)N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qaas
