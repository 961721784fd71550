#pragma once
// Offline SVD of a layer's key/value projections, for the latent (GQA) codecs (DESIGN.md §1):
// with W in the nn.Linear layout (out × in, y = x·Wᵀ), factor Wᵀ = U Σ Bᵀ with U: in × r
// (orthonormal columns), r = min(in, out). Then y = (x·U)·(ΣBᵀ) exactly, so a codec may cache the
// r-wide latent x·U instead of x and recover y with one r × out product.
//
// Outlier channels. The latent x·Uk of real models carries a massive outlier in channel 0 (the
// leading singular direction). Two weight-only predictions follow from the factorization:
//   - latent channels: the leading singular directions (channel 0, 1, ...) are the ones kept in
//     fp16 by codec::Latent unless the caller gives channels measured on calibration data;
//   - Key channels: K = (x·Uk)(ΣkBkᵀ) ≈ (x·Uk)₀·σ₀·Bkᵀ[0, :] when channel 0 dominates, so the
//     outlier channels of K are the largest |entries| of the first row of Bkᵀ
//     (predict_key_outlier_channels). measure_top_channels finds either kind on data.

#include <Eigen/Core>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../cache/snapshot.hpp"
#include "../config.hpp"
#include "../core/error.hpp"

namespace xquant::codec::svd {

/// Thin SVD factors of one linear map (or of several stacked along `out`).
struct Factors {
  index_t in = 0;    ///< input width (d)
  index_t out = 0;   ///< output width (dkv, or 2·dkv for [Wk|Wv])
  index_t rank = 0;  ///< r = min(in, out): width of the latent x·U
  /// Uᵀ, r × in row-major: latent = x·U is a Projection{basis_t, r, in}.
  std::vector<float> basis_t;
  /// B·Σ, out × r row-major: y = latent·(ΣBᵀ) is a Projection{recover, out, r}.
  std::vector<float> recover;
  /// Bᵀ, r × out row-major (row j: how latent channel j spreads over the outputs).
  std::vector<float> bt;
  /// Singular values, descending.
  std::vector<float> sigma;
};

namespace detail {
/// `rows` stacked row-major matrices (each out_i × in) as one double matrix Wᵀ (in × Σout_i).
inline ::Eigen::MatrixXd transpose_stacked(const std::vector<const float*>& parts, const std::vector<index_t>& outs,
                                           index_t in) {
  index_t total = 0;
  for (index_t o : outs) total += o;
  ::Eigen::MatrixXd wt(in, total);
  index_t col = 0;
  for (std::size_t p = 0; p < parts.size(); ++p) {
    for (index_t o = 0; o < outs[p]; ++o)
      for (index_t i = 0; i < in; ++i) wt(i, col + o) = static_cast<double>(parts[p][o * in + i]);
    col += outs[p];
  }
  return wt;
}

/// Whether U·diag(S)·Vᵀ reproduces wt and U, V have orthonormal columns, to `tol` relative,
/// checked on a few random probe vectors (O(in·out) each, where a full product would cost
/// O(in·out·r)): a wrong factorization fails a random probe with probability 1.
inline bool svd_is_accurate(const ::Eigen::MatrixXd& wt, const ::Eigen::MatrixXd& U, const ::Eigen::VectorXd& S,
                            const ::Eigen::MatrixXd& V, double tol = 1e-9) {
  std::mt19937_64 g(0x5eed);  // fixed: the same weights always take the same path
  std::normal_distribution<double> n01;
  const double wnorm = wt.norm();
  for (int probe = 0; probe < 3; ++probe) {
    ::Eigen::VectorXd x(wt.cols()), y(U.cols());
    for (auto& v : x) v = n01(g);
    for (auto& v : y) v = n01(g);
    const ::Eigen::VectorXd direct = wt * x, factored = U * (S.asDiagonal() * (V.transpose() * x));
    if (!((direct - factored).norm() <= tol * wnorm * x.norm())) return false;  // NaN fails too
    if (!((U.transpose() * (U * y) - y).norm() <= tol * y.norm())) return false;
    if (!((V.transpose() * (V * y) - y).norm() <= tol * y.norm())) return false;
  }
  return true;
}
}  // namespace detail

/// Factors of the maps W_p (each out_p × in, row-major) stacked along their outputs:
/// [W_1ᵀ | W_2ᵀ | ...] = U Σ Bᵀ. Computed in double (Eigen's BDCSVD, checked, or JacobiSVD when it
/// is wrong), stored in float. Signs are fixed so that the largest-magnitude entry of each column
/// of U is positive (deterministic). Error (never wrong factors) if neither SVD reproduces W.
inline Factors factorize_stacked(const std::vector<const float*>& parts, const std::vector<index_t>& outs, index_t in) {
  require<ConfigError>(!parts.empty() && parts.size() == outs.size(), "weights: expected one out-width per matrix");
  require<ConfigError>(in > 0, "in: must be positive, got ", in);
  for (std::size_t p = 0; p < parts.size(); ++p) {
    require<ConfigError>(parts[p] != nullptr, "weights: matrix ", p, " is null");
    require<ConfigError>(outs[p] > 0, "weights: matrix ", p, " must have a positive out-width, got ", outs[p]);
  }
  const ::Eigen::MatrixXd wt = detail::transpose_stacked(parts, outs, in);
  for (index_t j = 0; j < wt.cols(); ++j)
    for (index_t i = 0; i < in; ++i)
      require<ValueError>(std::isfinite(wt(i, j)), "weights: entry (", j, ", ", i, ") is not finite");
  // Divide and conquer (BDCSVD) is fast, but Eigen 3.4.0's returns wrong vectors for some plain
  // random matrices (10% reconstruction error for about 1 in 4000 random 256 × 64 weights,
  // tests/test_codec_latent.cpp). Its result is checked, and one-sided Jacobi, slower and
  // accurate, replaces it when the check fails.
  ::Eigen::MatrixXd U, V;
  ::Eigen::VectorXd S;
  const auto take = [&](const auto& svd) {
    U = svd.matrixU();
    V = svd.matrixV();
    S = svd.singularValues();
  };
  take(::Eigen::BDCSVD<::Eigen::MatrixXd>(wt, ::Eigen::ComputeThinU | ::Eigen::ComputeThinV));
  if (!detail::svd_is_accurate(wt, U, S, V)) {
    take(::Eigen::JacobiSVD<::Eigen::MatrixXd>(wt, ::Eigen::ComputeThinU | ::Eigen::ComputeThinV));
    require<Error>(detail::svd_is_accurate(wt, U, S, V),
                   "weights: the SVD of the key/value projection did not reproduce it (BDCSVD and JacobiSVD)");
  }
  Factors f;
  f.in = in;
  f.out = wt.cols();
  f.rank = std::min(f.in, f.out);
  for (index_t j = 0; j < f.rank; ++j) {
    index_t arg = 0;
    U.col(j).cwiseAbs().maxCoeff(&arg);
    if (U(arg, j) < 0) {
      U.col(j) = -U.col(j);
      V.col(j) = -V.col(j);
    }
  }
  f.basis_t.resize(static_cast<std::size_t>(f.rank * f.in));
  f.recover.resize(static_cast<std::size_t>(f.out * f.rank));
  f.bt.resize(static_cast<std::size_t>(f.rank * f.out));
  f.sigma.resize(static_cast<std::size_t>(f.rank));
  for (index_t j = 0; j < f.rank; ++j) {
    f.sigma[j] = static_cast<float>(S(j));
    for (index_t i = 0; i < f.in; ++i) f.basis_t[j * f.in + i] = static_cast<float>(U(i, j));
    for (index_t o = 0; o < f.out; ++o) {
      f.recover[o * f.rank + j] = static_cast<float>(V(o, j) * S(j));
      f.bt[j * f.out + o] = static_cast<float>(V(o, j));
    }
  }
  return f;
}

/// Factors of one map W (out × in, row-major): Wᵀ = U Σ Bᵀ.
inline Factors factorize(const float* w, index_t out, index_t in) { return factorize_stacked({w}, {out}, in); }

/// Indices of the `k` largest values of score[0, n), largest first (ties: lower index first).
inline std::vector<index_t> top_k(const std::vector<double>& score, index_t k) {
  const index_t n = static_cast<index_t>(score.size());
  require<ConfigError>(k >= 0 && k <= n, "k: must be in [0, ", n, "], got ", k);
  std::vector<index_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), index_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return score[a] > score[b]; });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

/// Weight-only prediction of the outlier channels of K = x·Wkᵀ: the `k` largest |Bkᵀ[0, j]|
/// (the first row of the Bᵀ factor of Wk), valid when latent channel 0 dominates.
inline std::vector<index_t> predict_key_outlier_channels(const Factors& key, index_t k) {
  std::vector<double> score(static_cast<std::size_t>(key.out));
  for (index_t j = 0; j < key.out; ++j) score[j] = std::abs(static_cast<double>(key.bt[j]));
  return top_k(score, k);
}

/// Channels with the `k` largest absolute values over `n` rows of `width` values (row stride ld):
/// the outlier channels measured on data (of K, or of a latent x·U).
inline std::vector<index_t> measure_top_channels(const float* rows, index_t n, index_t width, index_t ld, index_t k) {
  std::vector<double> score(static_cast<std::size_t>(width), 0.0);
  for (index_t t = 0; t < n; ++t)
    for (index_t j = 0; j < width; ++j) score[j] = std::max(score[j], std::abs(static_cast<double>(rows[t * ld + j])));
  return top_k(score, k);
}

/// A snapshot description of what a latent cache's stored rows depend on besides its options:
/// "svd_bases=" and an FNV-1a fingerprint of the bases Uᵀ of `factors`, in order.
inline std::string describe_bases(const std::vector<const Factors*>& factors) {
  std::uint64_t h = snapshot::fnv1a64(nullptr, 0);
  for (const Factors* f : factors) h = snapshot::fnv1a64(f->basis_t.data(), f->basis_t.size() * sizeof(float), h);
  return "svd_bases=" + snapshot::hex64(h);
}

}  // namespace xquant::codec::svd
