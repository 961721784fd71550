#pragma once
// The three dense products rematerialization is made of. backend::Reference runs them as plain
// loops (float accumulation in natural order); backend/eigen/linalg.hpp hands them to Eigen's GEMM.

#include <algorithm>
#include <cstring>

#include "../core/backend.hpp"
#include "weights.hpp"

namespace xquant::remat {

template <class Backend>
struct LinAlg {
  static_assert(detail::always_false<Backend>,
                "xquant: no dense linear algebra for this backend; use backend::Reference or backend::Eigen");
};

template <>
struct LinAlg<backend::Reference> {
  /// out (x.rows × p.out, row stride ld) = x·Wᵀ + bias; identity W copies x.
  static void project(const RowsView& x, const Projection& p, float* out, index_t ld) {
    for (index_t r = 0; r < x.rows; ++r)
      for (index_t o = 0; o < p.out; ++o) {
        float acc = 0.0f;
        if (p.w == nullptr) acc = x.data[r * x.ld + o];
        else
          for (index_t i = 0; i < p.in; ++i) acc += x.data[r * x.ld + i] * p.w[o * p.in + i];
        out[r * ld + o] = acc + (p.bias ? p.bias[o] : 0.0f);
      }
  }
  /// C (m × n) = alpha · A (m × k) · Bᵀ (B is n × k).
  static void gemm_nt(index_t m, index_t n, index_t k, float alpha, const float* A, index_t lda, const float* B,
                      index_t ldb, float* C, index_t ldc) {
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        float acc = 0.0f;
        for (index_t t = 0; t < k; ++t) acc += A[i * lda + t] * B[j * ldb + t];
        C[i * ldc + j] = alpha * acc;
      }
  }
  /// C (m × n) = A (m × k) · B (k × n).
  static void gemm_nn(index_t m, index_t n, index_t k, const float* A, index_t lda, const float* B, index_t ldb,
                      float* C, index_t ldc) {
    for (index_t i = 0; i < m; ++i) {
      for (index_t j = 0; j < n; ++j) C[i * ldc + j] = 0.0f;
      for (index_t t = 0; t < k; ++t) {
        const float a = A[i * lda + t];
        for (index_t j = 0; j < n; ++j) C[i * ldc + j] += a * B[t * ldb + j];
      }
    }
  }
};

}  // namespace xquant::remat
