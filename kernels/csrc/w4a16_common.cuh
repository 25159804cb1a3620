// Device helpers shared by the W4A16 tensor-core decode kernels (w4a16.cu, w4a16_stream.cu).
//
// Fragment convention (mma.sync m16n8k16, f16 x f16 -> f32): for a 16-row x 128-k weight block, lane
// (g = lane / 4, t = lane % 4) holds the 16 bytes (32 codes) of rows g and g + 8 at k = 32 t .. 32 t + 31.
// The mma k-slots are assigned to the data each lane already holds (the k order inside an mma is free as
// long as A and B agree): per 32-bit word of codes, shift s in {0, 4, 8, 12} yields the half2 pair
// (e_{s/4}, e_{4+s/4}) via the 0x6400 magic number, and the activation fragment takes the same pairs with
// one byte-permute. (u - z) is exact in fp16; products accumulate in fp32.
#pragma once

#include <utility>

#include "common.cuh"

namespace qaas {
namespace w4 {

// Two codes of one 32-bit word (nibbles at `shift` and `shift + 16`) minus the zero point, as half2.
// z2 holds (1024 + z) twice: 0x6400 | u is the fp16 value 1024 + u, so the subtraction is exact.
__device__ __forceinline__ uint32_t dq_pair(uint32_t w, int shift, uint32_t z2) {
  const uint32_t h = ((w >> shift) & 0x000F000Fu) | 0x64006400u;
  const half2 r = __hsub2(*reinterpret_cast<const half2*>(&h), *reinterpret_cast<const half2*>(&z2));
  return *reinterpret_cast<const uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t zero_pair(float zero) {
  const half2 z2 = __float2half2_rn(1024.f + zero);
  return *reinterpret_cast<const uint32_t*>(&z2);
}

// Programmatic dependent launch (sm_90): wait for the previous kernel in the stream (its writes visible), and
// let the next one launch. Both are no-ops for a kernel launched without the programmatic attribute.
__device__ __forceinline__ void griddep_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void griddep_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

__device__ __forceinline__ void mma_f16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 128-k block of a 16-row tile for NT groups of 8 tokens: codes va (row g) / vb (row g + 8), zero
// pairs za / zb; x points at token 0 of the activations [B, K]; part[nt] receives the fp32 dot products
// (C fragment: c0 (row g, token 2t), c1 (row g, token 2t+1), c2 / c3 the same for row g + 8).
// X_SHARED: x points into shared memory (plain loads) instead of global memory (read-only cache loads).
template <int NT, bool X_SHARED = false>
__device__ __forceinline__ void kblock_mma(const uint4& va, const uint4& vb, uint32_t za, uint32_t zb,
                                           const half* __restrict__ x, int B, int K, int kb, int g, int t,
                                           float (&part)[NT][4]) {
  uint4 xv[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = nt * 8 + g;
#pragma unroll
    for (int e = 0; e < 4; ++e) part[nt][e] = 0.f;
    const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)b * K + kb * 128 + t * 32);
#pragma unroll
    for (int q = 0; q < 4; ++q)
      xv[nt][q] = b < B ? (X_SHARED ? xp[q] : __ldg(xp + q)) : make_uint4(0u, 0u, 0u, 0u);
  }
  const uint32_t* wa = reinterpret_cast<const uint32_t*>(&va);
  const uint32_t* wb = reinterpret_cast<const uint32_t*>(&vb);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      const uint32_t a0 = dq_pair(wa[q], 8 * sub, za);
      const uint32_t a2 = dq_pair(wa[q], 8 * sub + 4, za);
      const uint32_t a1 = dq_pair(wb[q], 8 * sub, zb);
      const uint32_t a3 = dq_pair(wb[q], 8 * sub + 4, zb);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[nt][q]);
        const uint32_t b0 = __byte_perm(xw[sub], xw[sub + 2], 0x5410);
        const uint32_t b1 = __byte_perm(xw[sub], xw[sub + 2], 0x7632);
        mma_f16(part[nt], a0, a1, a2, a3, b0, b1);
      }
    }
  }
}

// All four half2 pairs of one 32-bit code word, (e_{s/4}, e_{4+s/4}) for s = 0, 4, 8, 12 as dq_pair, in 9
// instructions instead of 12: nibbles at s = 4 and 12 are masked in place (no shift), giving 1024 + 16 u, and
// one HFMA2 by 1/16 minus (64 + z) yields u - z exactly. zsub: (1024 + z) twice (zero_pair); zfma: -(64 + z) twice
// (zero_fma_pair).
__device__ __forceinline__ void dq_word4(uint32_t w, uint32_t zsub, uint32_t zfma, uint32_t (&p)[4]) {
  const uint32_t w8 = w >> 8;
  const half2 sixteenth = __float2half2_rn(0.0625f);
  const half2 zs = *reinterpret_cast<const half2*>(&zsub);
  const half2 zf = *reinterpret_cast<const half2*>(&zfma);
  uint32_t h[4];
  // (w & mask) | 0x64006400 as one LOP3 each (written as C, ptxas splits it into an AND and an OR)
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(h[0]) : "r"(w), "n"(0x000F000F), "n"(0x64006400));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(h[1]) : "r"(w), "n"(0x00F000F0), "n"(0x64006400));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(h[2]) : "r"(w8), "n"(0x000F000F), "n"(0x64006400));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(h[3]) : "r"(w8), "n"(0x00F000F0), "n"(0x64006400));
  half2 r[4];
  r[0] = __hsub2(*reinterpret_cast<const half2*>(&h[0]), zs);
  r[1] = __hfma2(*reinterpret_cast<const half2*>(&h[1]), sixteenth, zf);
  r[2] = __hsub2(*reinterpret_cast<const half2*>(&h[2]), zs);
  r[3] = __hfma2(*reinterpret_cast<const half2*>(&h[3]), sixteenth, zf);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = *reinterpret_cast<const uint32_t*>(&r[i]);
}

// -(64 + z) twice as half2 for an integer zero point 0 <= z < 16: exponent of 64, mantissa z << 4, sign set.
__device__ __forceinline__ uint32_t zero_fma_pair_code(uint32_t z) {
  const uint32_t h = 0xD400u | (z << 4);
  return h | (h << 16);
}

// (1024 + z) twice as half2 for an integer zero point z in 0..15 (0x6400 is 1024.0 in fp16).
__device__ __forceinline__ uint32_t zero_pair_code(uint32_t z) {
  const uint32_t h = 0x6400u | z;
  return h | (h << 16);
}

// The zero-point operands of dq_word4 from a metadata word (z = its 4 low bits): zsub = (1024 + z) twice, zfma =
// -(64 + z) twice. NT == 1: one IMAD each (the bit fields do not overlap, so adding is or-ing): with the 1-token
// activation addressing of w4a16_packed.cu, 1-token blocks issue ~20% fewer instructions per 128-k block (H200 run
// v10c: 5.8 -> 5.5 us at 4096^2, 11.6 -> 10.9 us at 11008x4096). NT == 2: shifts and ors (integer pipe), as before:
// the IMAD form (and the unpredicated loads) made 16 tokens ~7-11% slower in the same run (the FMA pipe, already
// carrying the HFMA2 and the accumulation, is the likely reason; not profiled).
template <int NT>
__device__ __forceinline__ void zero_codes(uint32_t word, uint32_t& zsub, uint32_t& zfma) {
  const uint32_t z = word & 0xFu;
  if constexpr (NT == 1) {
    zsub = z * 0x00010001u + 0x64006400u;
    zfma = z * 0x00100010u + 0xD400D400u;
  } else {
    zsub = zero_pair_code(z);
    zfma = zero_fma_pair_code(z);
  }
}

// The scale of a packed metadata word (w4a16_packed.cu, w4a16_batched.cu, w4a16_folded.cu; reference.pack_w4_meta:
// the fp32 scale with its 4 low bits replaced by the zero point).
__device__ __forceinline__ float meta_scale(uint32_t word) { return __uint_as_float(word & ~0xFu); }

// The activation B fragments of one 128-k block for lane (g, t), token b: per 8-k slice q the four words
// {b0, b1} of sub 0 and of sub 1, as kblock_mma builds them with byte permutes from the 16 bytes at
// k = 128 kb + 32 t + 8 q.
__device__ __forceinline__ uint4 x_frag_words(const uint4& xv) {
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv);
  return make_uint4(__byte_perm(xw[0], xw[2], 0x5410), __byte_perm(xw[0], xw[2], 0x7632),
                    __byte_perm(xw[1], xw[3], 0x5410), __byte_perm(xw[1], xw[3], 0x7632));
}

// The raw 16-byte activation slices of one 128-k block from global memory (tokens b >= B are zero); the
// byte permutes are left to kblock_mma_w4<NT, false> (applied per slice there: fewer live registers).
template <int NT>
__device__ __forceinline__ void x_frags_global(const half* __restrict__ x, int B, int K, int kb, int g, int t,
                                               uint4 (&bf)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = nt * 8 + g;
    const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)b * K + kb * 128 + t * 32);
#pragma unroll
    for (int q = 0; q < 4; ++q) bf[nt][q] = b < B ? __ldg(xp + q) : make_uint4(0u, 0u, 0u, 0u);
  }
}

// Fragments of one 128-k block from the block's shared copy, laid out [B][KB][q][t] (x_frag_words already
// applied): four 16-byte loads per token group, consecutive lanes t on consecutive 16 bytes.
template <int NT>
__device__ __forceinline__ void x_frags_shared(const uint4* xs, int B, int KB, int kb, int g, int t,
                                               uint4 (&bf)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int b = nt * 8 + g;
    const uint4* xp = xs + ((size_t)b * KB + kb) * 16 + t;
#pragma unroll
    for (int q = 0; q < 4; ++q) bf[nt][q] = b < B ? xp[4 * q] : make_uint4(0u, 0u, 0u, 0u);
  }
}

// One 128-k block of a 16-row tile (as kblock_mma) with dq_word4 code expansion: the packed-metadata kernel.
// fa / fb: the -(64 + z) pairs of rows g / g + 8 (zero_fma_pair_code, or its one-IMAD form: w4a16_packed.cu
// zero_codes). PERMUTED: bf holds fragment words (x_frags_shared), else raw
// slices (x_frags_global).
template <int NT, bool PERMUTED>
__device__ __forceinline__ void kblock_mma_w4(const uint4& va, const uint4& vb, uint32_t za, uint32_t zb, uint32_t fa,
                                              uint32_t fb, const uint4 (&bf)[NT][4], float (&part)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) part[nt][e] = 0.f;
  const uint32_t* wa = reinterpret_cast<const uint32_t*>(&va);
  const uint32_t* wb = reinterpret_cast<const uint32_t*>(&vb);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t pa[4], pb[4];
    dq_word4(wa[q], za, fa, pa);
    dq_word4(wb[q], zb, fb, pb);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint4 f = PERMUTED ? bf[nt][q] : x_frag_words(bf[nt][q]);
      mma_f16(part[nt], pa[0], pb[0], pa[1], pb[1], f.x, f.y);
      mma_f16(part[nt], pa[2], pb[2], pa[3], pb[3], f.z, f.w);
    }
  }
}

// acc += group scale x part (rows g: sa, g + 8: sb), in fp32.
template <int NT>
__device__ __forceinline__ void accumulate_scaled(float (&acc)[NT][4], const float (&part)[NT][4], float sa, float sb) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    acc[nt][0] = fmaf(sa, part[nt][0], acc[nt][0]);
    acc[nt][1] = fmaf(sa, part[nt][1], acc[nt][1]);
    acc[nt][2] = fmaf(sb, part[nt][2], acc[nt][2]);
    acc[nt][3] = fmaf(sb, part[nt][3], acc[nt][3]);
  }
}

// A warp's C fragments into its [16 rows][C tokens] slice of the cross-warp reduction buffer:
// c0 (row g, token 2t), c1 (row g, token 2t+1), c2 (row g+8, token 2t), c3 (row g+8, token 2t+1).
template <int NT, int C>
__device__ __forceinline__ void store_partials(float (&redw)[16][C], const float (&acc)[NT][4], int g, int t) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    redw[g][nt * 8 + 2 * t] = acc[nt][0];
    redw[g][nt * 8 + 2 * t + 1] = acc[nt][1];
    redw[g + 8][nt * 8 + 2 * t] = acc[nt][2];
    redw[g + 8][nt * 8 + 2 * t + 1] = acc[nt][3];
  }
}

// Output (row r, token b) = output feature n of a tile: the warps' partial sums red[w][r][b] added up, plus the bias.
template <int WARPS, int ROWS, int C>
__device__ __forceinline__ void store_reduced(const float (&red)[WARPS][ROWS][C], int r, int b, int n,
                                              const half* __restrict__ bias, half* __restrict__ out, int N) {
  float v = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) v += red[w][r][b];
  if (bias) v += __half2float(bias[n]);
  out[(size_t)b * N + n] = __float2half(v);
}

// After the block barrier: outputs (row r, token b) of the rows n0 .. n0 + ROWS - 1 past a block's reduction buffer (the
// warps' partial sums added up and the bias added by store_reduced), thread i taking entries i, i + blockDim.x, ...
template <int WARPS, int ROWS, int C>
__device__ __forceinline__ void store_tile_outputs(const float (&red)[WARPS][ROWS][C], int n0, int B, int N,
                                                   const half* __restrict__ bias, half* __restrict__ out) {
  for (int i = threadIdx.x; i < ROWS * C; i += blockDim.x) {
    const int r = i / C, b = i % C;
    const int n = n0 + r;
    if (b < B && n < N) store_reduced(red, r, b, n, bias, out, N);
  }
}

// Launch `kernel` with the given shape on `stream`, with programmatic dependent launch when `pdl` (the kernel may
// then start while the previous kernel in the stream drains; it must griddep_wait before touching that kernel's data).
template <typename... Params, typename... Args>
void launch_maybe_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                      Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute la[1];
  la[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  la[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = la;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

// Launch the folded-zero-point decode kernel over tiled codes (w4a16_folded.cu: a persistent grid of two 16-warp blocks
// per SM, codes requested two 128-k blocks ahead), with programmatic dependent launch when pdl; false where it does not
// apply (more than 8 tokens, or the staged activations past its 32 KB of shared memory): the caller then launches the
// tiled kernel.
bool launch_folded_decode(bool pdl, cudaStream_t stream, const half* x, const uint8_t* qt, const uint2* meta,
                          const half* bias, half* out, int B, int N, int K, int group_size);

// Launch a W4A16 decode kernel through the streaming (bulk-copy) path; false when the shape, alignment
// or shared-memory budget does not allow it (the caller then uses the register-streaming kernel).
// bulk: TMA bulk copies (else 16-byte cp.async); pdl: launch with programmatic dependent launch (the weight
// copies are issued before waiting for the previous kernel in the stream; the activations are read after).
bool launch_stream_decode(int nt_groups, bool bulk, bool pdl, cudaStream_t stream, const half* x, const uint8_t* qw,
                          const float* scale, const float* zero, const half* bias, half* out, int B, int N, int K,
                          int group_size);

}  // namespace w4
}  // namespace qaas
