// Instantiation of W4A16 sm90 GEMM configuration 2 (see w4a16_sm90.cuh); built only with CUTLASS.
#include "w4a16_sm90.cuh"

namespace qaas {
namespace sm90 {
void w4_run_cfg2(const W4A16Problem& p, const at::Tensor& like) { W4Cfg2::run(p, like); }
}  // namespace sm90
}  // namespace qaas
