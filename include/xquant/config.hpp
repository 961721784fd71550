#pragma once
// Build-wide definitions shared by host and device code. This header must stay free of CUDA
// headers: CPU users include it through <xquant/xquant.hpp> with any C++17 compiler.

#define XQUANT_VERSION_MAJOR 0
#define XQUANT_VERSION_MINOR 1
#define XQUANT_VERSION_PATCH 0

// XQ_HOST_DEVICE marks functions that run on both sides (quantizer math, packing, fp16 bits).
// Without a CUDA compiler it collapses to `inline`, like CUTLASS_HOST_DEVICE.
#if defined(__CUDACC__)
#define XQ_HOST_DEVICE __host__ __device__ __forceinline__
#define XQ_DEVICE_CODE 1
#else
#define XQ_HOST_DEVICE inline
#define XQ_DEVICE_CODE 0
#endif

#include <cstddef>
#include <cstdint>

namespace xquant {
using index_t = std::int64_t;  // token and element counts; wide enough for long contexts × width
}  // namespace xquant

namespace xquant {
/// a*b + c with two roundings on every compiler and device (nvcc would otherwise contract it
/// into one FMA), so dequantized values agree bit for bit between the CPU and CUDA paths.
XQ_HOST_DEVICE float mul_add_rn(float a, float b, float c) {
#if XQ_DEVICE_CODE && defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  return a * b + c;
#endif
}
}  // namespace xquant
