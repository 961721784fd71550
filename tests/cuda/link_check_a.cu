// Two translation units of one program include <xquant/cuda.cuh> and instantiate the same
// templates (see link_check_b.cu): a header-only CUDA library must link in that case (kernels
// defined in a header need internal linkage or a template). Built and run by ctest as
// test_cuda_link; it needs no device.

#include <cstdio>

#include <xquant/cuda.cuh>

namespace xc = xquant::cuda;
using Q4 = xquant::quant::Uniform<4>;

int uses_from_b();  // link_check_b.cu

int uses_from_a() {
  // Taking the addresses instantiates the host templates (and the kernels they launch) here too.
  auto remat = &xc::remat_fused<Q4>;
  auto attend = &xc::attend_absorbed_gemm<Q4, Q4>;
  return (remat != nullptr) + (attend != nullptr);
}

int main() {
  const int n = uses_from_a() + uses_from_b();
  std::printf("xquant::cuda linked from two translation units (%d entry points)\n", n);
  return n == 4 ? 0 : 1;
}
