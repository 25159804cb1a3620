// W4A16 decode (1 to 8 tokens, as long as the staged activations fit in 32 KB of shared memory: 3 tokens at K = 4096,
// 1 at K = 11008) over tiled codes with the zero points folded out of the code expansion, on a persistent grid.
// kernels.dispatch launches it with PDL where there are many 16-row tiles per SM (4096 x 11008 on the H200: 8.3-8.4 us
// against 9.7-9.8 for the tiled kernel's best launch, runs v16i-l).
//
// The tiled kernel (w4a16_packed.cu) spends most of its ~160 instructions per warp and 128-k block on the weights'
// expansion (dq_word4: 9 per 32-bit word, 4 of them the zero-point HSUB2 / HFMA2) and on the activations' byte permutes
// (16 per block). Here each block first stages the activations once in shared memory as ready fragment words, the odd
// k scaled by 1/16 (exact in fp16 but for subnormals, see below), together with two fp32 sums per token and 128-k
// block; the weights' magic-number codes then go into the mma unchanged (4 LOP3 + 1 shift per word):
//   even k: (1024 + u) * x          = 1024 x  + u x
//   odd k:  (1024 + 16 u) * (x / 16) = 64 (16 x') + u (16 x'),  x' = x / 16 rounded to fp16 (16 x' = x unless subnormal)
// so an mma chain started at -(C + z S) with C = 1024 E + 64 O, S = E + O (E / O: the 128-k block's even / odd k
// activation sums, odd ones of 16 x') ends at sum_k (u_k - z) x~_k: the zero point costs one FFMA per accumulator
// element instead of one HSUB2 / HFMA2 per code pair. The cancellation of 1024 E happens in the fp32 accumulator
// (|error| ~ 2^-24 * 1024 * sum |x| per block, far under the fp16 output's rounding).
//
// The staging costs a dependent global read and a block barrier before the first mma: paid once per 16-row tile it made
// the kernel slower than the tiled one (v16a), so the grid is persistent (two 16-warp blocks per SM looping over tiles)
// and each warp requests its codes two 128-k blocks ahead across tile boundaries. With only one tile per block (N <=
// 4224 on 132 SMs) it stays slower than the tiled kernel (4096 x 4096: 4.8-4.9 vs 4.2 us with PDL, v16i-l).
//
// Compiled apart for one token and for groups of 128 (v17f): the staged sums' slots then need no token index and the
// metadata index no division test per item, ~40 fewer instructions per warp; with every warp of an SM running that
// code at once, that took 4096 x 11008 from 8.7 to 8.0 us (H200, same run).
//
// Layouts: codes as reference.pack_w4_tiled (1 KB per 16-row x 128-k block, lane-ordered), metadata words as
// reference.pack_w4_meta (fp32 scale, zero point in the 4 low bits). Shared activations [B][KB][q 4][t 4] fragment
// words (as w4::x_frags_shared reads them), sums [KB][8 token slots] of (-C, S), slots past B repeating the last token
// (the columns of lanes past B are computed and never stored, as in the tiled kernel).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "w4a16_common.cuh"

namespace qaas {
namespace w4 {
namespace {

constexpr int kFoldSlots = 8;  // token columns of one m16n8k16 B fragment
// dynamic shared memory without the opt-in attribute: 48 KB less the static reduction buffers (2 x 16 warps x 16 x 8
// fp32)
constexpr size_t kFoldSmemMax = 48 * 1024 - 2 * 16 * 16 * 8 * sizeof(float);

size_t folded_smem_bytes(int B, int K) { return (size_t)B * K * 2 + (size_t)(K / 128) * kFoldSlots * sizeof(float2); }

// The four magic-number half2 pairs of one code word, zero point left in: (1024 + u) for the low nibbles of each byte
// pair (p[0], p[2]: k even) and (1024 + 16 u) for the high ones (p[1], p[3]: k odd), in dq_word4's k-slot order.
__device__ __forceinline__ void magic_word4(uint32_t w, uint32_t (&p)[4]) {
  const uint32_t w8 = w >> 8;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(p[0]) : "r"(w), "n"(0x000F000F), "n"(0x64006400));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(p[1]) : "r"(w), "n"(0x00F000F0), "n"(0x64006400));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(p[2]) : "r"(w8), "n"(0x000F000F), "n"(0x64006400));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(p[3]) : "r"(w8), "n"(0x00F000F0), "n"(0x64006400));
}

__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t h) {
  return __half22float2(*reinterpret_cast<const half2*>(&h));
}

// Stage x [B, K] as fragment words with odd k / 16 into xs, and per token and 128-k block (-(1024 E + 64 O), E + O)
// into sums (token slots past B - 1 repeat token B - 1). One 16-byte slice per thread and pass; the 16 slices of a
// 128-k block are 16 consecutive threads (a half warp), reduced by shuffles. ONE_TOKEN: B == 1, every slot the token's.
template <int THREADS, bool ONE_TOKEN>
__device__ __forceinline__ void stage_folded(const half* __restrict__ x, int B, int KB, uint4* xs, float2* sums) {
  const int total = B * KB * 16;
  const half2 odd_scale = __floats2half2_rn(0.0625f, 0.0625f);
  for (int base = 0; base < total; base += THREADS) {
    const int i = base + (int)threadIdx.x;
    float e = 0.f, o = 0.f;
    if (i < total) {
      // item i = ((b * KB + kb) * 4 + q) * 4 + t holds x[b, 128 kb + 32 t + 8 q .. + 8]
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(x + (size_t)(i >> 4) * 128 + (i & 3) * 32 + ((i >> 2) & 3) * 8));
      uint4 f = x_frag_words(v);  // (x0, x4), (x1, x5), (x2, x6), (x3, x7)
      half2 fy = __hmul2(*reinterpret_cast<const half2*>(&f.y), odd_scale);
      half2 fw = __hmul2(*reinterpret_cast<const half2*>(&f.w), odd_scale);
      f.y = *reinterpret_cast<const uint32_t*>(&fy);
      f.w = *reinterpret_cast<const uint32_t*>(&fw);
      xs[i] = f;
      const float2 ex = half2_bits_to_float2(f.x), ez = half2_bits_to_float2(f.z);
      const float2 oy = __half22float2(fy), ow = __half22float2(fw);
      e = (ex.x + ex.y) + (ez.x + ez.y);
      o = 16.f * ((oy.x + oy.y) + (ow.x + ow.y));  // sums of 16 x', the values the mma actually multiplies
    }
#pragma unroll
    for (int off = 1; off < 16; off <<= 1) {
      e += __shfl_xor_sync(0xffffffffu, e, off);
      o += __shfl_xor_sync(0xffffffffu, o, off);
    }
    // every lane of the half warp holds the sums: lane s (< 8) writes token slot s where that slot shows this token
    const int slot = i & 15;
    if (i < total && slot < kFoldSlots) {
      int b = 0, kb = i >> 4;  // token and 128-k block of item i without a division (B <= 8)
      while (!ONE_TOKEN && kb >= KB) {
        kb -= KB;
        ++b;
      }
      if (ONE_TOKEN || min(slot, B - 1) == b)
        sums[kb * kFoldSlots + slot] = make_float2(-(1024.f * e + 64.f * o), e + o);
    }
  }
}

// One 128-k block of a warp: codes va (row g) / vb (row g + 8) and metadata words mw of 128-k block kb, activations
// from the staged fragments xl (this lane's token row) and sums sl; acc += scale x sum_k (u - z) x~ (rows g: acc[0..1],
// g + 8: acc[2..3]; token columns 2t, 2t + 1).
__device__ __forceinline__ void folded_kblock(const uint4& va, const uint4& vb, const uint2& mw, const uint4* xl,
                                              const float4* sl, int kb, float (&acc)[4]) {
  const float4 cs = sl[kb * 4];  // (-C, S) of token columns 2t and 2t + 1
  const float nza = -(float)(mw.x & 0xFu), nzb = -(float)(mw.y & 0xFu);
  float part[4] = {fmaf(nza, cs.y, cs.x), fmaf(nza, cs.w, cs.z), fmaf(nzb, cs.y, cs.x), fmaf(nzb, cs.w, cs.z)};
  const uint32_t* wa = reinterpret_cast<const uint32_t*>(&va);
  const uint32_t* wb = reinterpret_cast<const uint32_t*>(&vb);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 f = xl[kb * 16 + 4 * q];
    uint32_t pa[4], pb[4];
    magic_word4(wa[q], pa);
    magic_word4(wb[q], pb);
    mma_f16(part, pa[0], pb[0], pa[1], pb[1], f.x, f.y);
    mma_f16(part, pa[2], pb[2], pa[3], pb[3], f.z, f.w);
  }
  const float sa = meta_scale(mw.x), sb = meta_scale(mw.y);
  acc[0] = fmaf(sa, part[0], acc[0]);
  acc[1] = fmaf(sa, part[1], acc[1]);
  acc[2] = fmaf(sb, part[2], acc[2]);
  acc[3] = fmaf(sb, part[3], acc[3]);
}

// The block's reduction of one tile: each warp's partial sums into red (double-buffered by the caller, so one barrier
// per tile suffices: a buffer is rewritten only after the next tile's barrier, which every reader of it has passed),
// then 16 rows x B tokens summed over the warps, bias added, stored.
template <int WARPS>
__device__ __forceinline__ void folded_tile_out(float (&red)[WARPS][16][kFoldSlots], const float (&acc)[4], int warp,
                                                int g, int t, int tile, const half* __restrict__ bias,
                                                half* __restrict__ out, int B, int N) {
  store_partials<1, kFoldSlots>(red[warp], *reinterpret_cast<const float(*)[1][4]>(&acc), g, t);
  __syncthreads();
  if (threadIdx.x < 16 * kFoldSlots) {
    const int r = threadIdx.x / kFoldSlots, b = threadIdx.x % kFoldSlots, n = tile * 16 + r;
    if (b < B && n < N) store_reduced(red, r, b, n, bias, out, N);
  }
}

// Persistent blocks (MINB per SM) over 16-row tiles blockIdx.x, + gridDim.x, ...; the activations staged once per
// block. Warp w takes the 128-k blocks w, w + WARPS, ... of every tile of its block as one sequence of items, whose
// codes and metadata are requested DEPTH items ahead into a register ring, across tile boundaries (the next tile's
// codes are in flight during this tile's last items and its reduction). G: groups per row, kpg: 128-k blocks per group.
template <int WARPS, int DEPTH, int MINB, bool ONE_TOKEN, bool GROUP128>
__global__ void __launch_bounds__(WARPS * 32, MINB)
    w4a16_folded_kernel(const half* __restrict__ x, const uint8_t* __restrict__ qt, const uint2* __restrict__ meta,
                        const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K, int G, int kpg) {
  __shared__ float red[2][WARPS][16][kFoldSlots];
  extern __shared__ uint4 smem[];
  griddep_launch_dependents();
  const int KB = K / 128, tiles = (N + 15) / 16;
  uint4* xs = smem;
  float2* sums = reinterpret_cast<float2*>(smem + (size_t)B * KB * 16);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const uint4* xl = xs + (ONE_TOKEN ? 0 : (size_t)min(g, B - 1) * KB * 16) + t;
  const float4* sl = reinterpret_cast<const float4*>(sums) + t;  // slots 2t, 2t + 1 of block kb at [kb * 4]
  // No integer divisions before the first requests: a warp's sequences end where its load / compute cursors pass the
  // last tile (a grid of one wave: every block has at least one tile).
  uint4 va[DEPTH], vb[DEPTH];
  uint2 mw[DEPTH];
  // the next item to request: tile, 128-k block, its codes (row g; row g + 8 at +32 units) and the tile's metadata
  int load_tile = blockIdx.x, load_kb = warp;
  const uint4* wp = reinterpret_cast<const uint4*>(qt) + ((size_t)load_tile * KB + warp) * 64 + lane;
  const uint2* mp = meta + (size_t)load_tile * G * 8 + g;
  auto load_item = [&](int d) {
    va[d] = __ldg(wp);
    vb[d] = __ldg(wp + 32);
    mw[d] = __ldg(mp + 8 * (GROUP128 ? load_kb : load_kb / kpg));
    load_kb += WARPS;
    wp += WARPS * 64;
    if (load_kb >= KB) {
      load_kb = warp;
      load_tile += gridDim.x;
      wp = reinterpret_cast<const uint4*>(qt) + ((size_t)load_tile * KB + warp) * 64 + lane;
      mp = meta + (size_t)load_tile * G * 8 + g;
    }
  };
  const bool has_items = warp < KB;  // else: no 128-k blocks (K < 128 WARPS), only the tiles' reductions
  if (has_items) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
      if (load_tile < tiles) load_item(d);  // weights and metadata only: nothing the previous kernel writes
  }
  griddep_wait();  // the activations (and the output buffer) may belong to the previous kernel
  stage_folded<WARPS * 32, ONE_TOKEN>(x, B, KB, xs, sums);
  __syncthreads();
  if (!has_items) {
    const float zero[4] = {0.f, 0.f, 0.f, 0.f};
    for (int tile = blockIdx.x, i = 0; tile < tiles; tile += gridDim.x, ++i)
      folded_tile_out<WARPS>(red[i & 1], zero, warp, g, t, tile, bias, out, B, N);
    return;
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int tile = blockIdx.x, kb = warp, done_tiles = 0;
  while (tile < tiles) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      if (tile >= tiles) break;
      folded_kblock(va[d], vb[d], mw[d], xl, sl, kb, acc);
      if (load_tile < tiles) load_item(d);
      kb += WARPS;
      if (kb >= KB) {
        folded_tile_out<WARPS>(red[done_tiles & 1], acc, warp, g, t, tile, bias, out, B, N);
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        kb = warp;
        tile += gridDim.x;
        ++done_tiles;
      }
    }
  }
}

// H200 runs v16a-c (4096 x 11008, 1 token, before the prologue trims of v16h/i): two 16-warp blocks per SM with codes
// requested two 128-k blocks ahead 11.0-11.1 us plain, 8.9-9.0 us with PDL; one ahead 11.3 / 9.6, three ahead (64
// registers) 11.7-11.9 / 9.2-9.3; the same persistent ring without the folding (zero points in the expansion,
// activations from global memory) 11.0 / 9.4; one tile per block (not persistent: the staging paid per tile) 12.3-12.9 /
// 10.8-12.1. v16f: one block of 16 warps per SM with 4 / 6 ahead 9.6 / 10.1; v16k: an L2 prefetch of the next 2 / 4
// items before griddepcontrol.wait 9.6 / 10.4 (vs 8.3); v16l: the tile reduction by shared-memory atomics and a last
// arriving warp instead of the block barrier 9.7 (vs 8.4).
constexpr int kFoldWarps = 16, kFoldDepth = 2, kFoldBlocksPerSM = 2;

template <int WARPS, int DEPTH, int MINB>
void launch_folded(bool pdl, cudaStream_t stream, const half* x, const uint8_t* qt, const uint2* meta, const half* bias,
                   half* out, int B, int N, int K, int G, int kpg) {
  const int blocks = std::min((N + 15) / 16, MINB * current_device_sm_count());  // one wave
  // the common cases compiled apart: one token (the staged sums' slots need no token index) and groups of 128 (the
  // metadata index needs no division test per item)
  auto kernel = B == 1 ? (kpg == 1 ? w4a16_folded_kernel<WARPS, DEPTH, MINB, true, true>
                                   : w4a16_folded_kernel<WARPS, DEPTH, MINB, true, false>)
                       : (kpg == 1 ? w4a16_folded_kernel<WARPS, DEPTH, MINB, false, true>
                                   : w4a16_folded_kernel<WARPS, DEPTH, MINB, false, false>);
  launch_maybe_pdl(kernel, dim3((unsigned)blocks), dim3(WARPS * 32), folded_smem_bytes(B, K), stream, pdl, x, qt, meta,
                   bias, out, B, N, K, G, kpg);
}

}  // namespace

bool launch_folded_decode(bool pdl, cudaStream_t stream, const half* x, const uint8_t* qt, const uint2* meta,
                          const half* bias, half* out, int B, int N, int K, int group_size) {
  if (B < 1 || B > kFoldSlots || folded_smem_bytes(B, K) > kFoldSmemMax) return false;
  launch_folded<kFoldWarps, kFoldDepth, kFoldBlocksPerSM>(pdl, stream, x, qt, meta, bias, out, B, N, K,
                                                          K / group_size, group_size / 128);
  return true;
}

}  // namespace w4
}  // namespace qaas
