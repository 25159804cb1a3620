// Instantiation of W8A8 GEMM tile configuration 5 (see w8a8_sm90.cuh); built only with CUTLASS.
#include "w8a8_sm90.cuh"

namespace qaas {
namespace sm90 {
void run_cfg5(const GemmProblem& p, const at::Tensor& like) { Cfg5::run(p, like); }
}  // namespace sm90
}  // namespace qaas
