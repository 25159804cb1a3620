// Quantized KV cache: per-token-per-head quantization (kv_quantize) and a split-K ("flash-decoding")
// decode attention that reads int8 / int4 K and V codes and dequantizes them in registers
// (kv_decode_attention). Design and floors: kernels/KV_ATTENTION.md.
//
// Conventions (quant.quantizers.core): unsigned codes u, x = (u - z) * s per (batch, head, token) row of
// head_dim elements; asymmetric s = (max(x,0)*c - min(x,0)*c) / (2^b - 1), z = rint(-min*c / s); symmetric
// s = max|x|*c / (2^(b-1) - 1), z = 2^(b-1); s >= 1e-8. int4: element 2j in the LOW nibble of byte j.
//
// Decode attention, per block (b, kv head, split, head chunk): the GT query heads of one KV head share
// the block, so every K/V code byte is read once. Lane layout inside a warp: TPR lanes per cache row
// (each lane owns EPL consecutive head_dim columns and keeps q and the output accumulator of those
// columns in registers for its GT heads), TOK = 32 / TPR rows per pass, U passes per iteration.
//   score(t, h) = s_k(t) * sum_d q'_hd (u_td - z_k(t)),  q' = q * sm_scale * log2(e)   (fp32)
//   online softmax in base 2 (running max m, running sum l per head, warp-uniform m)
//   acc_hd += w_th u_td, zacc_h += w_th z_v(t), w = p * s_v(t); output column = acc - zacc  (fp32)
// The warps of a block merge in shared memory; each block writes (m, l, acc) for its split and
// kv_merge_kernel combines the splits by log-sum-exp and writes fp16.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace qaas {
namespace {

// ------------------------------------------------------------------------------------------ helpers
template <int NW>
struct alignas(4 * NW) Words {
  uint32_t w[NW];
};

template <int NW>
__device__ __forceinline__ Words<NW> load_words(const void* p) {
  return __ldg(reinterpret_cast<const Words<NW>*>(p));
}

// 16-byte and 8-byte __ldg overloads exist for uint4 / uint2; route Words through them.
template <>
__device__ __forceinline__ Words<4> load_words<4>(const void* p) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  return Words<4>{{v.x, v.y, v.z, v.w}};
}
template <>
__device__ __forceinline__ Words<2> load_words<2>(const void* p) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  return Words<2>{{v.x, v.y}};
}
template <>
__device__ __forceinline__ Words<1> load_words<1>(const void* p) {
  return Words<1>{{__ldg(reinterpret_cast<const unsigned int*>(p))}};
}

// Byte j (0..3) of w as an exact float: 0x4B0000jj is 2^23 + byte, minus 2^23.
__device__ __forceinline__ float byte_to_float(uint32_t w, int j) {
  return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + j)) - 8388608.f;
}

// NW code words -> EPL floats in natural element order (int8: one code per byte; int4: element 2j in the
// low nibble of byte j).
template <int BITS, int NW, int EPL>
__device__ __forceinline__ void codes_to_float(const Words<NW>& c, float (&f)[EPL]) {
  static_assert(EPL == NW * 32 / BITS, "EPL must match the loaded code bytes");
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    if constexpr (BITS == 8) {
#pragma unroll
      for (int j = 0; j < 4; ++j) f[4 * i + j] = byte_to_float(c.w[i], j);
    } else {
      const uint32_t lo = c.w[i] & 0x0F0F0F0Fu;
      const uint32_t hi = (c.w[i] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        f[8 * i + 2 * j] = byte_to_float(lo, j);
        f[8 * i + 2 * j + 1] = byte_to_float(hi, j);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ kv_quantize
constexpr int kQuantThreads = 256;

// Store NB (1, 2, 4 or 8) bytes held little-endian in w[0..1].
template <int NB>
__device__ __forceinline__ void store_bytes(uint8_t* p, const uint32_t (&w)[2]) {
  if constexpr (NB == 1) *p = static_cast<uint8_t>(w[0]);
  else if constexpr (NB == 2) *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(w[0]);
  else if constexpr (NB == 4) *reinterpret_cast<uint32_t*>(p) = w[0];
  else *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
}

// One warp per row of D fp16 values; lane owns D/32 consecutive elements. Float32 arithmetic in the
// order of quant.quantizers.core (explicit _rn intrinsics: no contraction), so codes match bit for bit.
template <int D, int BITS>
__global__ void __launch_bounds__(kQuantThreads) kv_quantize_kernel(const __half* __restrict__ x, int64_t rows,
                                                                     bool symmetric, float clip,
                                                                     uint8_t* __restrict__ codes,
                                                                     float* __restrict__ scale_out,
                                                                     float* __restrict__ zero_out) {
  constexpr int E = D / 32;
  constexpr int QMAX = (1 << BITS) - 1;
  constexpr int HALF = (1 << (BITS - 1)) - 1;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kQuantThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  float v[E];
  {
    const Words<E / 2> raw = load_words<E / 2>(x + row * D + lane * E);
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
      const __half2 h = *reinterpret_cast<const __half2*>(&raw.w[i]);
      v[2 * i] = __low2float(h);
      v[2 * i + 1] = __high2float(h);
    }
  }
  float mx = v[0], mn = v[0];
#pragma unroll
  for (int e = 1; e < E; ++e) {
    mx = fmaxf(mx, v[e]);
    mn = fminf(mn, v[e]);
  }
  mx = warp_max(mx);
  mn = -warp_max(-mn);
  float s, z, lo;
  if (symmetric) {
    const float amax = __fmul_rn(fmaxf(mx, -mn), clip);
    s = fmaxf(__fdiv_rn(amax, static_cast<float>(HALF)), kEps);
    z = static_cast<float>(1 << (BITS - 1));
    lo = 1.f;
  } else {
    const float xmax = __fmul_rn(fmaxf(mx, 0.f), clip);
    const float xmin = __fmul_rn(fminf(mn, 0.f), clip);
    s = fmaxf(__fdiv_rn(__fsub_rn(xmax, xmin), static_cast<float>(QMAX)), kEps);
    z = rintf(__fdiv_rn(-xmin, s));
    lo = 0.f;
  }
  uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float u = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(v[e], s)), z), lo), static_cast<float>(QMAX));
    const uint32_t ui = static_cast<uint32_t>(u);
    const int bit = e * BITS;  // little-endian position of element e in the lane's packed bytes
    w[bit / 32] |= ui << (bit % 32);
  }
  constexpr int NB = E * BITS / 8;
  store_bytes<NB>(codes + row * (D * BITS / 8) + lane * NB, w);
  if (lane == 0) {
    scale_out[row] = s;
    zero_out[row] = z;
  }
}

template <int D, int BITS>
void launch_quantize(const at::Tensor& x, int64_t rows, bool symmetric, float clip, at::Tensor& codes,
                     at::Tensor& scale, at::Tensor& zero) {
  const int64_t rows_per_block = kQuantThreads / 32;
  const int64_t grid = (rows + rows_per_block - 1) / rows_per_block;
  kv_quantize_kernel<D, BITS><<<grid, kQuantThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __half*>(x.data_ptr()), rows, symmetric, clip, codes.data_ptr<uint8_t>(),
      scale.data_ptr<float>(), zero.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------ decode attention
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * 32;
constexpr int kMinChunk = 128;  // fewest tokens per split (before rounding to the block tile)
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int BITS, int GT>
struct AttnCfg {
  // Columns per lane: 32 int4 codes (one 16-byte load) when few heads share the block, else 16
  // (16-byte int8 / 8-byte int4 loads), 8 at eight heads (registers: q and acc are GT * EPL floats each).
  static constexpr int EPL = GT >= 8 ? 8 : ((BITS == 4 && GT <= 2) ? 32 : 16);
  static constexpr int TPR = D / EPL;                   // lanes per cache row
  static constexpr int TOK = 32 / TPR;                  // rows per warp pass
  static constexpr int U = GT >= 8 ? 2 : 4;             // passes per iteration (loads in flight)
  static constexpr int NB = EPL * BITS / 8;             // code bytes per lane per row
  static constexpr int NW = NB / 4;                     // 32-bit words per lane per row
  static constexpr int ROWB = D * BITS / 8;             // code bytes per cache row
  static constexpr int WTILE = U * TOK;                 // tokens per warp iteration
  static constexpr int BTILE = kAttnWarps * WTILE;      // tokens per block iteration
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0, "lanes per row must be a power of two <= 32");
  static_assert(NW >= 1 && NW <= 4 && (NW & (NW - 1)) == 0, "code loads of 4, 8 or 16 bytes");
};

struct AttnArgs {
  const __half* q;
  const uint8_t* kc;
  const float* ks;
  const float* kz;
  const uint8_t* vc;
  const float* vs;
  const float* vz;
  const int* seq_lens;
  float* part_m;
  float* part_l;
  float* part_acc;
  int hq, hkv, group, lmax, chunk, n_splits;
  float qscale;  // sm_scale * log2(e)
};

template <int D, int BITS, int GT>
__global__ void __launch_bounds__(kAttnThreads) kv_decode_kernel(const AttnArgs a) {
  using C = AttnCfg<D, BITS, GT>;
  constexpr int EPL = C::EPL, TPR = C::TPR, TOK = C::TOK, U = C::U;
  __shared__ float sm_m[kAttnWarps][GT];
  __shared__ float sm_l[kAttnWarps][GT];
  __shared__ float sm_acc[kAttnWarps][GT][D];

  const int bkv = blockIdx.x;  // b * hkv + kv head
  const int b = bkv / a.hkv, kvh = bkv % a.hkv;
  const int split = blockIdx.y, hc = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = lane / TPR, c = lane % TPR;
  const int len = min(a.seq_lens[b], a.lmax);
  const int start = split * a.chunk;
  const int end = min(start + a.chunk, len);

  // q' = q * sm_scale * log2e for this lane's columns of each head of the chunk (0 for padding heads).
  float qf[GT][EPL];
  float qs[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const int hg = hc * GT + g;
    const bool valid = hg < a.group;
    const __half* qp = a.q + (static_cast<int64_t>(b) * a.hq + kvh * a.group + (valid ? hg : 0)) * D + c * EPL;
#pragma unroll
    for (int i = 0; i < EPL / 8; ++i) {
      const Words<4> raw = load_words<4>(qp + 8 * i);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const __half2 h = *reinterpret_cast<const __half2*>(&raw.w[j]);
        qf[g][8 * i + 2 * j] = valid ? __low2float(h) * a.qscale : 0.f;
        qf[g][8 * i + 2 * j + 1] = valid ? __high2float(h) * a.qscale : 0.f;
      }
    }
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) s += qf[g][e];
    qs[g] = s;
  }

  float m[GT], l[GT], zacc[GT], acc[GT][EPL];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    zacc[g] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
  }

  const int64_t row0 = static_cast<int64_t>(bkv) * a.lmax;  // cache row of token 0
  for (int t0 = start + warp * C::WTILE; t0 < end; t0 += C::BTILE) {
    // 1. loads of U passes: codes of K and V, scales and zeros (rows past `end` re-read row end-1)
    Words<C::NW> kw[U], vw[U];
    float sk[U], zk[U], sv[U], zv[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * TOK + r;
      ok[u] = t < end;
      const int64_t row = row0 + (ok[u] ? t : end - 1);
      kw[u] = load_words<C::NW>(a.kc + row * C::ROWB + c * C::NB);
      vw[u] = load_words<C::NW>(a.vc + row * C::ROWB + c * C::NB);
      sk[u] = __ldg(a.ks + row);
      zk[u] = __ldg(a.kz + row);
      sv[u] = __ldg(a.vs + row);
      zv[u] = __ldg(a.vz + row);
    }
    // 2. scores (base-2 logits) for the lane's row of each pass, all heads
    float sc[U][GT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float f[EPL];
      codes_to_float<BITS>(kw[u], f);
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) d = fmaf(qf[g][e], f[e], d);
        d = fmaf(-zk[u], qs[g], d);
#pragma unroll
        for (int o = TPR / 2; o >= 1; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        sc[u][g] = ok[u] ? d * sk[u] : -INFINITY;
      }
    }
    // 3. online softmax: running max over the warp's rows (row 0 of pass 0 is valid: finite max)
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float mx = sc[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, sc[u][g]);
#pragma unroll
      for (int o = TPR; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mn = fmaxf(m[g], mx);
      const float alpha = exp2f(m[g] - mn);
      m[g] = mn;
      l[g] *= alpha;
      zacc[g] *= alpha;
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = exp2f(sc[u][g] - mn);
        l[g] += p;
        sc[u][g] = p;
      }
    }
    // 4. p * v: acc += (p s_v) u, zacc += (p s_v) z_v
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float f[EPL];
      codes_to_float<BITS>(vw[u], f);
      const float s_v = ok[u] ? sv[u] : 0.f;
      const float z_v = ok[u] ? zv[u] : 0.f;
#pragma unroll
      for (int g = 0; g < GT; ++g) {
        const float w = sc[u][g] * s_v;
        zacc[g] = fmaf(w, z_v, zacc[g]);
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(w, f[e], acc[g][e]);
      }
    }
  }

  // 5. sum over the warp's rows (m is warp-uniform), then over the block's warps in shared memory
#pragma unroll
  for (int g = 0; g < GT; ++g) {
#pragma unroll
    for (int o = TPR; o < 32; o <<= 1) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
      zacc[g] += __shfl_xor_sync(0xffffffffu, zacc[g], o);
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
    }
    if (r == 0) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) sm_acc[warp][g][c * EPL + e] = acc[g][e] - zacc[g];
    }
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < GT * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    const int hg = hc * GT + g;
    if (hg >= a.group) continue;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) mm = fmaxf(mm, sm_m[w][g]);
    float ls = 0.f, as = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float f = sm_m[w][g] == -INFINITY ? 0.f : exp2f(sm_m[w][g] - mm);
      ls = fmaf(sm_l[w][g], f, ls);
      as = fmaf(sm_acc[w][g][d], f, as);
    }
    const int64_t idx = (static_cast<int64_t>(b) * a.hq + kvh * a.group + hg) * a.n_splits + split;
    a.part_acc[idx * D + d] = as;
    if (d == 0) {
      a.part_m[idx] = mm;
      a.part_l[idx] = ls;
    }
  }
}

// One block per (b, query head), one thread per column: log-sum-exp merge of the splits, fp16 out.
__global__ void kv_merge_kernel(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                const float* __restrict__ part_acc, int n_splits, int D, __half* __restrict__ out) {
  const int64_t bh = blockIdx.x;
  const int d = threadIdx.x;
  const float* pm = part_m + bh * n_splits;
  const float* pl = part_l + bh * n_splits;
  const float* pa = part_acc + bh * n_splits * D + d;
  float mm = -INFINITY;
  for (int s = 0; s < n_splits; ++s) mm = fmaxf(mm, pm[s]);
  float ls = 0.f, as = 0.f;
  if (mm != -INFINITY) {
    for (int s = 0; s < n_splits; ++s) {
      const float f = pm[s] == -INFINITY ? 0.f : exp2f(pm[s] - mm);
      ls = fmaf(pl[s], f, ls);
      as = fmaf(pa[static_cast<int64_t>(s) * D], f, as);
    }
  }
  out[bh * D + d] = __float2half(ls > 0.f ? as / ls : 0.f);  // empty sequence: 0
}

template <int D, int BITS, int GT>
void launch_decode(AttnArgs a, int batch, int chunks, int sms, int64_t lmax, at::Tensor& out) {
  using C = AttnCfg<D, BITS, GT>;
  const int64_t bkv = static_cast<int64_t>(batch) * a.hkv * chunks;
  // enough blocks for ~4 waves of the SMs, each split at least kMinChunk tokens, a multiple of the tile
  int64_t splits = std::max<int64_t>(1, (4LL * sms + bkv - 1) / bkv);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (lmax + kMinChunk - 1) / kMinChunk));
  int64_t chunk = (lmax + splits - 1) / splits;
  chunk = (chunk + C::BTILE - 1) / C::BTILE * C::BTILE;
  splits = (lmax + chunk - 1) / chunk;
  a.chunk = static_cast<int>(chunk);
  a.n_splits = static_cast<int>(splits);
  auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device());
  const int64_t heads = static_cast<int64_t>(batch) * a.hq;
  at::Tensor pm = at::empty({heads * splits}, opts);
  at::Tensor pl = at::empty({heads * splits}, opts);
  at::Tensor pacc = at::empty({heads * splits * D}, opts);
  a.part_m = pm.data_ptr<float>();
  a.part_l = pl.data_ptr<float>();
  a.part_acc = pacc.data_ptr<float>();
  const dim3 grid(static_cast<unsigned>(batch * a.hkv), static_cast<unsigned>(splits), static_cast<unsigned>(chunks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kv_decode_kernel<D, BITS, GT><<<grid, kAttnThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  kv_merge_kernel<<<static_cast<unsigned>(heads), D, 0, stream>>>(a.part_m, a.part_l, a.part_acc, a.n_splits, D,
                                                                  reinterpret_cast<__half*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D, int BITS>
void dispatch_group(const AttnArgs& a, int batch, int sms, int64_t lmax, at::Tensor& out) {
  const int g = a.group;
  if (g == 1) launch_decode<D, BITS, 1>(a, batch, 1, sms, lmax, out);
  else if (g == 2) launch_decode<D, BITS, 2>(a, batch, 1, sms, lmax, out);
  else if (g <= 4) launch_decode<D, BITS, 4>(a, batch, 1, sms, lmax, out);
  else launch_decode<D, BITS, 8>(a, batch, (g + 7) / 8, sms, lmax, out);
}

void check_cache(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t batch,
                 int64_t rowb, const char* name) {
  TORCH_CHECK(codes.is_cuda() && codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.is_contiguous(),
              "kv_decode_attention: ", name, "_codes must be a contiguous uint8 CUDA tensor [B, Hkv, Lmax, D*bits/8]");
  TORCH_CHECK(codes.size(0) == batch && codes.size(3) == rowb, "kv_decode_attention: ", name,
              "_codes has shape ", codes.sizes(), ", expected [", batch, ", Hkv, Lmax, ", rowb, "]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0, "kv_decode_attention: ", name,
              "_codes must be 16-byte aligned");
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 &&
                    t->size(0) == codes.size(0) && t->size(1) == codes.size(1) && t->size(2) == codes.size(2),
                "kv_decode_attention: ", name, "_scale / ", name, "_zero must be contiguous float32 [B, Hkv, Lmax]");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cuda(const at::Tensor& x_in, int64_t bits, bool symmetric,
                                                                double clip) {
  TORCH_CHECK(x_in.is_cuda() && x_in.scalar_type() == at::kHalf && x_in.dim() >= 1,
              "kv_quantize: x must be a float16 CUDA tensor [..., head_dim]");
  TORCH_CHECK(bits == 8 || bits == 4, "kv_quantize: bits must be 4 or 8");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t D = x.size(-1);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "kv_quantize: head_dim must be 64, 128 or 256, got ", D);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> cshape = lead;
  cshape.push_back(bits == 8 ? D : D / 2);
  auto codes = at::empty(cshape, x.options().dtype(at::kByte));
  auto scale = at::empty(lead, x.options().dtype(at::kFloat));
  auto zero = at::empty(lead, x.options().dtype(at::kFloat));
  const int64_t rows = x.numel() / D;
  if (rows == 0) return {codes, scale, zero};
  const float c = static_cast<float>(clip);
#define QAAS_KVQ(D_)                                                          \
  if (bits == 8) launch_quantize<D_, 8>(x, rows, symmetric, c, codes, scale, zero); \
  else launch_quantize<D_, 4>(x, rows, symmetric, c, codes, scale, zero);
  if (D == 64) { QAAS_KVQ(64) }
  else if (D == 128) { QAAS_KVQ(128) }
  else { QAAS_KVQ(256) }
#undef QAAS_KVQ
  return {codes, scale, zero};
}

at::Tensor kv_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                                    const at::Tensor& k_zero, const at::Tensor& v_codes, const at::Tensor& v_scale,
                                    const at::Tensor& v_zero, int64_t bits, const at::Tensor& seq_lens,
                                    double sm_scale) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kHalf && q.dim() == 3 && q.is_contiguous(),
              "kv_decode_attention: q must be a contiguous float16 CUDA tensor [B, Hq, D]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0, "kv_decode_attention: q must be 16-byte aligned");
  TORCH_CHECK(bits == 8 || bits == 4, "kv_decode_attention: bits must be 4 or 8");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), hq = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 64 || D == 128, "kv_decode_attention: head_dim must be 64 or 128, got ", D);
  const int64_t rowb = D * bits / 8;
  check_cache(k_codes, k_scale, k_zero, batch, rowb, "k");
  check_cache(v_codes, v_scale, v_zero, batch, rowb, "v");
  TORCH_CHECK(v_codes.sizes() == k_codes.sizes(), "kv_decode_attention: K and V caches differ in shape");
  const int64_t hkv = k_codes.size(1), lmax = k_codes.size(2);
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "kv_decode_attention: Hq (", hq, ") must be a multiple of Hkv (", hkv, ")");
  TORCH_CHECK(seq_lens.is_cuda() && seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.size(0) == batch && seq_lens.is_contiguous(),
              "kv_decode_attention: seq_lens must be a contiguous int32 CUDA tensor [B]");
  TORCH_CHECK(lmax < (1LL << 31) && batch * hkv < (1LL << 31), "kv_decode_attention: cache too large");
  auto out = at::empty({batch, hq, D}, q.options());
  if (batch == 0 || hq == 0) return out;
  AttnArgs a{};
  a.q = reinterpret_cast<const __half*>(q.data_ptr());
  a.kc = k_codes.data_ptr<uint8_t>();
  a.ks = k_scale.data_ptr<float>();
  a.kz = k_zero.data_ptr<float>();
  a.vc = v_codes.data_ptr<uint8_t>();
  a.vs = v_scale.data_ptr<float>();
  a.vz = v_zero.data_ptr<float>();
  a.seq_lens = seq_lens.data_ptr<int>();
  a.hq = static_cast<int>(hq);
  a.hkv = static_cast<int>(hkv);
  a.group = static_cast<int>(hq / hkv);
  a.lmax = static_cast<int>(lmax);
  a.qscale = static_cast<float>(sm_scale * 1.4426950408889634);
  const int sms = current_device_sm_count();
  if (lmax == 0) {
    out.zero_();
    return out;
  }
  const int b32 = static_cast<int>(batch);
  if (D == 64) {
    if (bits == 8) dispatch_group<64, 8>(a, b32, sms, lmax, out);
    else dispatch_group<64, 4>(a, b32, sms, lmax, out);
  } else {
    if (bits == 8) dispatch_group<128, 8>(a, b32, sms, lmax, out);
    else dispatch_group<128, 4>(a, b32, sms, lmax, out);
  }
  return out;
}

}  // namespace qaas
