#pragma once
// Device memory owned by RAII buffers (plain cudaMalloc, never managed memory), the check that a
// caller's pointer is memory the device can read, and a cuBLAS handle bound to a stream.

#include <atomic>
#include <cstddef>
#include <utility>

#include <cuda_bf16.h>

#include "error.cuh"

namespace xquant::cuda {

/// `n` elements of T in device memory. Moves, never copies. Contents are uninitialized.
/// \tparam T a trivially copyable element type (bf16, fp16, float, int, code bytes)
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) { resize(n); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }

  /// Reallocates to exactly `n` elements (contents are lost). Synchronizes like cudaMalloc.
  void resize(std::size_t n) {
    if (n == n_) return;
    release();
    if (n) XQ_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
    n_ = n;
  }
  /// Grows to at least `n` elements.
  void reserve(std::size_t n) {
    if (n > n_) resize(n);
  }

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  std::size_t bytes() const { return n_ * sizeof(T); }

  void upload(const T* host, std::size_t n, cudaStream_t s) {
    require<ShapeError>(n <= n_, "upload: ", n, " elements do not fit a buffer of ", n_);
    XQ_CUDA_CHECK(cudaMemcpyAsync(p_, host, n * sizeof(T), cudaMemcpyHostToDevice, s));
  }
  void download(T* host, std::size_t n, cudaStream_t s) const {
    require<ShapeError>(n <= n_, "download: ", n, " elements exceed a buffer of ", n_);
    XQ_CUDA_CHECK(cudaMemcpyAsync(host, p_, n * sizeof(T), cudaMemcpyDeviceToHost, s));
  }
  /// Fills every byte with `byte` (tests poison outputs with 0xff: NaN in every float type); an
  /// empty buffer is left alone.
  void fill_bytes(int byte, cudaStream_t s) {
    if (n_) XQ_CUDA_CHECK(cudaMemsetAsync(p_, byte, bytes(), s));
  }

 private:
  void release() noexcept {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

namespace detail {
/// Tests set it to check pointers as on a device that cannot read pageable host memory.
inline bool assume_no_pageable_access = false;

/// Whether the current device reads pageable host memory directly (HMM or ATS); asked once per
/// device.
inline bool device_reads_pageable_memory() {
  int dev = 0;
  XQ_CUDA_CHECK(cudaGetDevice(&dev));
  constexpr int kCachedDevices = 64;
  static std::atomic<signed char> known[kCachedDevices] = {};  // 0: not asked yet, 1: no, 2: yes
  if (dev < kCachedDevices)
    if (const signed char k = known[dev].load(std::memory_order_relaxed)) return k == 2;
  int reads = 0;
  XQ_CUDA_CHECK(cudaDeviceGetAttribute(&reads, cudaDevAttrPageableMemoryAccess, dev));
  if (dev < kCachedDevices) known[dev].store(reads ? 2 : 1, std::memory_order_relaxed);
  return reads != 0;
}
}  // namespace detail

/// Throws ShapeError when `p` points to pageable host memory (malloc, new, the stack) and the
/// current device cannot read it: a kernel would fault on it, and a fault leaves the process's CUDA
/// context unusable. Device, managed and pinned host memory pass, as does every pointer on a device
/// that reads pageable memory (HMM, ATS), and null (callers that need the argument check that).
/// `name...` names the argument, e.g. "remat: W".
template <class... Name>
void require_device_accessible(const void* p, const Name&... name) {
  if (p == nullptr || (!detail::assume_no_pageable_access && detail::device_reads_pageable_memory())) return;
  cudaPointerAttributes a{};
  const cudaError_t e = cudaPointerGetAttributes(&a, p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // not left for the next check_launch to report
    detail::check_cuda(e, "cudaPointerGetAttributes", __FILE__, __LINE__);
  }
  require<ShapeError>(a.type != cudaMemoryTypeUnregistered, name...,
                      ": points to pageable host memory, which this device cannot read; pass device memory "
                      "(cudaMalloc), pinned host memory (cudaMallocHost) or managed memory");
}

/// A cuBLAS handle. Calls that take it set the stream first, so it follows the stream-ordered API.
class Cublas {
 public:
  Cublas() { XQ_CUBLAS_CHECK(cublasCreate(&h_)); }
  ~Cublas() {
    if (h_) cublasDestroy(h_);
  }
  Cublas(const Cublas&) = delete;
  Cublas& operator=(const Cublas&) = delete;
  cublasHandle_t on(cudaStream_t s) {
    XQ_CUBLAS_CHECK(cublasSetStream(h_, s));
    return h_;
  }

 private:
  cublasHandle_t h_ = nullptr;
};

/// C = A·Bᵀ in bf16 with fp32 accumulation through cuBLAS. Row-major A (M × K, lda),
/// B (N × K, ldb: nn.Linear's layout), C (M × N, ldc).
inline void gemm_bf16_nt(Cublas& blas, index_t M, index_t N, index_t K, const __nv_bfloat16* A, index_t lda,
                         const __nv_bfloat16* B, index_t ldb, __nv_bfloat16* C, index_t ldc, cudaStream_t stream) {
  const float one = 1.0f, zero = 0.0f;
  // Row-major C = A·Bᵀ is column-major Cᵀ = B·Aᵀ: B enters transposed, A as is.
  XQ_CUBLAS_CHECK(cublasGemmEx(blas.on(stream), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
                               static_cast<int>(K), &one, B, CUDA_R_16BF, static_cast<int>(ldb), A, CUDA_R_16BF,
                               static_cast<int>(lda), &zero, C, CUDA_R_16BF, static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT));
}

}  // namespace xquant::cuda
