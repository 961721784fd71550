#pragma once
// The remat epilogue shared by every remat kernel: bias, then RoPE on interleaved pairs
// (2i, 2i+1) of each head at the token's position, with the same float operations as xquant::Rope.

#include "common.cuh"

namespace xquant::cuda::detail {

struct EpilogueArgs {
  const float* bias;
  const float* cos;
  const float* sin;
  int head_dim;  // 0: no RoPE
  int positions = 0;  // rows of the cos/sin tables (positions × head_dim/2 floats each)
};

/// bias + RoPE on the adjacent pair of columns (c, c+1) of one row at position pos (c even).
__device__ __forceinline__ void epilogue2(float& x0, float& x1, index_t c, index_t pos, const EpilogueArgs& e) {
  if (e.bias) {
    x0 += e.bias[c];
    x1 += e.bias[c + 1];
  }
  if (e.head_dim) {
    const index_t half = e.head_dim / 2, i = pos * half + (static_cast<int>(c) % e.head_dim) / 2;
    const float cs = e.cos[i], sn = e.sin[i], a = x0, b = x1;
    x0 = a * cs - b * sn;
    x1 = a * sn + b * cs;
  }
}

/// bias + RoPE on 8 consecutive columns [c, c+8) of one row at position pos (c % 8 == 0).
__device__ __forceinline__ void epilogue8(float (&x)[8], index_t c, index_t pos, const EpilogueArgs& e) {
#pragma unroll
  for (int i = 0; i < 4; ++i) epilogue2(x[2 * i], x[2 * i + 1], c + 2 * i, pos, e);
}

}  // namespace xquant::cuda::detail
