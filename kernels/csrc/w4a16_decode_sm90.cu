// W4A16 decode (1..8 tokens) reading the codes in the Hopper GEMM's reordered layout (w4a16_sm90.cuh,
// reference.w4_sm90_nibble_offsets), so that one copy of a layer's codes could serve decode and the sm90 GEMM.
//
// That layout is made of 16 x 16 atoms (128 bytes; the atoms of one 16-k column are consecutive along N) in which
// lane 4 g + t holds, as one 32-bit word, exactly its m16n8k16 A fragment: rows g / g + 8 at k = 2t, 2t + 1, 2t + 8,
// 2t + 9, nibbles in the order [0,2,4,6,1,3,5,7]. dq_word4 expands such a word into (a0, a1, a2, a3) with the zero
// point of row g for a0 / a2 and of row g + 8 for a1 / a3. A warp reads one whole 128-byte line per atom: eight 4-byte
// loads per lane and 128-k block (the tiled layout: two 16-byte loads). The activations follow the atoms' true k order,
// so each block stages them once in shared memory as ready B fragments ([B][KB][t][4] uint4: for atoms 2q and 2q + 1
// the words of k = 16 j + 2 t and 16 j + 8 + 2 t). Metadata: the packed words of w4a16_packed.cu (pack_w4_meta).
// Otherwise the register kernel of w4a16_packed.cu: 16 warps per 16-row tile splitting K in 128-k blocks, products in
// fp32, the group scale applied per block, weights and metadata of the first round requested before
// griddepcontrol.wait when launched with programmatic dependent launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "common.cuh"
#include "w4a16_args.h"
#include "w4a16_common.cuh"

namespace qaas {
namespace {

constexpr int kWarps = 16;
constexpr size_t kXStageMax = 96 * 1024;  // activations staged per block (B x K x 2 bytes)

__global__ void __launch_bounds__(kWarps * 32, 2) w4a16_decode_sm90_kernel(
    const half* __restrict__ x, const uint32_t* __restrict__ codes, const uint2* __restrict__ meta,
    const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K, int G, int kpg) {
  __shared__ float red[kWarps][16][8];
  extern __shared__ uint4 xs[];
  w4::griddep_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x, KB = K / 128;
  const size_t atom_stride = (size_t)(N / 16) * 32;  // words from one 16-k atom column to the next
  const uint32_t* wsrc = codes + (size_t)tile * 32 + lane;
  const uint2* mrow = meta + (size_t)tile * G * 8 + g;
  uint32_t w[8];
  uint2 mw;
  auto load = [&](int kb) {
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j] = __ldg(wsrc + (size_t)(kb * 8 + j) * atom_stride);
    mw = __ldg(mrow + (size_t)(kpg == 1 ? kb : kb / kpg) * 8);
  };
  if (warp < KB) load(warp);
  w4::griddep_wait();
  // stage: item i = ((b * KB + kb) * 4 + t) * 4 + q holds the B fragment words of atoms 2q, 2q + 1 for lane column t
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(x);
  for (int i = threadIdx.x; i < B * KB * 16; i += blockDim.x) {
    const int q = i & 3, tt = (i >> 2) & 3, bk = i >> 4;  // bk = b * KB + kb
    const uint32_t* src = xw + (size_t)bk * 64 + 16 * q + tt;  // word of k = 128 kb + 32 q + 2 tt
    xs[i] = make_uint4(__ldg(src), __ldg(src + 4), __ldg(src + 8), __ldg(src + 12));
  }
  __syncthreads();
  const uint4* xl = xs + (size_t)min(g, B - 1) * KB * 16 + 4 * t;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int kb = warp; kb < KB; kb += kWarps) {
    if (kb != warp) load(kb);
    uint32_t za, zb, fa, fb;
    w4::zero_codes<1>(mw.x, za, fa);
    w4::zero_codes<1>(mw.y, zb, fb);
    float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 f = xl[kb * 16 + q];
      uint32_t p[4];
      w4::dq_word4(w[2 * q], za, fb, p);
      w4::mma_f16(part, p[0], p[1], p[2], p[3], f.x, f.y);
      w4::dq_word4(w[2 * q + 1], za, fb, p);
      w4::mma_f16(part, p[0], p[1], p[2], p[3], f.z, f.w);
    }
    acc[0] = fmaf(w4::meta_scale(mw.x), part[0], acc[0]);
    acc[1] = fmaf(w4::meta_scale(mw.x), part[1], acc[1]);
    acc[2] = fmaf(w4::meta_scale(mw.y), part[2], acc[2]);
    acc[3] = fmaf(w4::meta_scale(mw.y), part[3], acc[3]);
  }
  red[warp][g][2 * t] = acc[0];
  red[warp][g][2 * t + 1] = acc[1];
  red[warp][g + 8][2 * t] = acc[2];
  red[warp][g + 8][2 * t + 1] = acc[3];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * 8; i += blockDim.x) {
    const int r = i >> 3, b = i & 7, n = tile * 16 + r;
    if (b < B) {
      float v = 0.f;
#pragma unroll
      for (int ww = 0; ww < kWarps; ++ww) v += red[ww][r][b];
      if (bias) v += __half2float(bias[n]);
      out[(size_t)b * N + n] = __float2half(v);
    }
  }
}

}  // namespace

// x [M <= 8, K] fp16 times the codes [N, K/2] in the sm90 reordered layout (w4a16_sm90_reorder), packed metadata words
// (pack_w4_meta) and bias; pdl: launched with programmatic dependent launch.
at::Tensor w4a16_decode_sm90_layout_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& meta,
                                         int64_t group_size, const c10::optional<at::Tensor>& bias, bool pdl) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2, "w4a16_decode_sm90_layout: x and codes must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(codes.is_cuda() && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) * 2 == K &&
                  N % 16 == 0,
              "w4a16_decode_sm90_layout: codes must be contiguous uint8 [N, K/2] (w4a16_sm90_reorder), N % 16 == 0");
  TORCH_CHECK((size_t)M * K * 2 <= kXStageMax, "w4a16_decode_sm90_layout: M x K x 2 bytes must fit ", kXStageMax,
              " bytes of shared memory");
  const half* bp = w4::check_packed_args("w4a16_decode_sm90_layout", x, codes, meta, group_size, bias, N, 8);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const size_t smem = (size_t)M * K * 2;
  static const bool configured = [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(w4a16_decode_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)kXStageMax));
    return true;
  }();
  (void)configured;
  w4::launch_maybe_pdl(w4a16_decode_sm90_kernel, dim3((unsigned)(N / 16)), dim3(kWarps * 32), smem,
                       c10::cuda::getCurrentCUDAStream(), pdl, reinterpret_cast<const half*>(x.data_ptr<at::Half>()),
                       reinterpret_cast<const uint32_t*>(codes.data_ptr<uint8_t>()),
                       reinterpret_cast<const uint2*>(meta.data_ptr<int32_t>()), bp,
                       reinterpret_cast<half*>(out.data_ptr<at::Half>()), (int)M, (int)N, (int)K,
                       (int)(K / group_size), (int)(group_size / 128));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qaas
