#pragma once
// CUDA and cuBLAS failures as exceptions. Every runtime and cuBLAS call of the backend goes
// through XQ_CUDA_CHECK / XQ_CUBLAS_CHECK, and every launch is followed by check_launch(name), so
// a failure names the call and the runtime's error string instead of surfacing later.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../../core/error.hpp"

namespace xquant::cuda {

/// A CUDA runtime call, a kernel launch or a cuBLAS call failed.
struct CudaError : Error {
  using Error::Error;
};

namespace detail {
inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_<unknown>";
  }
}
inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess)
    throw CudaError(xquant::detail::concat(call, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e),
                                           ") at ", file, ":", line));
}
inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw CudaError(xquant::detail::concat(call, " failed: ", cublas_status_name(s), " at ", file, ":", line));
}
}  // namespace detail

#define XQ_CUDA_CHECK(call) ::xquant::cuda::detail::check_cuda((call), #call, __FILE__, __LINE__)
#define XQ_CUBLAS_CHECK(call) ::xquant::cuda::detail::check_cublas((call), #call, __FILE__, __LINE__)

/// Raises CudaError if the launch of `kernel` just made failed (bad configuration, too much
/// shared memory, ...). Execution errors surface at the next synchronizing call.
inline void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw CudaError(xquant::detail::concat("launch of ", kernel, " failed: ", cudaGetErrorName(e), " (",
                                           cudaGetErrorString(e), ")"));
}

/// Number of CUDA devices (0 when there is none or no driver), without throwing.
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace xquant::cuda
