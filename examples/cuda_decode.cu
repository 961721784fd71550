// xquant-cuda-decode: the GPU backend as an inference engine drives it, for one attention layer of
// a GQA model (16 query heads, 4 KV heads of 128, d = 2048) over a batch of 4 sequences.
//
//   1. a device stream keeps 4-bit codes of the layer's input X (per token, groups of 128) instead
//      of a K/V cache; a batched prefill chunk goes in with one append_batch call;
//   2. remat_fused rematerializes K = RoPE(X̂·Wkᵀ) for a token range (X̂ never reaches memory);
//   3. each decode step appends the new token's X to every sequence and runs attend_absorbed:
//      scores from rematerialized keys, softmax, then softmax·X̂ projected by Wv per head. The step
//      is captured once in a CUDA graph and replayed as the sequences grow (max_tokens bound);
//   4. the last step is checked against attend_absorbed_gemm, a path through cuBLAS that
//      materializes X̂ and K in scratch, and the stream's device bytes per token are compared with
//      an FP16 K/V cache's. (With 4 KV heads X is twice as wide as K and V together, so 4-bit X
//      is only ~1.9x smaller here; for such GQA models the latent codec caches X·Uk and X·Uv of
//      width dkv instead, and the same device streams and kernels serve it.)
//
// Build: part of the project's build when the CUDA backend is on (target xquant-cuda-decode);
// on Hopper configure with -DCMAKE_CUDA_ARCHITECTURES=90a for the wgmma kernels. Without a CUDA
// device it prints "SKIPPED: no CUDA device" and exits 0. Exit status 1 if the check fails.

#include <xquant/cuda.cuh>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace xc = xquant::cuda;
using xquant::index_t;

namespace {

// Random bf16 values on the device (normal, scaled), copied in `stream`'s order.
xc::DeviceBuffer<xc::bf16> random_bf16(std::mt19937& rng, std::size_t n, float scale, cudaStream_t stream) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<xc::bf16> h(n);
  for (auto& v : h) v = __float2bfloat16(dist(rng));
  xc::DeviceBuffer<xc::bf16> d(n);
  d.upload(h.data(), n, stream);  // (from pageable memory: h is free to go when this returns)
  return d;
}

}  // namespace

int main() try {
  if (xc::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  using Q = xquant::quant::Uniform<4>;  // 4-bit codes, asymmetric, one scale and zero per group
  const int B = 4;
  const index_t d = 2048, prefill = 500, steps = 64, capacity = 1024;
  const xquant::AttentionShape a{16, 4, 128};  // heads, KV heads, head dim
  const index_t dkv = a.kv_width();
  std::mt19937 rng(20261130);
  cudaStream_t stream;
  XQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  // The layer's weights and the RoPE tables (positions up to the capacity).
  const auto wk = random_bf16(rng, static_cast<std::size_t>(dkv * d), 0.02f, stream);
  const auto wv = random_bf16(rng, static_cast<std::size_t>(dkv * d), 0.02f, stream);
  const xc::DeviceRope rope(xquant::Rope(a.head_dim, capacity));
  const xc::DecodeWeights weights{wk.data(), 0, wv.data(), 0, nullptr};

  // 1. The X stream: one per layer; here keys and values both come from it (XQuant).
  xc::DeviceStream<Q> x({B, capacity, d, 128});
  const auto chunk = random_bf16(rng, static_cast<std::size_t>(B * prefill * d), 1.0f, stream);  // rows b·prefill + t
  x.append_batch(chunk.data(), prefill, d, stream);
  x.check(stream);  // synchronizes; raises ValueError on NaN/Inf or values outside fp16
  const double per_token = static_cast<double>(x.allocated_bytes()) / (static_cast<double>(B) * capacity);
  const double fp16_kv = 2.0 * 2.0 * static_cast<double>(dkv);  // K and V rows of dkv fp16 values
  std::printf("prefill: %d sequences x %lld tokens; stream %.0f bytes/token (allocated), FP16 K/V %.0f: %.2fx smaller\n",
              B, static_cast<long long>(prefill), per_token, fp16_kv, fp16_kv / per_token);

  // 2. K for the last 64 prefill tokens of every sequence (rows b·64 + t), RoPE at their positions.
  xc::DeviceBuffer<xc::bf16> k(static_cast<std::size_t>(B * 64 * dkv));
  xc::remat_fused(x, prefill - 64, prefill, xc::RematOperand{wk.data(), dkv, 0, nullptr, &rope}, k.data(), dkv, stream);
  std::printf("remat: K of tokens [%lld, %lld) with the %s kernel\n", static_cast<long long>(prefill - 64),
              static_cast<long long>(prefill),
              xc::fused_remat_kernel(x, prefill - 64, prefill) == xc::FusedRematKernel::Wgmma ? "wgmma" : "mma");

  // 3. Decode steps. The graph reads its inputs from fixed buffers: the new tokens' X and queries.
  xc::DeviceBuffer<xc::bf16> token(static_cast<std::size_t>(B * d));
  xc::DeviceBuffer<float> q(static_cast<std::size_t>(B * a.q_width())), out(q.size());
  xc::DecodeWorkspace ws;
  // One call outside the capture with the same bound grows the workspace (no allocation while
  // capturing); max_tokens = capacity sizes the launches for every length the stream can reach.
  xc::attend_absorbed(x, x, a, weights, rope, q.data(), out.data(), ws, stream, 0, 0, 0, capacity);
  cudaGraph_t graph;
  cudaGraphExec_t step;
  XQ_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  x.append_all(token.data(), d, stream);
  xc::attend_absorbed(x, x, a, weights, rope, q.data(), out.data(), ws, stream, 0, 0, 0, capacity);
  XQ_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  XQ_CUDA_CHECK(cudaGraphInstantiate(&step, graph, 0));

  std::normal_distribution<float> normal;
  std::vector<xc::bf16> h_token(token.size());
  std::vector<float> h_q(q.size());
  cudaEvent_t t0, t1;
  XQ_CUDA_CHECK(cudaEventCreate(&t0));
  XQ_CUDA_CHECK(cudaEventCreate(&t1));
  float step_ms = 0.0f;
  for (index_t s = 0; s < steps; ++s) {
    // (An engine's previous layer writes these on the device; here they come from the host.)
    for (auto& v : h_token) v = __float2bfloat16(normal(rng));
    for (auto& v : h_q) v = normal(rng);
    token.upload(h_token.data(), h_token.size(), stream);
    q.upload(h_q.data(), h_q.size(), stream);
    XQ_CUDA_CHECK(cudaEventRecord(t0, stream));
    XQ_CUDA_CHECK(cudaGraphLaunch(step, stream));
    XQ_CUDA_CHECK(cudaEventRecord(t1, stream));
    if ((s + 1) % 16 == 0) {
      x.check(stream);  // synchronizes: every 16 steps, not every step
      float ms = 0.0f;
      XQ_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
      step_ms = ms;
      std::printf("decode: step %lld of %lld, %lld tokens per sequence, last step %.1f us\n",
                  static_cast<long long>(s + 1), static_cast<long long>(steps), static_cast<long long>(prefill + s + 1),
                  1e3 * ms);
    }
  }
  x.sync_lengths(stream);  // graph replays advanced the device's lengths only

  // 4. The last step's output against the cuBLAS path on the same cache and queries.
  std::vector<float> got(out.size()), ref(out.size());
  out.download(got.data(), got.size(), stream);
  xc::Cublas blas;
  xc::attend_absorbed_gemm(x, x, a, weights, rope, q.data(), out.data(), ws, blas, stream);
  out.download(ref.data(), ref.size(), stream);
  XQ_CUDA_CHECK(cudaStreamSynchronize(stream));
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * static_cast<double>(got[i] - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  const double rel = std::sqrt(num / den);
  // Both paths round X̂ and the softmax weights to bf16; the cuBLAS path also rounds K (see
  // tests/cuda/test_cuda_attention.cu): relative differences of 1e-3 to 1e-2 are expected.
  const bool ok = std::isfinite(rel) && rel < 3e-2;
  std::printf("check: %lld tokens per sequence; attend_absorbed vs attend_absorbed_gemm: relative difference %.2e (%s)\n",
              static_cast<long long>(x.length(0)), rel, ok ? "ok" : "FAILED");
  std::printf("last decode step (append + attention, one graph launch): %.1f us\n", 1e3 * step_ms);

  XQ_CUDA_CHECK(cudaGraphExecDestroy(step));
  XQ_CUDA_CHECK(cudaGraphDestroy(graph));
  XQ_CUDA_CHECK(cudaEventDestroy(t0));
  XQ_CUDA_CHECK(cudaEventDestroy(t1));
  XQ_CUDA_CHECK(cudaStreamDestroy(stream));
  return ok ? 0 : 1;
} catch (const std::exception& e) {
  std::fprintf(stderr, "xquant-cuda-decode: %s\n", e.what());
  return 1;
}
