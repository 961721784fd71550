#pragma once
// Eigen implementation of the quantize/dequantize operations (quant/ops.hpp). Same arithmetic as
// the scalar reference, expressed as array expressions that Eigen vectorizes: IEEE subtract,
// divide and rint give the same codes bit for bit.

#include <Eigen/Core>
#include <vector>

#include "../../quant/ops.hpp"
#include "../../quant/reference.hpp"
#include "../../quant/uniform.hpp"

namespace xquant::quant {

template <>
struct QuantOps<backend::Eigen> {
  using Array = ::Eigen::ArrayXf;
  using RowArrays = ::Eigen::Array<float, ::Eigen::Dynamic, ::Eigen::Dynamic, ::Eigen::RowMajor>;
  using ConstRows = ::Eigen::Map<const RowArrays, 0, ::Eigen::OuterStride<>>;
  using Rows = ::Eigen::Map<RowArrays, 0, ::Eigen::OuterStride<>>;

  /// Codes of `v` under `p` as floats in [0, max_code]: same formula as Q::encode.
  template <class Q, class Expr>
  static auto codes_of(const Expr& v, const typename Q::Params& p) {
    constexpr float top = static_cast<float>(Q::max_code);
    if constexpr (Q::scheme == Scheme::Asymmetric)
      return ((v - p.zero) / p.scale).rint().max(0.0f).min(top);
    else
      return (v / p.scale).rint().max(-float(Q::sym_levels)).min(float(Q::sym_levels)) + float(Q::sym_levels);
  }

  template <class Q>
  static void quantize_tokens(const float* x, index_t rows, index_t ld, index_t width, index_t group,
                              std::uint8_t* codes, std::uint16_t* params) {
    if constexpr (Q::is_float) {
      QuantOps<backend::Reference>::quantize_tokens<Q>(x, rows, ld, width, group, codes, params);
    } else {
      const index_t cb = Q::code_bytes(width), groups = width / group;
      Array cf(width);
      std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
      for (index_t r = 0; r < rows; ++r) {
        for (index_t g = 0; g < groups; ++g) {
          ::Eigen::Map<const Array> v(x + r * ld + g * group, group);
          const float lo = v.minCoeff(), hi = v.maxCoeff();
          std::uint16_t* p = params + (r * groups + g) * Q::params_per_group;
          if (!Q::fit(lo, hi, p)) detail::throw_fp16_range(lo, hi);
          const auto P = Q::load(p);
          if (P.scale > 0.0f) cf.segment(g * group, group) = codes_of<Q>(v, P);
          else cf.segment(g * group, group).setConstant(Q::scheme == Scheme::Asymmetric ? 0.0f : float(Q::sym_levels));
        }
        for (index_t i = 0; i < width; ++i) c[i] = static_cast<std::uint8_t>(cf[i]);
        pack_codes<Q::bits>(c.data(), width, codes + r * cb);
      }
    }
  }

  template <class Q>
  static void quantize_channels(const float* x, index_t rows, index_t ld, index_t width,
                                std::uint8_t* codes, std::uint16_t* params) {
    ConstRows m(x, rows, width, ::Eigen::OuterStride<>(ld));
    const Array lo = m.colwise().minCoeff().transpose(), hi = m.colwise().maxCoeff().transpose();
    Array scale(width), zero(width);
    for (index_t j = 0; j < width; ++j) {
      std::uint16_t* p = params + j * Q::params_per_group;
      if (!Q::fit(lo[j], hi[j], p)) detail::throw_fp16_range(lo[j], hi[j]);
      const auto P = Q::load(p);
      scale[j] = P.scale;
      zero[j] = P.zero;
    }
    const auto live = (scale > 0.0f);
    const Array safe = live.select(scale, Array::Ones(width));
    Array cf(width);
    std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
    constexpr float top = static_cast<float>(Q::max_code), q = static_cast<float>(Q::sym_levels);
    for (index_t r = 0; r < rows; ++r) {
      const auto v = m.row(r).transpose();
      if constexpr (Q::scheme == Scheme::Asymmetric)
        cf = live.select(((v - zero) / safe).rint().max(0.0f).min(top), Array::Zero(width));
      else
        cf = live.select((v / safe).rint().max(-q).min(q) + q, Array::Constant(width, q));
      for (index_t j = 0; j < width; ++j) c[j] = static_cast<std::uint8_t>(cf[j]);
      pack_codes<Q::bits>(c.data(), width, codes + r * Q::code_bytes(width));
    }
  }

  template <class Q>
  static void dequantize_tokens(const std::uint8_t* codes, const std::uint16_t* params, index_t rows,
                                index_t width, index_t group, float* out, index_t ld) {
    if constexpr (Q::is_float) {
      QuantOps<backend::Reference>::dequantize_tokens<Q>(codes, params, rows, width, group, out, ld);
    } else {
      const index_t cb = Q::code_bytes(width), groups = width / group;
      std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
      for (index_t r = 0; r < rows; ++r) {
        unpack_codes<Q::bits>(codes + r * cb, width, c.data());
        auto codes_f = ::Eigen::Map<const ::Eigen::Array<std::uint8_t, ::Eigen::Dynamic, 1>>(c.data(), width).cast<float>();
        for (index_t g = 0; g < groups; ++g) {
          const auto P = Q::load(params + (r * groups + g) * Q::params_per_group);
          ::Eigen::Map<Array> o(out + r * ld + g * group, group);
          if constexpr (Q::scheme == Scheme::Asymmetric)
            o = codes_f.segment(g * group, group) * P.scale + P.zero;
          else
            o = (codes_f.segment(g * group, group) - float(Q::sym_levels)) * P.scale;
        }
      }
    }
  }

  template <class Q>
  static void dequantize_channels(const std::uint8_t* codes, const std::uint16_t* params, index_t rows,
                                  index_t width, float* out, index_t ld) {
    Array scale(width), zero(width);
    for (index_t j = 0; j < width; ++j) {
      const auto P = Q::load(params + j * Q::params_per_group);
      scale[j] = P.scale;
      zero[j] = P.zero;
    }
    std::vector<std::uint8_t> c(static_cast<std::size_t>(width));
    for (index_t r = 0; r < rows; ++r) {
      unpack_codes<Q::bits>(codes + r * Q::code_bytes(width), width, c.data());
      auto codes_f = ::Eigen::Map<const ::Eigen::Array<std::uint8_t, ::Eigen::Dynamic, 1>>(c.data(), width).cast<float>();
      ::Eigen::Map<Array> o(out + r * ld, width);
      if constexpr (Q::scheme == Scheme::Asymmetric) o = codes_f * scale + zero;
      else o = (codes_f - float(Q::sym_levels)) * scale;
    }
  }
};

}  // namespace xquant::quant
