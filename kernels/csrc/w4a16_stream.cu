// W4A16 decode (1..16 tokens), streaming variant: the weights reach shared memory asynchronously, completing
// on an mbarrier, instead of through registers: either Hopper bulk copies (cp.async.bulk, the TMA engine's
// 1-D form; one thread per block issues them) or 16-byte cp.async pieces issued by every thread.
//
// Why: the register-streaming kernel (w4a16.cu) keeps only what its warps hold in registers in flight and
// serialises a DRAM round trip per round; at 1 token it streams at ~2.15 TB/s after a ~3 us fixed cost
// (H100 run v5). Here one thread per block requests whole 16-row tiles (16 row copies of K/2 bytes plus the
// tile's scale and zero rows, which are contiguous in the [N, K/group] arrays) as soon as the block starts;
// with a persistent grid sized by occupancy and two tile buffers per block, the copies for up to
// 2 x blocks tiles are in flight at once: for LLaMA-7B shapes that is the whole weight matrix, requested in
// the first microsecond. The activations (B x K fp16) are copied to shared memory once per block when they
// fit (<= 48 KB), so no warp waits on an L2 round trip per 128-k block.
//
// Shared memory per tile buffer: codes [16][row_stride] (row_stride = K/2, padded by 64 bytes when K/2 is a
// multiple of 128 so rows g and g+1 land in different bank halves: conflict-free 16-byte loads), then
// scale [16][G] and zero [16][G] float32. Math per 128-k block: w4a16_common.cuh (identical to w4a16.cu).
//
// With pdl, griddepcontrol.wait sits between the weight copies and the activation copy: under programmatic
// dependent launch the next layer's weights stream in while the previous kernel finishes.
#include <c10/cuda/CUDAException.h>

#include "w4a16_common.cuh"

namespace qaas {
namespace w4 {
namespace {

constexpr int kXSharedMaxBytes = 48 * 1024;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_LOOP:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_LOOP;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Global -> shared bulk copy (bytes and both addresses multiples of 16) completing on `bar`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

// Ampere-style 16-byte asynchronous copy (LDGSTS), and an mbarrier arrival once this thread's earlier ones land.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

struct StreamGeometry {
  int row_stride;       // bytes per code row in shared memory
  int G;                // groups per row
  uint32_t codes_bytes; // 16 * row_stride
  uint32_t meta_bytes;  // 16 * G * 4 (one of scale / zero)
  uint32_t buf_bytes;   // codes + scale + zero
};

__host__ __device__ inline StreamGeometry stream_geometry(int K, int group_size) {
  StreamGeometry s;
  const int row_bytes = K / 2;
  s.row_stride = row_bytes + ((row_bytes % 128 == 0) ? 64 : 0);
  s.G = K / group_size;
  s.codes_bytes = 16u * (uint32_t)s.row_stride;
  s.meta_bytes = 16u * (uint32_t)s.G * 4u;
  s.buf_bytes = s.codes_bytes + 2u * s.meta_bytes;
  return s;
}

// BULK: one thread requests the tile with 18 bulk copies (TMA); else every thread issues 16-byte cp.async
// pieces of it (LDGSTS) and arrives on the tile's mbarrier when its pieces land (barrier count = threads).
template <int NT, int WARPS, bool X_SHARED, bool BULK>
__global__ void __launch_bounds__(WARPS * 32) w4a16_stream_kernel(
    const half* __restrict__ x, const uint8_t* __restrict__ qw, const float* __restrict__ scale,
    const float* __restrict__ zero, const half* __restrict__ bias, half* __restrict__ out, int B, int N, int K,
    int group_size, int stages) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ float red[WARPS][16][NT * 8];
  __shared__ __align__(8) uint64_t bars[3];  // tile buffers 0 / 1, activations
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const StreamGeometry geo = stream_geometry(K, group_size);
  const int G = geo.G, KB = K / 128;
  const int num_tiles = N / 16;
  const uint32_t row_bytes = (uint32_t)K / 2;
  half* xs = reinterpret_cast<half*>(smem + (size_t)stages * geo.buf_bytes);

  auto issue = [&](int tile, int buf) {  // BULK: thread 0 only; else all threads
    uint8_t* base = smem + (size_t)buf * geo.buf_bytes;
    const size_t n0 = (size_t)tile * 16;
    if constexpr (!BULK) {
      const int per_row = (int)row_bytes / 16;
      for (int q = threadIdx.x; q < 16 * per_row; q += WARPS * 32) {
        const int r = q / per_row, c = q - r * per_row;
        cp_async16(base + r * geo.row_stride + c * 16, qw + (n0 + r) * row_bytes + (size_t)c * 16);
      }
      const int per_meta = (int)geo.meta_bytes / 16;
      for (int q = threadIdx.x; q < 2 * per_meta; q += WARPS * 32) {
        const float* src = q < per_meta ? scale + n0 * G + (size_t)q * 4 : zero + n0 * G + (size_t)(q - per_meta) * 4;
        cp_async16(base + geo.codes_bytes + (size_t)q * 16, src);
      }
      cp_async_arrive(&bars[buf]);
      return;
    }
    mbar_arrive_expect_tx(&bars[buf], 16u * row_bytes + 2u * geo.meta_bytes);
#pragma unroll 1
    for (int r = 0; r < 16; ++r) bulk_copy(base + r * geo.row_stride, qw + (n0 + r) * row_bytes, row_bytes, &bars[buf]);
    bulk_copy(base + geo.codes_bytes, scale + n0 * G, geo.meta_bytes, &bars[buf]);
    bulk_copy(base + geo.codes_bytes + geo.meta_bytes, zero + n0 * G, geo.meta_bytes, &bars[buf]);
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < 3; ++s) mbar_init(&bars[s], (BULK || s == 2) ? 1u : (uint32_t)(WARPS * 32));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (!BULK || threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      const int tile = blockIdx.x + s * gridDim.x;
      if (tile < num_tiles) issue(tile, s);
    }
  }
  griddep_launch_dependents();
  griddep_wait();  // the activations may come from the previous kernel (programmatic dependent launch)
  if constexpr (X_SHARED) {
    if (threadIdx.x == 0) {
      const uint32_t xbytes = (uint32_t)B * (uint32_t)K * 2u;
      mbar_arrive_expect_tx(&bars[2], xbytes);
      bulk_copy(xs, x, xbytes, &bars[2]);
    }
    mbar_wait(&bars[2], 0);
  }
  const half* xsrc = X_SHARED ? xs : x;

  int it = 0;
  for (int tile = blockIdx.x; tile < num_tiles; tile += gridDim.x, ++it) {
    const int buf = it % stages;
    mbar_wait(&bars[buf], (uint32_t)(it / stages) & 1u);
    const uint8_t* base = smem + (size_t)buf * geo.buf_bytes;
    const float* sc = reinterpret_cast<const float*>(base + geo.codes_bytes);
    const float* zr = reinterpret_cast<const float*>(base + geo.codes_bytes + geo.meta_bytes);
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll 2
    for (int kb = warp; kb < KB; kb += WARPS) {
      const uint4 va = *reinterpret_cast<const uint4*>(base + g * geo.row_stride + kb * 64 + t * 16);
      const uint4 vb = *reinterpret_cast<const uint4*>(base + (g + 8) * geo.row_stride + kb * 64 + t * 16);
      const int grp = (kb * 128) / group_size;
      const float sa = sc[g * G + grp], sb = sc[(g + 8) * G + grp];
      float part[NT][4];
      kblock_mma<NT, X_SHARED>(va, vb, zero_pair(zr[g * G + grp]), zero_pair(zr[(g + 8) * G + grp]), xsrc, B, K, kb,
                               g, t, part);
      accumulate_scaled<NT>(acc, part, sa, sb);
    }
    store_partials<NT>(red[warp], acc, g, t);
    __syncthreads();  // partials written; every warp is done reading buffer `buf`
    if (!BULK || threadIdx.x == 0) {
      const int next = tile + stages * (int)gridDim.x;
      if (next < num_tiles) {
        if (BULK) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // generic reads before async writes
        issue(next, buf);
      }
    }
    const int n0 = tile * 16;
    for (int i = threadIdx.x; i < 16 * NT * 8; i += blockDim.x) {
      const int r = i / (NT * 8), b = i % (NT * 8);
      if (b < B) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) v += red[w][r][b];
        if (bias) v += __half2float(bias[n0 + r]);
        out[(size_t)b * N + n0 + r] = __float2half(v);
      }
    }
    __syncthreads();  // red is reused by the next tile
  }
}

template <int NT, int WARPS, bool X_SHARED, bool BULK>
bool launch_config(bool pdl, cudaStream_t stream, const half* x, const uint8_t* qw, const float* scale,
                   const float* zero, const half* bias, half* out, int B, int N, int K, int group_size) {
  auto kernel = w4a16_stream_kernel<NT, WARPS, X_SHARED, BULK>;
  int dev = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int sms = current_device_sm_count();
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const StreamGeometry geo = stream_geometry(K, group_size);
  const size_t xbytes = X_SHARED ? (size_t)B * K * 2 : 0;
  const size_t budget = (size_t)max_smem - attr.sharedSizeBytes;
  int stages = 2;
  if (2 * (size_t)geo.buf_bytes + xbytes > budget) stages = 1;
  const size_t dyn = (size_t)stages * geo.buf_bytes + xbytes;
  if (dyn > budget) return false;
  if ((size_t)attr.maxDynamicSharedSizeBytes < dyn)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)budget));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WARPS * 32, dyn));
  if (per_sm < 1) return false;
  const int tiles = N / 16;
  const int grid = tiles < per_sm * sms ? tiles : per_sm * sms;

  launch_maybe_pdl(kernel, dim3((unsigned)grid), dim3(WARPS * 32), dyn, stream, pdl, x, qw, scale, zero, bias, out, B, N,
                   K, group_size, stages);
  return true;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

bool launch_stream_decode(int nt_groups, bool bulk, bool pdl, cudaStream_t stream, const half* x, const uint8_t* qw,
                          const float* scale, const float* zero, const half* bias, half* out, int B, int N, int K,
                          int group_size) {
  if (K % 128 != 0 || group_size % 128 != 0 || N % 16 != 0 || N == 0) return false;
  if (!aligned16(x) || !aligned16(qw) || !aligned16(scale) || !aligned16(zero)) return false;
  const bool x_shared = (size_t)B * K * 2 <= (size_t)kXSharedMaxBytes;
#define QAAS_STREAM(NT_, BULK_)                                                                                   \
  return x_shared                                                                                                  \
             ? launch_config<NT_, 16, true, BULK_>(pdl, stream, x, qw, scale, zero, bias, out, B, N, K, group_size) \
             : launch_config<NT_, 16, false, BULK_>(pdl, stream, x, qw, scale, zero, bias, out, B, N, K, group_size)
  if (nt_groups == 1) {
    if (bulk) { QAAS_STREAM(1, true); }
    QAAS_STREAM(1, false);
  }
  if (bulk) { QAAS_STREAM(2, true); }
  QAAS_STREAM(2, false);
#undef QAAS_STREAM
}

}  // namespace w4
}  // namespace qaas
