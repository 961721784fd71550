// Decode attention on the GPU — absorbed values over the quantized cache, and attention over
// materialized K/V — against a float64 CPU reference (GQA and MHA, unequal sequence lengths,
// XQuant's single stream and the latent codec's two streams).

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "cuda_support.cuh"

namespace xq = xquant;
namespace xc = xquant::cuda;
using xq::Axis;
using xq::index_t;

namespace {

std::vector<float> bf(std::vector<float> v) { return xqcuda::round_to<xc::bf16>(std::move(v)); }

/// XQ_TEST_INITCHECK=1 (run_device.sh sets it under compute-sanitizer's initcheck): skip the parts
/// where a kernel reads what a TMA store wrote — K from cuBLAS's GEMM (attend_absorbed_gemm) and
/// K/V from remat_fused (attend_kv). initcheck does not see TMA stores and reports every such read
/// as uninitialized (NOTES.md item 64: it does so for a plain kernel reading a cuBLAS result).
bool tma_written_reads_skipped() {
  const char* e = std::getenv("XQ_TEST_INITCHECK");
  const bool skip = e != nullptr && e[0] == '1';
  if (skip) MESSAGE("XQ_TEST_INITCHECK=1: the cuBLAS decode path and attention over remat_fused's K/V are skipped");
  return skip;
}

/// Float64 decode attention of sequence rows: K = RoPE(X̂k·Wkᵀ), V = X̂v·Wvᵀ + bv; query at len−1,
/// over the first `attend` tokens (-1: all len).
std::vector<double> reference(const std::vector<float>& xk, index_t wk_in, const std::vector<float>& xv, index_t wv_in,
                              const std::vector<float>& wk, const std::vector<float>& wv, const std::vector<float>& bv,
                              const std::vector<float>& q, index_t len, const xq::AttentionShape& a,
                              index_t attend = -1) {
  const index_t dkv = a.kv_width(), qpos = len - 1;
  if (attend >= 0) len = attend;
  auto K = xqtest::project64(std::vector<float>(xk.begin(), xk.begin() + len * wk_in), wk.data(), len, wk_in, dkv);
  xqtest::rope64(K, len, a.kv_heads, a.head_dim, 0);
  auto V = xqtest::project64(std::vector<float>(xv.begin(), xv.begin() + len * wv_in), wv.data(), len, wv_in, dkv);
  for (index_t r = 0; r < len; ++r)
    for (index_t j = 0; j < dkv; ++j) V[r * dkv + j] += bv[j];
  std::vector<double> qd(q.begin(), q.end());
  xqtest::rope64(qd, 1, a.heads, a.head_dim, qpos);
  return xqtest::attention64(qd, K, V, 1, len, a.heads, a.kv_heads, a.head_dim);
}

/// Random inputs of a decode layer, on the host (for the reference) and the device: Wk (dkv ×
/// wk_in) and Wv (dkv × wv_in) rounded to bf16, a value bias, and `batch` queries; `out` has the
/// queries' shape.
struct DecodeInputs {
  std::vector<float> wk, wv, bv, q;
  xc::DeviceBuffer<xc::bf16> dwk, dwv;
  xc::DeviceBuffer<float> dbv, dq, out;
  DecodeInputs(std::mt19937_64& rng, const xq::AttentionShape& a, index_t wk_in, index_t wv_in, int batch)
      : wk(bf(xqtest::randn(rng, static_cast<std::size_t>(a.kv_width() * wk_in), 0.05f))),
        wv(bf(xqtest::randn(rng, static_cast<std::size_t>(a.kv_width() * wv_in), 0.05f))),
        bv(xqtest::randn(rng, static_cast<std::size_t>(a.kv_width()))),
        q(xqtest::randn(rng, static_cast<std::size_t>(batch * a.q_width()))),
        dwk(xqcuda::to_device<xc::bf16>(wk)),
        dwv(xqcuda::to_device<xc::bf16>(wv)),
        dbv(bv.size()),
        dq(q.size()),
        out(q.size()) {
    dbv.upload(bv.data(), bv.size(), nullptr);
    dq.upload(q.data(), q.size(), nullptr);
    XQ_CUDA_CHECK(cudaDeviceSynchronize());  // (work on other streams does not wait for the legacy one)
  }
  xc::DecodeWeights weights() const { return {dwk.data(), 0, dwv.data(), 0, dbv.data()}; }
  /// Query b's H·Dh values.
  std::vector<float> query(int b, const xq::AttentionShape& a) const {
    return {q.begin() + b * a.q_width(), q.begin() + (b + 1) * a.q_width()};
  }
};

/// QK/QV: quantizers of the key-side and value-side streams; latent: two streams of width dkv,
/// else one of width d; vgroup: the value stream's group (latent only; else both take 128).
template <class QK, class QV>
void check_decode(const xq::AttentionShape& a, bool latent, index_t d = 512, index_t vgroup = 128) {
  XQ_REQUIRE_DEVICE();
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  const std::string what = latent ? " latent" : " xquant";
  INFO("seed ", seed, " H ", a.heads, " Hkv ", a.kv_heads, " d ", d, what, " value group ", vgroup);
  REQUIRE((latent || vgroup == 128));
  const int B = 3;
  const std::vector<index_t> lens = {300, 77, 129};
  const index_t dkv = a.kv_width(), wk_in = latent ? dkv : d, wv_in = latent ? dkv : d, cap = 384;
  cudaStream_t s = nullptr;
  xc::DeviceStream<QK> ks({B, cap, wk_in, 128});
  xc::DeviceStream<QV> vs({B, cap, wv_in, vgroup});
  std::vector<std::vector<float>> xk(B), xv(B);
  for (int b = 0; b < B; ++b) {
    auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, lens[b], wk_in));
    auto dx = xqcuda::to_device<xc::bf16>(x);
    ks.append(b, dx.data(), lens[b] - 1, wk_in, s);
    ks.append(b, dx.data() + (lens[b] - 1) * wk_in, 1, wk_in, s);  // the decode token
    xk[b] = xqcuda::reference_xhat<QK>(x, lens[b], wk_in, 128);
    if (latent) {
      auto y = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, lens[b], wv_in));
      auto dy = xqcuda::to_device<xc::bf16>(y);
      vs.append(b, dy.data(), lens[b], wv_in, s);
      xv[b] = xqcuda::reference_xhat<QV>(y, lens[b], wv_in, vgroup);
    } else {
      vs.append(b, dx.data(), lens[b], wv_in, s);
      xv[b] = xqcuda::reference_xhat<QV>(x, lens[b], wv_in, 128);
    }
  }
  ks.check(s);
  vs.check(s);
  DecodeInputs in(rng, a, wk_in, wv_in, B);
  const auto &wk = in.wk, &wv = in.wv, &bv = in.bv, &q = in.q;
  auto& out = in.out;
  const xq::Rope rope(a.head_dim, 1024);
  const xc::DeviceRope drope(rope);
  xc::DecodeWorkspace ws;

  std::vector<double> ref;
  for (int b = 0; b < B; ++b) {
    const auto qb = in.query(b, a);
    auto r = reference(bf(xk[b]), wk_in, xv[b], wv_in, wk, wv, bv, qb, lens[b], a);
    ref.insert(ref.end(), r.begin(), r.end());
  }
  // (Every key stream of these tests is one the wgmma scores serve: width 512 or dkv 256, groups of 128.)
  if (xc::sm90a_kernels()) CHECK(xc::detail::absorbed_wgmma_applies<QK, QV>(ks.shape(), vs.shape(), 300));
  else MESSAGE("no sm_90a code for this device: attend_absorbed runs the portable kernel");
  // attend_absorbed's two paths: on sm_90a the wgmma scores + absorb_values kernels (splits: the
  // token splits of P·X̂v), also with the scores kernel's grid capped at 2 blocks, so that each
  // block works through several tiles in turn; elsewhere (and here with the switch) the portable
  // kernel (splits: its token ranges). From the second call on, the grown scratch is poisoned
  // (NaN) first, so a score or partial sum that no kernel writes shows up as a non-finite output.
  for (int path = 0; path < 3; ++path)
    for (int splits : {0, 1, 3}) {
      CAPTURE(path);
      CAPTURE(splits);
      out.fill_bytes(0xff, s);
      ws.s.fill_bytes(0xff, s);
      ws.p.fill_bytes(0xff, s);
      ws.part.fill_bytes(0xff, s);
      ws.acc.fill_bytes(0xff, s);
      {
        const xqcuda::ScopedValue<bool> portable(xc::detail::decode_wgmma_disabled, path == 2);
        const xqcuda::ScopedValue<int> blocks(xc::detail::remat_wgmma_max_blocks,
                                              path == 1 ? 2 : xc::detail::remat_wgmma_max_blocks);
        xc::attend_absorbed(ks, vs, a, in.weights(), drope, in.dq.data(), out.data(), ws, s, 0, 0, splits);
      }
      const auto got = xqcuda::to_host(out);
      CHECK(xqtest::all_finite(got));
      CHECK(xqtest::rel_error(got, ref) < 1e-2);
    }
  const bool skip_tma_reads = tma_written_reads_skipped();
  if (!skip_tma_reads) {  // the cuBLAS path (K and X̂ in scratch), twice: the second run reuses the grown workspace
    // Tolerance: this path rounds three more operands to bf16 than the reference does — X̂, K
    // (before RoPE) and the softmax weights P, each with a relative error up to 2^-9 — and the
    // latent values carry outlier channels, so errors of 1-2% occur on some seeds (1.8% seen).
    // 3e-2 bounds that. attend_absorbed above meets 1e-2: it keeps K in fp32 (the error that
    // exponentiation amplifies); its sm_90a path rounds P and X̂v to bf16 as this one does.
    xc::Cublas blas;
    for (int rep = 0; rep < 2; ++rep) {
      CAPTURE(rep);
      out.fill_bytes(0xff, s);
      xc::attend_absorbed_gemm(ks, vs, a, in.weights(), drope, in.dq.data(), out.data(), ws, blas, s);
      const auto got = xqcuda::to_host(out);
      CHECK(xqtest::all_finite(got));
      CHECK(xqtest::rel_error(got, ref) < 3e-2);
    }
  }
  // Materialize-then-attend over the same cache (equal lengths only): compare with the reference too.
  if (!latent && !skip_tma_reads) {
    const index_t n = 77;
    xc::DeviceStream<QK> one({1, cap, d, 128});
    auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, n, d));
    auto dx = xqcuda::to_device<xc::bf16>(x);
    one.append(0, dx.data(), n, d, s);
    xc::DeviceBuffer<xc::bf16> K(n * dkv), V(n * dkv);
    xc::remat_fused(one, 0, n, xc::RematOperand{in.dwk.data(), dkv, 0, nullptr, &drope}, K.data(), dkv, s);
    xc::remat_fused(one, 0, n, xc::RematOperand{in.dwv.data(), dkv, 0, in.dbv.data(), nullptr}, V.data(), dkv, s);
    xc::DeviceBuffer<int> len(1);
    const int nl = static_cast<int>(n);
    len.upload(&nl, 1, s);
    out.fill_bytes(0xff, s);
    xc::attend_kv(K.data(), V.data(), dkv, n, 1, n, len.data(), a, drope, in.dq.data(), out.data(), ws, s);
    auto got = xqcuda::to_host(out, static_cast<std::size_t>(a.q_width()));
    const auto xh = xqcuda::reference_xhat<QK>(x, n, d, 128);
    const std::vector<float> q0(q.begin(), q.begin() + a.q_width());
    const auto r = reference(bf(xh), d, bf(xh), d, wk, wv, bv, q0, n, a);
    CHECK(xqtest::all_finite(got));
    CHECK(xqtest::rel_error(got, r) < 1e-2);
  }
}

}  // namespace

TEST_CASE("cuda decode attention, absorbed values: GQA (4 query heads per KV head), 4-bit") {
  check_decode<xq::quant::Uniform<4>, xq::quant::Uniform<4>>({8, 2, 128}, false);
}
TEST_CASE("cuda decode attention, absorbed values: MHA, 2-bit") {
  check_decode<xq::quant::Uniform<2>, xq::quant::Uniform<2>>({4, 4, 128}, false);
}
TEST_CASE("cuda decode attention, absorbed values: 8- and 3-bit (the wgmma scores of such keys)") {
  check_decode<xq::quant::Uniform<8>, xq::quant::Uniform<8>>({8, 2, 128}, false);
  check_decode<xq::quant::Uniform<3>, xq::quant::Uniform<3>>({8, 2, 128}, false);
  check_decode<xq::quant::Uniform<3, Axis::Channel>, xq::quant::Uniform<4>>({8, 2, 128}, true);
  check_decode<xq::quant::Uniform<8, Axis::Channel>, xq::quant::Uniform<4>>({8, 2, 128}, true);
}
TEST_CASE("cuda decode attention, absorbed values: 8 and 3 query heads per KV head, widths not multiples of 256") {
  check_decode<xq::quant::Uniform<4>, xq::quant::Uniform<4>>({16, 2, 128}, false, 640);
  check_decode<xq::quant::Uniform<4>, xq::quant::Uniform<4>>({6, 2, 128}, false, 384);
  check_decode<xq::quant::Uniform<4>, xq::quant::Uniform<4>>({6, 3, 128}, false, 384);  // a tile with one KV head
}
TEST_CASE("cuda decode attention, absorbed values: latent codec (X·Uk per channel, X·Uv per token)") {
  check_decode<xq::quant::Uniform<4, Axis::Channel>, xq::quant::Uniform<4>>({8, 2, 128}, true);
}
TEST_CASE("cuda decode attention, absorbed values: bf16 parameters (ParamBits::Bf16: the packed key decode)") {
  using xq::ParamBits;
  using xq::Scheme;
  using K4 = xq::quant::Uniform<4, Axis::Token, Scheme::Asymmetric, ParamBits::Bf16>;
  using C2 = xq::quant::Uniform<2, Axis::Channel, Scheme::Asymmetric, ParamBits::Bf16>;
  using V4 = xq::quant::Uniform<4, Axis::Token, Scheme::Symmetric, ParamBits::Bf16>;
  check_decode<K4, K4>({8, 2, 128}, false);
  check_decode<C2, V4>({8, 2, 128}, true);
}
TEST_CASE("cuda decode attention, absorbed values: per-channel and 3-bit values (the general value decode)") {
  // absorb_values_kernel decodes per-token 2- and 4-bit values inline and every other quantizer
  // through dequant8 (per-channel: the newest tokens from the fp16 window).
  check_decode<xq::quant::Uniform<4, Axis::Channel>, xq::quant::Uniform<2, Axis::Channel>>({8, 2, 128}, true);
  check_decode<xq::quant::Uniform<4, Axis::Channel>, xq::quant::Uniform<3>>({8, 2, 128}, true);
  // Per-token 4-bit values in groups of 16: the inline decode, but 8 columns per load (the row
  // path, 32 columns under one group's parameters, needs groups of 32 or more).
  check_decode<xq::quant::Uniform<4, Axis::Channel>, xq::quant::Uniform<4>>({8, 2, 128}, true, 512, 16);
}
TEST_CASE("cuda decode steps captured once in a CUDA graph and replayed as the sequences grow") {
  // One decode step (append_all, then attend_absorbed with a max_tokens bound) is captured and
  // replayed 12 times with new token rows and queries in the same buffers: each replay must
  // append at the device's lengths and attend over every token so far, as the float64 reference
  // says. The sm_90a path and the portable kernel both run this way.
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  for (int path = 0; path < 2; ++path) {
    std::uint64_t seed;
    auto rng = xqtest::make_rng(seed);
    INFO("seed ", seed, " path ", std::string(path == 0 ? "default" : "portable"));
    const xq::AttentionShape a{8, 2, 128};
    const int B = 2;
    const index_t d = 512, cap = 256, bound = 200;
    // 103 + 1 tokens at capture: sm_90a grids sized from the host's lengths (104: Lp 104) instead
    // of the bound would leave out up to 11 of the newest tokens of sequence 0, which the
    // reference sees.
    const std::vector<index_t> prefill = {103, 37};
    const int steps = 12;
    xqcuda::CapturedStream cs;
    const cudaStream_t s = cs.get();
    xc::DeviceStream<Q> st({B, cap, d, 128});
    std::vector<std::vector<float>> rows(B);
    for (int b = 0; b < B; ++b) {
      rows[b] = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, prefill[b], d));
      auto dx = xqcuda::to_device<xc::bf16>(rows[b]);
      st.append(b, dx.data(), prefill[b], d, s);
    }
    st.check(s);
    DecodeInputs in(rng, a, d, d, B);  // (its queries serve the warm-up call below, which reads them)
    const auto &wk = in.wk, &wv = in.wv, &bv = in.bv;
    auto &dq = in.dq, &out = in.out;
    xc::DeviceBuffer<xc::bf16> dstep(static_cast<std::size_t>(B * d));
    const xq::Rope rope(a.head_dim, 1024);
    const xc::DeviceRope drope(rope);
    xc::DecodeWorkspace ws;
    const xc::DecodeWeights w = in.weights();
    {
      const xqcuda::ScopedValue<bool> portable(xc::detail::decode_wgmma_disabled, path == 1);
      // Outside the capture first: grows the workspace, which must not allocate while capturing.
      xc::attend_absorbed(st, st, a, w, drope, dq.data(), out.data(), ws, s, 0, 0, 0, bound);
      XQ_CUDA_CHECK(cudaStreamSynchronize(s));
      cs.begin(cudaStreamCaptureModeGlobal);
      st.append_all(dstep.data(), d, s);
      xc::attend_absorbed(st, st, a, w, drope, dq.data(), out.data(), ws, s, 0, 0, 0, bound);
      cs.end();
    }
    for (int step = 0; step < steps; ++step) {
      CAPTURE(step);
      const auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, B, d));
      const auto q = xqtest::randn(rng, static_cast<std::size_t>(B * a.q_width()));
      const auto hx = xqcuda::to_device<xc::bf16>(x);  // (host rounding; the copy below is stream-ordered)
      XQ_CUDA_CHECK(cudaMemcpyAsync(dstep.data(), hx.data(), dstep.bytes(), cudaMemcpyDeviceToDevice, s));
      dq.upload(q.data(), q.size(), s);
      out.fill_bytes(0xff, s);
      cs.launch();
      XQ_CUDA_CHECK(cudaStreamSynchronize(s));
      std::vector<double> ref;
      for (int b = 0; b < B; ++b) {
        rows[b].insert(rows[b].end(), x.begin() + b * d, x.begin() + (b + 1) * d);
        const index_t len = prefill[b] + step + 1;
        const auto xh = bf(xqcuda::reference_xhat<Q>(rows[b], len, d, 128));
        const std::vector<float> qb(q.begin() + b * a.q_width(), q.begin() + (b + 1) * a.q_width());
        const auto r = reference(xh, d, xh, d, wk, wv, bv, qb, len, a);
        ref.insert(ref.end(), r.begin(), r.end());
      }
      const auto got = xqcuda::to_host(out);
      CHECK(xqtest::all_finite(got));
      CHECK(xqtest::rel_error(got, ref) < 1e-2);
    }
    st.sync_lengths(s);
    CHECK(st.length(0) == prefill[0] + steps);
    CHECK(st.length(1) == prefill[1] + steps);
    st.check(s);
  }
}
TEST_CASE("cuda decode: a replayed step past the RoPE table gives NaN, not a read past the table") {
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  INFO("seed ", seed);
  const xq::AttentionShape a{4, 2, 128};
  const index_t d = 512, dkv = a.kv_width(), positions = 64;
  // Everything on the test's stream (a non-blocking stream does not wait for the legacy one).
  xqcuda::CapturedStream cs;
  const cudaStream_t s = cs.get();
  xc::DeviceStream<Q> st({1, 128, d, 128});
  const auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, positions + 1, d));
  const auto dx = xqcuda::to_device<xc::bf16>(x);
  st.append(0, dx.data(), positions - 1, d, s);
  const auto wk = xqcuda::to_device<xc::bf16>(bf(xqtest::randn(rng, static_cast<std::size_t>(dkv * d), 0.05f)));
  const auto wv = xqcuda::to_device<xc::bf16>(bf(xqtest::randn(rng, static_cast<std::size_t>(dkv * d), 0.05f)));
  const auto q = xqtest::randn(rng, static_cast<std::size_t>(a.q_width()));
  xc::DeviceBuffer<float> dq(q.size()), out(q.size());
  dq.upload(q.data(), q.size(), s);
  const xc::DeviceRope rope(xq::Rope(a.head_dim, positions));
  xc::DecodeWorkspace ws;
  const xc::DecodeWeights w{wk.data(), 0, wv.data(), 0, nullptr};
  xc::DeviceBuffer<xc::bf16> tok(static_cast<std::size_t>(d));
  XQ_CUDA_CHECK(cudaMemcpyAsync(tok.data(), dx.data() + (positions - 1) * d, tok.bytes(), cudaMemcpyDeviceToDevice, s));
  xc::attend_absorbed(st, st, a, w, rope, dq.data(), out.data(), ws, s, 0, 0, 0, positions);  // grows ws
  XQ_CUDA_CHECK(cudaStreamSynchronize(s));
  cs.begin();
  st.append_all(tok.data(), d, s);
  xc::attend_absorbed(st, st, a, w, rope, dq.data(), out.data(), ws, s, 0, 0, 0, positions);
  cs.end();
  cs.launch();  // 64 tokens: the last position of the table
  XQ_CUDA_CHECK(cudaStreamSynchronize(s));
  CHECK(xqtest::all_finite(xqcuda::to_host(out)));
  cs.launch();  // 65 tokens: past the table and the bound
  XQ_CUDA_CHECK(cudaStreamSynchronize(s));
  const auto got = xqcuda::to_host(out);
  CHECK(std::all_of(got.begin(), got.end(), [](float v) { return std::isnan(v); }));
}
TEST_CASE("cuda decode attention: a sequence longer than max_tokens attends over its first max_tokens tokens") {
  // max_tokens sizes the launches without the lengths (graph replays); a sequence that outgrew it
  // must not make a kernel read past its rows of the workspace (other heads' scores, or past the
  // end): it attends over tokens [0, max_tokens), its query still at position length − 1. The
  // scratch is poisoned with NaN, so a read of a row no kernel wrote shows as a non-finite output.
  XQ_REQUIRE_DEVICE();
  using Q = xq::quant::Uniform<4>;
  std::uint64_t seed;
  auto rng = xqtest::make_rng(seed);
  const xq::AttentionShape a{8, 2, 128};
  const int B = 3;
  const index_t d = 256, dkv = a.kv_width(), cap = 384, bound = 100;
  const std::vector<index_t> lens = {300, 77, 129};  // two past the bound, one within it
  xc::DeviceStream<Q> st({B, cap, d, 128});
  std::vector<std::vector<float>> xh(B);
  for (int b = 0; b < B; ++b) {
    const auto x = xqcuda::round_to<xc::bf16>(xqtest::activations(rng, lens[b], d));
    const auto dx = xqcuda::to_device<xc::bf16>(x);
    st.append(b, dx.data(), lens[b], d, nullptr);
    xh[b] = bf(xqcuda::reference_xhat<Q>(x, lens[b], d, 128));
  }
  st.check(nullptr);
  DecodeInputs in(rng, a, d, d, B);
  auto& out = in.out;
  const xc::DeviceRope drope(xq::Rope(a.head_dim, 1024));
  const xc::DecodeWeights w = in.weights();
  std::vector<double> ref;
  for (int b = 0; b < B; ++b) {
    const auto r = reference(xh[b], d, xh[b], d, in.wk, in.wv, in.bv, in.query(b, a), lens[b], a, std::min(lens[b], bound));
    ref.insert(ref.end(), r.begin(), r.end());
  }
  xc::DecodeWorkspace ws;
  for (int path = 0; path < 3; ++path)
    for (int splits : {0, 1, 3}) {
      INFO("seed ", seed, " path ", path, " splits ", splits);
      const xqcuda::ScopedValue<bool> portable(xc::detail::decode_wgmma_disabled, path == 2);
      const xqcuda::ScopedValue<int> blocks(xc::detail::remat_wgmma_max_blocks,
                                            path == 1 ? 2 : xc::detail::remat_wgmma_max_blocks);
      xc::attend_absorbed(st, st, a, w, drope, in.dq.data(), out.data(), ws, nullptr, 0, 0, splits, bound);  // grows ws
      out.fill_bytes(0xff, nullptr);
      ws.s.fill_bytes(0xff, nullptr);
      ws.p.fill_bytes(0xff, nullptr);
      ws.part.fill_bytes(0xff, nullptr);
      ws.acc.fill_bytes(0xff, nullptr);
      xc::attend_absorbed(st, st, a, w, drope, in.dq.data(), out.data(), ws, nullptr, 0, 0, splits, bound);
      const auto got = xqcuda::to_host(out);
      CHECK(xqtest::all_finite(got));
      CHECK(xqtest::rel_error(got, ref) < 1e-2);
    }
}
TEST_CASE("cuda decode attention: max_tokens beyond a capacity is rejected") {
  XQ_REQUIRE_DEVICE();
  xc::DeviceStream<xq::quant::Uniform<4>> st({1, 128, 512, 128});
  const xc::DeviceRope rope(xq::Rope(128, 256));
  const xq::AttentionShape a{4, 2, 128};
  xc::DeviceBuffer<xc::bf16> w(static_cast<std::size_t>(a.kv_width() * 512));
  xc::DeviceBuffer<float> q(static_cast<std::size_t>(a.q_width())), out(q.size());
  xc::DecodeWorkspace ws;
  const xc::DecodeWeights dw{w.data(), 0, w.data(), 0, nullptr};
  CHECK_THROWS_AS(xc::attend_absorbed(st, st, a, dw, rope, q.data(), out.data(), ws, nullptr, 0, 0, 0, 129),
                  xq::ShapeError);
  CHECK_THROWS_AS(xc::attend_absorbed(st, st, a, dw, rope, q.data(), out.data(), ws, nullptr, 0, 0, 0, -1),
                  xq::ShapeError);
}
TEST_CASE("cuda decode attention rejects unsupported head sizes") {
  XQ_REQUIRE_DEVICE();
  xc::DeviceStream<xq::quant::Uniform<4>> st({1, 128, 512, 128});
  xc::DecodeWorkspace ws;
  const xc::DeviceRope rope(xq::Rope(64, 16));
  CHECK_THROWS_AS(xc::attend_absorbed(st, st, {4, 4, 64}, xc::DecodeWeights{}, rope, nullptr, nullptr, ws, nullptr),
                  xq::ConfigError);
}
TEST_CASE("cuda decode attention rejects misaligned or short-strided weights, queries and outputs, and no heads") {
  XQ_REQUIRE_DEVICE();
  xc::DeviceStream<xq::quant::Uniform<4>> st({1, 128, 512, 128});
  const xc::DeviceRope rope(xq::Rope(128, 256));
  const xq::AttentionShape a{4, 2, 128};
  xc::DeviceBuffer<xc::bf16> w(static_cast<std::size_t>(a.kv_width() * 512 + 8));
  xc::DeviceBuffer<float> q(static_cast<std::size_t>(2 * a.q_width())), out(q.size());  // (2 rows: ldq = 2·H·Dh below)
  w.fill_bytes(0x3c, nullptr);  // finite values (0.0115 as bf16 and float) for the calls that run
  q.fill_bytes(0x3c, nullptr);
  std::vector<float> x(16 * 512);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 97) / 97.0f - 0.5f;
  const auto dx = xqcuda::to_device<xc::bf16>(x);
  st.append(0, dx.data(), 16, 512, nullptr);
  xc::DecodeWorkspace ws;
  xc::Cublas blas;
  const xc::DecodeWeights misaligned{w.data() + 4, 0, w.data(), 0, nullptr};
  const xc::DecodeWeights short_ld{w.data(), 256, w.data(), 0, nullptr};
  const xc::DecodeWeights odd_ld{w.data(), 0, w.data(), 516, nullptr};
  for (const auto& bad : {misaligned, short_ld, odd_ld}) {
    CHECK_THROWS_AS(xc::attend_absorbed(st, st, a, bad, rope, q.data(), out.data(), ws, nullptr), xq::ShapeError);
    CHECK_THROWS_AS(xc::attend_absorbed_gemm(st, st, a, bad, rope, q.data(), out.data(), ws, blas, nullptr),
                    xq::ShapeError);
  }
  // Query and output strides: 0 (packed) or at least H·Dh; heads must be positive.
  const xc::DecodeWeights dw{w.data(), 0, w.data(), 0, nullptr};
  for (index_t ldq : {index_t(0), a.q_width() - 1, index_t(-a.q_width())})
    for (index_t ldo : {index_t(0), a.q_width() - 128, index_t(-1)}) {
      if (ldq == 0 && ldo == 0) continue;
      CAPTURE(ldq);
      CAPTURE(ldo);
      CHECK_THROWS_AS(xc::attend_absorbed(st, st, a, dw, rope, q.data(), out.data(), ws, nullptr, ldq, ldo),
                      xq::ShapeError);
      CHECK_THROWS_AS(xc::attend_absorbed_gemm(st, st, a, dw, rope, q.data(), out.data(), ws, blas, nullptr, ldq, ldo),
                      xq::ShapeError);
    }
  CHECK_NOTHROW(xc::attend_absorbed(st, st, a, dw, rope, q.data(), out.data(), ws, nullptr, 2 * a.q_width(), a.q_width()));
  for (const xq::AttentionShape bad : {xq::AttentionShape{0, 2, 128}, xq::AttentionShape{-8, 2, 128}})
    CHECK_THROWS_AS(xc::attend_absorbed(st, st, bad, dw, rope, q.data(), out.data(), ws, nullptr), xq::ConfigError);
  // attend_kv: K and V are read 4 elements (8 bytes) at a time; batch must be positive.
  xc::DeviceBuffer<xc::bf16> K(static_cast<std::size_t>(16 * a.kv_width() + 8)), V(K.size());
  K.fill_bytes(0, nullptr);
  V.fill_bytes(0, nullptr);
  xc::DeviceBuffer<int> len(1);
  const int sixteen = 16;
  len.upload(&sixteen, 1, nullptr);
  CHECK_THROWS_AS(xc::attend_kv(K.data() + 1, V.data(), a.kv_width(), 16, 1, 16, len.data(), a, rope, q.data(), out.data(),
                                ws, nullptr),
                  xq::ShapeError);
  CHECK_THROWS_AS(xc::attend_kv(K.data(), V.data() + 2, a.kv_width(), 16, 1, 16, len.data(), a, rope, q.data(), out.data(),
                                ws, nullptr),
                  xq::ShapeError);
  CHECK_THROWS_AS(xc::attend_kv(K.data(), V.data(), a.kv_width(), 16, 0, 16, len.data(), a, rope, q.data(), out.data(),
                                ws, nullptr),
                  xq::ShapeError);
  CHECK_THROWS_AS(xc::attend_kv(K.data(), V.data(), a.kv_width(), 16, 1, 16, len.data(), a, rope, q.data(), out.data(),
                                ws, nullptr, a.q_width() - 1),
                  xq::ShapeError);
  CHECK_NOTHROW(xc::attend_kv(K.data(), V.data(), a.kv_width(), 16, 1, 16, len.data(), a, rope, q.data(), out.data(),
                              ws, nullptr));
  XQ_CUDA_CHECK(cudaDeviceSynchronize());

  // Pageable host memory the device cannot read (checked as on such a device, see the remat test):
  // each argument is named, and nothing runs.
  {
    const xqcuda::ScopedValue<bool> strict(xc::detail::assume_no_pageable_access, true);
    std::vector<xc::bf16> hw(w.size()), hK(K.size());
    std::vector<float> hq(q.size()), hout(out.size()), hb(a.kv_width());
    const int hlen = 16;
    auto refused = [](const char* arg, auto&& call) {
      CAPTURE(arg);
      CHECK_THROWS_WITH_AS(call(), doctest::Contains((std::string(arg) + ": points to pageable host memory").c_str()),
                           xq::ShapeError);
    };
    for (int gemm = 0; gemm < 2; ++gemm) {
      const std::string fn = gemm ? "attend_absorbed_gemm" : "attend_absorbed";
      auto attend = [&](const xc::DecodeWeights& dwx, const float* qx, float* ox) {
        if (gemm) xc::attend_absorbed_gemm(st, st, a, dwx, rope, qx, ox, ws, blas, nullptr);
        else xc::attend_absorbed(st, st, a, dwx, rope, qx, ox, ws, nullptr);
      };
      refused((fn + ": wk").c_str(), [&] { attend({hw.data(), 0, w.data(), 0, nullptr}, q.data(), out.data()); });
      refused((fn + ": wv").c_str(), [&] { attend({w.data(), 0, hw.data(), 0, nullptr}, q.data(), out.data()); });
      refused((fn + ": bv").c_str(), [&] { attend({w.data(), 0, w.data(), 0, hb.data()}, q.data(), out.data()); });
      refused((fn + ": q").c_str(), [&] { attend(dw, hq.data(), out.data()); });
      refused((fn + ": out").c_str(), [&] { attend(dw, q.data(), hout.data()); });
    }
    auto kv = [&](const xc::bf16* k, const xc::bf16* v, const int* l, const float* qx, float* ox) {
      xc::attend_kv(k, v, a.kv_width(), 16, 1, 16, l, a, rope, qx, ox, ws, nullptr);
    };
    refused("attend_kv: K", [&] { kv(hK.data(), V.data(), len.data(), q.data(), out.data()); });
    refused("attend_kv: V", [&] { kv(K.data(), hK.data(), len.data(), q.data(), out.data()); });
    refused("attend_kv: q", [&] { kv(K.data(), V.data(), len.data(), hq.data(), out.data()); });
    refused("attend_kv: out", [&] { kv(K.data(), V.data(), len.data(), q.data(), hout.data()); });
    refused("attend_kv: length", [&] { kv(K.data(), V.data(), &hlen, q.data(), out.data()); });
  }
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
}
