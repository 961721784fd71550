// eigen_types.hpp — the few Eigen types the driver uses. Activations are row-major
// (tokens × features) so that one token is one contiguous row, matching the weight layout
// (row-major out × in) of the checkpoint and the row-major buffers of the AttentionCache interface.
#pragma once

#include <Eigen/Core>

namespace llm {

using RowMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMatMap = Eigen::Map<const RowMatrixXf>;
using MatMap = Eigen::Map<RowMatrixXf>;
using ConstVecMap = Eigen::Map<const Eigen::VectorXf>;
// A block of columns of a row-major matrix (e.g. one head's slice of Q/K/V), any row stride.
using ConstStridedMap = Eigen::Map<const RowMatrixXf, 0, Eigen::OuterStride<>>;
using StridedMap = Eigen::Map<RowMatrixXf, 0, Eigen::OuterStride<>>;

}  // namespace llm
