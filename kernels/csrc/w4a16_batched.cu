// W4A16 GEMM for batched decode and short prefills (dispatched at 17..128 tokens): int4 codes in the decode kernels'
// tiled order (reference.pack_w4_tiled) with packed per-group metadata words (reference.pack_w4_meta), fp16
// activations, fp16 out.
//
// Why a third W4A16 kernel: the decode kernels (w4a16_packed.cu) give each 16-row tile its own block and read the
// activations of at most 16 tokens per lane straight from global memory; past 16 tokens the dispatcher used to
// dequantise the whole matrix to fp16 and call cuBLAS, which writes and reads 2 bytes per weight and ran at 0.29-0.39x
// of fp16 itself at 32-128 tokens (H200 run v13f), where the GEMM is memory-bound.
//
// Work split: a block owns RB = WR * TW * 16 output rows (WR row warps of TW tiles each) and MT = 8 * NTG tokens
// (grid.z walks token tiles), and one slice of K: the CS blocks of a thread-block cluster (grid.y, cluster dims
// (1, CS, 1)) split the 128-k blocks between them, and within a block WK warps split the slice again (a round: each k
// warp one 128-k block). Each round's activations are copied by cp.async into a ring of kXStages shared stages in
// fragment order, so a warp's 16-byte loads of one token group read 512 contiguous bytes; every warp prefetches its
// next round's codes and metadata words into registers. Each warp keeps TW tiles x MT tokens of fp32 accumulators;
// the activation fragments it reads feed all TW tiles. The partial sums meet in shared memory (WK warps) and then
// across the cluster through distributed shared memory: block rank r of the cluster sums its share of the RB x MT
// outputs over every block's sums, adds the bias and stores fp16. No global workspace, atomics or second launch.
//
// Math per 128-k block and tile as in the decode kernels (w4a16_common.cuh): codes expanded by dq_word4 to exact
// (u - z) in fp16, m16n8k16 products in fp32, the group scale applied in fp32 per 128-k block.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/extension.h>

#include <algorithm>

#include "common.cuh"
#include "w4a16_args.h"
#include "w4a16_common.cuh"

namespace qaas {
namespace {

namespace cg = cooperative_groups;

struct BatchedVariant {
  int ntg, tw, wr, wk, min_blocks;  // token groups of 8, tiles per warp, row warps, k warps, __launch_bounds__ blocks/SM
};
// 0: 32 tokens x 64 rows, 2 x 2 warps; 1: 32 x 128, 4 row warps; 2: 64 tokens x 64 rows, one tile per warp;
// 3: 32 x 64, 4 x 2 warps of one tile (8 warps per block).
constexpr BatchedVariant kBatchedVariants[] = {{4, 2, 2, 2, 3}, {4, 2, 4, 1, 3}, {8, 1, 4, 1, 3}, {4, 1, 4, 2, 2}};
constexpr int kNumBatchedVariants = sizeof(kBatchedVariants) / sizeof(kBatchedVariants[0]);
constexpr int kMaxClusterSplits = 8;  // the portable cluster size

// Row stride of the partial-sum buffer in floats: MT + 8 keeps the float2 stores of store_partials conflict-free.
template <int MT>
constexpr int red_stride() {
  return MT + 8;
}

// Wait until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_pending() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

constexpr int kXStages = 3;  // rounds of activations in flight or in use: two copies ahead of the one computed on

// Shared memory of a block: the activations of kXStages rounds (WK 128-k blocks x MT tokens each, in fragment order: unit
// ((q * MT + token) * 4 + t) holds x[token, 128 kb + 32 t + 8 q .. + 8], so a warp's 16-byte loads of one token group
// and slice q read 512 contiguous bytes), then, after the k loop, the partial sums [WK][RB][S] in the same bytes.
template <int NTG, int TW, int WR, int WK>
constexpr int batched_smem_units() {
  constexpr int MT = NTG * 8, RB = WR * TW * 16;
  constexpr int x_units = kXStages * WK * MT * 16, red_units = WK * RB * red_stride<MT>() / 4;
  return x_units > red_units ? x_units : red_units;
}

template <int NTG, int TW, int WR, int WK, int MINB>
__global__ void __launch_bounds__(WR * WK * 32, MINB) w4a16_batched_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qt, const uint2* __restrict__ meta,
    const half* __restrict__ bias, half* __restrict__ out, int M, int N, int K, int G, int kpg) {
  constexpr int MT = NTG * 8, RB = WR * TW * 16, S = red_stride<MT>(), XU = MT * 16, NTHREADS = WR * WK * 32;
  __shared__ uint4 smem[batched_smem_units<NTG, TW, WR, WK>()];
  cg::cluster_group cluster = cg::this_cluster();
  const int CS = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wr = warp % WR, wk = warp / WR;
  const int g = lane >> 2, t = lane & 3;
  const int KB = K / 128, last_tile = (N - 1) / 16;
  const int m0 = blockIdx.z * MT;
  const int row0 = blockIdx.x * RB;

  const uint4* wbase[TW];
  const uint2* mbase[TW];
#pragma unroll
  for (int tt = 0; tt < TW; ++tt) {
    const int tile = min((row0 >> 4) + wr * TW + tt, last_tile);  // past the last tile: clamped, never stored
    wbase[tt] = reinterpret_cast<const uint4*>(qt) + (size_t)tile * KB * 64 + lane;
    mbase[tt] = meta + (size_t)tile * G * 8 + g;
  }

  float acc[TW][NTG][4];
#pragma unroll
  for (int tt = 0; tt < TW; ++tt)
#pragma unroll
    for (int ng = 0; ng < NTG; ++ng)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[tt][ng][e] = 0.f;

  const int kb_begin = (int)((long)rank * KB / CS), kb_end = (int)((long)(rank + 1) * KB / CS);
  const int rounds = (kb_end - kb_begin + WK - 1) / WK;
  // round r: warp wk takes 128-k block kb_begin + r * WK + wk; the block stages those WK blocks' activations for MT
  // tokens (tokens past M copy the last token: their outputs are never stored, an mma's columns are independent).
  // Each thread copies the same units every round: their sources (from k = 0) and shared offsets are set up once.
  constexpr int kUnitsPerThread = (WK * XU + NTHREADS - 1) / NTHREADS;
  uint32_t src_off[kUnitsPerThread];  // in halves, from x
  int unit_j[kUnitsPerThread];        // the unit's 128-k block within the round (WK: none, past the last unit)
  const uint32_t xs_base = (uint32_t)__cvta_generic_to_shared(smem);
#pragma unroll
  for (int p = 0; p < kUnitsPerThread; ++p) {
    const int i = (int)threadIdx.x + p * NTHREADS;
    const int j = i / XU, u = i % XU, tq = u >> 2, tok = tq % MT, q = tq / MT;
    unit_j[p] = i < WK * XU ? j : WK;
    src_off[p] = (uint32_t)min(m0 + tok, M - 1) * (uint32_t)K + 32u * (u & 3) + 8u * q;
  }
  auto stage = [&](int r) {
    const uint32_t buf = xs_base + (uint32_t)((r % kXStages) * WK * XU * 16);
#pragma unroll
    for (int p = 0; p < kUnitsPerThread; ++p) {
      const int kb = kb_begin + r * WK + unit_j[p];
      if (unit_j[p] < WK && kb < kb_end)
        cp_async16(buf + 16u * ((uint32_t)threadIdx.x + p * NTHREADS), x + src_off[p] + (size_t)kb * 128);
    }
    cp_async_commit();  // (an empty group where nothing was copied: the waits below count groups)
  };
  uint4 na[TW], nb[TW];
  uint2 nm[TW];
  auto load = [&](int kb) {
    const int grp = kpg == 1 ? kb : kb / kpg;
#pragma unroll
    for (int tt = 0; tt < TW; ++tt) {
      na[tt] = __ldg(wbase[tt] + kb * 64);
      nb[tt] = __ldg(wbase[tt] + kb * 64 + 32);
      nm[tt] = __ldg(mbase[tt] + (size_t)grp * 8);
    }
  };
  if (kb_begin + wk < kb_end) load(kb_begin + wk);
#pragma unroll
  for (int r = 0; r < kXStages - 1; ++r) stage(r);
  for (int r = 0; r < rounds; ++r) {
    const int kb = kb_begin + r * WK + wk;
    const bool active = kb < kb_end;
    uint4 ca[TW], cb[TW];
    uint2 cm[TW];
#pragma unroll
    for (int tt = 0; tt < TW; ++tt) {
      ca[tt] = na[tt];
      cb[tt] = nb[tt];
      cm[tt] = nm[tt];
    }
    if (kb + WK < kb_end) load(kb + WK);  // the next 128-k block's codes in flight during this one's math
    cp_async_wait_pending<kXStages - 2>();  // round r's copies landed (the later rounds' may still fly)
    __syncthreads();  // ... for every thread's copies; and round r - 1's buffer is free for round r + kXStages - 1
    stage(r + kXStages - 1);
    if (active) {
      const uint4* xw = smem + (r % kXStages) * WK * XU + wk * XU;
      float part[TW][NTG][4];
#pragma unroll
      for (int tt = 0; tt < TW; ++tt)
#pragma unroll
        for (int ng = 0; ng < NTG; ++ng)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[tt][ng][e] = 0.f;
      uint32_t za[TW], zb[TW], fa[TW], fb[TW];
#pragma unroll
      for (int tt = 0; tt < TW; ++tt) {
        w4::zero_codes<1>(cm[tt].x, za[tt], fa[tt]);
        w4::zero_codes<1>(cm[tt].y, zb[tt], fb[tt]);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t pa[TW][4], pb[TW][4];
#pragma unroll
        for (int tt = 0; tt < TW; ++tt) {
          w4::dq_word4(reinterpret_cast<const uint32_t*>(&ca[tt])[q], za[tt], fa[tt], pa[tt]);
          w4::dq_word4(reinterpret_cast<const uint32_t*>(&cb[tt])[q], zb[tt], fb[tt], pb[tt]);
        }
#pragma unroll
        for (int ng = 0; ng < NTG; ++ng) {
          const uint4 f = w4::x_frag_words(xw[(q * MT + ng * 8 + g) * 4 + t]);
#pragma unroll
          for (int tt = 0; tt < TW; ++tt) {
            w4::mma_f16(part[tt][ng], pa[tt][0], pb[tt][0], pa[tt][1], pb[tt][1], f.x, f.y);
            w4::mma_f16(part[tt][ng], pa[tt][2], pb[tt][2], pa[tt][3], pb[tt][3], f.z, f.w);
          }
        }
      }
#pragma unroll
      for (int tt = 0; tt < TW; ++tt)
        w4::accumulate_scaled<NTG>(acc[tt], part[tt], w4::meta_scale(cm[tt].x), w4::meta_scale(cm[tt].y));
    }
  }
  cp_async_wait_pending<0>();
  __syncthreads();  // the buffers become the partial sums

  // partials of the WK warps: c0 (row g, token 2t), c1 (row g, token 2t + 1), c2 / c3 the same for row g + 8
  float(*red)[RB][S] = reinterpret_cast<float(*)[RB][S]>(smem);
#pragma unroll
  for (int tt = 0; tt < TW; ++tt) {
    const int r = (wr * TW + tt) * 16 + g;
#pragma unroll
    for (int ng = 0; ng < NTG; ++ng) {
      *reinterpret_cast<float2*>(&red[wk][r][ng * 8 + 2 * t]) = make_float2(acc[tt][ng][0], acc[tt][ng][1]);
      *reinterpret_cast<float2*>(&red[wk][r + 8][ng * 8 + 2 * t]) = make_float2(acc[tt][ng][2], acc[tt][ng][3]);
    }
  }
  if constexpr (WK > 1) {  // the block's own sum first, so the cluster exchange reads one copy per block
    __syncthreads();
    for (int i = threadIdx.x; i < RB * MT; i += NTHREADS) {
      const int r = i / MT, b = i % MT;
      float v = red[0][r][b];
#pragma unroll
      for (int w = 1; w < WK; ++w) v += red[w][r][b];
      red[0][r][b] = v;
    }
  }
  cluster.sync();  // every block's sums written (and visible across the cluster)
  // this rank's share of the RB x MT outputs in 4-token quads: consecutive threads on consecutive rows (the fp16
  // stores of a warp cover 32 consecutive outputs of a token), one 16-byte read per block of the cluster
  constexpr int Q = RB * MT / 4;
  const int q_begin = rank * Q / CS, q_end = (rank + 1) * Q / CS;
  for (int i = q_begin + (int)threadIdx.x; i < q_end; i += NTHREADS) {
    const int r = i % RB, b = 4 * (i / RB);
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int c = 0; c < CS; ++c) {
      const float4 p = *reinterpret_cast<const float4*>(cluster.map_shared_rank(&red[0][r][b], c));
      v.x += p.x, v.y += p.y, v.z += p.z, v.w += p.w;
    }
    const int n = row0 + r;
    if (n < N) {
      const float bn = bias ? __half2float(bias[n]) : 0.f;
      const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (m0 + b + e < M) out[(size_t)(m0 + b + e) * N + n] = __float2half(vals[e] + bn);
    }
  }
  cluster.sync();  // no block leaves while another still reads its shared memory
}

template <int NTG, int TW, int WR, int WK, int MINB>
void launch_batched(int splits, int sms, cudaStream_t stream, const half* x, const uint8_t* qt, const uint2* meta,
                    const half* bias, half* out, int M, int N, int K, int group_size) {
  constexpr int MT = NTG * 8, RB = WR * TW * 16;
  const int row_blocks = (N + RB - 1) / RB, token_tiles = (M + MT - 1) / MT;
  int cs = splits;
  if (cs <= 0) {
    // the most splits (powers of two) that keep the grid within ~87% of one wave of the occupancy: H200 run v13c, variant
    // 1 (3 blocks per SM), 32-256 tokens on the three 7B shapes, chose within 7% of the best fixed split everywhere (a
    // second wave, or more splits' shorter k loops, cost more than the idle SMs)
    const long base = (long)row_blocks * token_tiles, slots100 = 87L * sms * MINB;
    cs = 1;
    while (cs * 2 <= kMaxClusterSplits && base * cs * 2 * 100 <= slots100) cs *= 2;
  }
  cs = std::max(1, std::min(cs, kMaxClusterSplits));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)row_blocks, (unsigned)cs, (unsigned)token_tiles);
  cfg.blockDim = dim3(WR * WK * 32);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute la[1];
  la[0].id = cudaLaunchAttributeClusterDimension;
  la[0].val.clusterDim.x = 1;
  la[0].val.clusterDim.y = (unsigned)cs;
  la[0].val.clusterDim.z = 1;
  cfg.attrs = la;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, w4a16_batched_kernel<NTG, TW, WR, WK, MINB>, x, qt, meta, bias, out, M, N,
                                    K, K / group_size, group_size / 128));
}

// The variant for M tokens where the caller passes -1.
int default_batched_variant(int64_t) { return 1; }

}  // namespace

int64_t w4a16_batched_num_variants() { return kNumBatchedVariants; }

// x [M, K] fp16 times the tiled codes qt ([ceil(n/16) * 16, K/2], reference.pack_w4_tiled) with packed metadata
// (reference.pack_w4_meta), + bias; variant -1: by M; splits: blocks per cluster splitting K (-1: by occupancy).
at::Tensor w4a16_gemm_batched_cuda(const at::Tensor& x, const at::Tensor& qt, const at::Tensor& meta,
                                   int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t n,
                                   int64_t variant, int64_t splits) {
  TORCH_CHECK(x.dim() == 2 && qt.dim() == 2, "w4a16_batched: x and qt must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = n;
  TORCH_CHECK(N > 0 && qt.is_cuda() && qt.scalar_type() == at::kByte && qt.is_contiguous() &&
                  qt.size(0) == (N + 15) / 16 * 16 && qt.size(1) * 2 == K,
              "w4a16_batched: qt must be a contiguous uint8 CUDA tensor [ceil(n/16) * 16, K/2] (pack_w4_tiled)");
  TORCH_CHECK(variant >= -1 && variant < kNumBatchedVariants, "w4a16_batched: variant must be -1..",
              kNumBatchedVariants - 1);
  TORCH_CHECK(splits == -1 || (splits >= 1 && splits <= kMaxClusterSplits), "w4a16_batched: splits must be -1 or 1..",
              kMaxClusterSplits);
  TORCH_CHECK(M * K < (int64_t(1) << 32), "w4a16_batched: M * K too large for 32-bit activation offsets");
  const half* bp = w4::check_packed_args("w4a16_batched", x, qt, meta, group_size, bias, N, M);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const int v = variant < 0 ? default_batched_variant(M) : (int)variant;
  const int sms = current_device_sm_count();  // x's device: the guard above made it current
  auto stream = c10::cuda::getCurrentCUDAStream();
  const half* xp = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  const uint2* mp = reinterpret_cast<const uint2*>(meta.data_ptr<int32_t>());
  half* op = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  const uint8_t* qp = qt.data_ptr<uint8_t>();
  const int s = (int)splits, m = (int)M, nn = (int)N, k = (int)K, gs = (int)group_size;
  switch (v) {
    case 0: launch_batched<4, 2, 2, 2, 3>(s, sms, stream, xp, qp, mp, bp, op, m, nn, k, gs); break;
    case 1: launch_batched<4, 2, 4, 1, 3>(s, sms, stream, xp, qp, mp, bp, op, m, nn, k, gs); break;
    case 2: launch_batched<8, 1, 4, 1, 3>(s, sms, stream, xp, qp, mp, bp, op, m, nn, k, gs); break;
    default: launch_batched<4, 1, 4, 2, 2>(s, sms, stream, xp, qp, mp, bp, op, m, nn, k, gs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qaas
