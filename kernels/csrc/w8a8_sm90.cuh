// W8A8 GEMM for Hopper (sm_90a): wgmma tensor cores fed by TMA in a warp-specialized pipeline, built
// from CUTLASS's sm90 collectives, with our epilogue fused as an epilogue visitor tree (EVT):
//
//   D[m, n] = half( float(acc[m, n] - a_corr[m]) * a_scale[m] * w_scale[n] + bias[n] )
//   acc[m, n] = sum_k q[m, k] * u[n, k]
//
// q: SIGNED int8 activation codes (act_quant_s8), u: the layer's uint8 weight codes as stored (symmetric,
// zero point 128), so the kernel multiplies s8 x u8 (wgmma supports the mixed-sign form) and the zero
// point comes back through a_corr[m] = 128 * sum_k q[m, k], subtracted exactly in int32 before the
// conversion to float. No signed copy of the weights is made. A: [M, K] row-major (K-major), B: [N, K]
// row-major (K-major, "TN"), D: [M, N] fp16 row-major.
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
#include "cutlass/util/packed_stride.hpp"
#include "sm90_gemm_run.cuh"

namespace qaas {
namespace sm90 {

using namespace cute;

struct GemmProblem {
  const int8_t* a;
  const float* a_scale;
  const int32_t* a_corr;
  const uint8_t* w;
  const float* w_scale;
  const cutlass::half_t* bias;  // may be null
  cutlass::half_t* d;
  int M, N, K;
  int sm_count;
};

template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
struct W8A8Gemm {
  using ElementA = int8_t;
  using ElementB = uint8_t;
  using ElementD = cutlass::half_t;
  using ElementAcc = int32_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // [N, K] row-major == K x N column-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;  // 16 bytes of int8
  static constexpr int kAlignD = 8;    // 16 bytes of fp16
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // ---- epilogue visitor tree
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using Corr = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, int32_t, int32_t, Stride<_1, _0, int64_t>>;
  using Sub = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::minus, int32_t, int32_t, kRound>, Acc, Corr>;
  using AScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  using Scaled = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, Sub, AScale>;
  using WScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, ElementD, float, Stride<_0, _1, int64_t>>;
  using Epilogue = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>, Scaled,
      WScale, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpilogueSchedule, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignAB, ElementB, LayoutB, kAlignAB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const GemmProblem& p, const at::Tensor& like) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(p.M, p.K, 1));
    const StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(p.N, p.K, 1));
    const StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(p.M, p.N, 1));

    typename Epilogue::Arguments evt{
        {                                                       // Scaled
         {                                                      //   Sub
          {},                                                   //     Acc
          {p.a_corr, int32_t(0), {_1{}, _0{}, int64_t(p.M)}},  //     Corr
          {}},                                                  //     minus
         {p.a_scale, 0.f, {_1{}, _0{}, int64_t(p.M)}},          //   AScale
         {}},                                                   //   multiplies
        {p.w_scale, 0.f, {_0{}, _1{}, int64_t(p.N)}},           // WScale
        {p.bias, ElementD(0), {_0{}, _1{}, int64_t(p.N)}},      // Bias (null -> 0)
        {}};                                                    // multiply_add

    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {p.M, p.N, p.K, 1},
                                  {p.a, sa, p.w, sb},
                                  {evt, nullptr, sd, p.d, sd}};
    args.hw_info.device_id = like.get_device();
    args.hw_info.sm_count = p.sm_count;
    run_gemm<Gemm>(args, like, "w8a8_gemm_sm90", p.M, p.N, p.K, 0, "K and N must be multiples of 16");
  }
};

// The tile configurations (each instantiated in its own translation unit so they compile in parallel).
using Cfg0 = W8A8Gemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                      cutlass::epilogue::TmaWarpSpecialized>;
using Cfg1 = W8A8Gemm<Shape<_128, _256, _128>, Shape<_1, _2, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                      cutlass::epilogue::TmaWarpSpecializedCooperative>;
using Cfg2 = W8A8Gemm<Shape<_64, _128, _256>, Shape<_1, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                      cutlass::epilogue::TmaWarpSpecialized>;

// 128x256 tiles, cooperative, with the 2x1 cluster of Cfg0: the long-K prefill tile (H200 v19g, 2048 tokens, K = 11008,
// N = 4096: 127.0-127.1 us against 135.5-137.4 for Cfg0 and 133.4-134.7 for Cfg1; at K = 4096 Cfg0 stayed ahead).
using Cfg3 = W8A8Gemm<Shape<_128, _256, _128>, Shape<_2, _1, _1>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                      cutlass::epilogue::TmaWarpSpecializedCooperative>;

void run_cfg0(const GemmProblem& p, const at::Tensor& like);
void run_cfg1(const GemmProblem& p, const at::Tensor& like);
void run_cfg2(const GemmProblem& p, const at::Tensor& like);
void run_cfg3(const GemmProblem& p, const at::Tensor& like);

}  // namespace sm90
}  // namespace qaas
