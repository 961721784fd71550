// Rematerialization of K (RoPE at cached positions) and V on the GPU, fused and simple paths,
// against a float64 CPU reference built from the CPU quantizer's X̂.

#include "cuda_support.cuh"

namespace xq = xquant;
namespace xc = xquant::cuda;
using xq::Axis;
using xq::index_t;

namespace {

/// bf16-rounded copy of v.
std::vector<float> bf(std::vector<float> v) { return xqcuda::round_to<xc::bf16>(std::move(v)); }

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
  std::vector<std::vector<float>> xhat(B);
  for (int b = 0; b < B; ++b) {
    auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, len, width));
    auto d = xqcuda::to_device<xc::bf16>(x);
    st.append(b, d.data(), 200, width, s);
    st.append(b, d.data() + 200 * width, len - 200, width, s);
    xhat[b] = bf(xqcuda::reference_xhat<Q>(x, len, width, group));  // the A operand is bf16
  }
  st.check(s);
  const xq::Rope rope(64, 1024);
  const xc::DeviceRope drope(rope);
  xc::Cublas blas;
  xc::DeviceBuffer<xc::bf16> scratch;

  struct Case {
    index_t n;
    bool rope, bias;
  };
  for (const Case c : {Case{256, true, false}, Case{200, false, true}, Case{384, true, true}}) {
    CAPTURE(c.n);
    CAPTURE(c.rope);
    const auto w = bf(xqtest::randn(rng, static_cast<std::size_t>(c.n * width), 0.05f));
    const auto bias = xqtest::randn(rng, static_cast<std::size_t>(c.n));
    auto dw = xqcuda::to_device<xc::bf16>(w);
    xc::DeviceBuffer<float> dbias(bias.size());
    dbias.upload(bias.data(), bias.size(), s);
    xc::RematOperand op{dw.data(), c.n, 0, c.bias ? dbias.data() : nullptr, c.rope ? &drope : nullptr};

    std::vector<double> ref;
    for (int b = 0; b < B; ++b) {
      std::vector<float> rows(xhat[b].begin() + begin * width, xhat[b].begin() + end * width);
      auto y = xqtest::project64(rows, w.data(), count, width, c.n);
      if (c.bias)
        for (index_t r = 0; r < count; ++r)
          for (index_t j = 0; j < c.n; ++j) y[r * c.n + j] += bias[j];
      if (c.rope) xqtest::rope64(y, count, c.n / 64, 64, begin);
      ref.insert(ref.end(), y.begin(), y.end());
    }
    xc::DeviceBuffer<xc::bf16> out(static_cast<std::size_t>(B * count * c.n));
    for (int path = 0; path < 2; ++path) {
      CAPTURE(path);
      out.fill_bytes(0xff, s);  // NaN everywhere
      if (path == 0) xc::remat_fused(st, begin, end, op, out.data(), c.n, s);
      else xc::remat_simple(st, begin, end, op, out.data(), c.n, blas, scratch, s);
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
}

}  // namespace

TEST_CASE("cuda remat: 4-bit per-token") { check_remat<xq::quant::Uniform<4>>(128); }
TEST_CASE("cuda remat: 2-bit per-token, groups of 32") { check_remat<xq::quant::Uniform<2>>(32); }
TEST_CASE("cuda remat: 3-bit per-token") { check_remat<xq::quant::Uniform<3>>(64); }
TEST_CASE("cuda remat: 8-bit per-token") { check_remat<xq::quant::Uniform<8>>(128); }
TEST_CASE("cuda remat: 4-bit per-channel, fp16 window rows") {
  check_remat<xq::quant::Uniform<4, Axis::Channel>>(128);
}
TEST_CASE("cuda remat: 2-bit symmetric per-channel") {
  check_remat<xq::quant::Uniform<2, Axis::Channel, xq::Scheme::Symmetric>>(64);
}
