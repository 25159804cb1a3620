// Fused online transform + per-token symmetric activation quantization.
//
// Two kernels compute the same function:
//
// * act_quant_tc_kernel (fp16 input; Kronecker with 16 <= n1 <= 128 and n2 a multiple of 16 <= 128 (n1 is
//   padded to N1, the next multiple of 16: padding rows of X read one shared zero row, zero rows/columns of P1,
//   padded output rows never written); block Hadamard of
//   a power-of-two size 256 <= hb <= 16384): the transform on tensor cores (mma.sync m16n8k16, fp16 x
//   fp16 -> fp32). A chunk of n1 * n2 consecutive row elements, reshaped X [n1, n2], becomes
//   Y = P1^T X P2 (Kronecker: the whole row, x @ kron(P1, P2); Hadamard: each hb block, P1 = H_n1,
//   P2 = H_n2 as +-1 Sylvester matrices, since H_{n1 n2} = H_n1 (x) H_n2, then * 1/sqrt(hb) in fp32).
//   Persistent blocks of 8 warps take TB tokens per round; rows arrive in shared memory by cp.async
//   (16 bytes, double-buffered: the next round loads while this one computes; compact rows, padding rows of a
//   chunk read one shared zero row); P1, P2 are held per block as fp16 fragments: copied (16-byte cp.async with the
//   first round's rows) from a buffer act_quant_fragments built once per transform, the `frags` argument the
//   dispatcher caches per layer, or else staged by each block from the float32 factors (coalesced, no divisions:
//   on H100 run v7a integer index math was ~45% of the kernel's instructions; v8b: the staging alone ~27% at
//   K = 11008). A warp "unit" is (token, chunk, 16 output columns j): step 1 computes
//   T^T[j, :] = P2[:, j]^T X^T (A = P2^T fragments, B = X by ldmatrix), whose accumulators are exactly
//   the B fragments of step 2, Y[:, j] = P1^T T[:, j] (no shuffles, nothing through shared memory).
//   T is scaled by a power of two per unit first, so fp16 neither overflows nor loses low bits to subnormals.
//   Precision, default FAST: plain fp16 P and T (2 products), y * (2^-e * norm * (1 / scale)) instead of the
//   division; ~1% of
//   int8 codes land one step from the float64 reference's. (FlatQuant's reference kernel,
//   deploy/kernels/kron_matmul.py, also multiplies fp16 operands with fp32 accumulation and an fp16
//   intermediate.) Compensated (environment QAAS_ACT_QUANT_FAST=0, read once): P = P_hi + P_lo and
//   T = T_hi + T_lo in fp16, Y ~= P1hi^T Thi + P1hi^T Tlo + P1lo^T Thi with T = X P2hi + X P2lo (Hadamard: P
//   exact, only T is split), 5 products (Hadamard 3) and the true division: float32-accurate. H100, 2048x4096,
//   Kronecker 64x64: 27 us FAST vs 38.5 us compensated (no transform: 18.5 us).
//   Left-only Kronecker (p2 absent: identity right factor, FlatQuant's o_proj transform heads (x) I): step 1 is
//   skipped, X itself is step 2's B operand (ldmatrix.trans), FAST mode and narrow variants only.
//   Y stays in registers; per-token absmax by warp redux + shared atomics; each lane stores its 4 consecutive
//   codes of a row straight to global memory (a warp's j-tile and its neighbour's fill each 32-byte sector);
//   a round's scales / row sums are written after the next round's barrier (double-buffered by parity).
// * act_quant_vec_kernel (no transform, fp16 / bf16, K % 8 == 0, K <= 16384): one block of 128 threads per
//   token, the row held in registers (16-byte loads), 8-byte code stores.
// * act_quant_kernel (every other case: fp32 input, bf16 with a transform, other sizes): one block per row
//   at a time, row staged in shared memory as fp32, in-place butterflies or scalar fp32 products.
//
// Quantization (both): v = transformed value (Hadamard: * 1/sqrt(hb) in fp32), scale =
// max(absmax(v) * clip / qmax, 1e-8), q = clamp(rint(v / scale), -qmax, qmax) (a true division, rint =
// round half to even); unsigned codes u = q + 2^(bits-1) (int4 two per byte, element 2j in the low
// nibble), or (act_quant_s8) signed int8 q with a_corr = 128 * sum_k q (exact int32).
// QAAS_ACT_QUANT_TC=0 (read once) forces the scalar kernel everywhere (A/B comparisons), no transform included.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace qaas {
namespace {

enum OutForm : int { kOutU8 = 0, kOutU4 = 1, kOutS8 = 2 };

// =========================================================================================== scalar path
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

__device__ __forceinline__ int block_sum_int(int v, int* red) {
  v = __reduce_add_sync(0xffffffffu, v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = (lane < (int)(blockDim.x >> 5)) ? red[lane] : 0;
    w = __reduce_add_sync(0xffffffffu, w);
    if (lane == 0) red[32] = w;
  }
  __syncthreads();
  return red[32];
}

// MODE: 0 none, 1 block-diagonal Hadamard, 2 Kronecker. OUT: kOutU8 / kOutU4 (unsigned codes) or kOutS8
// (signed int8 codes, corr[m] = 128 * row sum).
template <typename T, int MODE, int OUT>
__global__ void __launch_bounds__(kThreads) act_quant_kernel(
    const T* __restrict__ x, int M, int K, const float* __restrict__ clip, int hb, float had_norm,
    const float* __restrict__ p1, const float* __restrict__ p2, int n1, int n2,
    uint8_t* __restrict__ codes, float* __restrict__ scales, int* __restrict__ corr) {
  constexpr int BITS = OUT == kOutU4 ? 4 : 8;
  extern __shared__ float smem[];
  __shared__ float red[33];
  __shared__ int ired[33];
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
      int rsum = 0;
      for (int i = threadIdx.x; i < K; i += blockDim.x) {
        float q = rintf((row[i] * norm) / scale);
        q = fminf(fmaxf(q, (float)-half_q), (float)half_q);
        if constexpr (OUT == kOutS8) {
          out[i] = (uint8_t)(int8_t)(int)q;
          rsum += (int)q;
        } else {
          out[i] = (uint8_t)((int)q + zero_q);
        }
      }
      if constexpr (OUT == kOutS8) {
        rsum = block_sum_int(rsum, ired);
        if (threadIdx.x == 0) corr[m] = 128 * rsum;
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

template <typename T, int MODE, int OUT>
void launch_scalar(const at::Tensor& x, const at::Tensor& clip, int hb, const float* p1, const float* p2, int n1,
                   int n2, uint8_t* codes, float* scales, int* corr) {
  const int M = x.size(0), K = x.size(1);
  size_t floats = K;
  if (MODE == 2) floats = 2 * (size_t)K + (size_t)n1 * n1 + (size_t)n2 * n2;
  const size_t bytes = floats * sizeof(float);
  auto kernel = act_quant_kernel<T, MODE, OUT>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  }
  const int sms = current_device_sm_count();
  const int per_sm = MODE == 2 ? 1 : 8;
  const int grid = std::max(1, std::min(M, sms * per_sm));
  const float had_norm = MODE == 1 ? (float)(1.0 / std::sqrt((double)hb)) : 1.f;
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), M, K, clip.data_ptr<float>(), hb, had_norm, p1, p2, n1, n2,
      codes, scales, corr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int OUT>
void dispatch_scalar(int mode, const at::Tensor& x, const at::Tensor& clip, int hb, const float* p1,
                     const float* p2, int n1, int n2, uint8_t* codes, float* scales, int* corr) {
  if (mode == 0) launch_scalar<T, 0, OUT>(x, clip, hb, p1, p2, n1, n2, codes, scales, corr);
  else if (mode == 1) launch_scalar<T, 1, OUT>(x, clip, hb, p1, p2, n1, n2, codes, scales, corr);
  else launch_scalar<T, 2, OUT>(x, clip, hb, p1, p2, n1, n2, codes, scales, corr);
}

// ================================================================================ no transform, vectorised
// One block of kVecThreads per token (fp16 / bf16, K % 8 == 0, 16-byte aligned rows): the whole row is loaded
// into registers with 16-byte loads (VPT vectors of 8 per thread, all in flight at once), block absmax, then
// codes written as 8 (int8) or 4 (int4) bytes per vector. Same arithmetic as act_quant_kernel (float32 absmax,
// scale = max(absmax * clip / qmax, eps), true division, round half to even): identical codes.
namespace vec {

constexpr int kVecThreads = 128;
constexpr int kMaxVpt = 16;  // K <= 16 * 8 * 128 = 16384

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& v, float (&f)[8]) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = static_cast<float>(e[j]);
}

template <typename T, int OUT, int VPT>
__global__ void __launch_bounds__(kVecThreads) act_quant_vec_kernel(const T* __restrict__ x, int K,
                                                                     const float* __restrict__ clip,
                                                                     uint8_t* __restrict__ codes,
                                                                     float* __restrict__ scales,
                                                                     int* __restrict__ corr) {
  constexpr int QMAX = OUT == kOutU4 ? 7 : 127;
  __shared__ float s_max[kVecThreads / 32];
  __shared__ int s_sum[kVecThreads / 32];
  const int m = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nvec = K >> 3;
  const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)m * K);
  uint4 v[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = tid + i * kVecThreads;
    if (idx < nvec) v[i] = __ldg(src + idx);
  }
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (tid + i * kVecThreads < nvec) {
      float f[8];
      to_float8<T>(v[i], f);
#pragma unroll
      for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(f[j]));
    }
  }
  amax = warp_max(amax);
  if (lane == 0) s_max[warp] = amax;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kVecThreads / 32; ++w) amax = fmaxf(amax, s_max[w]);
  const float scale = fmaxf(amax * __ldg(clip) / (float)QMAX, kEps);
  if (tid == 0) scales[m] = scale;
  int rsum = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = tid + i * kVecThreads;
    if (idx < nvec) {
      float f[8];
      to_float8<T>(v[i], f);
      int q[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float r = rintf(f[j] / scale);
        q[j] = (int)fminf(fmaxf(r, (float)-QMAX), (float)QMAX);
      }
      if constexpr (OUT == kOutU4) {
        uint32_t w = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) w |= (uint32_t)(q[j] + 8) << (4 * j);
        reinterpret_cast<uint32_t*>(codes + (size_t)m * (K / 2))[idx] = w;
      } else {
        const int z = OUT == kOutS8 ? 0 : 128;
        uint32_t w0 = 0, w1 = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          w0 |= ((uint32_t)(q[j] + z) & 0xffu) << (8 * j);
          w1 |= ((uint32_t)(q[j + 4] + z) & 0xffu) << (8 * j);
        }
        reinterpret_cast<uint2*>(codes + (size_t)m * K)[idx] = make_uint2(w0, w1);
        if constexpr (OUT == kOutS8) {
#pragma unroll
          for (int j = 0; j < 8; ++j) rsum += q[j];
        }
      }
    }
  }
  if constexpr (OUT == kOutS8) {
    rsum = __reduce_add_sync(0xffffffffu, rsum);
    if (lane == 0) s_sum[warp] = rsum;
    __syncthreads();
    if (tid == 0) {
      int tot = 0;
#pragma unroll
      for (int w = 0; w < kVecThreads / 32; ++w) tot += s_sum[w];
      corr[m] = 128 * tot;
    }
  }
}

// Vectors per thread for a row of K elements (a template value), or 0 where the kernel does not apply.
int vpt_for(int K) {
  if (K % 8 != 0) return 0;
  const int need = (K / 8 + kVecThreads - 1) / kVecThreads;
  if (need > kMaxVpt) return 0;
  for (int v : {1, 2, 4, 6, 8, 12, 16})
    if (need <= v) return v;
  return 0;
}

template <typename T, int OUT>
void launch(const at::Tensor& x, const at::Tensor& clip, int vpt, uint8_t* codes, float* scales, int* corr) {
  const int M = x.size(0), K = x.size(1);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const float* cp = clip.data_ptr<float>();
  auto stream = c10::cuda::getCurrentCUDAStream();
#define QAAS_VEC(V_)                                                                                   \
  if (vpt == V_) {                                                                                     \
    act_quant_vec_kernel<T, OUT, V_><<<M, kVecThreads, 0, stream>>>(xp, K, cp, codes, scales, corr); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                    \
    return;                                                                                            \
  }
  QAAS_VEC(1) QAAS_VEC(2) QAAS_VEC(4) QAAS_VEC(6) QAAS_VEC(8) QAAS_VEC(12) QAAS_VEC(16)
#undef QAAS_VEC
  TORCH_CHECK(false, "act_quant: internal error, no vectorised kernel for ", vpt, " vectors per thread");
}

}  // namespace vec

// ====================================================================================== tensor-core path
namespace tc {

constexpr int kWarps = 8;
constexpr int kThreadsTc = kWarps * 32;
constexpr int kMaxTB = 16;  // tokens per round, at most

// Units (16 output columns of one chunk) a warp keeps in registers per round (RMAX), two variants:
// wide: RMAX * N1 / 2 <= 64 fp32 registers of Y, one block (8 warps) per SM (~160 registers);
// narrow (N1 <= 64): RMAX * N1 / 2 <= 32, compiled for three blocks per SM (<= 80 registers; H100: three blocks'
// warps hide more of each other's latency than two at <= 128 registers), so one block's quantization / barriers
// overlap the others' tensor-core work. The host takes narrow where it fits.
// n1 80 / 96 (incl. 86 padded to 96): wide takes two units per warp (two tokens of 8 units per round); narrow one
// unit per warp in <= 128 registers, two blocks per SM (K = 11008 Kronecker 86x128: one token per round per block,
// 16 warps per SM instead of 8; shared memory ~107 KB per block thanks to the compact X rows).
__host__ __device__ constexpr int rmax_wide(int n1) { return n1 <= 64 ? 128 / n1 : (n1 <= 96 ? 2 : 1); }
__host__ __device__ constexpr int rmax_narrow(int n1) { return n1 <= 64 ? 64 / n1 : (n1 <= 96 ? 1 : 0); }
__host__ __device__ constexpr int min_blocks(int n1, int rmax) {
  return rmax == rmax_narrow(n1) ? (n1 <= 64 ? 3 : 2) : 1;
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d = a b: the first product of an accumulation chain (no zeroing instructions for the accumulator)
__device__ __forceinline__ void mma16816_c0(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}

// d += a b over k = 8 (A: 16 x 8 as {a0, a1} of a 16 x 16 fragment, B: 8 x 8 as one register): the last k tile of
// step 2 where its upper 8 rows are padding (n1 <= N1 - 8)
__device__ __forceinline__ void mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr)
               : "memory");
}

__device__ __forceinline__ uint4 lds128(const __half* p) { return *reinterpret_cast<const uint4*>(p); }

// Output-column permutation inside a 16-column tile: the accumulator slot s = 8*nj + 2*t + e (n-tile nj,
// lane t, element e) holds physical column 4*t + 2*nj + e, so a lane's four values of one row are four
// consecutive columns. Step 1's A rows are slots: row s of a P2 tile is physical column col_of_slot(s).
__device__ __forceinline__ int col_of_slot(int s) { return ((s & 7) >> 1) * 4 + (s >> 3) * 2 + (s & 1); }

// Fragment-ordered copy of a 16x16 m16n8k16 A tile: lane (g, t) holds 8 halves, {(g,2t),(g,2t+1)},
// {(g+8,2t),(g+8,2t+1)}, {(g,2t+8),(g,2t+9)}, {(g+8,2t+8),(g+8,2t+9)} = its registers a0..a3 (one lds.128).

__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// (a, b) -> fp16 pair hi and the fp16 pair of the residuals lo (a ~= hi + lo to ~2^-22 relative).
__device__ __forceinline__ void split_pair(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __half2 h = __floats2half2_rn(a, b);
  const float2 hf = __half22float2(h);
  hi = h2_bits(h);
  lo = h2_bits(__floats2half2_rn(a - hf.x, b - hf.y));
}

template <int QMAX>
__device__ __forceinline__ int quant1(float v, float scale) {
  float q = rintf(v / scale);
  q = fminf(fmaxf(q, (float)-QMAX), (float)QMAX);
  return (int)q;
}

// FAST mode, four consecutive values of one row -> their four codes packed as stored (int8 / uint8: 4 bytes, int4:
// 4 nibbles in the low 16 bits), plus (kOutS8) their sum added to rsum. "Magic number" rounding: t = v * mul + B
// with B = 1.5 * 2^23 + Z (Z = 0 / 128 / 8: signed int8 / unsigned int8 / unsigned int4 codes) is one FFMA that
// rounds the exact product v * mul to the nearest integer, ties to even, in t's low mantissa bits (|v * mul| <
// 2^22; larger values are clamped below); the clamp to [B - QMAX, B + QMAX] commutes with the rounding (integer
// bounds) and is done on t; t's low byte is then the code (two's complement for int8). 4 FFMA + 8 FMNMX + 3 PRMT
// (+ 1 IDP4A) per 4 values, against 4 FMUL + 8 FMNMX + 4 F2I + 3 PRMT + 3 IADD with a float-to-int conversion
// (H100 SASS of the K = 11008 kernel: the quantization was ~30% of its instructions). mul = (2^-e * norm) *
// (1 / scale): one product per value instead of the IEEE division; differs from the reference only where v /
// scale lies within an ulp or two of a rounding tie.
template <int OUT>
__device__ __forceinline__ uint32_t quant4_fast(float v0, float v1, float v2, float v3, float mul, int& rsum) {
  constexpr int QMAX = OUT == kOutU4 ? 7 : 127;
  constexpr int Z = OUT == kOutS8 ? 0 : (OUT == kOutU4 ? 8 : 128);
  constexpr float kB = 12582912.f + (float)Z, kLo = kB - (float)QMAX, kHi = kB + (float)QMAX;
  const uint32_t b0 = __float_as_uint(fminf(fmaxf(fmaf(v0, mul, kB), kLo), kHi));
  const uint32_t b1 = __float_as_uint(fminf(fmaxf(fmaf(v1, mul, kB), kLo), kHi));
  const uint32_t b2 = __float_as_uint(fminf(fmaxf(fmaf(v2, mul, kB), kLo), kHi));
  const uint32_t b3 = __float_as_uint(fminf(fmaxf(fmaf(v3, mul, kB), kLo), kHi));
  // low bytes of b0..b3 -> bytes 0..3
  const uint32_t w = __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
  if constexpr (OUT == kOutS8) rsum = __dp4a((int)w, 0x01010101, rsum);  // signed bytes: sum of the 4 codes
  if constexpr (OUT == kOutU4) {
    const uint32_t n = w | (w >> 4);  // byte 0 = u0 | u1 << 4, byte 2 = u2 | u3 << 4 (each u < 16)
    return __byte_perm(n, 0u, 0x4420);
  }
  return w;
}

// Absolute maximum of N floats as four independent chains (the serial chain's FMNMX latency was exposed: each
// max waited on the one before)
template <int N>
__device__ __forceinline__ float absmax_tree(const float* v) {
  float m[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < N; ++i) m[i & 3] = fmaxf(m[i & 3], fabsf(v[i]));
  return fmaxf(fmaxf(m[0], m[1]), fmaxf(m[2], m[3]));
}

// Fragment-ordered fp16 copy of P^T's 16 x 16 A tiles (NB x NB tiles; P2 rows are output slots, physical column
// col_of_slot; P1 rows plain, rows / columns >= n padding: zero; Hadamard: +-1 Sylvester entries instead of p): item
// q = (tile, lane) holds A rows {g, g + 8} x columns {2t, 2t + 1, 2t + 8, 2t + 9} of the tile as 8 halves = that
// lane's registers a0..a3 (one lds.128 in the kernel); lo: the fp16 residuals too (compensated mode). Items q = first,
// first + step, ..., 4 per iteration with their 8 loads each in flight (element by element with integer index math
// this was ~20-30% of the kernel's instructions: H100 runs v7a, v7c).
__device__ __forceinline__ void stage_fragments(int NB, bool is_p2, int had, bool lo, const float* __restrict__ p,
                                                int n, __half* dh, __half* dl, int first, int step) {
  const int total = NB * NB * 32;
  for (int q0 = 0; q0 < total; q0 += 4 * step) {
    float v[4][8];
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int q = q0 + it * step + first;
      const int tile = q >> 5, l = q & 31, gg = l >> 2, tt = l & 3;
      const int rt = tile / NB, ct = tile - rt * NB;  // tile row (output block), tile column (k block)
      const int r0 = rt * 16 + (is_p2 ? col_of_slot(gg) : gg);
      const int r1 = rt * 16 + (is_p2 ? col_of_slot(gg + 8) : gg + 8);
      const int k0 = ct * 16 + 2 * tt;
      const int ks[4] = {k0, k0 + 1, k0 + 8, k0 + 9};
#pragma unroll
      for (int h = 0; h < 8; ++h) {
        const int k = ks[(h >> 2) * 2 + (h & 1)];  // halves: (r0,k0) (r0,k0+1) (r1,k0) (r1,k0+1) (r0,k0+8) ...
        const int r = ((h >> 1) & 1) ? r1 : r0;
        float pvv = 0.f;
        if (q < total && r < n && k < n) {
          if (had) pvv = (__popc(r & k) & 1) ? -1.f : 1.f;
          else pvv = __ldg(p + k * n + r);  // A(r, k) = P[k][r]
        }
        v[it][h] = pvv;
      }
    }
#pragma unroll
    for (int it = 0; it < 4; ++it) {
      const int q = q0 + it * step + first;
      if (q < total) {
        uint32_t hw[4], lw[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) split_pair(v[it][2 * e], v[it][2 * e + 1], hw[e], lw[e]);
        *reinterpret_cast<uint4*>(dh + (size_t)q * 8) = make_uint4(hw[0], hw[1], hw[2], hw[3]);
        if (lo) *reinterpret_cast<uint4*>(dl + (size_t)q * 8) = make_uint4(lw[0], lw[1], lw[2], lw[3]);
      }
    }
  }
}

// Halves of the staged factors at the start of shared memory: P2 hi [, lo], P1 hi [, lo] (no P2 when left-only).
__host__ __device__ inline size_t frag_halves(int N1, int n2, bool lo, bool left) {
  return (size_t)(N1 * N1 + (left ? 0 : n2 * n2)) * (lo ? 2 : 1);
}

// Where each staged factor starts, from `base` (the same layout in act_quant_fragments_kernel's global buffer and in
// the transform kernel's shared memory): P2 hi, P2 lo, P1 hi, P1 lo (a lo part only when `lo`), then `end`.
struct FragLayout {
  __half *p2h, *p2l, *p1h, *p1l, *end;
};
__host__ __device__ inline FragLayout frag_layout(__half* base, int N1, int n2, bool lo, bool left) {
  FragLayout f;
  f.p2h = base;
  f.p2l = base + n2 * n2;
  f.p1h = base + (lo ? 2 : 1) * (left ? 0 : n2 * n2);
  f.p1l = f.p1h + N1 * N1;
  f.end = f.p1h + (lo ? 2 : 1) * N1 * N1;
  return f;
}

// The staged factors built once in global memory, laid out exactly as the kernel's shared memory holds them
// (blockIdx.y: 0 P2, 1 P1; grid-stride over items).
__global__ void act_quant_fragments_kernel(int N1, int n1, int n2, int had, bool lo, bool left,
                                           const float* __restrict__ p1, const float* __restrict__ p2,
                                           __half* __restrict__ out) {
  const int first = blockIdx.x * blockDim.x + threadIdx.x, step = gridDim.x * blockDim.x;
  const FragLayout f = frag_layout(out, N1, n2, lo, left);
  if (blockIdx.y == 0) {
    if (!left) stage_fragments(n2 >> 4, true, had, lo, p2, n2, f.p2h, f.p2l, first, step);
  } else {
    stage_fragments(N1 >> 4, false, had, lo, p1, n1, f.p1h, f.p1l, first, step);
  }
}

// Shared memory (dynamic), in order: P2 fragments hi [, lo], P1 fragments hi [, lo] (fp16, n^2 each), one zero
// row (n2 + 8 halves), X for TB tokens x 2 buffers (the token's K / n2 rows of n2 halves, each padded by 8:
// conflict-free ldmatrix; compact: row r of the token is row r here, so chunk c starts at row c * n1, and the
// ldmatrix lanes of the padding rows n1..N1-1 of a chunk read the zero row).
// N1 = n1 rounded up to a multiple of 16. Left-only (the right factor is the identity): no P2.
__host__ __device__ inline size_t smem_bytes(int N1, int n1, int n2, bool lo, int TB, int K, bool left = false) {
  return (size_t)2 * frag_halves(N1, n2, lo, left) + (size_t)(n2 + 8) * 2 +
         (size_t)2 * TB * (K / n2) * (n2 + 8) * 2;
}

// LEFT: Kronecker with the identity as right factor, Y = P1^T X (FlatQuant's o_proj transform: the heads factor
// (x) I_head_dim, whose head-dim factor is folded into v_proj). Step 1 is skipped: step 2's B fragments are X
// itself, read by ldmatrix.trans (fp16 already: no power-of-two scaling), and the output columns keep their
// natural order (a lane's values of one row are columns 2t, 2t+1 and 2t+8, 2t+9: int8 codes are exchanged within
// the quad so that each lane stores columns 4t .. 4t+3 as one 4-byte store; int4 codes as two 1-byte stores).
// FAST only (plain fp16 products; the compensated mode takes an explicit identity right factor instead).
template <int N1, int RMAX, bool FAST, int OUT, bool LEFT = false>
__global__ void __launch_bounds__(kThreadsTc, min_blocks(N1, RMAX)) act_quant_tc_kernel(
    const __half* __restrict__ x, int M, int K, int n1, int n2, int had, const float* __restrict__ clip,
    const float* __restrict__ p1, const float* __restrict__ p2, const uint4* __restrict__ pfrag, float norm, int TB,
    int nrounds, uint8_t* __restrict__ codes, float* __restrict__ scales, int* __restrict__ corr) {
  static_assert(!LEFT || FAST, "the left-only kernel is FAST only");
  constexpr int NB1 = N1 / 16;
  constexpr int QMAX = OUT == kOutU4 ? 7 : 127;
  // step 1's k loop (n2 / 16 iterations, runtime) unrolled so the next iterations' ldmatrix overlap this one's
  // mma; by 2 only for the wide tiles (6-8 B fragments of 4 registers each per iteration)
  constexpr int kKbUnroll = N1 > 64 ? 2 : 4;
  const bool lo = !FAST && !had;  // P split in hi + lo (Kronecker, compensated)
  // FAST: the last 16-row block of the padded n1 has only padding in its upper 8 rows (n1 <= N1 - 8, e.g. 86 of
  // 96): step 1 skips that 8-row accumulator tile and step 2 takes its last k tile as m16n8k8 (~8% fewer products)
  const bool pad_hi = FAST && n1 <= N1 - 8;
  const int NB2 = n2 >> 4;        // 16-blocks of n2 = j-tiles per chunk
  const int chunks = K / (n1 * n2);
  const int U = chunks * NB2;     // units (chunk, j-tile) per token
  const int xstr = n2 + 8;        // halves per staged X row
  const int xtok = chunks * n1 * xstr;
  const int CB = OUT == kOutU4 ? K / 2 : K;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const FragLayout frags = frag_layout(reinterpret_cast<__half*>(smem_raw), N1, n2, lo, LEFT);
  __half* sp2h = frags.p2h;
  __half* sp2l = frags.p2l;
  __half* sp1h = frags.p1h;
  __half* sp1l = frags.p1l;
  __half* szero = frags.end;  // one zero row: what padding rows of X read
  __half* sx = szero + xstr;
  // token absmax / code sums, double-buffered by round parity: a round's values are written out (and cleared)
  // after the next round's first barrier, so no barrier is needed between quantization and write-out
  __shared__ unsigned s_amax[2][kMaxTB];
  __shared__ int s_sum[2][kMaxTB];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint32_t sx_addr = (uint32_t)__cvta_generic_to_shared(sx);
  const uint32_t szero_addr = (uint32_t)__cvta_generic_to_shared(szero);

  // cp.async of round `round`'s rows into buffer `buf` (16-byte pieces, global order = coalesced). The round's
  // tokens are consecutive rows of x and of the buffer (a token's K / n2 staged rows follow the previous one's), so
  // piece w of the round (row r = w / W, column piece w - r W) lands at halves r * xstr + (w - r W) * 8 = 8 (w + r).
  // The row index is a multiply-high by ceil(2^32 / W) (exact for w < 2^28 / W), once per thread where W divides
  // the block's thread count (every n2 that is a power of two): then each step of kThreadsTc pieces advances the
  // row by the constant kThreadsTc / W.
  const int W = n2 >> 3;
  const uint32_t wmagic = 0xffffffffu / (uint32_t)W + 1u;
  const bool row_step_const = kThreadsTc % W == 0;
  const uint32_t dstep = (uint32_t)(kThreadsTc + (row_step_const ? kThreadsTc / W : 0)) * 16u;
  auto issue = [&](int round, int buf) {
    const int m0 = round * TB;
    const int total = min(TB, M - m0) * (K >> 3);
    const char* src = reinterpret_cast<const char*>(x + (size_t)m0 * K);
    const uint32_t dst = sx_addr + (uint32_t)(buf * TB * xtok) * 2u;
    if (row_step_const) {
      uint32_t d = dst + (uint32_t)(tid + (int)__umulhi((uint32_t)tid, wmagic)) * 16u;
      const char* sp = src + (size_t)tid * 16;
      for (int w = tid; w < total; w += kThreadsTc, d += dstep, sp += kThreadsTc * 16) cp_async16(d, sp);
    } else {
      for (int w = tid; w < total; w += kThreadsTc) {
        const int r = (int)__umulhi((uint32_t)w, wmagic);
        cp_async16(dst + (uint32_t)(w + r) * 16u, src + (size_t)w * 16);
      }
    }
  };
  // P2^T / P1^T as fragment-ordered fp16 (stage_fragments): copied from `pfrag` (built once per transform by
  // act_quant_fragments_kernel) by 16-byte cp.async in the first round's group, a few instructions per thread, or,
  // without it, staged below from the float32 factors (H100 run v8b: ~27% of the K = 11008 kernel's instructions,
  // all at the start of every block, waiting on scattered loads).
  if (pfrag != nullptr) {
    const int n16 = (int)(frag_halves(N1, n2, lo, LEFT) >> 3);
    const uint32_t fbase = (uint32_t)__cvta_generic_to_shared(sp2h);
    for (int i = tid; i < n16; i += kThreadsTc) cp_async16(fbase + (uint32_t)i * 16u, pfrag + i);
  }
  for (int q = tid; q < xstr; q += kThreadsTc) szero[q] = __float2half_rn(0.f);
  if ((int)blockIdx.x < nrounds) issue(blockIdx.x, 0);
  cp_async_commit();

  if (tid < kMaxTB) {
    s_amax[0][tid] = s_amax[1][tid] = 0u;
    s_sum[0][tid] = s_sum[1][tid] = 0;
  }
  if (pfrag == nullptr) {
    if (!LEFT) stage_fragments(NB2, true, had, lo, p2, n2, sp2h, sp2l, tid, kThreadsTc);
    stage_fragments(NB1, false, had, lo, p1, n1, sp1h, sp1l, tid, kThreadsTc);
  }
  const float clip_ratio = __ldg(clip);
  // ldmatrix.x4 lane address inside a 16 x 16 X tile: matrices (rows 0-7, cols 0-7), (0-7, 8-15),
  // (8-15, 0-7), (8-15, 8-15) -> B fragments {r0, r1} of rows a 0-7 and {r2, r3} of rows a 8-15.
  const int lrow = (lane & 7) + ((lane >> 4) << 3), lcol = ((lane >> 3) & 1) << 3;

  // A warp's units are the same every round (token tb of the round, chunk c, j-tile jt): decoded once.
  int utb[RMAX], uc[RMAX], ujt[RMAX];
#pragma unroll
  for (int r = 0; r < RMAX; ++r) {
    const int u = warp + r * kWarps;
    utb[r] = u / U;
    const int v = u - utb[r] * U;
    uc[r] = v / NB2;
    ujt[r] = v - uc[r] * NB2;
  }

  // scales / corr of the previous round (parity pb), then its accumulators cleared for the round after next
  int prev_m0 = 0, prev_nt = 0;
  auto flush = [&](int pb) {
    if (tid < prev_nt) {
      scales[prev_m0 + tid] = fmaxf(__uint_as_float(s_amax[pb][tid]) * clip_ratio / (float)QMAX, kEps);
      if constexpr (OUT == kOutS8) corr[prev_m0 + tid] = 128 * s_sum[pb][tid];
      s_amax[pb][tid] = 0u;
      s_sum[pb][tid] = 0;
    }
  };

  int buf = 0;
  for (int round = blockIdx.x; round < nrounds; round += gridDim.x, buf ^= 1) {
    if (round + (int)gridDim.x < nrounds) issue(round + gridDim.x, buf ^ 1);
    cp_async_commit();
    cp_async_wait1();
    __syncthreads();  // (A) this round's rows (and, first time, P) visible; the previous round fully quantized
    flush(buf ^ 1);   // (its accumulators are next used two rounds on, after that round's (A))

    const int m0 = round * TB;
    const int nt = min(TB, M - m0);
    const int nunits = nt * U;
    const uint32_t xb = sx_addr + (uint32_t)(buf * TB * xtok) * 2u;

    float y[RMAX][NB1][2][4];  // Y[16 mi + g (+8)][slot 8 nj + 2t (+1)] per unit, unscaled
    float ysc[RMAX];           // 2^-e * norm per unit
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      const int u = warp + r * kWarps;
      if (u < nunits) {
        const int tb = utb[r], c = uc[r], jt = ujt[r];
        uint32_t th[NB1][2][2], tl[NB1][2][2];  // step 2's B fragments (T, fp16; tl: compensated low parts)
        float finv = 1.f;                        // 2^-e: undoes T's power-of-two scaling
        if constexpr (LEFT) {
          // T = X: the B fragment (k = a in 16 ka.., n = columns 8 ns.. of the j-tile) by ldmatrix.trans, matrices
          // (rows 0-7, cols 0-7) (8-15, 0-7) (0-7, 8-15) (8-15, 8-15) = th[ka][0][0], [0][1], [1][0], [1][1];
          // padding rows read the zero row
#pragma unroll
          for (int ka = 0; ka < NB1; ++ka) {
            const int row = ka * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
            const int col = jt * 16 + ((lane >> 4) << 3);
            const uint32_t addr = row >= n1 ? szero_addr + (uint32_t)col * 2u
                                            : xb + (uint32_t)((tb * xtok) + (c * n1 + row) * xstr + col) * 2u;
            uint32_t b[4];
            ldsm_x4_trans(b, addr);
            th[ka][0][0] = b[0];
            th[ka][0][1] = b[1];
            th[ka][1][0] = b[2];
            th[ka][1][1] = b[3];
            tl[ka][0][0] = tl[ka][0][1] = tl[ka][1][0] = tl[ka][1][1] = 0u;
          }
        } else {
          // ---- step 1: acc[nt][.] = T^T[slots of jt][a = 8 nt ..], k over b
          float acc[2 * NB1][4];
          // ldmatrix row address of each 16-row a-tile: chunk c's row na * 16 + lrow, or the zero row (padding)
          uint32_t xrow[NB1];
#pragma unroll
          for (int na = 0; na < NB1; ++na) {
            const int row = na * 16 + lrow;
            xrow[na] = row >= n1 ? szero_addr + (uint32_t)lcol * 2u
                                 : xb + (uint32_t)((tb * xtok) + (c * n1 + row) * xstr + lcol) * 2u;
          }
          const __half* f2h = sp2h + (jt * NB2) * 256 + lane * 8;
          const __half* f2l = sp2l + (jt * NB2) * 256 + lane * 8;
          // one k step of 16 b; the first (FIRST) starts every accumulator from zero
          auto kstep = [&](int kb, auto first) {
            constexpr bool FIRST = decltype(first)::value;
            const uint4 va = lds128(f2h + kb * 256);
            const uint32_t ah[4] = {va.x, va.y, va.z, va.w};
            uint32_t al[4] = {0u, 0u, 0u, 0u};
            if (lo) {
              const uint4 vl = lds128(f2l + kb * 256);
              al[0] = vl.x; al[1] = vl.y; al[2] = vl.z; al[3] = vl.w;
            }
#pragma unroll
            for (int na = 0; na < NB1; ++na) {
              uint32_t b[4];
              ldsm_x4(b, xrow[na] + (uint32_t)kb * 32u);
              const bool hi = !(na == NB1 - 1 && pad_hi);  // rows 16 na + 8 .. + 15 not all padding
              if constexpr (FIRST) {
                mma16816_c0(acc[2 * na], ah, b[0], b[1]);
                if (hi) mma16816_c0(acc[2 * na + 1], ah, b[2], b[3]);
              } else {
                mma16816(acc[2 * na], ah, b[0], b[1]);
                if (hi) mma16816(acc[2 * na + 1], ah, b[2], b[3]);
              }
              if (lo) {
                mma16816(acc[2 * na], al, b[0], b[1]);
                mma16816(acc[2 * na + 1], al, b[2], b[3]);
              }
            }
          };
          kstep(0, std::true_type{});
#pragma unroll kKbUnroll
          for (int kb = 1; kb < NB2; ++kb) kstep(kb, std::false_type{});
          if (pad_hi) {  // the skipped tile: T^T of zero rows
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[2 * NB1 - 1][e] = 0.f;
          }
          // ---- power-of-two scaling of T into [2^14, 2^15) (fp16 range), then fp16 B fragments of step 2
          float mx = absmax_tree<8 * NB1>(&acc[0][0]);
          mx = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(mx)));  // |.| >= 0: uint order
          const int ebits = (__float_as_int(mx) >> 23) & 0xff;           // biased exponent of max|T|
          const int ef = min(max(268 - ebits, 27), 227);                  // biased exponent of f = 2^(141-E)
          const float f = __int_as_float(ef << 23);
          finv = __int_as_float((254 - ef) << 23);
#pragma unroll
          for (int ka = 0; ka < NB1; ++ka)
#pragma unroll
            for (int ns = 0; ns < 2; ++ns) {
              // B fragment (k = a in 16 ka.., n = slots 8 ns..): {T[2t..][g], T[2t+8..][g]} =
              // acc of a-tiles 2ka, 2ka+1 at slot row g (ns 0: c0,c1) or g+8 (ns 1: c2,c3)
              if (FAST) {
                th[ka][ns][0] = h2_bits(__floats2half2_rn(acc[2 * ka][2 * ns] * f, acc[2 * ka][2 * ns + 1] * f));
                th[ka][ns][1] =
                    h2_bits(__floats2half2_rn(acc[2 * ka + 1][2 * ns] * f, acc[2 * ka + 1][2 * ns + 1] * f));
                tl[ka][ns][0] = tl[ka][ns][1] = 0u;
              } else {
                split_pair(acc[2 * ka][2 * ns] * f, acc[2 * ka][2 * ns + 1] * f, th[ka][ns][0], tl[ka][ns][0]);
                split_pair(acc[2 * ka + 1][2 * ns] * f, acc[2 * ka + 1][2 * ns + 1] * f, th[ka][ns][1],
                           tl[ka][ns][1]);
              }
            }
        }
        // ---- step 2: Y[i][slots] = sum_a P1[a][i] T[a][slots]
        const __half* f1h = sp1h + lane * 8;
        const __half* f1l = sp1l + lane * 8;
        // ka outer: each step issues 2 * NB1 independent mma (one accumulation chain per output tile); every
        // accumulator still sums over ka in order, as with mi outer
#pragma unroll
        for (int ka = 0; ka < NB1; ++ka)
#pragma unroll
          for (int mi = 0; mi < NB1; ++mi) {
            if (ka == NB1 - 1 && pad_hi) {  // T rows 16 ka + 8 .. + 15 are padding (zero): k = 8 (ka >= 1 here)
              const uint2 v2 = *reinterpret_cast<const uint2*>(f1h + (mi * NB1 + ka) * 256);
              mma1688(y[r][mi][0], v2.x, v2.y, th[ka][0][0]);
              mma1688(y[r][mi][1], v2.x, v2.y, th[ka][1][0]);
              continue;
            }
            const uint4 va = lds128(f1h + (mi * NB1 + ka) * 256);
            const uint32_t ah[4] = {va.x, va.y, va.z, va.w};
            if (ka == 0) {  // the first product of each accumulator (no zeroing)
              mma16816_c0(y[r][mi][0], ah, th[ka][0][0], th[ka][0][1]);
              mma16816_c0(y[r][mi][1], ah, th[ka][1][0], th[ka][1][1]);
            } else {
              mma16816(y[r][mi][0], ah, th[ka][0][0], th[ka][0][1]);
              mma16816(y[r][mi][1], ah, th[ka][1][0], th[ka][1][1]);
            }
            if (!FAST) {
              mma16816(y[r][mi][0], ah, tl[ka][0][0], tl[ka][0][1]);
              mma16816(y[r][mi][1], ah, tl[ka][1][0], tl[ka][1][1]);
            }
            if (lo) {
              const uint4 vl = lds128(f1l + (mi * NB1 + ka) * 256);
              const uint32_t al[4] = {vl.x, vl.y, vl.z, vl.w};
              mma16816(y[r][mi][0], al, th[ka][0][0], th[ka][0][1]);
              mma16816(y[r][mi][1], al, th[ka][1][0], th[ka][1][1]);
            }
          }
        // ---- unit absmax of v = (y * 2^-e) * norm  (= fl(max|y| * ysc): monotone rounding)
        ysc[r] = finv * norm;
        float ym = absmax_tree<8 * NB1>(&y[r][0][0][0]);
        ym = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(ym)));
        if (lane == 0) atomicMax(&s_amax[buf][tb], __float_as_uint(ym * ysc[r]));
      }
    }
    __syncthreads();  // (B) token absmax complete

    // ---- quantize from registers straight into the token rows in global memory
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      const int u = warp + r * kWarps;
      if (u < nunits) {
        const int tb = utb[r], c = uc[r], jt = ujt[r];
        const float scale = fmaxf(__uint_as_float(s_amax[buf][tb]) * clip_ratio / (float)QMAX, kEps);
        const float mul = ysc[r] * (1.f / scale);  // FAST only: (y * 2^-e * norm) / scale as one product
        // physical columns 4t .. 4t+3 of the unit's row g (left-only int4: 2t, 2t+1 and, 8 further on, 2t+8, 2t+9;
        // left-only int8 stores 4t .. 4t+3 after a quad exchange); tile (mi, hr) is 16 mi + 8 hr rows further on
        constexpr bool kLeftQuad = LEFT && OUT != kOutU4;
        const int e0 = c * n1 * n2 + g * n2 + jt * 16 + ((LEFT && !kLeftQuad) ? 2 : 4) * t;
        uint8_t* cbase = codes + (size_t)(m0 + tb) * CB + (OUT == kOutU4 ? (e0 >> 1) : e0);
        const int rows8 = OUT == kOutU4 ? 4 * n2 : 8 * n2;  // bytes of 8 rows
        int rsum = 0;
#pragma unroll
        for (int mi = 0; mi < NB1; ++mi)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            // padding rows (zero, not part of the output) lie in the last 16-row tile only (n1 > N1 - 16); the quad
            // exchange below needs every lane, so there they are computed (codes of zeros) and not stored
            const bool pad = mi == NB1 - 1 && mi * 16 + g + 8 * hr >= n1;
            if (!kLeftQuad && pad) continue;
            uint32_t w;
            if constexpr (FAST) {
              w = quant4_fast<OUT>(y[r][mi][0][2 * hr], y[r][mi][0][2 * hr + 1], y[r][mi][1][2 * hr],
                                   y[r][mi][1][2 * hr + 1], mul, rsum);
            } else {
              const int q0 = quant1<QMAX>(y[r][mi][0][2 * hr] * ysc[r], scale);
              const int q1 = quant1<QMAX>(y[r][mi][0][2 * hr + 1] * ysc[r], scale);
              const int q2 = quant1<QMAX>(y[r][mi][1][2 * hr] * ysc[r], scale);
              const int q3 = quant1<QMAX>(y[r][mi][1][2 * hr + 1] * ysc[r], scale);
              if constexpr (OUT == kOutU4) {
                w = (uint32_t)(q0 + 8) | ((uint32_t)(q1 + 8) << 4) | ((uint32_t)(q2 + 8) << 8) |
                    ((uint32_t)(q3 + 8) << 12);
              } else {
                const int z = OUT == kOutS8 ? 0 : 128;
                w = ((uint32_t)(q0 + z) & 0xffu) | (((uint32_t)(q1 + z) & 0xffu) << 8) |
                    (((uint32_t)(q2 + z) & 0xffu) << 16) | (((uint32_t)(q3 + z) & 0xffu) << 24);
                if constexpr (OUT == kOutS8) rsum += q0 + q1 + q2 + q3;
              }
            }
            uint8_t* dst = cbase + (2 * mi + hr) * rows8;
            if constexpr (kLeftQuad) {
              // lane t holds columns (2t, 2t+1, 2t+8, 2t+9); columns 4t .. 4t+3 are the low (t < 2) or high
              // (t >= 2) halves of quad lanes 2t mod 4 and 2t mod 4 + 1: one 4-byte store instead of two 2-byte ones
              const int src = (lane & ~3) | ((2 * t) & 3);
              const uint32_t wa = __shfl_sync(0xffffffffu, w, src);
              const uint32_t wb = __shfl_sync(0xffffffffu, w, src + 1);
              if (!pad) *reinterpret_cast<uint32_t*>(dst) = __byte_perm(wa, wb, t < 2 ? 0x5410 : 0x7632);
            } else if constexpr (LEFT) {
              dst[0] = (uint8_t)w;
              dst[4] = (uint8_t)(w >> 8);
            } else if constexpr (OUT == kOutU4) {
              *reinterpret_cast<uint16_t*>(dst) = (uint16_t)w;
            } else {
              *reinterpret_cast<uint32_t*>(dst) = w;
            }
          }
        if constexpr (OUT == kOutS8) {
          rsum = __reduce_add_sync(0xffffffffu, rsum);
          if (lane == 0) atomicAdd(&s_sum[buf][tb], rsum);
        }
      }
    }
    prev_m0 = m0;
    prev_nt = nt;
  }
  // the block's last round: its scales and sums once every warp has quantized
  __syncthreads();
  if (prev_nt > 0) flush(buf ^ 1);
  cp_async_wait0();
}

struct Plan {
  int n1 = 0, N1 = 0, n2 = 0, had = 0, rmax = 0, TB = 0, nrounds = 0;  // N1: n1 padded to a multiple of 16
  bool left = false;  // Kronecker with the identity as right factor (the LEFT kernel)
  float norm = 1.f;
  size_t smem = 0;
};

bool env_flag(const char* name, bool dflt) {
  const char* s = std::getenv(name);
  if (s == nullptr || s[0] == '\0') return dflt;
  return !(s[0] == '0' && s[1] == '\0');
}
// Environment switches, read once per process: QAAS_ACT_QUANT_FAST=0 error-compensated products (the default
// is plain fp16 products); QAAS_ACT_QUANT_TC=0 scalar kernel only; QAAS_ACT_QUANT_WIDE=1 never the narrow variant.
bool fast_mode() {
  static const bool v = env_flag("QAAS_ACT_QUANT_FAST", true);
  return v;
}
bool tc_enabled() {
  static const bool v = env_flag("QAAS_ACT_QUANT_TC", true);
  return v;
}
bool wide_only() {
  static const bool v = env_flag("QAAS_ACT_QUANT_WIDE", false);
  return v;
}

// Is the tensor-core kernel applicable, and with which shape (variant, TB tokens per round, shared memory)?
// left: the right factor is the identity (no p2): only the narrow variants, FAST mode.
bool make_plan(const at::Tensor& x, int mode, int hb, int n1, int n2, int out, int sms, int smem_optin,
               int smem_per_sm, bool left, Plan& p) {
  if (!tc_enabled() || x.scalar_type() != at::kHalf || (mode != 1 && mode != 2)) return false;
  if (left && (mode != 2 || !fast_mode())) return false;
  if ((reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) != 0) return false;
  const int M = x.size(0), K = x.size(1);
  if (mode == 1) {
    if (hb < 256 || hb > 16384) return false;
    int L = 0;
    while ((1 << L) < hb) ++L;
    p.n2 = 1 << ((L + 1) / 2);  // n1 <= n2: fewer products per element (n2 + 2 n1)
    p.n1 = hb / p.n2;
    p.had = 1;
    p.norm = (float)(1.0 / std::sqrt((double)hb));
  } else {
    if (n2 % 16 || n1 < 16 || n2 < 16 || n1 > 128 || n2 > 128) return false;
    p.n1 = n1;
    p.n2 = n2;
    p.had = 0;
    p.norm = 1.f;
  }
  if (K % (p.n1 * p.n2) != 0) return false;
  p.N1 = (p.n1 + 15) / 16 * 16;
  const int U = (K / (p.n1 * p.n2)) * (p.n2 / 16);  // units per token
  const bool lo = !fast_mode() && !p.had;
  p.left = left;
  // narrow first (two blocks per SM: shared memory of each <= half the SM's), else wide (one block)
  for (int narrow = wide_only() && !left ? 0 : 1; narrow >= (left ? 1 : 0); --narrow) {
    const int rmax = narrow ? rmax_narrow(p.N1) : rmax_wide(p.N1);
    const int slots = kWarps * rmax;
    if (rmax == 0 || U > slots) continue;
    const size_t limit = narrow ? (size_t)smem_per_sm / 2 - 2048 : (size_t)smem_optin - 1024;
    const int blocks = sms * (narrow ? 2 : 1);
    int TB = std::max(1, std::min(std::min(kMaxTB, slots / U), (M + blocks - 1) / blocks));
    while (TB > 1 && smem_bytes(p.N1, p.n1, p.n2, lo, TB, K, left) > limit) --TB;
    if (smem_bytes(p.N1, p.n1, p.n2, lo, TB, K, left) > limit) continue;
    p.rmax = rmax;
    p.TB = TB;
    p.smem = smem_bytes(p.N1, p.n1, p.n2, lo, TB, K, left);
    p.nrounds = (M + TB - 1) / TB;
    return true;
  }
  return false;
}

// Blocks per SM of a kernel at a given dynamic shared memory size (the attribute raised to the device's
// opt-in maximum once per kernel and device), cached.
int blocks_per_sm(const void* fn, int dev, int smem_optin, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(fn, dev, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto raised = cache.find(std::make_tuple(fn, dev, (size_t)0));
  if (raised == cache.end()) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin - 1024));
    cache[std::make_tuple(fn, dev, (size_t)0)] = 0;
  }
  int occ = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, kThreadsTc, smem));
  occ = std::max(occ, 1);
  cache[key] = occ;
  return occ;
}

template <int N1, int RMAX, bool FAST, int OUT, bool LEFT = false>
void launch_tc(const at::Tensor& x, const at::Tensor& clip, const float* p1, const float* p2, const uint4* pfrag,
               const Plan& p, int dev, int sms, int smem_optin, uint8_t* codes, float* scales, int* corr) {
  auto kernel = act_quant_tc_kernel<N1, RMAX, FAST, OUT, LEFT>;
  const int occ = blocks_per_sm(reinterpret_cast<const void*>(kernel), dev, smem_optin, p.smem);
  const int grid = std::max(1, std::min(p.nrounds, sms * occ));
  kernel<<<grid, kThreadsTc, p.smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __half*>(x.data_ptr()), (int)x.size(0), (int)x.size(1), p.n1, p.n2, p.had,
      clip.data_ptr<float>(), p1, p2, pfrag, p.norm, p.TB, p.nrounds, codes, scales, corr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool FAST, int OUT>
void dispatch_tc(const at::Tensor& x, const at::Tensor& clip, const float* p1, const float* p2, const uint4* pfrag,
                 const Plan& p, int dev, int sms, int smem_optin, uint8_t* codes, float* scales, int* corr) {
#define QAAS_TC(N1_, R_)                                                                             \
  if (p.N1 == N1_ && p.rmax == R_) {                                                                 \
    launch_tc<N1_, R_, FAST, OUT>(x, clip, p1, p2, pfrag, p, dev, sms, smem_optin, codes, scales, corr); \
    return;                                                                                          \
  }
#define QAAS_TC_LEFT(N1_)                                                                                          \
  if (p.N1 == N1_ && p.rmax == rmax_narrow(N1_)) {                                                                 \
    launch_tc<N1_, rmax_narrow(N1_), true, OUT, true>(x, clip, p1, nullptr, pfrag, p, dev, sms, smem_optin, codes, \
                                                      scales, corr);                                              \
    return;                                                                                                       \
  }
  if (p.left) {  // make_plan takes the left-only kernel in FAST mode and narrow variants only
    if constexpr (FAST) {
      QAAS_TC_LEFT(16) QAAS_TC_LEFT(32) QAAS_TC_LEFT(48) QAAS_TC_LEFT(64) QAAS_TC_LEFT(80) QAAS_TC_LEFT(96)
    }
    TORCH_CHECK(false, "act_quant: internal error, no left-only kernel for N1 = ", p.N1, ", rmax = ", p.rmax);
  }
  // wide
  QAAS_TC(16, rmax_wide(16)) QAAS_TC(32, rmax_wide(32)) QAAS_TC(48, rmax_wide(48)) QAAS_TC(64, rmax_wide(64))
  QAAS_TC(80, rmax_wide(80)) QAAS_TC(96, rmax_wide(96)) QAAS_TC(112, rmax_wide(112)) QAAS_TC(128, rmax_wide(128))
  // narrow
  QAAS_TC(16, rmax_narrow(16)) QAAS_TC(32, rmax_narrow(32)) QAAS_TC(48, rmax_narrow(48)) QAAS_TC(64, rmax_narrow(64))
  QAAS_TC(80, rmax_narrow(80)) QAAS_TC(96, rmax_narrow(96))
#undef QAAS_TC
#undef QAAS_TC_LEFT
  TORCH_CHECK(false, "act_quant: internal error, no tensor-core kernel for N1 = ", p.N1, ", rmax = ", p.rmax);
}

}  // namespace tc

struct Args {
  const float* p1 = nullptr;
  const float* p2 = nullptr;  // null with left: the right factor is the identity
  int n1 = 0, n2 = 0;
  bool left = false;
};

Args check_args(const char* name, const at::Tensor& x, const at::Tensor& clip, int64_t mode, int64_t hb,
                const c10::optional<at::Tensor>& p1, const c10::optional<at::Tensor>& p2) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), name, ": x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(clip.is_cuda() && clip.numel() == 1 && clip.scalar_type() == at::kFloat,
              name, ": clip must be a float32 CUDA scalar tensor");
  TORCH_CHECK(mode >= 0 && mode <= 2, name, ": mode must be 0 (none), 1 (hadamard) or 2 (kronecker)");
  const int64_t K = x.size(1);
  Args a;
  if (mode == 1) {
    TORCH_CHECK(hb >= 2 && (hb & (hb - 1)) == 0 && K % hb == 0, name,
                ": hadamard block must be a power of two dividing K");
  }
  if (mode == 2) {
    // p2 absent: the right factor is the identity of size K / n1 (left-only Kronecker, FlatQuant's o_proj)
    TORCH_CHECK(p1.has_value(), name, ": kronecker needs p1 (and p2, or none for an identity right factor)");
    TORCH_CHECK(p1->scalar_type() == at::kFloat && p1->is_contiguous() && p1->is_cuda() && p1->dim() == 2 &&
                    p1->size(0) == p1->size(1) && p1->size(0) > 0 && K % p1->size(0) == 0,
                name, ": p1 must be a contiguous float32 CUDA [n1, n1] tensor with n1 dividing K");
    a.n1 = p1->size(0);
    a.p1 = p1->data_ptr<float>();
    if (p2.has_value()) {
      TORCH_CHECK(p2->scalar_type() == at::kFloat && p2->is_contiguous() && p2->is_cuda(), name,
                  ": p2 must be a contiguous float32 CUDA tensor");
      a.n2 = p2->size(0);
      TORCH_CHECK(p2->dim() == 2 && p2->size(1) == a.n2 && (int64_t)a.n1 * a.n2 == K, name,
                  ": p1 [n1,n1], p2 [n2,n2] with n1*n2 == K");
      a.p2 = p2->data_ptr<float>();
    } else {
      a.n2 = (int)(K / a.n1);
      a.left = true;
    }
  }
  return a;
}

struct Device {
  int dev = 0, sms = 0, optin = 0, per_sm = 0;
};

Device device_info() {
  Device d;
  C10_CUDA_CHECK(cudaGetDevice(&d.dev));
  d.sms = current_device_sm_count();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d.dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, d.dev));
  return d;
}

// The tensor-core plan for a transform (mode 1 / 2), or false where the other kernels run. A left-only Kronecker
// the left-only kernel cannot take runs the general kernel with an explicit identity right factor: `b` then holds
// it (kept alive by `eye`).
bool select_tc_plan(const at::Tensor& x, int mode, int hb, const Args& a, int out, const Device& d, tc::Plan& plan,
                    Args& b, at::Tensor& eye) {
  b = a;
  if (tc::make_plan(x, mode, hb, a.n1, a.n2, out, d.sms, d.optin, d.per_sm, a.left, plan)) return true;
  if (!a.left) return false;
  eye = at::eye(a.n2, x.options().dtype(at::kFloat));
  b.p2 = eye.data_ptr<float>();
  b.left = false;
  return tc::make_plan(x, mode, hb, b.n1, b.n2, out, d.sms, d.optin, d.per_sm, false, plan);
}

// Whether a plan's factors are staged with their fp16 residuals (compensated Kronecker), and how many halves they take.
bool plan_lo(const tc::Plan& plan) { return !tc::fast_mode() && !plan.had; }
int64_t plan_frag_halves(const tc::Plan& plan) {
  return (int64_t)tc::frag_halves(plan.N1, plan.n2, plan_lo(plan), plan.left);
}

// The staged factors of a plan in global memory (int16 words holding fp16 bit patterns), as act_quant_fragments_kernel
// builds them.
at::Tensor build_fragments(const at::Tensor& x, const tc::Plan& plan, const Args& b) {
  auto out = at::empty({plan_frag_halves(plan)}, x.options().dtype(at::kShort));
  const int items = std::max(plan.N1, plan.n2) * std::max(plan.N1, plan.n2) / 8;  // (NB^2 tiles x 32 lanes)
  const dim3 grid((unsigned)std::max(1, std::min(64, (items + 255) / 256)), 2);
  tc::act_quant_fragments_kernel<<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      plan.N1, plan.n1, plan.n2, plan.had, plan_lo(plan), plan.left, b.p1, b.p2,
      reinterpret_cast<__half*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// frags: act_quant_fragments for this transform (optional): checked against the plan, which must stage exactly that
// many halves.
const uint4* checked_fragments(const c10::optional<at::Tensor>& frags, const at::Tensor& x, const tc::Plan& plan) {
  if (!frags.has_value() || !frags->defined()) return nullptr;
  const int64_t halves = plan_frag_halves(plan);
  TORCH_CHECK(frags->is_cuda() && frags->device() == x.device() && frags->scalar_type() == at::kShort &&
                  frags->is_contiguous() && frags->numel() == halves &&
                  (reinterpret_cast<uintptr_t>(frags->data_ptr()) & 15) == 0,
              "act_quant: frags must be act_quant_fragments(x, mode, hb, p1, p2) of this transform (", halves,
              " int16 words on x's device)");
  return reinterpret_cast<const uint4*>(frags->data_ptr());
}

template <int OUT>
void run(const at::Tensor& x, const at::Tensor& clip, int mode, int hb, const Args& a,
         const c10::optional<at::Tensor>& frags, uint8_t* codes, float* scales, int* corr) {
  const Device d = device_info();
  if (mode == 0 && tc::tc_enabled() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
      (reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) == 0 && x.size(0) <= INT32_MAX) {
    const int vpt = vec::vpt_for((int)x.size(1));
    if (vpt > 0) {
      if (x.scalar_type() == at::kHalf) vec::launch<at::Half, OUT>(x, clip, vpt, codes, scales, corr);
      else vec::launch<at::BFloat16, OUT>(x, clip, vpt, codes, scales, corr);
      return;
    }
  }
  tc::Plan plan;
  Args b;
  at::Tensor eye;
  if (select_tc_plan(x, mode, hb, a, OUT, d, plan, b, eye)) {  // (false: b has the identity of a left-only a)
    const uint4* pf = checked_fragments(frags, x, plan);
    if (tc::fast_mode())
      tc::dispatch_tc<true, OUT>(x, clip, b.p1, b.p2, pf, plan, d.dev, d.sms, d.optin, codes, scales, corr);
    else
      tc::dispatch_tc<false, OUT>(x, clip, b.p1, b.p2, pf, plan, d.dev, d.sms, d.optin, codes, scales, corr);
    return;
  }
  switch (x.scalar_type()) {
    case at::kHalf: dispatch_scalar<at::Half, OUT>(mode, x, clip, hb, b.p1, b.p2, b.n1, b.n2, codes, scales, corr); break;
    case at::kBFloat16:
      dispatch_scalar<at::BFloat16, OUT>(mode, x, clip, hb, b.p1, b.p2, b.n1, b.n2, codes, scales, corr);
      break;
    case at::kFloat: dispatch_scalar<float, OUT>(mode, x, clip, hb, b.p1, b.p2, b.n1, b.n2, codes, scales, corr); break;
    default: TORCH_CHECK(false, "act_quant: x must be float16, bfloat16 or float32");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> act_quant_cuda(const at::Tensor& x, int64_t bits, const at::Tensor& clip,
                                                  int64_t mode, int64_t hb, const c10::optional<at::Tensor>& p1,
                                                  const c10::optional<at::Tensor>& p2,
                                                  const c10::optional<at::Tensor>& frags) {
  TORCH_CHECK(bits == 8 || bits == 4, "act_quant: bits must be 4 or 8");
  const Args a = check_args("act_quant", x, clip, mode, hb, p1, p2);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(bits == 8 || K % 2 == 0, "act_quant: int4 needs an even row length");
  auto codes = at::empty({M, bits == 8 ? K : K / 2}, x.options().dtype(at::kByte));
  auto scales = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {codes, scales};
  if (bits == 8) run<kOutU8>(x, clip, mode, hb, a, frags, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), nullptr);
  else run<kOutU4>(x, clip, mode, hb, a, frags, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), nullptr);
  return {codes, scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> act_quant_s8_cuda(const at::Tensor& x, const at::Tensor& clip,
                                                                 int64_t mode, int64_t hb,
                                                                 const c10::optional<at::Tensor>& p1,
                                                                 const c10::optional<at::Tensor>& p2,
                                                                 const c10::optional<at::Tensor>& frags) {
  const Args a = check_args("act_quant_s8", x, clip, mode, hb, p1, p2);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  auto codes = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scales = at::empty({M}, x.options().dtype(at::kFloat));
  auto corr = at::empty({M}, x.options().dtype(at::kInt));
  if (M == 0) return {codes, scales, corr};
  run<kOutS8>(x, clip, mode, hb, a, frags, reinterpret_cast<uint8_t*>(codes.data_ptr<int8_t>()),
              scales.data_ptr<float>(), corr.data_ptr<int>());
  return {codes, scales, corr};
}

// The transform's factors staged once as the tensor-core kernel holds them (fp16 fragments, int16 words), for the
// `frags` argument of act_quant / act_quant_s8 on activations like x (same K, dtype and alignment; any number of
// rows): every block then copies them instead of building them from p1 / p2. Empty where that kernel does not
// run for such activations (no transform, bf16 / fp32 input, shapes it does not take). Valid while p1 / p2 are
// unchanged and in the same process (the precision switch QAAS_ACT_QUANT_FAST is read once per process).
at::Tensor act_quant_fragments_cuda(const at::Tensor& x, int64_t mode, int64_t hb, const c10::optional<at::Tensor>& p1,
                                    const c10::optional<at::Tensor>& p2) {
  const at::Tensor clip = at::ones({}, x.options().dtype(at::kFloat));
  const Args a = check_args("act_quant_fragments", x, clip, mode, hb, p1, p2);
  const c10::cuda::CUDAGuard guard(x.device());
  const Device d = device_info();
  tc::Plan plan;
  Args b;
  at::Tensor eye;
  if (mode == 0 || !select_tc_plan(x, mode, hb, a, kOutS8, d, plan, b, eye))
    return at::empty({0}, x.options().dtype(at::kShort));
  return build_fragments(x, plan, b);
}

}  // namespace qaas
