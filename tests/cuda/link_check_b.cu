// The second translation unit of test_cuda_link (see link_check_a.cu).

#include <xquant/cuda.cuh>

namespace xc = xquant::cuda;
using Q4 = xquant::quant::Uniform<4>;

int uses_from_b() {
  auto remat = &xc::remat_fused<Q4>;
  auto attend = &xc::attend_absorbed_gemm<Q4, Q4>;
  return (remat != nullptr) + (attend != nullptr);
}
