#pragma once
// Helpers of the GPU tests: skip without a device, host <-> device copies of bf16/fp16 data,
// CPU reference rows of a quantized stream.

#include <cstdio>

#include <xquant/cuda.cuh>
#include <xquant/quant/reference.hpp>

#include "support.hpp"

namespace xqcuda {

namespace xc = xquant::cuda;

/// True when a CUDA device exists; otherwise prints the skip message once and returns false.
inline bool have_device() {
  static const bool ok = xc::device_count() > 0;
  static bool said = false;
  if (!ok && !said) {
    std::printf("SKIPPED: no CUDA device (GPU tests build but do not run here)\n");
    said = true;
  }
  if (!ok) MESSAGE("SKIPPED: no CUDA device");
  return ok;
}
#define XQ_REQUIRE_DEVICE() \
  if (!::xqcuda::have_device()) return

template <class T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, xc::bf16>) return __float2bfloat16_rn(x);
  else return __float2half_rn(x);
}
template <class T>
float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) return x;  // (not through __half2float, which would round it to fp16)
  else if constexpr (std::is_same_v<T, xc::bf16>) return __bfloat162float(x);
  else return __half2float(x);
}
/// Rounds to T and back (the values the GPU actually sees).
template <class T>
std::vector<float> round_to(std::vector<float> v) {
  for (float& x : v) x = to_float(from_float<T>(x));
  return v;
}
template <class T>
xc::DeviceBuffer<T> to_device(const std::vector<float>& v) {
  std::vector<T> h(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) h[i] = from_float<T>(v[i]);
  xc::DeviceBuffer<T> d(v.size());
  XQ_CUDA_CHECK(cudaMemcpy(d.data(), h.data(), d.bytes(), cudaMemcpyHostToDevice));
  // A copy from pageable memory may return before its DMA into `d` ends, and work on a
  // non-blocking stream does not wait for it (a graph test appended stale rows under memcheck).
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
  return d;
}
template <class T>
std::vector<T> to_host(const xc::DeviceBuffer<T>& d, std::size_t n = 0) {
  std::vector<T> h(n ? n : d.size());
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
  XQ_CUDA_CHECK(cudaMemcpy(h.data(), d.data(), h.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}
template <class T>
std::vector<float> to_host_float(const xc::DeviceBuffer<T>& d, std::size_t n = 0) {
  const auto h = to_host(d, n);
  std::vector<float> f(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) f[i] = to_float(h[i]);
  return f;
}

/// CPU reference of what a DeviceStream<Q> holds for one sequence of `len` tokens (rows of
/// `width` floats, already rounded to the input type): X̂ as floats, through the reference ops.
template <class Q>
std::vector<float> reference_xhat(const std::vector<float>& x, xquant::index_t len, xquant::index_t width,
                                  xquant::index_t group) {
  using Ops = xquant::quant::QuantOps<xquant::backend::Reference>;
  std::vector<float> out(static_cast<std::size_t>(len * width));
  const xquant::index_t cb = Q::code_bytes(width);
  if constexpr (Q::axis == xquant::Axis::Token) {
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(len * cb));
    std::vector<std::uint16_t> params(static_cast<std::size_t>(len * (width / group) * Q::params_per_group));
    Ops::quantize_tokens<Q>(x.data(), len, width, width, group, codes.data(), params.data());
    Ops::dequantize_tokens<Q>(codes.data(), params.data(), len, width, group, out.data(), width);
  } else {
    std::vector<float> h(x);
    for (float& v : h) v = xquant::round_to_half(v);  // per-channel tokens pass through the fp16 window
    const xquant::index_t full = len - len % group;
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(group * cb));
    std::vector<std::uint16_t> params(static_cast<std::size_t>(width * Q::params_per_group));
    for (xquant::index_t t = 0; t < full; t += group) {
      Ops::quantize_channels<Q>(h.data() + t * width, group, width, width, codes.data(), params.data());
      Ops::dequantize_channels<Q>(codes.data(), params.data(), group, width, out.data() + t * width, width);
    }
    std::copy(h.begin() + full * width, h.begin() + len * width, out.begin() + full * width);
  }
  return out;
}

/// Sets one of the library's test switches (xquant::cuda::detail::...) for a scope and puts the
/// old value back when the scope ends, also when a failed REQUIRE or an exception leaves it early.
template <class T>
class ScopedValue {
 public:
  ScopedValue(T& target, T value) : target_(target), old_(target) { target_ = value; }
  ScopedValue(const ScopedValue&) = delete;
  ScopedValue& operator=(const ScopedValue&) = delete;
  ~ScopedValue() { target_ = old_; }

 private:
  T& target_;
  T old_;
};

/// A non-blocking stream and the CUDA graph captured on it, all released when the test leaves
/// the scope, also when a failed REQUIRE or an exception leaves it early.
class CapturedStream {
 public:
  CapturedStream() { XQ_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  CapturedStream(const CapturedStream&) = delete;
  CapturedStream& operator=(const CapturedStream&) = delete;
  ~CapturedStream() {  // (errors ignored: a destructor must not throw)
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
    cudaStreamDestroy(s_);
  }
  cudaStream_t get() const { return s_; }
  /// Starts capturing, after all earlier work on the device: the legacy default stream does not
  /// order work on a non-blocking stream, so setup done there could still be running.
  void begin(cudaStreamCaptureMode mode = cudaStreamCaptureModeThreadLocal) {
    XQ_CUDA_CHECK(cudaDeviceSynchronize());
    XQ_CUDA_CHECK(cudaStreamBeginCapture(s_, mode));
  }
  /// Ends the capture and, with `instantiate`, makes the graph launchable.
  void end(bool instantiate = true) {
    XQ_CUDA_CHECK(cudaStreamEndCapture(s_, &graph_));
    if (instantiate) XQ_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
  }
  /// One replay of the captured graph on the stream.
  void launch() { XQ_CUDA_CHECK(cudaGraphLaunch(exec_, s_)); }

 private:
  cudaStream_t s_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace xqcuda
