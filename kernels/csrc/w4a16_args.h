// Argument checks shared by the packed-metadata W4A16 entry points (w4a16_packed.cu, w4a16_batched.cu).
#pragma once

#include <ATen/ATen.h>
#include <cuda_fp16.h>

namespace qaas {
namespace w4 {

// x a contiguous fp16 CUDA [M <= max_rows, K], K and the group multiples of 128, meta ceil(N/16) * G * 16 int32 words
// (reference.pack_w4_meta), x and the codes 16-byte aligned, meta 8-byte, bias fp16 [N]; `name` prefixes the
// messages. Returns the bias pointer (nullptr without one).
const half* check_packed_args(const char* name, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& meta,
                              int64_t group_size, const c10::optional<at::Tensor>& bias, int64_t N, int64_t max_rows);

}  // namespace w4
}  // namespace qaas
