// W4A16 decode (1..16 tokens) over tiled codes (reference.pack_w4_tiled) and packed metadata words
// (reference.pack_w4_meta), fed by a bulk-copy pipeline: a persistent grid whose blocks each stream their 16-row tiles
// through a ring of shared-memory stages.
//
// Why: the register-streaming tiled kernel (w4a16_packed.cu) keeps at most one 128-k block per warp in flight, so
// each block pays a DRAM round trip per 128-k block it owns, and a layer of many tiles pays them again per wave (2.6
// waves of 16-warp blocks at N = 11008). Its profile (H200 v10f) was memory-latency-bound: DRAM at 29-43% of peak,
// no warp eligible in half the cycles. Here what is in flight no longer depends on registers: one producer thread per
// block keeps STAGES chunks of weights requested (cp.async.bulk, completing on an mbarrier), and consumer warps
// compute on a chunk as soon as it lands. v6's shared-memory streaming kernel (w4a16_stream.cu) lost because it
// waited for whole 16-row tiles (16 scattered row copies, two buffers) before computing; in the tiled order a chunk
// (CW consecutive 128-k blocks of one tile, 1 KB each, plus their metadata words) is two contiguous copies and the
// computation starts on the first kilobytes.
//
// Block: CW consumer warps + 1 producer warp. Chunk c of a tile holds 128-k blocks CW c .. CW c + CW - 1; consumer
// warp w takes block CW c + w (lane (g, t) reads 16 bytes for row g and 16 for row g + 8, as in the register kernel,
// from shared memory: conflict-free 16-byte loads), keeps its partial sums over the tile's chunks, and the CW partials
// are reduced through shared memory (double-buffered, one named barrier per tile) by the consumer threads.
// Barriers per stage: full (count 1 + the copies' bytes) and empty (count CW: one arrival per consumer warp once it
// has used the stage's data). Tiles are assigned round robin: block b owns tiles b, b + grid, ...
//
// Programmatic dependent launch: the producer requests weights at once (the previous kernel in the stream must not
// write the weights or the metadata: the same contract as w4a16_packed.cu); consumers wait for the previous kernel
// (griddepcontrol.wait) before reading the activations or writing the output.
//
// The chunk must hold whole weight groups (CW a multiple of group_size / 128) and the codes and metadata must be
// 16-byte aligned (bulk copies); launch_tiled_pipe returns false otherwise and the caller runs the register kernel.
#include <algorithm>

#include <c10/cuda/CUDAException.h>

#include "mbarrier.cuh"
#include "w4a16_common.cuh"

namespace qaas {
namespace w4 {
namespace {

constexpr size_t kPipeXSharedMax = 48 * 1024;  // XS variants: activations up to 48 KB (else the x-global twin)

// Bytes of one stage: CW 128-k blocks of codes (1 KB each) and CW slots of 64 B of metadata words.
template <int CW>
struct PipeStage {
  static constexpr int kCodes = CW * 1024;
  static constexpr int kMeta = CW * 64;
  static constexpr int kBytes = kCodes + kMeta;
};

// PWB (per-warp barriers): each 128-k block of a chunk is its own pair of copies (1 KB of codes, its group's 64 B of
// words into the warp's slot) completing on the warp's own full barrier, so a warp waits for its kilobyte only, not
// for the whole chunk; any group size. Else one barrier per stage, the chunk's codes and words as two copies (CW a
// multiple of group_size / 128). XS: the activations [B, K] staged in shared memory by one bulk copy per block
// (after griddepcontrol.wait) instead of read per 128-k block from global memory.
template <int NT, int CW, int STAGES, int MINB, bool PWB, bool XS>
__global__ void __launch_bounds__((CW + 1) * 32, MINB) w4a16_tiled_pipe_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qt, const uint8_t* __restrict__ meta,
    const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K, int G, int kpg) {
  using Stage = PipeStage<CW>;
  constexpr int C = NT * 8;  // tokens per mma column block
  constexpr int kFull = PWB ? CW : 1;  // full barriers per stage
  extern __shared__ __align__(128) uint8_t stages[];  // STAGES x Stage::kBytes, then (XS) the activations
  __shared__ float red[2][CW][16][C];
  __shared__ __align__(8) uint64_t full[STAGES][kFull], empty[STAGES], xbar;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int KB = K / 128, chunks = (KB + CW - 1) / CW, tiles = (N + 15) / 16;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      for (int f = 0; f < kFull; ++f) mbar_init(&full[s][f], 1u);
      mbar_init(&empty[s], (uint32_t)CW);
    }
    mbar_init(&xbar, 1u);
    mbar_init_fence();
  }
  __syncthreads();
  griddep_launch_dependents();

  if (warp == CW) {  // producer: one thread keeps every stage requested
    if (lane == 0) {
      int s = 0;
      uint32_t phase = 0;
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const uint8_t* codes = qt + (size_t)tile * KB * 1024;
        const uint8_t* words = meta + (size_t)tile * G * 64;
        for (int c = 0; c < chunks; ++c) {
          const int kb0 = c * CW, nk = min(CW, KB - kb0);
          mbar_wait(&empty[s], phase ^ 1u);  // every consumer warp is done with the stage's previous chunk
          uint8_t* dst = stages + (size_t)s * Stage::kBytes;
          if constexpr (PWB) {
            for (int w = 0; w < nk; ++w) {
              const int kb = kb0 + w;
              mbar_arrive_expect_tx(&full[s][w], 1024u + 64u);
              bulk_copy(dst + w * 1024, codes + (size_t)kb * 1024, 1024u, &full[s][w]);
              bulk_copy(dst + Stage::kCodes + w * 64, words + (size_t)(kb / kpg) * 64, 64u, &full[s][w]);
            }
            // warps past the tile's last 128-k block: their barrier completes this phase too (phases stay in step)
            for (int w = nk; w < CW; ++w) mbar_arrive(&full[s][w]);
          } else {
            const uint32_t code_bytes = (uint32_t)nk * 1024u, meta_bytes = (uint32_t)(nk / kpg) * 64u;
            mbar_arrive_expect_tx(&full[s][0], code_bytes + meta_bytes);
            bulk_copy(dst, codes + (size_t)kb0 * 1024, code_bytes, &full[s][0]);
            bulk_copy(dst + Stage::kCodes, words + (size_t)(kb0 / kpg) * 64, meta_bytes, &full[s][0]);
          }
          if (++s == STAGES) {
            s = 0;
            phase ^= 1u;
          }
        }
      }
    }
    return;
  }

  // consumers
  const int g = lane >> 2, t = lane & 3;
  // the warp's metadata words in a chunk: its own slot (PWB) or its group's (lane's rows g, g + 8)
  const int word_row = (PWB ? warp : warp / kpg) * 8 + g;
  griddep_wait();  // the activations and the output may belong to the previous kernel in the stream
  const half* xsrc = x;
  if constexpr (XS) {
    half* xs = reinterpret_cast<half*>(stages + (size_t)STAGES * Stage::kBytes);
    if (threadIdx.x == 0) {
      const uint32_t xbytes = (uint32_t)B * (uint32_t)K * 2u;
      mbar_arrive_expect_tx(&xbar, xbytes);
      bulk_copy(xs, x, xbytes, &xbar);
    }
    mbar_wait(&xbar, 0u);
    xsrc = xs;
  }
  // NT == 1: one activation base pointer, unpredicated loads (lanes past B read the last token; their columns are
  // never stored), as in w4a16_packed.cu
  const uint4* xl = reinterpret_cast<const uint4*>(xsrc + (size_t)min(g, B - 1) * K) + 4 * t;
  int s = 0;
  uint32_t phase = 0;
  int parity = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, parity ^= 1) {
    float acc[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
    for (int c = 0; c < chunks; ++c) {
      const int kb = c * CW + warp;
      const bool active = kb < KB;
      uint4 bf[NT][4];
      if (active) {  // requested before waiting for the chunk
        if constexpr (NT == 1) {
#pragma unroll
          for (int q = 0; q < 4; ++q) bf[0][q] = XS ? xl[kb * 16 + q] : __ldg(xl + kb * 16 + q);
        } else if constexpr (XS) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int b = nt * 8 + g;
            const uint4* xp = reinterpret_cast<const uint4*>(xsrc + (size_t)b * K + kb * 128 + t * 32);
#pragma unroll
            for (int q = 0; q < 4; ++q) bf[nt][q] = b < B ? xp[q] : make_uint4(0u, 0u, 0u, 0u);
          }
        } else {
          x_frags_global<NT>(x, B, K, kb, g, t, bf);
        }
      }
      mbar_wait(&full[s][PWB ? warp : 0], phase);
      if (active) {
        const uint8_t* st = stages + (size_t)s * Stage::kBytes;
        const uint4 va = reinterpret_cast<const uint4*>(st)[warp * 64 + lane];
        const uint4 vb = reinterpret_cast<const uint4*>(st)[warp * 64 + 32 + lane];
        const uint2 mw = reinterpret_cast<const uint2*>(st + Stage::kCodes)[word_row];
        uint32_t za, zb, fa, fb;
        zero_codes<NT>(mw.x, za, fa);
        zero_codes<NT>(mw.y, zb, fb);
        float part[NT][4];
        kblock_mma_w4<NT, false>(va, vb, za, zb, fa, fb, bf, part);
        accumulate_scaled<NT>(acc, part, meta_scale(mw.x), meta_scale(mw.y));
      }
      __syncwarp();  // the stage's data is in every lane's registers (consumed above)
      if (lane == 0) mbar_arrive(&empty[s]);
      if (++s == STAGES) {
        s = 0;
        phase ^= 1u;
      }
    }
    store_partials<NT, C>(red[parity][warp], acc, g, t);
    // every consumer warp's partials of this tile written; also orders the reads of red[parity ^ 1] (previous tile)
    // before any warp writes it again for the next tile
    named_barrier_sync(1, CW * 32);
    const int n0 = tile * 16;
    for (int i = threadIdx.x; i < 16 * C; i += CW * 32) {
      const int r = i / C, b = i % C, n = n0 + r;
      if (b < B && n < N) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < CW; ++w) v += red[parity][w][r][b];
        if (bias) v += __half2float(bias[n]);
        out[(size_t)b * N + n] = __float2half(v);
      }
    }
  }
}

// CW consumer warps, STAGES chunks in flight per block, MINB blocks per SM (the grid: min(tiles, MINB x SMs), fewer
// per SM where the occupancy calculator says so).
template <int NT, int CW, int STAGES, int MINB, bool PWB, bool XS>
bool launch_pipe(bool pdl, cudaStream_t stream, const half* x, const uint8_t* qt, const uint8_t* meta,
                 const half* bias, half* out, int B, int N, int K, int group_size) {
  const int kpg = group_size / 128;
  if (!PWB && CW % kpg != 0) return false;
  if (XS && (size_t)B * K * 2 > kPipeXSharedMax) return false;
  auto kernel = w4a16_tiled_pipe_kernel<NT, CW, STAGES, MINB, PWB, XS>;
  const size_t dyn = (size_t)STAGES * PipeStage<CW>::kBytes + (XS ? (size_t)B * K * 2 : 0);
  int dev = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (dyn > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dyn));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, (CW + 1) * 32, dyn));
  if (per_sm < 1) return false;
  const int tiles = (N + 15) / 16;
  const int grid = std::min(tiles, std::min(per_sm, MINB) * sms);
  launch_maybe_pdl(kernel, dim3((unsigned)grid), dim3((CW + 1) * 32), dyn, stream, pdl, x, qt, meta, bias, out, B, N,
                   K, K / group_size, kpg);
  return true;
}

}  // namespace

bool launch_tiled_pipe(int nt_groups, int config, bool pdl, cudaStream_t stream, const half* x, const uint8_t* qt,
                       const uint2* meta, const half* bias, half* out, int B, int N, int K, int group_size) {
  if ((reinterpret_cast<uintptr_t>(qt) & 15) || (reinterpret_cast<uintptr_t>(meta) & 15)) return false;
  const uint8_t* mb = reinterpret_cast<const uint8_t*>(meta);
  // 16 tokens: half the blocks per SM (twice the accumulator and activation registers)
#define QAAS_PIPE(CW, STAGES, MINB, PWB, XS)                                                                     \
  return nt_groups == 1 ? launch_pipe<1, CW, STAGES, MINB, PWB, XS>(pdl, stream, x, qt, mb, bias, out, B, N, K,       \
                                                                   group_size)                                      \
                        : launch_pipe<2, CW, STAGES, (MINB + 1) / 2, PWB, XS>(pdl, stream, x, qt, mb, bias, out, B, N, \
                                                                             K, group_size)
  const bool xs_fits = (size_t)B * K * 2 <= kPipeXSharedMax;
  switch (config) {
    case 0:
      if (xs_fits) { QAAS_PIPE(16, 4, 2, true, true); }
      QAAS_PIPE(16, 4, 2, true, false);
    case 1:
      if (xs_fits) { QAAS_PIPE(8, 8, 2, true, true); }
      QAAS_PIPE(8, 8, 2, true, false);
    case 2: QAAS_PIPE(8, 4, 4, true, false);
    default:
      if (xs_fits) { QAAS_PIPE(16, 4, 2, false, true); }
      QAAS_PIPE(16, 4, 2, false, false);
  }
#undef QAAS_PIPE
}

}  // namespace w4
}  // namespace qaas
