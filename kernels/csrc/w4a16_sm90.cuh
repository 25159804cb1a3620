// W4A16 GEMM for Hopper (sm_90a) on wgmma: CUTLASS's mixed-input collective (TMA-fed, warp-specialized, the int4
// operand converted to fp16 in registers and fed to wgmma from registers), scheduled by CUTLASS's stream-K scheduler
// (data-parallel, split-K or stream-K decompositions), for batched decode and prefill.
//
//   out[m, n] = half( sum_k x[m, k] * (u[n, k] * s[g, n] + z[g, n]) + bias[n] ),  g = k / group_size
//
// u: the layer's uint4 codes (0..15), s: the group scale rounded to fp16, z = -(zero point) * s in fp16 (so a code
// equal to the zero point gives exactly 0); products accumulate in fp32. Operands are swapped (the GEMM computes
// out^T = W x^T): the weight rows are the wgmma M side (128 rows per tile, two consumer warpgroups) and the tokens its
// N side (TileN per tile), so short inputs waste no tensor-core rows. A (codes): [N, K] K-major, reordered by
// w4a16_sm90_reorder from the packed row order of quant.quantizers.packing.pack_int4 (nibble 0 = even k) so that the
// 8 values one thread converts are one 32-bit shared load, in the order [0,2,4,6,1,3,5,7] of CUTLASS's shuffle
// converter. B: x [M, K] row-major. Scales and zero terms [G, N] fp16 (N fastest). D: out [M, N].
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "sm90_gemm_run.cuh"

namespace qaas {
namespace sm90 {

using namespace cute;

struct W4A16Problem {
  const uint8_t* codes;           // [N, K/2], row order or reordered (see above)
  const cutlass::half_t* x;       // [M, K]
  const cutlass::half_t* scale;   // [G, N]
  const cutlass::half_t* zero;    // [G, N]
  const cutlass::half_t* bias;    // [N] or null
  cutlass::half_t* out;           // [M, N]
  int M, N, K, group_size;
  int splits;  // -1: CUTLASS's heuristic (stream-K where it pays), 1: data-parallel, >1: split-K into that many slices
  int sm_count;
};

// The layout of reordered codes: within each warp's share of a 64 x 16 wgmma A tile, the 8 values one thread holds
// (its fp16 A fragment: rows g / g + 8, k = 2t, 2t + 1, 2t + 8, 2t + 9) are made contiguous, in the value order
// [0,2,4,6,1,3,5,7] that CUTLASS's uint4 -> fp16 shuffle converter expands with one LOP3 per pair. The same
// construction as tools/util's compute_memory_reordering_atom (one atom along K), whose header is not included here
// (it pulls in cuRAND).
using W4ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;  // [0,2,4,6,1,3,5,7]
constexpr auto w4_reordering_atom() {
  using MmaAtom = decltype(SM90::GMMA::rs_op_selector<cutlass::half_t, cutlass::half_t, float, Shape<_64, _16, _32>>());
  using Traits = MMA_Traits<MmaAtom>;
  auto mk_shape = select<0, 2>(typename Traits::Shape_MNK{});  // (64, 16)
  auto tv_mma = typename Traits::ALayout{};                    // (128 threads, 8 values) -> (m, k)
  // one warp's (32 threads, 8 values) share, inverted to (m, k) -> (thread, value) over its 16 x 16 rows
  auto tv_warp = make_layout_like(composition(tv_mma, make_shape(Int<32>{}, size<1>(tv_mma))));
  auto mk_warp = blocked_product(
      right_inverse(tv_warp).with_shape(shape_div(mk_shape, size(typename Traits::ThrID{}) / Int<32>{})),
      Layout<Shape<_1, _1>>{});
  // (thread, value) -> offset: a thread's 8 values contiguous, in the shuffled order
  auto val_to_offset = logical_product(W4ValueShuffle{}, Int<1>{});
  auto thr_to_offset = make_layout(size<0>(tv_warp));
  auto tv_to_offset = select<1, 0>(logical_product(val_to_offset, thr_to_offset));
  return composition(tv_to_offset, mk_warp);
}
using W4LayoutAtom = decltype(w4_reordering_atom());
using W4StrideA = cutlass::detail::TagToStrideA_t<cutlass::layout::RowMajor>;
using W4LayoutReordered = decltype(cute::tile_to_shape(W4LayoutAtom{}, Layout<Shape<int, int, int>, W4StrideA>{}));

template <int TileN, int TileK>
struct W4A16Gemm {
  using ElementW = cutlass::uint4b_t;
  using ElementX = cutlass::half_t;
  using ElementD = cutlass::half_t;
  using ElementScale = cutlass::half_t;
  using TileShape = Shape<_128, Int<TileN>, Int<TileK>>;
  using ClusterShape = Shape<_1, _1, _1>;
  using LayoutX = cutlass::layout::ColumnMajor;  // x [M, K] row-major is the K x M column-major B operand
  using LayoutD = cutlass::layout::ColumnMajor;  // out [M, N] row-major is out^T [N, M] column-major
  static constexpr int kAlignW = 32;  // 16 bytes of int4
  static constexpr int kAlignX = 8;   // 16 bytes of fp16
  static constexpr int kAlignD = 8;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // epilogue: acc + bias[row of out^T]
  using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, ElementD, float, Stride<_1, _0, int64_t>>;
  using Epilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, ElementD, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignD, ElementD, LayoutD, kAlignD,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<ElementW, ElementScale, ElementScale>,
      W4LayoutReordered, kAlignW, ElementX, LayoutX, kAlignX, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const W4A16Problem& p, const at::Tensor& like) {
    using StrideX = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    using StrideS = typename CollectiveMainloop::StrideScale;
    const int G = p.K / p.group_size;
    const auto dW = cute::tile_to_shape(W4LayoutAtom{}, cute::make_shape(p.N, p.K, 1));
    const StrideX dX = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(p.M, p.K, 1));
    const StrideD dD = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(p.N, p.M, 1));
    const StrideS dS = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(p.N, G, 1));

    typename Epilogue::Arguments evt{{}, {p.bias, ElementD(0), {_1{}, _0{}, int64_t(p.N)}}, {}};
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {p.N, p.M, p.K, 1},
        {reinterpret_cast<const ElementW*>(p.codes), dW, p.x, dX, p.scale, dS, p.group_size, p.zero},
        {evt, nullptr, dD, p.out, dD}};
    args.hw_info.device_id = like.get_device();
    args.hw_info.sm_count = p.sm_count;
    using Decomposition = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90StreamKParams::DecompositionMode;
    if (p.splits == 1) {
      args.scheduler.decomposition_mode = Decomposition::DataParallel;
    } else if (p.splits > 1) {
      args.scheduler.decomposition_mode = Decomposition::SplitK;
      args.scheduler.splits = p.splits;
    }

    run_gemm<Gemm>(args, like, "w4a16_gemm_sm90", p.M, p.N, p.K, p.group_size,
                   "N a multiple of 16, K of 64, groups of a multiple of the k tile");
  }
};

// The configurations (each instantiated in its own translation unit, w4a16_sm90_cfg*.cu, so they compile in parallel).
// Tokens x k per tile (128 weight rows each). H200 run v14a (k tiles of 64; a 64-token tile over codes in row order was
// 1.11-1.39x slower than over reordered codes, so only the reordered layout is kept).
using W4Cfg0 = W4A16Gemm<32, 64>;
using W4Cfg1 = W4A16Gemm<64, 64>;
using W4Cfg2 = W4A16Gemm<128, 64>;
using W4Cfg3 = W4A16Gemm<256, 64>;
using W4Cfg4 = W4A16Gemm<32, 128>;
using W4Cfg5 = W4A16Gemm<64, 128>;
using W4Cfg6 = W4A16Gemm<128, 128>;
constexpr int kW4Configs = 7;

void w4_run_cfg0(const W4A16Problem& p, const at::Tensor& like);
void w4_run_cfg1(const W4A16Problem& p, const at::Tensor& like);
void w4_run_cfg2(const W4A16Problem& p, const at::Tensor& like);
void w4_run_cfg3(const W4A16Problem& p, const at::Tensor& like);
void w4_run_cfg4(const W4A16Problem& p, const at::Tensor& like);
void w4_run_cfg5(const W4A16Problem& p, const at::Tensor& like);
void w4_run_cfg6(const W4A16Problem& p, const at::Tensor& like);
// Reorders row-order codes [N, K/2] into W4LayoutReordered (into `dst`, same shape) on the current stream.
void w4_reorder(const uint8_t* src, uint8_t* dst, int N, int K, cudaStream_t stream);

}  // namespace sm90
}  // namespace qaas
