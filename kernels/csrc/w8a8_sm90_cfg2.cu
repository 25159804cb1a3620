// Instantiation of W8A8 GEMM tile configuration 2 (see w8a8_sm90.cuh); built only with CUTLASS.
#include "w8a8_sm90.cuh"

namespace qaas {
namespace sm90 {
void run_cfg2(const GemmProblem& p, const at::Tensor& like) { Cfg2::run(p, like); }
}  // namespace sm90
}  // namespace qaas
