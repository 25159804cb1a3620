// W4A16 decode (1..16 tokens) with packed per-group metadata and programmatic dependent launch.
//
// Metadata word (one uint32 per output row and weight group, kernels/reference.py pack_w4_meta): the fp32
// scale rounded to 19 mantissa bits, its 4 low bits replaced by the integer zero point (0..15). Layout
// [ceil(N/16)][G][8][2]: tile, group, g, h for row 16 * tile + g + 8 * h, so lane (g, t) gets its two rows (g and
// g + 8) in one 8-byte load and a warp's 16 rows of one group are 64 contiguous bytes. The float32 layout
// (w4a16.cu) needs four 4-byte loads per lane from 32 scattered sectors per 128-k block and twice the bytes.
//
// Codes and math are those of w4a16.cu's tensor-core kernel (w4a16_common.cuh): a block owns 16 output rows,
// its warps split K in 128-k blocks, (u - z) exact in fp16, products in fp32, scale applied in fp32 per block;
// the codes are expanded by dq_word4 (9 instructions per 32-bit word: the odd nibbles masked in place and scaled
// by 1/16 in one HFMA2), and groups of 128 index their metadata without an integer division.
//
// Programmatic dependent launch: the kernel first lets the next kernel in the stream launch, requests its first
// round of weights and metadata, and only then waits for the previous kernel (griddepcontrol.wait) before
// reading the activations or writing anything. Launched with the programmatic stream serialization attribute
// (the `pdl` variants), a W4A16 call thus overlaps its launch and first DRAM round trip with the tail of the
// kernel before it. Contract of those variants: the kernel just before in the stream must not write the weights
// or the metadata (model weights are written outside the forward pass). Without the attribute the wait is a
// no-op and the kernel is an ordinary one.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "common.cuh"
#include "w4a16_args.h"
#include "w4a16_common.cuh"

namespace qaas {
namespace {

struct PackedVariant {
  int warps, unroll;  // warps per block (splitting K), 128-k blocks per warp per round
  bool pdl;           // launched with programmatic dependent launch
  int min_blocks;     // __launch_bounds__ blocks per SM (16-warp blocks: 2 caps at 64 registers, 3 at 40 (spills a
                      // few registers to L1): 48 warps per SM, room for a PDL successor's block)
  bool x_shared;      // activations staged once per block in shared memory as ready B fragments (where M * K * 2
                      // <= kXSharedMax; else the same variant without)
};
constexpr PackedVariant kPackedVariants[] = {{16, 1, false, 2}, {16, 1, true, 2}, {16, 1, false, 3},
                                             {16, 1, true, 3},  {16, 2, false, 2}, {16, 2, true, 2},
                                             {8, 4, false, 1},  {8, 4, true, 1}, {16, 1, false, 2, true},
                                             {16, 1, true, 2, true}};
constexpr int kXSharedMax = 48 * 1024;
constexpr int kNumPackedVariants = sizeof(kPackedVariants) / sizeof(kPackedVariants[0]);
// H100 runs v9a/v9b: 16 warps x 1 block is the fastest variant without PDL on all three 7B shapes at 1 and 16 tokens
// (v9b, 4096^2, 1 token: 6.2 us, float32-metadata kernel 7.6); its PDL twin (pdl_twin) 5.0 us back to back.
constexpr int kDefaultPacked = 0;
constexpr int pdl_twin(int v) { return v | 1; }  // even variants plain, odd ones the same kernel launched with PDL

// G: weight groups per row (K / group_size), kpg: 128-k blocks per group, both from the host (no integer division in
// the prologue).
// TILES (tiled codes only): 16-row tiles per block, each warp's activation fragments feeding all of them; tile indices
// past the last are clamped (their rows are never stored).
template <int NT, int WARPS, int UNROLL, int MINB, bool XS, bool TILED = false, int TILES = 1>
__global__ void __launch_bounds__(WARPS * 32, MINB) w4a16_packed_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qw, const uint2* __restrict__ meta,
    const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K, int G, int kpg) {
  static_assert(TILES == 1 || (TILED && !XS), "several tiles per block read tiled codes");
  constexpr int C = NT * 8;  // tokens per block
  __shared__ float red[WARPS][16 * TILES][C];
  extern __shared__ uint4 xs[];  // XS: [B][KB][q 4][t 4] activation fragments
  w4::griddep_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16 * TILES;
  const int rA = min(n0 + g, N - 1), rB = min(n0 + g + 8, N - 1);
  const int KB = K / 128, last_tile = (N - 1) / 16;
  // TILED (reference.pack_w4_tiled): a tile's codes are 1 KB per 128-k block, lane-ordered: row g at unit lane, row
  // g + 8 at unit 32 + lane (wA + 32), so each 16-byte load of the warp covers four whole 128-byte lines
  const uint4* wA[TILES];
  const uint2* mrow[TILES];  // [tile][group][g] -> (row g, row g + 8)
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt) {
    const int tile = TILES == 1 ? (int)blockIdx.x : min((int)blockIdx.x * TILES + tt, last_tile);
    wA[tt] = TILED ? reinterpret_cast<const uint4*>(qw) + (size_t)tile * KB * 64 + lane
                   : reinterpret_cast<const uint4*>(qw + (size_t)rA * (K / 2)) + t;
    mrow[tt] = meta + (size_t)tile * G * 8 + g;
  }
  const uint4* wB = TILED ? nullptr : reinterpret_cast<const uint4*>(qw + (size_t)rB * (K / 2)) + t;
  constexpr int kBlockUnits = TILED ? 64 : 4;  // uint4 units per 128-k block
  // NT == 1: the activation row this lane's B fragment reads, from k = 32 t: token g, or the last token for lanes past
  // B (their output columns are never stored and an mma's columns are independent): one base pointer and unpredicated
  // loads at constant offsets per 128-k block (per-load 64-bit address math and predicates were ~40 SASS instructions
  // per block, recomputed under the 64-register cap). NT == 2 keeps the predicated loads (see zero_codes).
  const uint4* xl = reinterpret_cast<const uint4*>(x + (size_t)min(g, B - 1) * K) + 4 * t;
  float acc[TILES][NT][4];
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt)
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[tt][i][e] = 0.f;

  uint4 va[UNROLL][TILES], vb[UNROLL][TILES];
  uint2 mw[UNROLL][TILES];
  auto load_round = [&](int base) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int kb = base + u;
      if (kb < KB) {
        const int grp = kpg == 1 ? kb : kb / kpg;  // groups of 128 skip the division
#pragma unroll
        for (int tt = 0; tt < TILES; ++tt) {
          va[u][tt] = __ldg(wA[tt] + kb * kBlockUnits);
          vb[u][tt] = __ldg((TILED ? wA[tt] + 32 : wB) + kb * kBlockUnits);
          mw[u][tt] = __ldg(mrow[tt] + (size_t)grp * 8);
        }
      }
    }
  };
  auto compute_round = [&](int base) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int kb = base + u;
      if (kb >= KB) break;
      uint4 bf[NT][4];
      if constexpr (XS) {
        w4::x_frags_shared<NT>(xs, B, KB, kb, g, t, bf);
      } else if constexpr (NT == 1) {
#pragma unroll
        for (int q = 0; q < 4; ++q) bf[0][q] = __ldg(xl + kb * 16 + q);
      } else {
        w4::x_frags_global<NT>(x, B, K, kb, g, t, bf);
      }
#pragma unroll
      for (int tt = 0; tt < TILES; ++tt) {
        float part[NT][4];
        uint32_t za, zb, fa, fb;
        w4::zero_codes<NT>(mw[u][tt].x, za, fa);
        w4::zero_codes<NT>(mw[u][tt].y, zb, fb);
        w4::kblock_mma_w4<NT, XS>(va[u][tt], vb[u][tt], za, zb, fa, fb, bf, part);
        w4::accumulate_scaled<NT>(acc[tt], part, w4::meta_scale(mw[u][tt].x), w4::meta_scale(mw[u][tt].y));
      }
    }
  };
  constexpr int kStride = WARPS * UNROLL;
  const int first = warp * UNROLL;
  load_round(first);  // weights and metadata only: nothing the previous kernel writes
  w4::griddep_wait();  // the activations (and the output buffer) may belong to the previous kernel
  if constexpr (XS) {
    // item i = ((b * KB + kb) * 4 + q) * 4 + t holds x[b, 128 kb + 32 t + 8 q .. + 8] as fragment words
    for (int i = threadIdx.x; i < B * KB * 16; i += blockDim.x)
      xs[i] = w4::x_frag_words(__ldg(reinterpret_cast<const uint4*>(x + (size_t)(i >> 4) * 128 + (i & 3) * 32 +
                                                                     ((i >> 2) & 3) * 8)));
    __syncthreads();
  }
  for (int kb0 = first; kb0 < KB; kb0 += kStride) {
    if (kb0 != first) load_round(kb0);
    compute_round(kb0);
  }
#pragma unroll
  for (int tt = 0; tt < TILES; ++tt)
    w4::store_partials<NT, C>(*reinterpret_cast<float(*)[16][C]>(&red[warp][16 * tt][0]), acc[tt], g, t);
  __syncthreads();
  w4::store_tile_outputs(red, n0, B, N, bias, out);
}

// The tiled-codes kernel for one 16-row tile per block, one token group and groups of 128 (the decode case the
// dispatcher launches): each warp's codes, metadata and activations addressed by pointers stepped by WARPS 128-k blocks
// per round (the general kernel above recomputes 64-bit addresses from the block index every round under its register
// cap: ~30 instructions per round). LATE_TRIGGER: the next kernel in the stream may launch (PDL) only once this block's
// k loop is done, not at its start: for small blocks (4 warps, 8 per SM) that are all resident at once, an early
// trigger lets the next kernel's blocks take the free slots and start their own weight requests mid-run, whose
// remaining blocks then wait for slots (H200 v19b, 4 tokens, 4096x11008: 11.03 us with the early trigger, 9.45 late).
template <int WARPS, int MINB, bool LATE_TRIGGER = false>
__global__ void __launch_bounds__(WARPS * 32, MINB) w4a16_tiled_g128_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qt, const uint2* __restrict__ meta,
    const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K) {
  constexpr int C = 8;
  __shared__ float red[WARPS][16][C];
  if constexpr (!LATE_TRIGGER) w4::griddep_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int KB = K >> 7;
  // item kb of this tile: codes at units (tile * KB + kb) * 64 + lane (+ 32 for row g + 8), metadata word pair at
  // (tile * KB + kb) * 8 + g (G == KB for groups of 128)
  const size_t first = (size_t)blockIdx.x * KB + warp;
  const uint4* wp = reinterpret_cast<const uint4*>(qt) + first * 64 + lane;
  const uint2* mp = meta + first * 8 + g;
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  uint4 va, vb;
  uint2 mw;
  int kb = warp;
  // (conditional loads: unconditional ones, with the address clamped, let ptxas move the wait above them)
  if (kb < KB) {
    va = __ldg(wp);
    vb = __ldg(wp + 32);
    mw = __ldg(mp);
  }
  w4::griddep_wait();  // the activations (and the output buffer) may belong to the previous kernel
  // the activation row of this lane's B fragment (token g, or the last token for lanes past B: their columns are
  // never stored), from k = 128 kb + 32 t
  const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)min(g, B - 1) * K) + 4 * t + 16 * warp;
  while (kb < KB) {
    uint4 bf[1][4];
#pragma unroll
    for (int q = 0; q < 4; ++q) bf[0][q] = __ldg(xp + q);
    float part[1][4];
    uint32_t za, zb, fa, fb;
    w4::zero_codes<1>(mw.x, za, fa);
    w4::zero_codes<1>(mw.y, zb, fb);
    w4::kblock_mma_w4<1, false>(va, vb, za, zb, fa, fb, bf, part);
    w4::accumulate_scaled<1>(acc, part, w4::meta_scale(mw.x), w4::meta_scale(mw.y));
    kb += WARPS;
    xp += 16 * WARPS;
    if (kb < KB) {
      wp += 64 * WARPS;
      mp += 8 * WARPS;
      va = __ldg(wp);
      vb = __ldg(wp + 32);
      mw = __ldg(mp);
    }
  }
  if constexpr (LATE_TRIGGER) w4::griddep_launch_dependents();
  w4::store_partials<1, C>(red[warp], acc, g, t);
  __syncthreads();
  w4::store_tile_outputs(red, (int)blockIdx.x * 16, B, N, bias, out);
}

template <int NT, int WARPS, int UNROLL, int MINB, bool XS = false>
void launch_packed(bool pdl, cudaStream_t stream, const half* x, const uint8_t* qw, const uint2* meta,
                   const half* bias, half* out, int B, int N, int K, int group_size) {
  w4::launch_maybe_pdl(w4a16_packed_kernel<NT, WARPS, UNROLL, MINB, XS>, dim3((unsigned)((N + 15) / 16)),
                       dim3(WARPS * 32), XS ? (size_t)B * K * 2 : 0, stream, pdl, x, qw, meta, bias, out, B, N, K,
                       K / group_size, group_size / 128);
}

template <int NT>
void launch_packed_variant(int variant, cudaStream_t stream, const half* x, const uint8_t* qw, const uint2* meta,
                           const half* bias, half* out, int B, int N, int K, int group_size) {
  const PackedVariant v = kPackedVariants[variant];
  if (v.x_shared && (size_t)B * K * 2 <= (size_t)kXSharedMax)
    launch_packed<NT, 16, 1, 2, true>(v.pdl, stream, x, qw, meta, bias, out, B, N, K, group_size);
  else if (v.warps == 16 && v.unroll == 1 && v.min_blocks == 3)
    launch_packed<NT, 16, 1, 3>(v.pdl, stream, x, qw, meta, bias, out, B, N, K, group_size);
  else if (v.warps == 16 && v.unroll == 1)
    launch_packed<NT, 16, 1, 2>(v.pdl, stream, x, qw, meta, bias, out, B, N, K, group_size);
  else if (v.warps == 16)
    launch_packed<NT, 16, 2, 2>(v.pdl, stream, x, qw, meta, bias, out, B, N, K, group_size);
  else
    launch_packed<NT, 8, 4, 1>(v.pdl, stream, x, qw, meta, bias, out, B, N, K, group_size);
}

// Tiled-weight variants (w4a16_gemm_packed_tiled): 0 / 1 = variant 0 / 1 (16 warps x 1 block, plain / PDL), 2 / 3 =
// variant 4 / 5 (16 warps x 2 blocks), 4 / 5 three 16-warp blocks per SM (40 registers), 6 / 7 two 16-row tiles per
// block (16 warps); 8 / 9 the persistent folded-zero-point kernel of w4a16_folded.cu where it applies (<= 8 tokens,
// activations within its shared memory), else 0 / 1. Variants 0 / 1 run w4a16_tiled_g128_kernel where it applies (<= 8
// tokens, groups of 128: H200 v18d/e, 1 token with PDL, 4096x4096 4.20-4.26 -> 3.79-3.84 us, 11008x4096 9.04-9.07 ->
// 7.69-7.76, 4096x11008 10.31 -> 9.22 against w4a16_packed_kernel), else w4a16_packed_kernel. 10 / 11: the lean kernel
// in blocks of 4 warps, 8 per SM, its dependents launched after the k loop, where the lean kernel applies (else 0 / 1):
// every warp runs KB / 4 rounds and up to 8 tiles per SM are resident at once (H200 v19b, K = 4096, 5-8 tiles per SM:
// plainly 9.03-11.60 us vs 10.24-14.04 for variant 0; 4 and 8 tokens with PDL 9.45-12.32 vs 10.25-14.59 for variant
// 1; at 1 token with PDL the folded kernel stays ahead, 8.19 vs 8.94 at 4096x11008).
constexpr int kNumTiledVariants = 12, kFirstFoldedVariant = 8, kSmallBlockVariant = 10;
template <int NT>
void launch_tiled_variant(int variant, cudaStream_t stream, const half* x, const uint8_t* qt, const uint2* meta,
                          const half* bias, half* out, int B, int N, int K, int group_size) {
  if (variant == kFirstFoldedVariant || variant == kFirstFoldedVariant + 1) {
    if (NT == 1 && w4::launch_folded_decode(variant & 1, stream, x, qt, meta, bias, out, B, N, K, group_size))
      return;
    variant &= 1;
  }
  const bool pdl = variant & 1;
  const dim3 grid((unsigned)((N + 15) / 16)), block(16 * 32);
  const int G = K / group_size, kpg = group_size / 128;
  const bool lean = NT == 1 && kpg == 1;
  if (variant >= kSmallBlockVariant && !lean) variant &= 1;
  switch (variant >> 1) {
    case kSmallBlockVariant >> 1:
      w4::launch_maybe_pdl(w4a16_tiled_g128_kernel<4, 8, true>, grid, dim3(4 * 32), 0, stream, pdl, x, qt, meta, bias,
                           out, B, N, K);
      break;
    case 0:
      if (lean)
        w4::launch_maybe_pdl(w4a16_tiled_g128_kernel<16, 2>, grid, block, 0, stream, pdl, x, qt, meta, bias, out, B, N,
                             K);
      else
        w4::launch_maybe_pdl(w4a16_packed_kernel<NT, 16, 1, 2, false, true>, grid, block, 0, stream, pdl, x, qt, meta,
                             bias, out, B, N, K, G, kpg);
      break;
    case 1:
      w4::launch_maybe_pdl(w4a16_packed_kernel<NT, 16, 2, 2, false, true>, grid, block, 0, stream, pdl, x, qt, meta,
                           bias, out, B, N, K, G, kpg);
      break;
    case 2:  // (the stepped pointers of w4a16_tiled_g128_kernel spill under the 40-register cap of three per SM)
      w4::launch_maybe_pdl(w4a16_packed_kernel<NT, 16, 1, 3, false, true>, grid, block, 0, stream, pdl, x, qt, meta,
                           bias, out, B, N, K, G, kpg);
      break;
    case 3:
      w4::launch_maybe_pdl(w4a16_packed_kernel<NT, 16, 1, 2, false, true, 2>, dim3((unsigned)((N + 31) / 32)), block, 0,
                           stream, pdl, x, qt, meta, bias, out, B, N, K, G, kpg);
  }
}

}  // namespace

namespace w4 {
const half* check_packed_args(const char* name, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& meta,
                              int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t N, int64_t max_rows) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kHalf, name,
              ": x must be a contiguous fp16 CUDA tensor [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= max_rows, name, " handles at most ", max_rows, " rows");
  TORCH_CHECK(K % 128 == 0 && group_size % 128 == 0 && K % group_size == 0, name,
              ": K and group_size must be multiples of 128, group_size dividing K");
  TORCH_CHECK(meta.is_cuda() && meta.scalar_type() == at::kInt && meta.is_contiguous() &&
                  meta.numel() == (N + 15) / 16 * (K / group_size) * 16,
              name, ": meta must be a contiguous int32 tensor of ceil(N/16) * G * 16 words (pack_w4_meta)");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(x.data_ptr()) & 15) == 0 &&
                  (reinterpret_cast<uintptr_t>(codes.data_ptr()) & 15) == 0 &&
                  (reinterpret_cast<uintptr_t>(meta.data_ptr()) & 7) == 0,
              name, ": x and the codes must be 16-byte aligned, meta 8-byte aligned");
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kHalf && bias->numel() == N && bias->is_contiguous(), name,
              ": bias must be fp16 [N]");
  return reinterpret_cast<const half*>(bias->data_ptr<at::Half>());
}

}  // namespace w4

at::Tensor w4a16_gemm_packed_variant_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& meta,
                                          int64_t group_size, const c10::optional<at::Tensor>& bias,
                                          int64_t variant) {
  TORCH_CHECK(x.dim() == 2 && qw.dim() == 2, "w4a16_packed: x and qweight must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0);
  TORCH_CHECK(qw.is_cuda() && qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.size(1) * 2 == K,
              "w4a16_packed: qweight must be a contiguous uint8 CUDA tensor [N, K/2]");
  const half* bp = w4::check_packed_args("w4a16_packed", x, qw, meta, group_size, bias, N, 16);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const int v = (variant >= 0 && variant < kNumPackedVariants) ? (int)variant : kDefaultPacked;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const half* xp = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  const uint2* mp = reinterpret_cast<const uint2*>(meta.data_ptr<int32_t>());
  half* op = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  if (M <= 8)
    launch_packed_variant<1>(v, stream, xp, qw.data_ptr<uint8_t>(), mp, bp, op, (int)M, (int)N, (int)K, (int)group_size);
  else
    launch_packed_variant<2>(v, stream, xp, qw.data_ptr<uint8_t>(), mp, bp, op, (int)M, (int)N, (int)K, (int)group_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// pdl: launch with programmatic dependent launch (see the header: the kernel just before must not write qw/meta).
at::Tensor w4a16_gemm_packed_cuda(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& meta,
                                  int64_t group_size, const c10::optional<at::Tensor>& bias, bool pdl) {
  return w4a16_gemm_packed_variant_cuda(x, qw, meta, group_size, bias, pdl ? pdl_twin(kDefaultPacked) : kDefaultPacked);
}

int64_t w4a16_packed_num_variants() { return kNumPackedVariants; }

// The same GEMV over codes in the tiled order (reference.pack_w4_tiled, [ceil(N/16) * 16, K/2]); n: output features.
at::Tensor w4a16_gemm_packed_tiled_cuda(const at::Tensor& x, const at::Tensor& qt, const at::Tensor& meta,
                                        int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t n,
                                        int64_t variant) {
  TORCH_CHECK(x.dim() == 2 && qt.dim() == 2, "w4a16_packed_tiled: x and qt must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = n;
  TORCH_CHECK(N > 0 && qt.is_cuda() && qt.scalar_type() == at::kByte && qt.is_contiguous() &&
                  qt.size(0) == (N + 15) / 16 * 16 && qt.size(1) * 2 == K,
              "w4a16_packed_tiled: qt must be a contiguous uint8 CUDA tensor [ceil(n/16) * 16, K/2] (pack_w4_tiled)");
  TORCH_CHECK(variant >= 0 && variant < kNumTiledVariants, "w4a16_packed_tiled: variant must be 0..11");
  const half* bp = w4::check_packed_args("w4a16_packed_tiled", x, qt, meta, group_size, bias, N, 16);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const half* xp = reinterpret_cast<const half*>(x.data_ptr<at::Half>());
  const uint2* mp = reinterpret_cast<const uint2*>(meta.data_ptr<int32_t>());
  half* op = reinterpret_cast<half*>(out.data_ptr<at::Half>());
  if (M <= 8)
    launch_tiled_variant<1>((int)variant, stream, xp, qt.data_ptr<uint8_t>(), mp, bp, op, (int)M, (int)N, (int)K,
                            (int)group_size);
  else
    launch_tiled_variant<2>((int)variant, stream, xp, qt.data_ptr<uint8_t>(), mp, bp, op, (int)M, (int)N, (int)K,
                            (int)group_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qaas
