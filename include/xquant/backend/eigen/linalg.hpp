#pragma once
// Eigen's GEMM behind the rematerialization products (remat/linalg.hpp).

#include <Eigen/Core>

#include "../../remat/linalg.hpp"

namespace xquant::remat {

template <>
struct LinAlg<backend::Eigen> {
  using RowMatrix = ::Eigen::Matrix<float, ::Eigen::Dynamic, ::Eigen::Dynamic, ::Eigen::RowMajor>;
  using ConstMap = ::Eigen::Map<const RowMatrix, 0, ::Eigen::OuterStride<>>;
  using Map = ::Eigen::Map<RowMatrix, 0, ::Eigen::OuterStride<>>;

  static void project(const RowsView& x, const Projection& p, float* out, index_t ld) {
    Map o(out, x.rows, p.out, ::Eigen::OuterStride<>(ld));
    const ConstMap xm(x.data, x.rows, x.cols, ::Eigen::OuterStride<>(x.ld));
    if (p.w == nullptr) o = xm.leftCols(p.out);
    else o.noalias() = xm.leftCols(p.in) * ConstMap(p.w, p.out, p.in, ::Eigen::OuterStride<>(p.in)).transpose();
    if (p.bias) o.rowwise() += ::Eigen::Map<const ::Eigen::RowVectorXf>(p.bias, p.out);
  }
  static void gemm_nt(index_t m, index_t n, index_t k, float alpha, const float* A, index_t lda, const float* B,
                      index_t ldb, float* C, index_t ldc) {
    Map(C, m, n, ::Eigen::OuterStride<>(ldc)).noalias() =
        alpha * ConstMap(A, m, k, ::Eigen::OuterStride<>(lda)) * ConstMap(B, n, k, ::Eigen::OuterStride<>(ldb)).transpose();
  }
  static void gemm_nn(index_t m, index_t n, index_t k, const float* A, index_t lda, const float* B, index_t ldb,
                      float* C, index_t ldc) {
    Map(C, m, n, ::Eigen::OuterStride<>(ldc)).noalias() =
        ConstMap(A, m, k, ::Eigen::OuterStride<>(lda)) * ConstMap(B, k, n, ::Eigen::OuterStride<>(ldb));
  }
};

}  // namespace xquant::remat
