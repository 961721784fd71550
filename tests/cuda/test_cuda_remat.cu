// Rematerialization of K (RoPE at cached positions) and V on the GPU, fused and simple paths,
// against a float64 CPU reference built from the CPU quantizer's X̂.

#include <algorithm>
#include <cstring>
#include <limits>

#include "cuda_support.cuh"

namespace xq = xquant;
namespace xc = xquant::cuda;
using xq::Axis;
using xq::index_t;

namespace {

/// bf16-rounded copy of v.
std::vector<float> bf(std::vector<float> v) { return xqcuda::round_to<xc::bf16>(std::move(v)); }

/// Appends `len` random activation rows (`len + extra` to the last sequence) to every sequence of
/// `st` (in two chunks, the first of `first` rows) and returns each sequence's X̂ from the CPU
/// reference, rounded to bf16 (the remat kernels' A operand).
template <class Q>
std::vector<std::vector<float>> fill(xc::DeviceStream<Q>& st, std::mt19937_64& rng, index_t len0, index_t first,
                                     index_t extra = 0) {
  const auto& sh = st.shape();
  std::vector<std::vector<float>> xhat(static_cast<std::size_t>(sh.batch));
  for (int b = 0; b < sh.batch; ++b) {
    const index_t len = len0 + (b == sh.batch - 1 ? extra : 0);
    auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, len, sh.width));
    auto d = xqcuda::to_device<xc::bf16>(x);
    st.append(b, d.data(), first, sh.width, nullptr);
    if (len > first) st.append(b, d.data() + first * sh.width, len - first, sh.width, nullptr);
    xhat[b] = bf(xqcuda::reference_xhat<Q>(x, len, sh.width, sh.group));
  }
  st.check(nullptr);
  return xhat;
}

/// One remat shape: N, the RoPE head width (0: no RoPE), and whether a bias applies.
struct Case {
  index_t n, head_dim;
  bool bias;
};

/// A random bf16 right-hand side W (n × width) and bias on host and device, and the RematOperand
/// over them (bias and RoPE optional).
struct Operand {
  std::vector<float> w, bias;
  xc::DeviceBuffer<xc::bf16> dw;
  xc::DeviceBuffer<float> dbias;
  xc::RematOperand op;
  Operand(std::mt19937_64& rng, index_t n, index_t width, bool with_bias, const xc::DeviceRope* rope)
      : w(bf(xqtest::randn(rng, static_cast<std::size_t>(n * width), 0.05f))),
        bias(xqtest::randn(rng, static_cast<std::size_t>(n))),
        dw(xqcuda::to_device<xc::bf16>(w)),
        dbias(bias.size()) {
    dbias.upload(bias.data(), bias.size(), nullptr);
    op = xc::RematOperand{dw.data(), n, 0, with_bias ? dbias.data() : nullptr, rope};
  }
};

/// float64 RoPE(X̂·Wᵀ + bias) for tokens [begin, end) of every sequence, sequence-major
/// (bias may be null; head_dim 0: no RoPE).
std::vector<double> remat_reference(const std::vector<std::vector<float>>& xhat, index_t begin, index_t end,
                                    index_t width, const std::vector<float>& w, index_t n, const float* bias,
                                    index_t head_dim) {
  const index_t count = end - begin;
  std::vector<double> ref;
  for (const auto& xs : xhat) {
    std::vector<float> rows(xs.begin() + begin * width, xs.begin() + end * width);
    auto y = xqtest::project64(rows, w.data(), count, width, n);
    if (bias)
      for (index_t r = 0; r < count; ++r)
        for (index_t j = 0; j < n; ++j) y[r * n + j] += bias[j];
    if (head_dim) xqtest::rope64(y, count, n / head_dim, head_dim, begin);
    ref.insert(ref.end(), y.begin(), y.end());
  }
  return ref;
}

template <class Q>
void check_remat(index_t group) {
  XQ_REQUIRE_DEVICE();
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  const std::string what = Q::axis == Axis::Token ? " per-token" : " per-channel";
  INFO("seed ", seed, " bits ", Q::bits, " group ", group, what);
  const int B = 2;
  const index_t width = 512, cap = 384, len = 320, begin = 37, end = 300, count = end - begin;
  cudaStream_t s = nullptr;
  xc::DeviceStream<Q> st({B, cap, width, group});
  const auto xhat = fill(st, rng, len, 200);
  const xq::Rope rope(64, 1024);
  const xc::DeviceRope drope(rope);
  xc::Cublas blas;
  xc::DeviceBuffer<xc::bf16> scratch;

  for (const Case c : {Case{256, 64, false}, Case{200, 0, true}, Case{384, 64, true}}) {
    CAPTURE(c.n);
    CAPTURE(c.head_dim);
    const Operand o(rng, c.n, width, c.bias, c.head_dim ? &drope : nullptr);
    const xc::RematOperand& op = o.op;
    const auto ref = remat_reference(xhat, begin, end, width, o.w, c.n, c.bias ? o.bias.data() : nullptr, c.head_dim);
    // remat_fused's kernel: wgmma for every bit width, with per-token groups >= 64 or per-channel
    // groups >= 32, on sm_90a builds (width 512 suits 3-bit codes too).
    const bool wgmma = xc::sm90a_kernels() && group >= (Q::axis == Axis::Token ? 64 : 32);
    CHECK(xc::fused_remat_kernel(st, begin, end) ==
          (wgmma ? xc::FusedRematKernel::Wgmma : xc::FusedRematKernel::Mma));
    xc::DeviceBuffer<xc::bf16> out(static_cast<std::size_t>(B * count * c.n));
    // Paths: remat_fused as chosen, remat_fused on the portable kernel, remat_simple.
    for (int path = 0; path < 3; ++path) {
      CAPTURE(path);
      if (path == 1 && !wgmma) continue;  // the portable kernel was path 0
      out.fill_bytes(0xff, s);  // NaN everywhere
      {
        const xqcuda::ScopedValue<bool> portable(xc::detail::remat_wgmma_disabled, path == 1);
        if (path < 2) xc::remat_fused(st, begin, end, op, out.data(), c.n, s);
        else xc::remat_simple(st, begin, end, op, out.data(), c.n, blas, scratch, s);
        if (path == 1) CHECK(xc::fused_remat_kernel(st, begin, end) == xc::FusedRematKernel::Mma);
      }
      const auto got = xqcuda::to_host_float(out);
      CHECK(xqtest::all_finite(got));
      CHECK(xqtest::rel_error(got, ref) < 5e-3);
    }
  }
  // Shape errors name the problem.
  const auto w = xqcuda::to_device<xc::bf16>(xqtest::randn(rng, 64 * width));
  xc::DeviceBuffer<xc::bf16> out(64 * 64);
  CHECK_THROWS_AS(xc::remat_fused(st, 0, len + 1, xc::RematOperand{w.data(), 64}, out.data(), 64, s), xq::ShapeError);
  CHECK_THROWS_AS(xc::remat_fused(st, 0, 10, xc::RematOperand{w.data(), 60}, out.data(), 64, s), xq::ShapeError);
  CHECK_THROWS_AS(xc::remat_fused(st, 0, 10, xc::RematOperand{w.data() + 4, 56}, out.data(), 64, s), xq::ShapeError);
  CHECK_THROWS_AS(xc::remat_simple(st, 0, 10, xc::RematOperand{w.data(), 64}, out.data() + 4, 64, blas, scratch, s),
                  xq::ShapeError);
}

}  // namespace

TEST_CASE("cuda remat: 4-bit per-token") { check_remat<xq::quant::Uniform<4>>(128); }
TEST_CASE("cuda remat: 2-bit per-token, groups of 32") { check_remat<xq::quant::Uniform<2>>(32); }
TEST_CASE("cuda remat: 3-bit per-token") { check_remat<xq::quant::Uniform<3>>(64); }
TEST_CASE("cuda remat: 8-bit per-token") { check_remat<xq::quant::Uniform<8>>(128); }
TEST_CASE("cuda remat: 8-bit per-channel") { check_remat<xq::quant::Uniform<8, Axis::Channel>>(128); }
TEST_CASE("cuda remat: 4-bit per-channel, fp16 window rows") {
  check_remat<xq::quant::Uniform<4, Axis::Channel>>(128);
}
TEST_CASE("cuda remat: 2-bit symmetric per-channel") {
  check_remat<xq::quant::Uniform<2, Axis::Channel, xq::Scheme::Symmetric>>(64);
}

// ---- the Hopper wgmma kernel (remat_sm90.cuh) ------------------------------------------------------

namespace {

/// Runs the wgmma kernel's decode for every code position of `words` random code words under
/// `params`, writing what each thread's four positions decode to (the A values; before bf16
/// rounding, except for the packed decode): per-token streams by row_scale and dequant_one,
/// per-channel ones by chan_scale and dequant_chan (the four channels given the same parameters);
/// 2- and 4-bit ParamBits::Bf16 quantizers by dequant_step_pair under row_pairs or chan_pairs.
template <class Q>
__global__ void dequant_positions_kernel(const std::uint64_t* words, const std::uint32_t* params, int n, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  namespace d = xc::detail;
  using Word = typename d::StepCodes<Q::bits>::Word;  // 64 bits for 3- and 8-bit codes
  const Word u = static_cast<Word>(words[i]);
  const std::uint32_t q = Q::params_per_group == 2 ? params[i] : params[i] & 0xFFFFu;  // as chan_words reads them
  if constexpr (d::packed_decode<Q>) {
    std::uint32_t pair[2];  // columns (2c, 2c+1) and (2c+8, 2c+9)
    if constexpr (Q::axis == Axis::Token) {
      const auto p = d::row_pairs(params[i]);
      pair[0] = d::dequant_step_pair<Q, 0>(u, p), pair[1] = d::dequant_step_pair<Q, 1>(u, p);
    } else {
      const auto p = d::chan_pairs(d::ChanWords{{q, q, q, q}});
      pair[0] = d::dequant_step_pair<Q, 0>(u, p.lo), pair[1] = d::dequant_step_pair<Q, 1>(u, p.hi);
    }
    for (int k = 0; k < 4; ++k) out[4 * i + k] = __uint_as_float(pair[k / 2] >> (16 * (k % 2)) << 16);
  } else if constexpr (Q::axis == Axis::Token) {
    const auto rs = d::row_scale<Q>(params[i]);
    out[4 * i + 0] = d::dequant_one<Q, 0>(u, rs);
    out[4 * i + 1] = d::dequant_one<Q, 1>(u, rs);
    out[4 * i + 2] = d::dequant_one<Q, 2>(u, rs);
    out[4 * i + 3] = d::dequant_one<Q, 3>(u, rs);
  } else {
    const auto cs = d::chan_scale<Q>(d::ChanWords{{q, q, q, q}});
    out[4 * i + 0] = d::dequant_chan<Q, 0>(u, cs.s[0], cs.z[0]);
    out[4 * i + 1] = d::dequant_chan<Q, 1>(u, cs.s[1], cs.z[1]);
    out[4 * i + 2] = d::dequant_chan<Q, 2>(u, cs.s[2], cs.z[2]);
    out[4 * i + 3] = d::dequant_chan<Q, 3>(u, cs.s[3], cs.z[3]);
  }
}

/// The wgmma kernel's decode equals Q::decode bit for bit: every code at every position, random
/// fp16 parameters (normal and subnormal scales, zeros of both signs and magnitudes). The packed
/// decode of ParamBits::Bf16 quantizers equals Q::decode rounded to bf16, under the parameters
/// Q::fit gives for random ranges of every magnitude (centred on zero, offset from it, or with a
/// minimum next to zero, whose zero is flushed).
template <class Q>
void check_dequant_positions() {
  XQ_REQUIRE_DEVICE();
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed, " bits ", Q::bits, " symmetric ", Q::scheme == xq::Scheme::Symmetric, " per-channel ",
       Q::axis == Axis::Channel);
  const int n = 1 << 16;
  std::vector<std::uint64_t> words(n);
  std::vector<std::uint32_t> params(n);
  std::uniform_int_distribution<std::uint32_t> any;
  using Word = typename xc::detail::StepCodes<Q::bits>::Word;
  std::uniform_real_distribution<float> mag(-30.0f, 16.0f), unit(-1.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-14, 14);
  for (int i = 0; i < n; ++i) {
    words[i] = static_cast<Word>(any(rng) | static_cast<std::uint64_t>(any(rng)) << 32);
    if constexpr (xc::detail::bf16_params<Q>) {
      const float m = std::ldexp(1.0f, ex(rng)), centre = i % 3 == 0 ? 0.0f : unit(rng) * std::ldexp(1.0f, ex(rng));
      float lo = centre + m * unit(rng), hi = centre + m * unit(rng);
      if (i % 7 == 0) lo = std::ldexp(unit(rng), -30) * std::fabs(hi);
      if (lo > hi) std::swap(lo, hi);
      std::uint16_t p[2] = {0, 0};
      REQUIRE(Q::fit(lo, hi, p));
      params[i] = p[0] | static_cast<std::uint32_t>(p[1]) << 16;
      continue;
    }
    const float s = std::ldexp(1.0f, static_cast<int>(mag(rng))) * (1.0f + static_cast<float>(any(rng) % 1024) / 1024.0f);
    const float z = (any(rng) & 1 ? -1.0f : 1.0f) * std::ldexp(1.0f, static_cast<int>(mag(rng))) *
                    (1.0f + static_cast<float>(any(rng) % 1024) / 1024.0f);
    const std::uint16_t hs = i % 97 == 0 ? 0 : xq::float_to_half(s), hz = xq::float_to_half(z);
    params[i] = hs | (static_cast<std::uint32_t>(hz) << 16);
  }
  xc::DeviceBuffer<std::uint64_t> dw(n);
  xc::DeviceBuffer<std::uint32_t> dp(n);
  dw.upload(words.data(), n, nullptr);
  dp.upload(params.data(), n, nullptr);
  xc::DeviceBuffer<float> out(4 * n);
  out.fill_bytes(0xff, nullptr);
  dequant_positions_kernel<Q><<<n / 256, 256>>>(dw.data(), dp.data(), n, out.data());
  xc::check_launch("dequant_positions_kernel");
  const auto got = xqcuda::to_host(out);
  using C = xc::detail::StepCodes<Q::bits>;
  int mismatches = 0;
  for (int i = 0; i < n; ++i) {
    const std::uint16_t p[2] = {static_cast<std::uint16_t>(params[i]), static_cast<std::uint16_t>(params[i] >> 16)};
    const auto P = Q::load(p);
    for (int k = 0; k < 4; ++k) {
      const auto code = static_cast<std::uint32_t>((words[i] >> C::offset(k)) & Q::max_code);
      const float decoded = Q::decode(code, P);  // rounded to bf16 (nearest even) for the packed decode
      const float want = xc::detail::packed_decode<Q> ? xqcuda::to_float(xqcuda::from_float<xc::bf16>(decoded)) : decoded;
      if (std::memcmp(&want, &got[4 * i + k], 4) != 0 && ++mismatches <= 5)
        MESSAGE("word ", words[i], " position ", k, ": ", got[4 * i + k], " != decode ", want);
    }
  }
  CHECK(mismatches == 0);
}

/// The wgmma kernel against the float64 reference and against the simple path (cuBLAS on the
/// same bf16 X̂): several ring wraps (width 1024 = 16 k tiles, 3 or 4 stages), partial row and column
/// tiles, two sequences, bias and RoPE; a long range and a one-token range. Storage is poisoned
/// (NaN parameters) before the appends, and the output buffer has poisoned rows past its end.
/// Per-channel streams: the range starts inside a token group (tiles and warps straddle groups)
/// and ends with sequence 0's open-group window rows; sequence 1 is longer, so the same tokens
/// have codes there (each tile must use its own sequence's length).
template <class Q>
void check_wgmma_remat(index_t group, index_t width = 1024) {
  XQ_REQUIRE_DEVICE();
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed, " bits ", Q::bits, " group ", group, " symmetric ", Q::scheme == xq::Scheme::Symmetric,
       " width ", width);
  const int B = 2;
  constexpr bool channel = Q::axis == Axis::Channel;
  const index_t cap = channel ? 1024 : 700, len = 650, longer = channel ? 140 : 0;
  cudaStream_t s = nullptr;
  xc::DeviceStream<Q> st({B, cap, width, group});
  st.fill_storage(0xff, s);  // codes 0xff, NaN parameters and window: a read of unwritten storage shows
  const auto xhat = fill(st, rng, len, channel ? 200 : len, longer);
  if (channel) {  // window rows in sequence 0's part of the range, codes for the same tokens in sequence 1's
    REQUIRE(len % group != 0);
    REQUIRE(xc::StreamView<Q>::quantized(len + longer, group) >= len);
  }
  struct Range {
    index_t begin, end;
  };
  // RoPE tables of three head widths: the epilogue reuses a thread's table reads for its second
  // 128 columns when the head width divides 128 (64, 128), and reads them again when not (96).
  const xc::DeviceRope rope64(xq::Rope(64, 1024)), rope96(xq::Rope(96, 1024)), rope128(xq::Rope(128, 1024));
  auto rope_of = [&](index_t hd) { return hd == 64 ? &rope64 : hd == 96 ? &rope96 : hd == 128 ? &rope128 : nullptr; };
  xc::Cublas blas;
  xc::DeviceBuffer<xc::bf16> scratch;
  const Case cases[] = {{512, 128, true}, {264, 0, false}, {384, 128, false}, {768, 96, true}, {320, 64, true}};
  const index_t last = channel ? len : 640;
  for (const Range range : {Range{3, last}, Range{last - 1, last}}) {
    const index_t begin = range.begin, end = range.end, count = end - begin;
    CAPTURE(begin);
    CAPTURE(end);
    for (const Case& c : cases) {
      CAPTURE(c.n);
      CAPTURE(c.head_dim);
      CAPTURE(c.bias);
      const bool rotate = c.head_dim != 0;
      REQUIRE(c.n % (rotate ? c.head_dim : 1) == 0);
      const Operand o(rng, c.n, width, c.bias, rope_of(c.head_dim));
      const xc::RematOperand& op = o.op;
      if (xc::sm90a_kernels()) CHECK(xc::fused_remat_kernel(st, begin, end) == xc::FusedRematKernel::Wgmma);
      else MESSAGE("no sm_90a code for this device: remat_fused runs the portable kernel");

      const auto ref = remat_reference(xhat, begin, end, width, o.w, c.n, c.bias ? o.bias.data() : nullptr, c.head_dim);
      const index_t ldo = c.n + 8;  // a row stride past N: nothing outside [0, N) may be written
      const index_t guard = 64;      // rows past the output's end: nothing may be written there either
      xc::DeviceBuffer<xc::bf16> fused(static_cast<std::size_t>((B * count + guard) * ldo)), simple(fused.size());
      fused.fill_bytes(0xff, s);
      simple.fill_bytes(0xff, s);
      xc::remat_fused(st, begin, end, op, fused.data(), ldo, s);
      xc::remat_simple(st, begin, end, op, simple.data(), ldo, blas, scratch, s);
      // The persistent grid with fewer blocks than tiles: each block works through several tiles,
      // its ring's stages and phases running on across them. Same kernel, same sums: equal bits.
      xc::DeviceBuffer<xc::bf16> few(fused.size());
      few.fill_bytes(0xff, s);
      {
        const xqcuda::ScopedValue<int> blocks(xc::detail::remat_wgmma_max_blocks, 3);
        xc::remat_fused(st, begin, end, op, few.data(), ldo, s);
      }
      {
        const auto x = xqcuda::to_host(few), y = xqcuda::to_host(fused);  // bf16 bits, NaN padding included
        CHECK(std::memcmp(x.data(), y.data(), x.size() * sizeof(xc::bf16)) == 0);
      }
      const auto f = xqcuda::to_host_float(fused), g = xqcuda::to_host_float(simple);
      std::vector<float> fv, gv;
      int pad_written = 0;
      for (index_t r = 0; r < B * count + guard; ++r)
        for (index_t j = 0; j < ldo; ++j) {
          const float a = f[r * ldo + j], b = g[r * ldo + j];
          if (j < c.n && r < B * count) fv.push_back(a), gv.push_back(b);
          else pad_written += !std::isnan(a);
        }
      CHECK(pad_written == 0);
      CHECK(xqtest::all_finite(fv));
      // bf16 outputs of the same bf16 product: float64 reference within bf16 rounding (2^-9 per
      // element, norm-wise ~1e-3); fused vs simple differ only by fp32 summation order and the simple
      // path's extra rounding before the epilogue.
      CHECK(xqtest::rel_error(fv, ref) < 5e-3);
      CHECK(xqtest::rel_error(fv, gv) < 5e-3);
      if (!rotate && !c.bias) {
        // Without an epilogue both are round_bf16 of fp32 sums of identical products: at most one
        // bf16 ulp (2^-7 relative) apart, plus fp32 summation noise near zero.
        double rms = 0;
        for (float x : gv) rms += static_cast<double>(x) * x;
        rms = std::sqrt(rms / static_cast<double>(gv.size()));
        int far = 0;
        for (std::size_t i = 0; i < fv.size(); ++i)
          far += std::fabs(fv[i] - gv[i]) > std::ldexp(std::max(std::fabs(fv[i]), std::fabs(gv[i])), -7) + 1e-4 * rms;
        CHECK(far == 0);
      }
    }
  }
}

}  // namespace

TEST_CASE("cuda remat wgmma: dequantization equals Q::decode bit for bit") {
  check_dequant_positions<xq::quant::Uniform<4>>();
  check_dequant_positions<xq::quant::Uniform<2>>();
  check_dequant_positions<xq::quant::Uniform<4, Axis::Token, xq::Scheme::Symmetric>>();
  check_dequant_positions<xq::quant::Uniform<2, Axis::Token, xq::Scheme::Symmetric>>();
  check_dequant_positions<xq::quant::Uniform<4, Axis::Channel>>();
  check_dequant_positions<xq::quant::Uniform<2, Axis::Channel>>();
  check_dequant_positions<xq::quant::Uniform<4, Axis::Channel, xq::Scheme::Symmetric>>();
  check_dequant_positions<xq::quant::Uniform<2, Axis::Channel, xq::Scheme::Symmetric>>();
  check_dequant_positions<xq::quant::Uniform<3>>();
  check_dequant_positions<xq::quant::Uniform<3, Axis::Channel>>();
  check_dequant_positions<xq::quant::Uniform<3, Axis::Token, xq::Scheme::Symmetric>>();
  check_dequant_positions<xq::quant::Uniform<8>>();
  check_dequant_positions<xq::quant::Uniform<8, Axis::Token, xq::Scheme::Symmetric>>();
  check_dequant_positions<xq::quant::Uniform<8, Axis::Channel>>();
  check_dequant_positions<xq::quant::Uniform<8, Axis::Channel, xq::Scheme::Symmetric>>();
  // (bf16 parameters, 3- and 8-bit codes: the float decode, not the packed one)
  check_dequant_positions<xq::quant::Uniform<3, Axis::Channel, xq::Scheme::Asymmetric, xq::ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<8, Axis::Token, xq::Scheme::Asymmetric, xq::ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<8, Axis::Channel, xq::Scheme::Symmetric, xq::ParamBits::Bf16>>();
}
TEST_CASE("cuda remat wgmma: the packed decode of ParamBits::Bf16 quantizers equals bf16(Q::decode) bit for bit") {
  using xq::ParamBits;
  using xq::Scheme;
  check_dequant_positions<xq::quant::Uniform<4, Axis::Token, Scheme::Asymmetric, ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<2, Axis::Token, Scheme::Asymmetric, ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<4, Axis::Token, Scheme::Symmetric, ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<2, Axis::Token, Scheme::Symmetric, ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<4, Axis::Channel, Scheme::Asymmetric, ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<2, Axis::Channel, Scheme::Asymmetric, ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<4, Axis::Channel, Scheme::Symmetric, ParamBits::Bf16>>();
  check_dequant_positions<xq::quant::Uniform<2, Axis::Channel, Scheme::Symmetric, ParamBits::Bf16>>();
}
TEST_CASE("cuda remat wgmma: ParamBits::Bf16 quantizers (the packed decode)") {
  using xq::ParamBits;
  using xq::Scheme;
  check_wgmma_remat<xq::quant::Uniform<4, Axis::Token, Scheme::Asymmetric, ParamBits::Bf16>>(128);
  check_wgmma_remat<xq::quant::Uniform<2, Axis::Token, Scheme::Symmetric, ParamBits::Bf16>>(64);
  check_wgmma_remat<xq::quant::Uniform<4, Axis::Channel, Scheme::Symmetric, ParamBits::Bf16>>(64);
  check_wgmma_remat<xq::quant::Uniform<2, Axis::Channel, Scheme::Asymmetric, ParamBits::Bf16>>(32);
}
TEST_CASE("cuda remat wgmma: 4-bit, groups of 128") { check_wgmma_remat<xq::quant::Uniform<4>>(128); }
TEST_CASE("cuda remat wgmma: 2-bit, groups of 64") { check_wgmma_remat<xq::quant::Uniform<2>>(64); }
TEST_CASE("cuda remat wgmma: 3-bit, groups of 128, 3-bit symmetric with bf16 parameters, groups of 64, and 3-bit "
          "per-channel, groups of 32") {
  check_wgmma_remat<xq::quant::Uniform<3>>(128);
  check_wgmma_remat<xq::quant::Uniform<3, Axis::Token, xq::Scheme::Symmetric, xq::ParamBits::Bf16>>(64);
  check_wgmma_remat<xq::quant::Uniform<3, Axis::Channel>>(32);
}
TEST_CASE("cuda remat wgmma: 3-bit rows of a width that is not a multiple of 128 take the portable kernel") {
  // TMA needs a 16-byte row stride: 320 3-bit codes are 120 bytes, 384 are 144.
  XQ_REQUIRE_DEVICE();
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed);
  xc::DeviceStream<xq::quant::Uniform<3>> odd({1, 256, 320, 64}), even({1, 256, 384, 64});
  fill(odd, rng, 200, 200, 0);
  fill(even, rng, 200, 200, 0);
  CHECK(xc::fused_remat_kernel(odd, 0, 200) == xc::FusedRematKernel::Mma);
  if (xc::sm90a_kernels()) CHECK(xc::fused_remat_kernel(even, 0, 200) == xc::FusedRematKernel::Wgmma);
  else MESSAGE("no sm_90a code for this device: remat_fused runs the portable kernel");
}
TEST_CASE("cuda remat wgmma: 8-bit, groups of 128, and 8-bit symmetric with bf16 parameters, groups of 64") {
  check_wgmma_remat<xq::quant::Uniform<8>>(128);
  check_wgmma_remat<xq::quant::Uniform<8, Axis::Token, xq::Scheme::Symmetric, xq::ParamBits::Bf16>>(64);
}
TEST_CASE("cuda remat wgmma: 8-bit per-channel (a 3-stage ring), groups of 128, and symmetric with bf16 parameters, "
          "groups of 32") {
  static_assert(xc::detail::wg::kStages<xq::quant::Uniform<8, Axis::Channel>> == 3);
  check_wgmma_remat<xq::quant::Uniform<8, Axis::Channel>>(128);
  check_wgmma_remat<xq::quant::Uniform<8, Axis::Channel, xq::Scheme::Symmetric, xq::ParamBits::Bf16>>(32);
}
TEST_CASE("cuda remat wgmma: 4-bit symmetric, groups of 256") {
  check_wgmma_remat<xq::quant::Uniform<4, Axis::Token, xq::Scheme::Symmetric>>(256);
}
TEST_CASE("cuda remat wgmma: 2-bit symmetric, groups of 128") {
  check_wgmma_remat<xq::quant::Uniform<2, Axis::Token, xq::Scheme::Symmetric>>(128);
}
TEST_CASE("cuda remat wgmma: 4-bit per-channel, groups of 128") {
  check_wgmma_remat<xq::quant::Uniform<4, Axis::Channel>>(128);
}
TEST_CASE("cuda remat wgmma: 2-bit per-channel, groups of 32 (5 token groups per tile)") {
  check_wgmma_remat<xq::quant::Uniform<2, Axis::Channel>>(32);
}
TEST_CASE("cuda remat wgmma: 4-bit symmetric per-channel, groups of 64") {
  check_wgmma_remat<xq::quant::Uniform<4, Axis::Channel, xq::Scheme::Symmetric>>(64);
}
TEST_CASE("cuda remat wgmma: 4-bit per-channel, groups of 256") {
  check_wgmma_remat<xq::quant::Uniform<4, Axis::Channel>>(256);
}
TEST_CASE("cuda remat wgmma: an odd number of 64-wide k tiles (width 320)") {
  // The mainloop alternates two register sets by k tile; an odd count leaves the last tile
  // without its partner, and the persistent grid's next tile then starts on an odd ring step.
  check_wgmma_remat<xq::quant::Uniform<4>>(64, 320);
  check_wgmma_remat<xq::quant::Uniform<2, Axis::Channel>>(128, 320);
  check_wgmma_remat<xq::quant::Uniform<8, Axis::Channel>>(128, 320);  // and a 3-stage ring
}
TEST_CASE("cuda remat wgmma: one and two 64-wide k tiles (widths 64, 128)") {
  // The staged output tile is freed, and the RoPE tables loaded into it, at k tiles clamped to
  // the tile's last: with one or two k tiles the producer waits for the consumers to free the
  // tile right after issuing its first k tile (a deadlock would hang here, not fail).
  check_wgmma_remat<xq::quant::Uniform<4>>(64, 64);
  check_wgmma_remat<xq::quant::Uniform<4, Axis::Channel>>(32, 128);
  check_wgmma_remat<xq::quant::Uniform<8, Axis::Channel>>(32, 128);  // a 3-stage ring
}

TEST_CASE("cuda remat and dequantize refuse pageable host memory the device cannot read, and take pinned memory") {
  // A kernel that faults on a host pointer leaves the CUDA context unusable for the whole process,
  // so the entry points ask the driver what each pointer is. On a device that reads pageable
  // memory (HMM, ATS) host pointers are fine; the test checks as if this one could not.
  XQ_REQUIRE_DEVICE();
  MESSAGE("this device reads pageable host memory: ", xc::detail::device_reads_pageable_memory());
  const xqcuda::ScopedValue<bool> strict(xc::detail::assume_no_pageable_access, true);
  using Q = xq::quant::Uniform<4>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const int width = 64, n = 64, len = 16;
  xc::DeviceStream<Q> st({1, 64, width, 32});
  const auto x = xqcuda::to_device<xc::bf16>(xqtest::randn(rng, static_cast<std::size_t>(len * width)));
  st.append(0, x.data(), len, width, nullptr);
  const auto w = xqcuda::to_device<xc::bf16>(xqtest::randn(rng, static_cast<std::size_t>(n * width)));
  const auto host_b = xqtest::randn(rng, n);
  xc::DeviceBuffer<float> bias(host_b.size());
  bias.upload(host_b.data(), host_b.size(), nullptr);
  xc::DeviceBuffer<xc::bf16> out(static_cast<std::size_t>(len * n));
  std::vector<xc::bf16> host_w(w.size()), host_out(out.size());
  std::vector<float> host_bias(n), host_x(static_cast<std::size_t>(len * width));
  xc::Cublas blas;
  xc::DeviceBuffer<xc::bf16> scratch;
  auto refused = [&](const xc::RematOperand& op, xc::bf16* o, const char* arg) {
    CAPTURE(arg);
    CHECK_THROWS_WITH_AS(xc::remat_fused(st, 0, len, op, o, n, nullptr), doctest::Contains(arg), xq::ShapeError);
    CHECK_THROWS_WITH_AS(xc::remat_simple(st, 0, len, op, o, n, blas, scratch, nullptr), doctest::Contains(arg),
                         xq::ShapeError);
  };
  refused(xc::RematOperand{host_w.data(), n}, out.data(), "remat: W: points to pageable host memory");
  refused(xc::RematOperand{w.data(), n, 0, host_bias.data()}, out.data(), "remat: bias: points to pageable host memory");
  refused(xc::RematOperand{w.data(), n}, host_out.data(), "remat: out: points to pageable host memory");
  CHECK_THROWS_WITH_AS(xc::dequantize(st, 0, len, host_x.data(), width, nullptr),
                       doctest::Contains("dequantize: out: points to pageable host memory"), xq::ShapeError);
  // Pinned host memory is mapped into the device's address space: dequantize writes it directly.
  float* pinned = nullptr;
  XQ_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned), host_x.size() * sizeof(float)));
  std::fill(pinned, pinned + host_x.size(), std::numeric_limits<float>::quiet_NaN());
  xc::DeviceBuffer<float> dev_out(host_x.size());
  dev_out.fill_bytes(0xff, nullptr);
  CHECK_NOTHROW(xc::dequantize(st, 0, len, pinned, width, nullptr));
  xc::dequantize(st, 0, len, dev_out.data(), width, nullptr);
  const auto want = xqcuda::to_host(dev_out);  // (synchronizes)
  CHECK(xqtest::all_finite(want));
  CHECK(std::memcmp(pinned, want.data(), want.size() * sizeof(float)) == 0);
  XQ_CUDA_CHECK(cudaFreeHost(pinned));
  // Nothing above was launched on host memory: the context still works.
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
}
