#pragma once
// Small device helpers shared by the kernels: element types, fp16-bit conversions through the
// library's XQ_HOST_DEVICE functions, packed-code loads and stores.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <mutex>
#include <type_traits>

#include "../../core/half.hpp"
#include "../../quant/format.hpp"
#include "../../quant/packing.hpp"
#include "../../quant/uniform.hpp"
#include "error.cuh"

namespace xquant::cuda {

using bf16 = __nv_bfloat16;
using fp16 = __half;

namespace detail {

template <class T>
inline constexpr bool is_input_type = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

/// Input element -> float, exactly (bf16 and fp16 are subsets of float).
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(fp16 v) { return __half2float(v); }

/// Loads 8 consecutive input values (16 bytes, aligned) as floats.
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}

/// Stores the Bits bytes that hold 8 packed codes (a chunk of 8 codes fills whole bytes).
template <int Bits>
__device__ __forceinline__ void store_chunk(std::uint8_t* p, std::uint64_t w) {
  if constexpr (Bits == 2) *reinterpret_cast<std::uint16_t*>(p) = static_cast<std::uint16_t>(w);
  else if constexpr (Bits == 4) *reinterpret_cast<std::uint32_t*>(p) = static_cast<std::uint32_t>(w);
  else if constexpr (Bits == 8) *reinterpret_cast<std::uint64_t*>(p) = w;
  else {
#pragma unroll
    for (int b = 0; b < Bits; ++b) p[b] = static_cast<std::uint8_t>(w >> (8 * b));
  }
}
/// Loads the Bits bytes of 8 packed codes as the low bits of a 64-bit word.
template <int Bits>
__device__ __forceinline__ std::uint64_t load_chunk(const std::uint8_t* p) {
  if constexpr (Bits == 2) return *reinterpret_cast<const std::uint16_t*>(p);
  else if constexpr (Bits == 4) return *reinterpret_cast<const std::uint32_t*>(p);
  else if constexpr (Bits == 8) return *reinterpret_cast<const std::uint64_t*>(p);
  else {
    std::uint64_t w = 0;
#pragma unroll
    for (int b = 0; b < Bits; ++b) w |= static_cast<std::uint64_t>(p[b]) << (8 * b);
    return w;
  }
}

/// 8 codes -> their packed word, through the CPU's own pack_codes (so the layout cannot drift).
template <int Bits>
__device__ __forceinline__ std::uint64_t pack8(const std::uint8_t (&c)[8]) {
  std::uint8_t bytes[8] = {};
  quant::pack_codes<Bits>(c, 8, bytes);
  std::uint64_t w = 0;
#pragma unroll
  for (int b = 0; b < Bits; ++b) w |= static_cast<std::uint64_t>(bytes[b]) << (8 * b);
  return w;
}

/// Two floats -> bf16x2 (round to nearest even), `lo` in the low half.
__device__ __forceinline__ std::uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}

/// 8 values to 8 consecutive bf16 (rounded to nearest even) or float outputs, 16-byte aligned.
template <class O>
__device__ __forceinline__ void store8(O* dst, const float (&x)[8]) {
  static_assert(std::is_same_v<O, float> || std::is_same_v<O, bf16>, "store8: bf16 or float outputs");
  if constexpr (std::is_same_v<O, float>) {
    *reinterpret_cast<float4*>(dst) = make_float4(x[0], x[1], x[2], x[3]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack_bf16x2(x[0], x[1]), pack_bf16x2(x[2], x[3]),
                                                pack_bf16x2(x[4], x[5]), pack_bf16x2(x[6], x[7]));
  }
}

/// Butterfly min/max over `lanes` consecutive lanes (a power of two <= 32, aligned).
__device__ __forceinline__ void segment_minmax(float& lo, float& hi, int lanes) {
  for (int o = lanes >> 1; o >= 1; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
}

inline unsigned blocks_for(index_t n, unsigned per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

/// Multiprocessors of the current device (grids sized to fill it).
inline int multiprocessor_count() {
  int dev = 0, sms = 0;
  XQ_CUDA_CHECK(cudaGetDevice(&dev));
  XQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

/// A kernel's allowance of dynamic shared memory (cudaFuncSetAttribute), set once per device and
/// only ever raised: the attribute call costs host time that a decode step pays on every layer
/// otherwise. One static instance per kernel, e.g. `static SmemAllowance allow; allow.ensure(k, n);`
/// inside the launching function template.
class SmemAllowance {
 public:
  template <class Kernel>
  void ensure(Kernel kernel, int bytes) {
    int dev = 0;
    XQ_CUDA_CHECK(cudaGetDevice(&dev));
    const bool known = dev >= 0 && dev < kDevices;
    if (known && granted_[dev].load(std::memory_order_acquire) >= bytes) return;
    std::lock_guard<std::mutex> lock(mutex_);  // raising is rare: once per device and size
    if (known && granted_[dev].load(std::memory_order_relaxed) >= bytes) return;
    XQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    if (known) granted_[dev].store(bytes, std::memory_order_release);
  }

 private:
  static constexpr int kDevices = 64;
  std::atomic<int> granted_[kDevices] = {};
  std::mutex mutex_;
};

}  // namespace detail
}  // namespace xquant::cuda
