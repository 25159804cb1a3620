// Shared helpers for the qaas CUDA kernels.
//
// Code conventions (quant.quantizers.core / packing): unsigned codes u with x = (u - z) * s;
// symmetric z = 2**(b-1). int4: element 2j in the LOW nibble of byte j.
// For tensor-core math a symmetric int8 code becomes a signed value by u ^ 0x80 (== u - 128 as int8)
// and an int4 code by a per-byte subtraction of 8 after unpacking.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <c10/cuda/CUDAException.h>

namespace qaas {

constexpr float kEps = 1e-8f;

// SMs of the current CUDA device (host side: the launchers size persistent grids and waves by it). Queried per call
// (a cached device attribute in the driver), so a process with devices of different kinds gets each one's own count.
inline int current_device_sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Eight int4 codes (one 32-bit word, element 2j in the low nibble of byte j) -> eight signed int8
// (code - 8) in natural element order, as two 32-bit words.
__device__ __forceinline__ void unpack8_int4_signed(uint32_t w, uint32_t& out0, uint32_t& out1) {
  const uint32_t lo = w & 0x0F0F0F0Fu;          // elements 0, 2, 4, 6
  const uint32_t hi = (w >> 4) & 0x0F0F0F0Fu;   // elements 1, 3, 5, 7
  out0 = __vsub4(__byte_perm(lo, hi, 0x5140), 0x08080808u);
  out1 = __vsub4(__byte_perm(lo, hi, 0x7362), 0x08080808u);
}

// 16-byte asynchronous global -> shared copies (L2 only: .cg), by shared-window address; groups committed and awaited.
__device__ __forceinline__ void cp_async16(uint32_t saddr, const void* gptr) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(gptr) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait0() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

}  // namespace qaas
