#pragma once
// The row-level quantize/dequantize operations every storage stream needs, declared once.
// Backends specialize QuantOps (quant/reference.hpp: scalar; backend/eigen/quantize.hpp: Eigen).
//
// Layout they read and write (one block of a stream):
//   codes  — one packed row of Q::code_bytes(width) bytes per token;
//   params — Axis::Token: per token, width/group groups × Q::params_per_group fp16 values;
//            Axis::Channel: per token group, width × Q::params_per_group fp16 values.
// Inputs are finite (the cache checks before it quantizes); a group whose scale or zero does not
// fit fp16 raises ValueError.

#include "../core/backend.hpp"
#include "../core/error.hpp"
#include "format.hpp"

namespace xquant::quant {

template <class Backend>
struct QuantOps {
  static_assert(detail::always_false<Backend>,
                "xquant: no quantize/dequantize operations for this backend; use "
                "backend::Reference or backend::Eigen on the CPU (GPU: include <xquant/cuda.cuh>)");
};

namespace detail {
[[noreturn]] inline void throw_fp16_range(float lo, float hi) {
  throw ValueError(xquant::detail::concat(
      "X: a quantization group spans [", lo, ", ", hi,
      "], whose scale or zero does not fit fp16 (|value| <= 65504); rescale the activations"));
}
}  // namespace detail

}  // namespace xquant::quant
