// W4A16 GEMM for batched decode and short prefills (17..128 tokens as dispatched): int4 codes in the decode kernels'
// tiled order (reference.pack_w4_tiled) with packed per-group metadata words (reference.pack_w4_meta), fp16
// activations, fp16 out.
//
// Why a third W4A16 kernel: the decode kernels (w4a16_packed.cu) give each 16-row tile its own block and read the
// activations of at most 16 tokens per lane straight from global memory; past 16 tokens the dispatcher used to
// dequantise the whole matrix to fp16 and call cuBLAS, which writes and reads 2 bytes per weight and so runs at about
// a third of the speed of fp16 itself while the GEMM is memory-bound (tens to a few hundred tokens).
//
// Work split: a block owns RB = WR * TW * 16 output rows (WR row warps of TW tiles each) and MT = 8 * NTG tokens
// (grid.z walks token tiles), and one slice of K: the CS blocks of a thread-block cluster (grid.y, cluster dims
// (1, CS, 1)) split the 128-k blocks between them, and within a block WK warps split the slice again (a round: each
// k warp one 128-k block). Every round's codes, metadata words and activations are copied into a ring of kStages
// shared-memory stages by cp.async, kStages - 1 rounds ahead of the math (run v13d: with the codes prefetched one
// round ahead in registers, each warp waited out a DRAM round trip per round). Each warp keeps TW tiles x MT tokens of
// fp32 accumulators; the activation fragments it reads feed all TW tiles. The partial sums meet in shared memory (WK
// warps) and then across the cluster through distributed shared memory: block rank r of the cluster sums its share of
// the RB x MT outputs over every block's sums, adds the bias and stores fp16. No global workspace, atomics or second
// launch.
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
  int ntg, tw, wr, wk;  // token groups of 8, tiles per warp, row warps, k warps
};
// 0: 32 tokens x 128 rows, 4 warps of 2 tiles (dispatched); 1: 32 x 64, 2 x 2 warps of 2 tiles; 2: 32 x 64, 4 x 2
// warps of one tile (8 warps per block).
constexpr BatchedVariant kBatchedVariants[] = {{4, 2, 4, 1}, {4, 2, 2, 2}, {4, 1, 4, 2}};
constexpr int kNumBatchedVariants = sizeof(kBatchedVariants) / sizeof(kBatchedVariants[0]);
constexpr int kMaxClusterSplits = 8;  // the portable cluster size
constexpr int kStages = 4;            // shared-memory rounds: three in flight while the fourth is computed on
constexpr int kMinBlocks = 3;         // blocks per SM (__launch_bounds__: 168 registers)

__device__ __forceinline__ void zero_operands(uint32_t word, uint32_t& zsub, uint32_t& zfma) {
  const uint32_t z = word & 0xFu;  // (1024 + z) and -(64 + z) twice, as w4a16_packed.cu's one-IMAD form
  zsub = z * 0x00010001u + 0x64006400u;
  zfma = z * 0x00100010u + 0xD400D400u;
}

__device__ __forceinline__ float meta_scale_of(uint32_t word) { return __uint_as_float(word & ~0xFu); }

// Wait until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_pending() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Shapes of one configuration, in 16-byte units. A stage holds one round: for each of the WK 128-k blocks the
// activations (XU units, fragment order: unit (q * MT + token) * 4 + t holds x[token, 128 kb + 32 t + 8 q .. + 8], so a
// warp's loads of one token group and slice q read 512 contiguous bytes), then the tiles' codes (1 KB each, the tiled
// order as in global memory), then their metadata words (64 bytes each). After the k loop the same bytes hold the
// partial sums [WK][RB][S] floats (S = MT + 8 keeps the float2 stores conflict-free).
template <int NTG, int TW, int WR, int WK>
struct BatchedShape {
  static constexpr int MT = NTG * 8, TILES = WR * TW, RB = TILES * 16, S = MT + 8, THREADS = WR * WK * 32;
  static constexpr int XU = MT * 16, WU = TILES * 64, MU = TILES * 4;
  static constexpr int STAGE = WK * (XU + WU + MU);
  static constexpr int RED = WK * RB * S / 4;
  static constexpr int UNITS = kStages * STAGE > RED ? kStages * STAGE : RED;
  static constexpr size_t BYTES = (size_t)UNITS * 16;
  // the staging loops below give each thread fixed tokens / code units across its copies
  static_assert(THREADS % (4 * MT) == 0 && THREADS % 64 == 0 && WK * MU <= THREADS && (TILES & (TILES - 1)) == 0,
                "unsupported batched W4A16 configuration");
};

template <int NTG, int TW, int WR, int WK>
__global__ void __launch_bounds__(WR * WK * 32, kMinBlocks) w4a16_batched_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qt, const uint2* __restrict__ meta,
    const half* __restrict__ bias, half* __restrict__ out, int M, int N, int K, int G, int kpg) {
  using Sh = BatchedShape<NTG, TW, WR, WK>;
  constexpr int MT = Sh::MT, RB = Sh::RB, S = Sh::S, XU = Sh::XU, WU = Sh::WU, MU = Sh::MU, NTHREADS = Sh::THREADS;
  constexpr int TILES = Sh::TILES;
  extern __shared__ uint4 smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int CS = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wr = warp % WR, wk = warp / WR;
  const int g = lane >> 2, t = lane & 3;
  const int KB = K / 128, last_tile = (N - 1) / 16;
  const int m0 = blockIdx.z * MT;
  const int row0 = blockIdx.x * RB, tile0 = row0 >> 4;
  const int kb_begin = (int)((long)rank * KB / CS), kb_end = (int)((long)(rank + 1) * KB / CS);
  const int rounds = (kb_end - kb_begin + WK - 1) / WK;
  const uint32_t smem_base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint4* xg = reinterpret_cast<const uint4*>(x);
  const uint4* wg = reinterpret_cast<const uint4*>(qt);
  const uint4* mg = reinterpret_cast<const uint4*>(meta);  // 16-byte aligned (checked on the host)

  // this thread's copies per round. Activations: unit i = tid + p * NTHREADS of the stage; token and t are fixed by tid
  // (tokens past M copy the last token: their outputs are never stored, an mma's columns are independent).
  const uint32_t x_row = (uint32_t)min(m0 + ((tid >> 2) % MT), M - 1) * (uint32_t)(K / 8) + 4u * (tid & 3);
  const int x_q0 = (tid >> 2) / MT;  // + p * NTHREADS / (4 MT): (j, q) = (qq / 4, qq % 4)
  // codes: unit tid & 63 of tile (tid >> 6) + p * NTHREADS / 64 (modulo TILES; the quotient is the k warp j)
  // metadata: threads tid < WK * MU copy unit tid & 3 of tile (tid % MU) / 4 for k warp tid / MU
  auto stage = [&](int r) {
    const uint32_t base = smem_base + (uint32_t)((r % kStages) * Sh::STAGE) * 16u;
    const int kb0 = kb_begin + r * WK;
#pragma unroll
    for (int p = 0; p < WK * XU / NTHREADS; ++p) {
      const int qq = x_q0 + p * (NTHREADS / (4 * MT));
      const int kb = kb0 + (qq >> 2);
      if (kb < kb_end) cp_async16(base + 16u * (tid + p * NTHREADS), xg + x_row + (qq & 3) + (size_t)kb * 16);
    }
#pragma unroll
    for (int p = 0; p < WK * WU / NTHREADS; ++p) {
      const int ii = (tid >> 6) + p * (NTHREADS / 64), j = ii / TILES, tl = ii % TILES;
      const int kb = kb0 + j;
      if (kb < kb_end) {
        const size_t src = ((size_t)min(tile0 + tl, last_tile) * KB + kb) * 64 + (tid & 63);
        cp_async16(base + 16u * (WK * XU + tid + p * NTHREADS), wg + src);
      }
    }
    if (tid < WK * MU) {
      const int j = tid / MU, tl = (tid % MU) >> 2, kb = kb0 + j;
      if (kb < kb_end) {
        const int grp = kpg == 1 ? kb : kb / kpg;
        const size_t src = ((size_t)min(tile0 + tl, last_tile) * G + grp) * 4 + (tid & 3);
        cp_async16(base + 16u * (WK * (XU + WU) + tid), mg + src);
      }
    }
    cp_async_commit();  // (an empty group where nothing was copied: the waits count groups)
  };

  float acc[TW][NTG][4];
#pragma unroll
  for (int tt = 0; tt < TW; ++tt)
#pragma unroll
    for (int ng = 0; ng < NTG; ++ng)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[tt][ng][e] = 0.f;

#pragma unroll
  for (int r = 0; r < kStages - 1; ++r) stage(r);
  for (int r = 0; r < rounds; ++r) {
    cp_async_wait_pending<kStages - 2>();  // round r's copies landed (the later rounds' may still fly)
    __syncthreads();  // ... for every thread's copies; and round r - 1's stage is free for round r + kStages - 1
    stage(r + kStages - 1);
    if (kb_begin + r * WK + wk < kb_end) {
      const uint4* st = smem + (r % kStages) * Sh::STAGE;
      const uint4* xw = st + wk * XU;
      const uint4* ww = st + WK * XU + wk * WU + wr * TW * 64;
      const uint2* mw = reinterpret_cast<const uint2*>(st + WK * (XU + WU) + wk * MU) + wr * TW * 8 + g;
      uint4 ca[TW], cb[TW];
      uint2 cm[TW];
      uint32_t za[TW], zb[TW], fa[TW], fb[TW];
#pragma unroll
      for (int tt = 0; tt < TW; ++tt) {
        ca[tt] = ww[tt * 64 + lane];
        cb[tt] = ww[tt * 64 + 32 + lane];
        cm[tt] = mw[tt * 8];
        zero_operands(cm[tt].x, za[tt], fa[tt]);
        zero_operands(cm[tt].y, zb[tt], fb[tt]);
      }
      float part[TW][NTG][4];
#pragma unroll
      for (int tt = 0; tt < TW; ++tt)
#pragma unroll
        for (int ng = 0; ng < NTG; ++ng)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[tt][ng][e] = 0.f;
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
        w4::accumulate_scaled<NTG>(acc[tt], part[tt], meta_scale_of(cm[tt].x), meta_scale_of(cm[tt].y));
    }
  }
  cp_async_wait_pending<0>();
  __syncthreads();  // the stages become the partial sums

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
    for (int i = tid; i < RB * MT; i += NTHREADS) {
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
  for (int i = q_begin + tid; i < q_end; i += NTHREADS) {
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

template <int NTG, int TW, int WR, int WK>
void launch_batched(int splits, int sms, cudaStream_t stream, const half* x, const uint8_t* qt, const uint2* meta,
                    const half* bias, half* out, int M, int N, int K, int group_size) {
  using Sh = BatchedShape<NTG, TW, WR, WK>;
  const int row_blocks = (N + Sh::RB - 1) / Sh::RB, token_tiles = (M + Sh::MT - 1) / Sh::MT;
  int cs = splits;
  if (cs <= 0) {
    // the most splits (powers of two) that keep the grid within ~87% of one wave of the occupancy: H200 run v13c, 32-256
    // tokens on the three 7B shapes, chose within 7% of the best fixed split everywhere (a second wave, or more splits'
    // shorter k loops, cost more than the idle SMs)
    const long base = (long)row_blocks * token_tiles, slots100 = 87L * sms * kMinBlocks;
    cs = 1;
    while (cs * 2 <= kMaxClusterSplits && base * cs * 2 * 100 <= slots100) cs *= 2;
  }
  cs = std::max(1, std::min(cs, kMaxClusterSplits));
  auto kernel = w4a16_batched_kernel<NTG, TW, WR, WK>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Sh::BYTES));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)row_blocks, (unsigned)cs, (unsigned)token_tiles);
  cfg.blockDim = dim3(Sh::THREADS);
  cfg.dynamicSmemBytes = Sh::BYTES;
  cfg.stream = stream;
  cudaLaunchAttribute la[1];
  la[0].id = cudaLaunchAttributeClusterDimension;
  la[0].val.clusterDim.x = 1;
  la[0].val.clusterDim.y = (unsigned)cs;
  la[0].val.clusterDim.z = 1;
  cfg.attrs = la;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, x, qt, meta, bias, out, M, N, K, K / group_size, group_size / 128));
}

constexpr int kDefaultBatched = 0;

}  // namespace

int64_t w4a16_batched_num_variants() { return kNumBatchedVariants; }

// x [M, K] fp16 times the tiled codes qt ([ceil(n/16) * 16, K/2], reference.pack_w4_tiled) with packed metadata
// (reference.pack_w4_meta), + bias; variant -1: the default (0); splits: blocks per cluster splitting K (-1: by occupancy).
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
  TORCH_CHECK((reinterpret_cast<uintptr_t>(meta.data_ptr()) & 15) == 0, "w4a16_batched: meta must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const int v = variant < 0 ? kDefaultBatched : (int)variant;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const half* xp = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  const uint2* mp = reinterpret_cast<const uint2*>(meta.data_ptr<int32_t>());
  half* op = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  const uint8_t* qp = qt.data_ptr<uint8_t>();
  const int s = (int)splits, m = (int)M, nn = (int)N, k = (int)K, gs = (int)group_size;
  switch (v) {
    case 0: launch_batched<4, 2, 4, 1>(s, sms, stream, xp, qp, mp, bp, op, m, nn, k, gs); break;
    case 1: launch_batched<4, 2, 2, 2>(s, sms, stream, xp, qp, mp, bp, op, m, nn, k, gs); break;
    default: launch_batched<4, 1, 4, 2>(s, sms, stream, xp, qp, mp, bp, op, m, nn, k, gs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qaas
