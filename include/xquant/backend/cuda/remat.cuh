#pragma once
// Rematerialization of K (post-RoPE) and V for a token range of every sequence of a stream:
//   remat_fused  — one kernel: dequantize X̂ in the GEMM mainloop, bias + RoPE in the epilogue;
//   remat_simple — dequantize to bf16 in device memory, cuBLAS bf16 GEMM, then bias + RoPE.
// Output rows are sequence-major: row b·(end−begin) + (t−begin) holds token t of sequence b.
// W is bf16, row-major N × width (nn.Linear's out × in); out = RoPE(X̂·Wᵀ + bias).

#include <vector>

#include "../../remat/rope.hpp"
#include "epilogue.cuh"
#include "mainloop.cuh"
#include "remat_sm90.cuh"
#include "memory.cuh"
#include "stream.cuh"

namespace xquant::cuda {

/// RoPE cos/sin tables on the device: the same floats as xquant::Rope's (positions × Dh/2).
class DeviceRope {
 public:
  explicit DeviceRope(const Rope& r) : head_dim_(r.head_dim()), max_positions_(r.max_positions()) {
    const index_t half = head_dim_ / 2;
    std::vector<float> c(static_cast<std::size_t>(max_positions_ * half)), s(c.size());
    for (index_t p = 0; p < max_positions_; ++p)
      for (index_t i = 0; i < half; ++i) {
        c[p * half + i] = r.cos(p, i);
        s[p * half + i] = r.sin(p, i);
      }
    cos_.resize(c.size());
    sin_.resize(s.size());
    XQ_CUDA_CHECK(cudaMemcpy(cos_.data(), c.data(), cos_.bytes(), cudaMemcpyHostToDevice));
    XQ_CUDA_CHECK(cudaMemcpy(sin_.data(), s.data(), sin_.bytes(), cudaMemcpyHostToDevice));
  }
  index_t head_dim() const { return head_dim_; }
  index_t max_positions() const { return max_positions_; }
  const float* cos() const { return cos_.data(); }
  const float* sin() const { return sin_.data(); }

 private:
  index_t head_dim_, max_positions_;
  DeviceBuffer<float> cos_, sin_;
};

/// The right-hand side of a rematerialization: out = X̂·Wᵀ (+ bias), optionally rotated.
struct RematOperand {
  const bf16* w = nullptr;       ///< N × width row-major, 16-byte aligned rows
  index_t n = 0;                 ///< N: output columns (dkv)
  index_t ldw = 0;               ///< row stride of w in elements (0: width)
  const float* bias = nullptr;   ///< N floats, or nullptr
  const DeviceRope* rope = nullptr;  ///< rotate each head of rope->head_dim() columns at the token's position
};

namespace detail {

template <class Q>
__global__ void __launch_bounds__(gemm::THREADS, 2)
    remat_fused_kernel(StreamView<Q> v, index_t begin, index_t count, index_t M, const bf16* __restrict__ W, index_t ldw,
                       index_t N, EpilogueArgs e, bf16* __restrict__ out, index_t ldo) {
  using namespace gemm;
  extern __shared__ __align__(16) unsigned char smem[];
  const index_t n0 = static_cast<index_t>(blockIdx.x) * BN, m0 = static_cast<index_t>(blockIdx.y) * BM;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, wm = warp >> 2, wn = warp & 3;
  const index_t r = m0 + (t >> 1);
  const bool valid = r < M;
  const index_t seq = valid ? r / count : 0, tok = valid ? begin + r % count : 0;
  const index_t quantized = valid ? StreamView<Q>::quantized(v.length[seq], v.group) : 0;
  FragC acc[4][2];
  fused_mainloop<Q>(v, seq, tok, valid, quantized, W, ldw, n0, N, v.width, smem, acc);

  // Epilogue: each warp moves one 16×16 fragment at a time through its own scratch.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 16 * 20;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::store_matrix_sync(scratch, acc[i][j], 20, nvcuda::wmma::mem_row_major);
      __syncwarp();
      const int rr = lane >> 1, cc = (lane & 1) * 8;
      const index_t gr = m0 + wm * 64 + i * 16 + rr, gc = n0 + wn * 32 + j * 16 + cc;
      if (gr < M && gc < N) {
        float x[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) x[k] = scratch[rr * 20 + cc + k];
        epilogue8(x, gc, begin + gr % count, e);
        store8(out + gr * ldo + gc, x);
      }
      __syncwarp();
    }
}

/// bias + RoPE over bf16 rows in place (the simple path's epilogue).
static __global__ void epilogue_kernel(bf16* y, index_t ldy, index_t N, index_t begin, index_t count, EpilogueArgs e) {
  const index_t r = blockIdx.x;
  for (index_t c = threadIdx.x * 8; c < N; c += blockDim.x * 8) {
    float x[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = __bfloat162float(y[r * ldy + c + k]);
    epilogue8(x, c, begin + r % count, e);
    store8(y + r * ldy + c, x);
  }
}

/// Rows [begin, begin+count) of every sequence of `v` -> `out` (rows past a sequence's length: zeros).
template <class Q, class O>
void launch_dequantize(const StreamView<Q>& v, index_t begin, index_t count, O* out, index_t ldo, cudaStream_t stream) {
  const index_t rows = count * v.batch;
  require<ShapeError>(rows < (index_t(1) << 31), "dequantize: ", rows, " rows exceed one launch (2^31)");
  if constexpr (Q::axis == Axis::Channel) {
    const int tile_rows = dequantize_tile_rows ? dequantize_tile_rows : dq::tile_rows(rows, multiprocessor_count());
    const index_t tiles = (count + tile_rows - 1) / tile_rows;
    dequantize_channel_kernel<Q, O><<<static_cast<unsigned>(tiles * v.batch), dq::kThreads, 0, stream>>>(
        v, begin, count, tile_rows, static_cast<unsigned>(tiles), out, ldo);
    check_launch("dequantize_channel_kernel");
  } else {
    dequantize_kernel<Q, O><<<static_cast<unsigned>(rows), 128, 0, stream>>>(v, begin, count, static_cast<unsigned>(rows),
                                                                              out, ldo);
    check_launch("dequantize_kernel");
  }
}

template <class Q>
EpilogueArgs check_remat(const DeviceStream<Q>& x, index_t begin, index_t end, const RematOperand& op, const bf16* out,
                         index_t ldo) {
  const index_t width = x.shape().width;
  require<ShapeError>(op.w != nullptr && out != nullptr, "remat: W and out must not be null");
  require<ShapeError>(reinterpret_cast<std::uintptr_t>(op.w) % 16 == 0, "remat: W must be 16-byte aligned");
  require<ShapeError>(reinterpret_cast<std::uintptr_t>(out) % 16 == 0, "remat: out must be 16-byte aligned");
  require_device_accessible(op.w, "remat: W");
  require_device_accessible(op.bias, "remat: bias");
  require_device_accessible(out, "remat: out");
  require<ShapeError>(op.n > 0 && op.n % 8 == 0, "remat: N must be a positive multiple of 8, got ", op.n);
  require<ShapeError>(op.ldw == 0 || (op.ldw >= width && op.ldw % 8 == 0), "remat: ldw must be >= width ", width,
                      " and a multiple of 8, got ", op.ldw);
  require<ShapeError>(ldo >= op.n && ldo % 8 == 0, "remat: ldo must be >= N ", op.n, " and a multiple of 8, got ", ldo);
  require<ShapeError>(0 <= begin && begin < end, "remat: token range [", begin, ", ", end, ") is empty or negative");
  for (int b = 0; b < x.shape().batch; ++b)
    require<ShapeError>(end <= x.length(b), "remat: token range [", begin, ", ", end, ") exceeds sequence ", b,
                        "'s length ", x.length(b));
  EpilogueArgs e{op.bias, nullptr, nullptr, 0};
  if (op.rope) {
    const index_t dh = op.rope->head_dim();
    require<ConfigError>(dh % 8 == 0 && op.n % dh == 0, "remat: RoPE head_dim ", dh,
                         " must be a multiple of 8 that divides N ", op.n);
    require<ConfigError>(end <= op.rope->max_positions(), "remat: position ", end - 1,
                         " exceeds the RoPE table's max_positions ", op.rope->max_positions());
    e = EpilogueArgs{op.bias, op.rope->cos(), op.rope->sin(), static_cast<int>(dh),
                     static_cast<int>(op.rope->max_positions())};
  }
  return e;
}

}  // namespace detail

/// Which kernel remat_fused runs.
enum class FusedRematKernel {
  Wgmma,  ///< Hopper wgmma, X̂ dequantized into registers (sm_90a build on an sm_90 device; 2/3/4/8-bit
          ///< streams, width % 64 == 0 (3-bit: % 128), per-token groups >= 64, per-channel groups >= 32)
  Mma     ///< portable tensor-core mainloop (WMMA), X̂ staged in shared memory; measured on an H200
          ///< at 0.22-0.25 of cuBLAS per-token and 0.11-0.14 per-channel, where remat_simple ran
          ///< 3-5x faster (docs/BENCHMARKS.md): prefer remat_simple wherever this kernel is chosen
};
/// The kernel remat_fused(x, begin, end, ...) runs on this build and device.
/// \tparam Q the stream's quantizer, quant::Uniform<Bits, Axis, Scheme, ParamBits> (deduced)
template <class Q>
FusedRematKernel fused_remat_kernel(const DeviceStream<Q>& x, index_t begin, index_t end) {
  return detail::remat_wgmma_applies<Q>(x.shape(), end - begin) ? FusedRematKernel::Wgmma : FusedRematKernel::Mma;
}

/// out = RoPE(X̂·Wᵀ + bias) for tokens [begin, end) of every sequence, in one fused kernel
/// (X̂ never leaves the chip). Needs width % 64 == 0 and, for per-token groups, group >= 32.
/// On Hopper (sm_90a build) 2/3/4/8-bit streams take the wgmma kernel (remat_sm90.cuh). Elsewhere
/// (fused_remat_kernel() == FusedRematKernel::Mma) the portable kernel is 3-5x slower than
/// remat_simple on an H200: call remat_simple there.
/// \tparam Q the stream's quantizer, quant::Uniform<Bits, Axis, Scheme, ParamBits> (deduced)
template <class Q>
void remat_fused(const DeviceStream<Q>& x, index_t begin, index_t end, const RematOperand& op, bf16* out, index_t ldo,
                 cudaStream_t stream) {
  const detail::EpilogueArgs e = detail::check_remat(x, begin, end, op, out, ldo);
  const auto& s = x.shape();
  require<ConfigError>(s.width % detail::gemm::BK == 0, "remat_fused: width must be a multiple of 64, got ", s.width,
                       " (use remat_simple)");
  require<ConfigError>(Q::axis == Axis::Channel || s.group >= 32, "remat_fused: per-token groups must be >= 32, got ",
                       s.group, " (use remat_simple)");
  const index_t count = end - begin, M = count * s.batch;
  const index_t ldw = op.ldw ? op.ldw : s.width;
  if constexpr (detail::wg::supports<Q>) {
    if (fused_remat_kernel(x, begin, end) == FusedRematKernel::Wgmma) {
      detail::launch_remat_wgmma(x, begin, count, op.w, ldw, op.n, e, out, ldo, stream);
      return;
    }
  }
  auto kernel = detail::remat_fused_kernel<Q>;
  static detail::SmemAllowance allowance;
  allowance.ensure(kernel, detail::gemm::kSmemBytes);
  const dim3 grid(detail::blocks_for(op.n, detail::gemm::BN), detail::blocks_for(M, detail::gemm::BM));
  require<ConfigError>(grid.y <= 65535u, "remat_fused: ", M, " rows exceed one launch; split the token range");
  kernel<<<grid, detail::gemm::THREADS, detail::gemm::kSmemBytes, stream>>>(x.view(), begin, count, M, op.w,
                                                                           ldw, op.n, e, out, ldo);
  check_launch("remat_fused_kernel");
}

/// Writes X̂ (tokens [begin, end) of every sequence, sequence-major) as bf16 or float rows.
/// \tparam Q the stream's quantizer (deduced)
/// \tparam O the output type: bf16 or float (deduced from `out`, 16-byte aligned)
template <class Q, class O>
void dequantize(const DeviceStream<Q>& x, index_t begin, index_t end, O* out, index_t ldo, cudaStream_t stream) {
  static_assert(std::is_same_v<O, bf16> || std::is_same_v<O, float>, "dequantize: out must be bf16 or float");
  const auto& s = x.shape();
  require<ShapeError>(out != nullptr, "dequantize: out must not be null");
  require<ShapeError>(reinterpret_cast<std::uintptr_t>(out) % 16 == 0,
                      "dequantize: out must be 16-byte aligned (8 values are stored at once)");
  require<ShapeError>(ldo >= s.width && ldo % 8 == 0, "dequantize: ldo must be >= width ", s.width,
                      " and a multiple of 8, got ", ldo);
  require<ShapeError>(0 <= begin && begin < end, "dequantize: token range [", begin, ", ", end, ") is empty");
  for (int b = 0; b < s.batch; ++b)
    require<ShapeError>(end <= x.length(b), "dequantize: token range end ", end, " exceeds sequence ", b, "'s length ",
                        x.length(b));
  require_device_accessible(out, "dequantize: out");
  detail::launch_dequantize(x.view(), begin, end - begin, out, ldo, stream);
}

/// The plain path: X̂ -> bf16 scratch (device memory) -> cuBLAS bf16 GEMM -> bias + RoPE.
/// `scratch` grows to (end−begin)·batch·width elements.
/// \tparam Q the stream's quantizer (deduced)
template <class Q>
void remat_simple(const DeviceStream<Q>& x, index_t begin, index_t end, const RematOperand& op, bf16* out, index_t ldo,
                  Cublas& blas, DeviceBuffer<bf16>& scratch, cudaStream_t stream) {
  const detail::EpilogueArgs e = detail::check_remat(x, begin, end, op, out, ldo);
  const auto& s = x.shape();
  const index_t count = end - begin, M = count * s.batch;
  scratch.reserve(static_cast<std::size_t>(M * s.width));
  dequantize(x, begin, end, scratch.data(), s.width, stream);
  gemm_bf16_nt(blas, M, op.n, s.width, scratch.data(), s.width, op.w, op.ldw ? op.ldw : s.width, out, ldo, stream);
  if (e.bias || e.head_dim) {
    detail::epilogue_kernel<<<static_cast<unsigned>(M), 128, 0, stream>>>(out, ldo, op.n, begin, count, e);
    check_launch("epilogue_kernel");
  }
}

}  // namespace xquant::cuda
