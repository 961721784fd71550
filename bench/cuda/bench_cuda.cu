// GPU benchmarks of the CUDA backend, each with its baseline in the same binary:
//   append  — quantize + append a prefill chunk, as a fraction of a device-to-device copy of X;
//   remat   — fused dequantize + GEMM + RoPE vs cuBLAS bf16 GEMM on an unquantized X (and the
//             simple dequantize-then-cuBLAS path); remat38: the same over 3- and 8-bit streams;
//   dequant — X̂ to bf16 (remat_simple's first step), as a fraction of a device-to-device copy;
//   decode  — attention with absorbed values vs materialize-then-attend, and vs FP16-KV attention.
// Shapes: Llama-2-7B layer (d 4096, 32 × 128, MHA), Llama-3.1-8B (8 KV heads) with X cached, and
// Llama-3.1-8B with the latent codec (X·Uk per channel, X·Uv per token, width 1024). Batch 1 and
// 8, 4k and 32k cached tokens, 4- and 2-bit. Times are medians of CUDA-event timings after warm-up;
// a benchmark is one row of the tables, whose calls (baseline included) are timed in turn.
// At exit a markdown table of the ratios is printed (and written to $XQ_BENCH_MD if set).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <xquant/cuda.cuh>

namespace xq = xquant;
namespace xc = xquant::cuda;
using xq::index_t;
using U4 = xq::quant::Uniform<4>;
using U2 = xq::quant::Uniform<2>;
using C4 = xq::quant::Uniform<4, xq::Axis::Channel>;
using C2 = xq::quant::Uniform<2, xq::Axis::Channel>;
using U3 = xq::quant::Uniform<3>;
using U8 = xq::quant::Uniform<8>;
/// Q with group parameters of 8 significant bits (ParamBits::Bf16): the wgmma kernel's packed decode.
template <class Q>
using Bf16Params = xq::quant::Uniform<Q::bits, Q::axis, Q::scheme, xq::ParamBits::Bf16>;

namespace {

// ---- random device data (never zeros) -------------------------------------------------------
__device__ float hash_normalish(std::uint64_t i, std::uint32_t seed) {
  std::uint64_t z = i * 0x9E3779B97F4A7C15ull + seed;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float a = static_cast<float>(z & 0xffffff) / 16777216.0f, b = static_cast<float>((z >> 24) & 0xffffff) / 16777216.0f;
  return (a + b - 1.0f) * 2.45f;  // mean 0, variance ~1
}
template <class T>
__global__ void fill_kernel(T* p, std::size_t n, std::uint32_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float v = hash_normalish(i, seed) * scale;
    if constexpr (std::is_same_v<T, float>) p[i] = v;
    else if constexpr (std::is_same_v<T, xc::bf16>) p[i] = __float2bfloat16_rn(v);
    else p[i] = __float2half_rn(v);
  }
}
template <class T>
xc::DeviceBuffer<T> random_buffer(std::size_t n, float scale = 1.0f) {
  static std::uint32_t seed = 1234;
  xc::DeviceBuffer<T> b(n);
  fill_kernel<T><<<1024, 256>>>(b.data(), n, ++seed, scale);
  xc::check_launch("fill_kernel");
  return b;
}

// ---- timing -----------------------------------------------------------------------------------
struct Timer {
  cudaEvent_t a, b;
  Timer() {
    XQ_CUDA_CHECK(cudaEventCreate(&a));
    XQ_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
};

/// Spins until the host sets *release (or a second has passed: then *timed_out is set, and the
/// bench fails rather than hangs). Placed before the start event, it holds the stream while the
/// host enqueues the timed work, so the events time the GPU's execution and not the host's
/// submission latency: without it, the start event runs on an idle GPU and the interval also
/// holds the host's checks and launch calls, a large part of a call of a few µs (nvbench holds
/// its streams the same way).
__global__ void hold_kernel(const volatile int* release, int* timed_out) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (*release == 0 && t - t0 < 1000000000ull);
  if (*release == 0) *timed_out = 1;
}
/// A host word the hold kernel polls, and one it raises on a timeout (mapped pinned memory).
struct HoldFlags {
  int* host = nullptr;  // [0] release, [1] timed out
  HoldFlags() {
    XQ_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), 2 * sizeof(int), cudaHostAllocMapped));
    host[0] = host[1] = 0;
  }
  ~HoldFlags() { cudaFreeHost(host); }
  HoldFlags(const HoldFlags&) = delete;
  HoldFlags& operator=(const HoldFlags&) = delete;
};

/// Reads `n` vectors and keeps nothing (the sum is never the value that would be stored): run
/// before a timed call, it leaves none of the call's data in L2, as nvbench does by default. Reads
/// leave clean lines, which the timed call evicts without writing them back.
__global__ void l2_flush_kernel(const uint4* p, std::size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0xFFFFFFFFu) *sink = acc;  // the buffer is zeros: never taken, but the loads must stay
}
/// A zeroed buffer of twice the L2 size and the kernel that reads it (l2_flush_kernel).
struct L2Flush {
  xc::DeviceBuffer<uint4> buf;
  xc::DeviceBuffer<unsigned> sink{1};
  L2Flush() {
    cudaDeviceProp p{};
    XQ_CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    buf = xc::DeviceBuffer<uint4>(2 * static_cast<std::size_t>(p.l2CacheSize) / sizeof(uint4));
    XQ_CUDA_CHECK(cudaMemset(buf.data(), 0, buf.bytes()));
  }
  void operator()() {
    l2_flush_kernel<<<1024, 256>>>(buf.data(), buf.size(), sink.data());
    xc::check_launch("l2_flush_kernel");
  }
};

/// One timed call of a row: what it runs, and the label of its counter (`<label>_us`).
struct Call {
  std::string label;
  std::function<void()> run;
};
/// Medians of a row's calls, in ms and in µs of host enqueue time, in the order of the calls.
struct Timed {
  std::vector<double> ms, host_us;
};

/// Runs `calls` under Google Benchmark's loop with CUDA-event timing, each once per iteration and
/// in turn, so that every call of a row meets the same clocks and temperatures (a long call heats
/// the GPU and lowers the clocks that the next ones meet: timed one after the other, a row's
/// baseline and the calls measured against it would see different ones). Returns each call's
/// median over the timed iterations, after `warmup` untimed calls of each. `reset`, if given, runs
/// before every call (warm-up and timed) outside the timed events: the bench's own bookkeeping,
/// such as emptying a stream that the previous call filled. Each timed call is enqueued behind
/// hold_kernel and released once enqueued, so the interval holds the GPU's work alone; the host's
/// own time to enqueue a call is reported too. A call must not synchronize with the device (it
/// would wait for the hold: the bench then fails).
/// Before each timed call L2 is flushed (l2_flush_kernel, untimed): every call starts from the
/// same cold cache instead of finding what it, or the call before it, left there. XQ_BENCH_FLUSH=0
/// leaves the flush out.
/// XQ_BENCH_HOLD=0 leaves the hold out: under a profiler that serializes launches (ncu), the host
/// cannot release a hold kernel that is running (profile_device.sh sets it).
/// XQ_BENCH_CALLS=label[,label...] times only the calls with those labels (a profile of one
/// kernel, or an A/B of one call); the others report 0.
Timed time_calls(benchmark::State& state, const std::vector<Call>& calls, const std::function<void()>& reset = {},
                 int warmup = 3) {
  Timer t;
  static HoldFlags hold;
  static const bool use_hold = [] {
    const char* e = std::getenv("XQ_BENCH_HOLD");
    return !e || std::atoi(e) != 0;
  }();
  static const bool use_flush = [] {
    const char* e = std::getenv("XQ_BENCH_FLUSH");
    return !e || std::atoi(e) != 0;
  }();
  static const std::string only = [] {
    const char* e = std::getenv("XQ_BENCH_CALLS");
    return e ? "," + std::string(e) + "," : std::string();
  }();
  std::vector<bool> timed(calls.size());
  for (std::size_t j = 0; j < calls.size(); ++j)
    timed[j] = only.empty() || only.find("," + calls[j].label + ",") != std::string::npos;
  for (int i = 0; i < warmup; ++i)
    for (std::size_t j = 0; j < calls.size(); ++j) {
      if (!timed[j]) continue;
      if (reset) reset();
      calls[j].run();
    }
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<std::vector<double>> ms(calls.size()), host_us(calls.size());
  volatile int* release = hold.host;
  for (auto _ : state) {
    double iteration_ms = 0.0;
    for (std::size_t j = 0; j < calls.size(); ++j) {
      if (!timed[j]) continue;
      if (reset) reset();  // stream-ordered before event a: its work is not inside the timed interval
      if (use_flush) {
        static L2Flush flush;  // (its buffer, twice the L2 size, only where the flush is wanted)
        flush();
      }
      *release = 0;
      if (use_hold) hold_kernel<<<1, 1>>>(hold.host, hold.host + 1);
      XQ_CUDA_CHECK(cudaEventRecord(t.a));
      const auto h0 = std::chrono::steady_clock::now();
      calls[j].run();
      host_us[j].push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - h0).count());
      XQ_CUDA_CHECK(cudaEventRecord(t.b));
      *release = 1;
      XQ_CUDA_CHECK(cudaEventSynchronize(t.b));
      if (hold.host[1]) {
        state.SkipWithError("the timed call took over a second to enqueue, or synchronized with the device");
        hold.host[1] = 0;
        return Timed{std::vector<double>(calls.size(), 0.0), std::vector<double>(calls.size(), 0.0)};
      }
      float e = 0;
      XQ_CUDA_CHECK(cudaEventElapsedTime(&e, t.a, t.b));
      ms[j].push_back(e);
      iteration_ms += e;
    }
    state.SetIterationTime(iteration_ms / 1e3);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  Timed r;
  for (std::size_t j = 0; j < calls.size(); ++j) {
    r.ms.push_back(median(ms[j]));
    r.host_us.push_back(median(host_us[j]));
    if (calls.size() > 1) state.counters[calls[j].label + "_us"] = r.ms.back() * 1e3;
  }
  return r;
}

/// time_calls of one call `f`: its median in ms; counters median_us and host_us.
double time_it(benchmark::State& st, const std::function<void()>& f, const std::function<void()>& reset = {},
               int warmup = 3) {
  const Timed t = time_calls(st, {{"call", f}}, reset, warmup);
  st.counters["median_us"] = t.ms[0] * 1e3;
  st.counters["host_us"] = t.host_us[0];
  return t.ms[0];
}

std::map<std::string, double> g_ms;       // benchmark name -> median ms
std::map<std::string, double> g_host_us;  // benchmark name -> median host enqueue µs (where a table shows it)
std::map<std::string, double> g_bytes;    // benchmark name -> bytes a call moves (where its quantizer decides them)

struct Shape {
  const char* name;
  index_t d, H, Hkv;
  bool latent;
  index_t key_width() const { return latent ? Hkv * 128 : d; }
};
const Shape kShapes[] = {{"L2-7B", 4096, 32, 32, false}, {"L3.1-8B", 4096, 32, 8, false}, {"L3.1-8B-latent", 4096, 32, 8, true}};

std::string key(const char* what, const Shape& s, int B, index_t L, int bits) {
  std::ostringstream os;
  os << what << "/" << s.name << "/B" << B << "/L" << L / 1024 << "k/" << bits << "b";
  return os.str();
}

// ---- append -----------------------------------------------------------------------------------
// A batch's chunks arrive as one B·L-row array and go in with one call (append_batch: one launch
// for per-token streams); the copy moves the same rows in one cudaMemcpyAsync. One row times the
// copy and the 4- and 2-bit appends in turn (time_calls).
template <class Q>
double append_bytes(int B, index_t L, index_t width) {
  return static_cast<double>(B) * L * (width * 2 + Q::code_bytes(width) + (width / 128) * 4);
}
void bench_append_row(benchmark::State& st, int B, index_t L, index_t width, std::string name) {
  auto x = random_buffer<xc::bf16>(static_cast<std::size_t>(B * L * width));
  xc::DeviceBuffer<xc::bf16> y(x.size());
  xc::DeviceStream<U4> s4({B, L, width, 128});
  xc::DeviceStream<U2> s2({B, L, width, 128});
  const Timed t = time_calls(
      st,
      {{"copy", [&] { XQ_CUDA_CHECK(cudaMemcpyAsync(y.data(), x.data(), x.bytes(), cudaMemcpyDeviceToDevice, nullptr)); }},
       {"append4", [&] { s4.append_batch(x.data(), L, width, nullptr); }},
       {"append2", [&] { s2.append_batch(x.data(), L, width, nullptr); }}},
      // The streams hold one call's tokens; emptying them (a memset of the lengths) is not timed.
      [&] {
        s4.clear(nullptr);
        s2.clear(nullptr);
      });
  g_ms["copy" + name] = t.ms[0];
  g_ms["append" + name + "/4b"] = t.ms[1];
  g_ms["append" + name + "/2b"] = t.ms[2];
  const double copy_gbs = 2.0 * x.bytes() / t.ms[0] / 1e6;
  st.counters["copy_GB/s"] = copy_gbs;
  st.counters["frac4"] = append_bytes<U4>(B, L, width) / t.ms[1] / 1e6 / copy_gbs;
  st.counters["frac2"] = append_bytes<U2>(B, L, width) / t.ms[2] / 1e6 / copy_gbs;
}
template <class Q>
void bench_decode_append(benchmark::State& st, int B, index_t width, std::string name) {
  auto x = random_buffer<xc::bf16>(static_cast<std::size_t>(B * width));
  xc::DeviceStream<Q> s({B, 4096, width, 128});
  const double ms = time_it(
      st, [&] { s.append_all(x.data(), width, nullptr); },
      [&] { if (s.length(0) == 4096) s.clear(nullptr); });
  g_ms[name] = ms;
}

// ---- caches for remat and decode ---------------------------------------------------------------
template <class QK, class QV>
struct Cache {
  std::unique_ptr<xc::DeviceStream<QK>> k;
  std::unique_ptr<xc::DeviceStream<QV>> v;  // latent only
  xc::DeviceStream<QV>& values() { return v ? *v : reinterpret_cast<xc::DeviceStream<QV>&>(*k); }
};
template <class QK, class QV>
Cache<QK, QV> make_cache(const Shape& s, int B, index_t L) {
  Cache<QK, QV> c;
  const index_t w = s.key_width();
  auto x = random_buffer<xc::bf16>(static_cast<std::size_t>(L * w));
  c.k = std::make_unique<xc::DeviceStream<QK>>(xc::DeviceStreamShape{B, L, w, 128});
  for (int b = 0; b < B; ++b) c.k->append(b, x.data(), L, w, nullptr);
  if (s.latent) {
    auto y = random_buffer<xc::bf16>(static_cast<std::size_t>(L * w));
    c.v = std::make_unique<xc::DeviceStream<QV>>(xc::DeviceStreamShape{B, L, w, 128});
    for (int b = 0; b < B; ++b) c.v->append(b, y.data(), L, w, nullptr);
  }
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
  return c;
}

xc::Cublas& blas() {
  static xc::Cublas b;
  return b;
}
const xc::DeviceRope& rope() {
  static xc::DeviceRope r(xq::Rope(128, 32768, 500000.0));
  return r;
}

// ---- remat GEMM -----------------------------------------------------------------------------
/// What a remat row's calls share: W (N × width), an unquantized X of the row's M × width for the
/// cuBLAS baseline, the output and the operand (RoPE at head width 128, no bias).
struct RematInputs {
  index_t w, N, M;
  xc::DeviceBuffer<xc::bf16> W, X, out;
  xc::RematOperand op;
  RematInputs(const Shape& s, int B, index_t L)
      : w(s.key_width()), N(s.Hkv * 128), M(B * L), W(random_buffer<xc::bf16>(static_cast<std::size_t>(N * w), 0.02f)),
        X(random_buffer<xc::bf16>(static_cast<std::size_t>(M * w))), out(static_cast<std::size_t>(M * N)),
        op{W.data(), N, 0, nullptr, &rope()} {}
  void cublas() { xc::gemm_bf16_nt(blas(), M, N, w, X.data(), w, W.data(), w, out.data(), N, nullptr); }
  template <class Q>
  void fused(const xc::DeviceStream<Q>& x, index_t L) { xc::remat_fused(x, 0, L, op, out.data(), N, nullptr); }
  template <class Q>
  void simple(const xc::DeviceStream<Q>& x, index_t L, xc::DeviceBuffer<xc::bf16>& scratch) {
    xc::remat_simple(x, 0, L, op, out.data(), N, blas(), scratch, nullptr);
  }
};

// One row (shape, B, L) times in turn: cuBLAS bf16 on an unquantized X of the same shape (the
// baseline), the fused kernel at 4 and 2 bits (fp16 parameters, then 8-bit ones: ParamBits::Bf16),
// and the simple path (X̂ dequantized to bf16 in device memory, then cuBLAS) at 4 and 2 bits.
template <class Q4K, class Q4V, class Q2K, class Q2V>
void bench_remat_row(benchmark::State& st, Shape s, int B, index_t L) {
  RematInputs in(s, B, L);
  auto c4 = make_cache<Q4K, Q4V>(s, B, L);
  auto c2 = make_cache<Q2K, Q2V>(s, B, L);
  auto c4b = make_cache<Bf16Params<Q4K>, Q4V>(s, B, L);
  auto c2b = make_cache<Bf16Params<Q2K>, Q2V>(s, B, L);
  xc::DeviceBuffer<xc::bf16> scratch;
  const Timed t = time_calls(
      st, {{"cublas", [&] { in.cublas(); }},
           {"fused4", [&] { in.fused(*c4.k, L); }},
           {"fused2", [&] { in.fused(*c2.k, L); }},
           {"simple4", [&] { in.simple(*c4.k, L, scratch); }},
           {"simple2", [&] { in.simple(*c2.k, L, scratch); }},
           {"fused4b", [&] { in.fused(*c4b.k, L); }},
           {"fused2b", [&] { in.fused(*c2b.k, L); }}});
  g_ms[key("remat_cublas", s, B, L, 16)] = t.ms[0];
  g_ms[key("remat_fused", s, B, L, 4)] = t.ms[1];
  g_ms[key("remat_fused", s, B, L, 2)] = t.ms[2];
  g_ms[key("remat_simple", s, B, L, 4)] = t.ms[3];
  g_ms[key("remat_simple", s, B, L, 2)] = t.ms[4];
  g_ms[key("remat_fused_bf16p", s, B, L, 4)] = t.ms[5];
  g_ms[key("remat_fused_bf16p", s, B, L, 2)] = t.ms[6];
  st.counters["cublas_TFLOP/s"] = 2.0 * in.M * in.N * in.w / t.ms[0] / 1e9;
  if (t.ms[1] > 0) st.counters["frac4"] = t.ms[0] / t.ms[1];
  if (t.ms[2] > 0) st.counters["frac2"] = t.ms[0] / t.ms[2];
  if (t.ms[5] > 0) st.counters["frac4b"] = t.ms[0] / t.ms[5];
  if (t.ms[6] > 0) st.counters["frac2b"] = t.ms[0] / t.ms[6];
}

// 3- and 8-bit key streams (Q3K, Q8K: per-token for X, per-channel for the latent keys): cuBLAS,
// then per width the wgmma kernel, the portable fused kernel (what remat_fused ran for these
// streams before the wgmma kernel took them) and the simple path, all in turn.
template <class Q3K, class Q8K>
void bench_remat38_row(benchmark::State& st, Shape s, int B, index_t L) {
  RematInputs in(s, B, L);
  auto c3 = make_cache<Q3K, U3>(s, B, L);
  auto c8 = make_cache<Q8K, U8>(s, B, L);
  xc::DeviceBuffer<xc::bf16> scratch;
  auto portable = [&](auto& c) {
    const bool was = std::exchange(xc::detail::remat_wgmma_disabled, true);
    in.fused(*c.k, L);
    xc::detail::remat_wgmma_disabled = was;
  };
  const Timed t = time_calls(
      st, {{"cublas", [&] { in.cublas(); }},
           {"fused3", [&] { in.fused(*c3.k, L); }},
           {"portable3", [&] { portable(c3); }},
           {"simple3", [&] { in.simple(*c3.k, L, scratch); }},
           {"fused8", [&] { in.fused(*c8.k, L); }},
           {"portable8", [&] { portable(c8); }},
           {"simple8", [&] { in.simple(*c8.k, L, scratch); }}});
  g_ms[key("remat38_cublas", s, B, L, 16)] = t.ms[0];
  const char* what[] = {"remat_fused", "remat_portable", "remat_simple"};
  for (int i = 0; i < 3; ++i) {
    g_ms[key(what[i], s, B, L, 3)] = t.ms[1 + i];
    g_ms[key(what[i], s, B, L, 8)] = t.ms[4 + i];
  }
  if (t.ms[1] > 0) st.counters["frac3"] = t.ms[0] / t.ms[1];
  if (t.ms[4] > 0) st.counters["frac8"] = t.ms[0] / t.ms[4];
}

// ---- dequantize -------------------------------------------------------------------------------
// X̂ of every cached token to bf16 (remat_simple's first step, and the decode's cuBLAS path's), as
// a fraction of a device-to-device copy of the bf16 output. Bytes counted: codes and fp16
// parameters read, bf16 written; the copy moves 2 × the output. One row times the copy and the
// 4- and 2-bit dequantize in turn.
template <class Q>
double dequant_bytes(int B, index_t L, index_t width) {
  // Groups of 128: per-token streams hold width / 128 groups per row, per-channel ones width
  // groups per 128 rows; each group has an fp16 scale and zero.
  const double params = Q::axis == xq::Axis::Token ? (width / 128) * 4.0 : width * 4.0 / 128;
  return static_cast<double>(B) * L * (width * 2 + Q::code_bytes(width) + params);
}
template <class Q4K, class Q4V, class Q2K, class Q2V>
void bench_dequant_row(benchmark::State& st, Shape s, int B, index_t L) {
  const index_t w = s.key_width();
  const auto n = static_cast<std::size_t>(B * L * w);
  auto src = random_buffer<xc::bf16>(n);
  xc::DeviceBuffer<xc::bf16> out(n);
  auto c4 = make_cache<Q4K, Q4V>(s, B, L);
  auto c2 = make_cache<Q2K, Q2V>(s, B, L);
  const Timed t = time_calls(
      st, {{"copy", [&] { XQ_CUDA_CHECK(cudaMemcpyAsync(out.data(), src.data(), out.bytes(), cudaMemcpyDeviceToDevice, nullptr)); }},
           {"deq4", [&] { xc::dequantize(*c4.k, 0, L, out.data(), w, nullptr); }},
           {"deq2", [&] { xc::dequantize(*c2.k, 0, L, out.data(), w, nullptr); }}});
  g_ms[key("dequant_copy", s, B, L, 16)] = t.ms[0];
  g_ms[key("dequant", s, B, L, 4)] = t.ms[1];
  g_ms[key("dequant", s, B, L, 2)] = t.ms[2];
  g_bytes[key("dequant", s, B, L, 4)] = dequant_bytes<Q4K>(B, L, w);
  g_bytes[key("dequant", s, B, L, 2)] = dequant_bytes<Q2K>(B, L, w);
  const double copy_gbs = 2.0 * out.bytes() / t.ms[0] / 1e6;
  st.counters["copy_GB/s"] = copy_gbs;
  st.counters["frac4"] = g_bytes[key("dequant", s, B, L, 4)] / t.ms[1] / 1e6 / copy_gbs;
  st.counters["frac2"] = g_bytes[key("dequant", s, B, L, 2)] / t.ms[2] / 1e6 / copy_gbs;
}

// ---- decode attention -------------------------------------------------------------------------
// One row times in turn: attention over an FP16 K/V cache of the same context (FP16 KV), and at 4
// and 2 bits the fused absorbed decode (attend_absorbed: K, V, X̂ never written), the absorbed
// decode through cuBLAS (X̂ and K in scratch) and materialize-then-attend (X̂ dequantized once per
// stream, cuBLAS GEMMs for K, then RoPE, and V, then attention over them).
template <class Q4K, class Q4V, class Q2K, class Q2V>
void bench_decode_row(benchmark::State& st, Shape s, int B, index_t L) {
  const xq::AttentionShape a{s.H, s.Hkv, 128};
  const index_t dkv = a.kv_width(), wk = s.key_width(), wv = wk;  // the value side has the key side's width here
  auto q = random_buffer<float>(static_cast<std::size_t>(B * a.q_width()));
  xc::DeviceBuffer<float> out(static_cast<std::size_t>(B * a.q_width()));
  xc::DecodeWorkspace ws;
  xc::DeviceBuffer<int> lens(static_cast<std::size_t>(B));
  std::vector<int> hl(static_cast<std::size_t>(B), static_cast<int>(L));
  lens.upload(hl.data(), hl.size(), nullptr);
  auto Kh = random_buffer<xc::fp16>(static_cast<std::size_t>(B * L * dkv));
  auto Vh = random_buffer<xc::fp16>(static_cast<std::size_t>(B * L * dkv));
  auto c4 = make_cache<Q4K, Q4V>(s, B, L);
  auto c2 = make_cache<Q2K, Q2V>(s, B, L);
  auto Wk = random_buffer<xc::bf16>(static_cast<std::size_t>(dkv * wk), 0.02f);
  auto Wv = random_buffer<xc::bf16>(static_cast<std::size_t>(dkv * wk), 0.02f);
  const xc::DecodeWeights dw{Wk.data(), 0, Wv.data(), 0, nullptr};
  xc::DeviceBuffer<xc::bf16> K(static_cast<std::size_t>(B * L * dkv)), V(K.size());
  xc::DeviceBuffer<xc::bf16> Xk(static_cast<std::size_t>(B * L * wk)), Xv(s.latent ? static_cast<std::size_t>(B * L * wv) : 0);
  const xc::detail::EpilogueArgs e{nullptr, rope().cos(), rope().sin(), 128};
  auto fused = [&](auto& c) { xc::attend_absorbed(*c.k, c.values(), a, dw, rope(), q.data(), out.data(), ws, nullptr); };
  auto absorbed = [&](auto& c) {
    xc::attend_absorbed_gemm(*c.k, c.values(), a, dw, rope(), q.data(), out.data(), ws, blas(), nullptr);
  };
  auto materialize = [&](auto& c) {
    xc::dequantize(*c.k, 0, L, Xk.data(), wk, nullptr);
    xc::gemm_bf16_nt(blas(), B * L, dkv, wk, Xk.data(), wk, Wk.data(), wk, K.data(), dkv, nullptr);
    xc::detail::epilogue_kernel<<<static_cast<unsigned>(B * L), 128>>>(K.data(), dkv, dkv, 0, L, e);
    const xc::bf16* xv = Xk.data();
    if (s.latent) {
      xc::dequantize(c.values(), 0, L, Xv.data(), wv, nullptr);
      xv = Xv.data();
    }
    xc::gemm_bf16_nt(blas(), B * L, dkv, wv, xv, wv, Wv.data(), wv, V.data(), dkv, nullptr);
    xc::attend_kv(K.data(), V.data(), dkv, L, B, L, lens.data(), a, rope(), q.data(), out.data(), ws, nullptr);
  };
  const Timed t = time_calls(
      st, {{"fp16kv", [&] { xc::attend_kv(Kh.data(), Vh.data(), dkv, L, B, L, lens.data(), a, rope(), q.data(), out.data(), ws, nullptr); }},
           {"fused4", [&] { fused(c4); }},
           {"absorbed4", [&] { absorbed(c4); }},
           {"mat4", [&] { materialize(c4); }},
           {"fused2", [&] { fused(c2); }},
           {"absorbed2", [&] { absorbed(c2); }},
           {"mat2", [&] { materialize(c2); }}});
  g_ms[key("decode_fp16kv", s, B, L, 16)] = t.ms[0];
  const char* what[] = {"decode_absorbed", "decode_absorbed_gemm", "decode_materialize"};
  for (int i = 0; i < 3; ++i) {
    g_ms[key(what[i], s, B, L, 4)] = t.ms[1 + i];
    g_ms[key(what[i], s, B, L, 2)] = t.ms[4 + i];
  }
  if (t.ms[3] > 0) st.counters["fused/mat4"] = t.ms[1] / t.ms[3];
  if (t.ms[6] > 0) st.counters["fused/mat2"] = t.ms[4] / t.ms[6];
}

// A decode step as an engine runs it: one token appended to every sequence, then attend_absorbed
// with a max_tokens bound of L, called directly and replayed from a CUDA graph captured once (the
// same work, one launch for the host), timed in turn. Both advance the same sequences, which start
// at L − 48 tokens: the warm-up and timed steps of both stay within the bound. Per-token streams
// only: a per-channel stream's append decides on the host when a group is full, which a graph
// cannot replay.
template <class QK, class QV>
void bench_decode_step(benchmark::State& st, Shape s, int B, index_t L) {
  const xq::AttentionShape a{s.H, s.Hkv, 128};
  const index_t dkv = a.kv_width(), w = s.key_width(), cap = L + 64, start = L - 48;
  auto x = random_buffer<xc::bf16>(static_cast<std::size_t>(L * w));
  xc::DeviceStream<QK> k({B, cap, w, 128});
  for (int b = 0; b < B; ++b) k.append(b, x.data(), start, w, nullptr);
  std::unique_ptr<xc::DeviceStream<QV>> v;
  if (s.latent) {
    v = std::make_unique<xc::DeviceStream<QV>>(xc::DeviceStreamShape{B, cap, w, 128});
    for (int b = 0; b < B; ++b) v->append(b, x.data(), start, w, nullptr);
  }
  auto& values = v ? *v : reinterpret_cast<xc::DeviceStream<QV>&>(k);
  auto tok = random_buffer<xc::bf16>(static_cast<std::size_t>(B * w));
  auto q = random_buffer<float>(static_cast<std::size_t>(B * a.q_width()));
  xc::DeviceBuffer<float> out(static_cast<std::size_t>(B * a.q_width()));
  auto Wk = random_buffer<xc::bf16>(static_cast<std::size_t>(dkv * w), 0.02f);
  auto Wv = random_buffer<xc::bf16>(static_cast<std::size_t>(dkv * w), 0.02f);
  const xc::DecodeWeights dw{Wk.data(), 0, Wv.data(), 0, nullptr};
  xc::DecodeWorkspace ws;
  auto step = [&](cudaStream_t cs) {
    k.append_all(tok.data(), w, cs);
    if (v) v->append_all(tok.data(), w, cs);
    xc::attend_absorbed(k, values, a, dw, rope(), q.data(), out.data(), ws, cs, 0, 0, 0, L);
  };
  step(nullptr);  // grows the workspace outside any capture
  XQ_CUDA_CHECK(cudaDeviceSynchronize());
  cudaStream_t cs = nullptr;
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  XQ_CUDA_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  XQ_CUDA_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
  step(cs);
  XQ_CUDA_CHECK(cudaStreamEndCapture(cs, &g));
  XQ_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
  const Timed t = time_calls(st, {{"direct", [&] { step(nullptr); }},
                                  {"graph", [&] { XQ_CUDA_CHECK(cudaGraphLaunch(exec, nullptr)); }}});
  XQ_CUDA_CHECK(cudaGraphExecDestroy(exec));
  XQ_CUDA_CHECK(cudaGraphDestroy(g));
  XQ_CUDA_CHECK(cudaStreamDestroy(cs));
  const char* what[] = {"decode_step", "decode_step_graph"};
  for (int i = 0; i < 2; ++i) {
    g_ms[key(what[i], s, B, L, 4)] = t.ms[static_cast<std::size_t>(i)];
    g_host_us[key(what[i], s, B, L, 4)] = t.host_us[static_cast<std::size_t>(i)];
  }
  st.counters["direct_host_us"] = t.host_us[0];
  st.counters["graph_host_us"] = t.host_us[1];
  // The replays advanced the device's lengths only; the host's view must hold the truth too.
  k.sync_lengths(nullptr);
  if (v) v->sync_lengths(nullptr);
  if (k.length(0) > L) st.SkipWithError("decode_step: the sequences outgrew the bound max_tokens = L");
}

template <class QK, class QV>
void register_step(const Shape& s) {
  for (int B : {1, 8})
    for (index_t L : {index_t(4096), index_t(32768)}) {
      std::ostringstream os;
      os << "decode_step/" << s.name << "/B" << B << "/L" << L / 1024 << "k";
      benchmark::RegisterBenchmark(os.str().c_str(), bench_decode_step<QK, QV>, s, B, L)
          ->UseManualTime()->Iterations(B * L >= 8 * 32768 ? 5 : 15)->Unit(benchmark::kMicrosecond);
    }
}

template <class Q4K, class Q4V, class Q2K, class Q2V>
void register_rows(const Shape& s) {
  for (int B : {1, 8})
    for (index_t L : {index_t(4096), index_t(32768)}) {
      // XQ_BENCH_ITERATIONS overrides the count: long runs of one call (with XQ_BENCH_CALLS) for
      // sampling clocks and power under sustained load (NOTES.md item 58).
      int iterations = (B * L >= 8 * 32768) ? 5 : 15;
      if (const char* e = std::getenv("XQ_BENCH_ITERATIONS")) iterations = std::max(1, std::atoi(e));
      std::ostringstream os;
      os << s.name << "/B" << B << "/L" << L / 1024 << "k";
      benchmark::RegisterBenchmark(("remat/" + os.str()).c_str(), bench_remat_row<Q4K, Q4V, Q2K, Q2V>, s, B, L)
          ->UseManualTime()->Iterations(iterations)->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("decode/" + os.str()).c_str(), bench_decode_row<Q4K, Q4V, Q2K, Q2V>, s, B, L)
          ->UseManualTime()->Iterations(iterations)->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark(("dequant/" + os.str()).c_str(), bench_dequant_row<Q4K, Q4V, Q2K, Q2V>, s, B, L)
          ->UseManualTime()->Iterations(iterations)->Unit(benchmark::kMicrosecond);
      using Q3K = xq::quant::Uniform<3, Q4K::axis>;
      using Q8K = xq::quant::Uniform<8, Q4K::axis>;
      benchmark::RegisterBenchmark(("remat38/" + os.str()).c_str(), bench_remat38_row<Q3K, Q8K>, s, B, L)
          ->UseManualTime()->Iterations(iterations)->Unit(benchmark::kMicrosecond);
    }
}

void register_appends() {
  for (index_t width : {index_t(4096), index_t(1024)})
    for (int B : {1, 8})
      for (index_t L : {index_t(4096), index_t(32768)}) {
        std::ostringstream os;
        os << "/w" << width << "/B" << B << "/L" << L / 1024 << "k";
        benchmark::RegisterBenchmark(("append" + os.str()).c_str(), bench_append_row, B, L, width, os.str())
            ->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
      }
}

template <class Q>
void register_token_append(int bits) {
  for (int B : {1, 8}) {
    const std::string n = "append_token/w4096/B" + std::to_string(B) + "/" + std::to_string(bits) + "b";
    benchmark::RegisterBenchmark(n.c_str(), bench_decode_append<Q>, B, index_t(4096), n)
        ->UseManualTime()->Iterations(200)->Unit(benchmark::kMicrosecond);
  }
}

std::string fmt(double v, int prec = 2) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}
double get(const std::string& k) {
  auto it = g_ms.find(k);
  return it == g_ms.end() ? 0.0 : it->second;
}

std::string table() {
  std::ostringstream os;
  cudaDeviceProp p{};
  XQ_CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
  os << "Device: " << p.name << " (" << p.multiProcessorCount << " SMs)\n\n";
  os << "Quantize + append (prefill chunks, bf16 X in), bandwidth as a fraction of a device-to-device copy "
        "of X (target >= 0.7); a batch is one append_batch call and one copy; the memset that empties the stream "
        "between calls is not timed:\n\n| width | B | tokens/seq | copy GB/s | 4-bit GB/s | 4-bit frac | 2-bit GB/s | 2-bit frac |\n|---|---|---|---|---|---|---|---|\n";
  for (index_t width : {index_t(4096), index_t(1024)})
    for (int B : {1, 8})
      for (index_t L : {index_t(4096), index_t(32768)}) {
        std::ostringstream sfx;
        sfx << "/w" << width << "/B" << B << "/L" << L / 1024 << "k";
        const double c = get("copy" + sfx.str());
        const double copy_gbs = 2.0 * B * L * width * 2 / c / 1e6;
        os << "| " << width << " | " << B << " | " << L / 1024 << "k | " << fmt(copy_gbs, 0);
        for (int bits : {4, 2}) {
          const double t = get("append" + sfx.str() + "/" + std::to_string(bits) + "b");
          const double bytes = bits == 4 ? append_bytes<U4>(B, L, width) : append_bytes<U2>(B, L, width);
          const double gbs = bytes / t / 1e6;
          os << " | " << fmt(gbs, 0) << " | " << fmt(gbs / copy_gbs);
        }
        os << " |\n";
      }
  os << "\nSingle decode token append (all sequences, d=4096): ";
  for (int B : {1, 8})
    for (int bits : {4, 2})
      os << "B" << B << "/" << bits << "b " << fmt(get("append_token/w4096/B" + std::to_string(B) + "/" + std::to_string(bits) + "b") * 1e3, 1) << " us; ";
  os << "\n\nRemat GEMM K = RoPE(X̂·Wkᵀ) over all cached tokens (M = B·L, K = width, N = dkv); times in ms; "
        "fraction = cuBLAS bf16 time on unquantized X / fused time (target >= 0.9):\n\n"
        "| shape | B | L | cuBLAS bf16 | TFLOP/s | fused 4b | frac | fused 2b | frac | simple 4b | simple 2b | "
        "fused 4b, 8-bit params | frac | fused 2b, 8-bit params | frac |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const Shape& s : kShapes)
    for (int B : {1, 8})
      for (index_t L : {index_t(4096), index_t(32768)}) {
        const double cb = get(key("remat_cublas", s, B, L, 16));
        const double fl = 2.0 * B * L * s.key_width() * s.Hkv * 128;
        const double f4 = get(key("remat_fused", s, B, L, 4)), f2 = get(key("remat_fused", s, B, L, 2));
        os << "| " << s.name << " | " << B << " | " << L / 1024 << "k | " << fmt(cb, 3) << " | " << fmt(fl / cb / 1e9, 0)
           << " | " << fmt(f4, 3) << " | " << fmt(cb / f4) << " | " << fmt(f2, 3) << " | " << fmt(cb / f2) << " | "
           << fmt(get(key("remat_simple", s, B, L, 4)), 3) << " | " << fmt(get(key("remat_simple", s, B, L, 2)), 3);
        for (int bits : {4, 2}) {
          const double fb = get(key("remat_fused_bf16p", s, B, L, bits));
          os << " | " << fmt(fb, 3) << " | " << fmt(cb / fb);
        }
        os << " |\n";
      }
  os << "\nRemat GEMM over 3- and 8-bit streams (per-token X; the latent keys per channel); times in ms; fraction = cuBLAS bf16 time / "
        "the call's time; portable = the fused kernel before Hopper (what remat_fused ran for these streams before "
        "the wgmma kernel took them):\n\n| shape | B | L | bits | cuBLAS bf16 | fused (wgmma) | frac | portable | frac | "
        "simple | frac |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const Shape& s : kShapes)
    for (int B : {1, 8})
      for (index_t L : {index_t(4096), index_t(32768)})
        for (int bits : {3, 8}) {
          const double cb = get(key("remat38_cublas", s, B, L, 16));
          os << "| " << s.name << " | " << B << " | " << L / 1024 << "k | " << bits << " | " << fmt(cb, 3);
          for (const char* what : {"remat_fused", "remat_portable", "remat_simple"}) {
            const double m = get(key(what, s, B, L, bits));
            os << " | " << fmt(m, 3) << " | " << fmt(cb / m);
          }
          os << " |\n";
        }
  os << "\nDequantize X̂ of all cached tokens to bf16 (remat_simple's first step), bandwidth as a fraction of a "
        "device-to-device copy of the bf16 output (codes and parameters read + bf16 written; the copy moves 2 × the "
        "output):\n\n| shape | B | L | copy GB/s | 4-bit GB/s | 4-bit frac | 2-bit GB/s | 2-bit frac |\n"
        "|---|---|---|---|---|---|---|---|\n";
  for (const Shape& s : kShapes)
    for (int B : {1, 8})
      for (index_t L : {index_t(4096), index_t(32768)}) {
        const index_t w = s.key_width();
        const double copy_gbs = 2.0 * B * L * w * 2 / get(key("dequant_copy", s, B, L, 16)) / 1e6;
        os << "| " << s.name << " | " << B << " | " << L / 1024 << "k | " << fmt(copy_gbs, 0);
        for (int bits : {4, 2}) {
          const std::string k = key("dequant", s, B, L, bits);
          const double gbs = g_bytes[k] / get(k) / 1e6;
          os << " | " << fmt(gbs, 0) << " | " << fmt(gbs / copy_gbs);
        }
        os << " |\n";
      }
  os << "\nDecode attention (one query token per sequence); times in ms. absorbed/materialize target <= 0.6; "
        "materialize = X̂ dequantized once per stream + cuBLAS GEMMs for K (then RoPE) and V + attention over them; "
        "absorbed = attend_absorbed_gemm (X̂ and K in scratch, cuBLAS); fused = attend_absorbed (K, V, X̂ never "
        "written); FP16 KV = attention over an fp16 K/V cache of the same context:\n\n"
        "| shape | B | L | FP16 KV | mat 4b | absorbed 4b | abs/mat | fused 4b | fused/mat | abs/fp16kv | mat 2b | absorbed 2b | abs/mat | fused 2b | fused/mat |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (const Shape& s : kShapes)
    for (int B : {1, 8})
      for (index_t L : {index_t(4096), index_t(32768)}) {
        const double kv = get(key("decode_fp16kv", s, B, L, 16));
        os << "| " << s.name << " | " << B << " | " << L / 1024 << "k | " << fmt(kv, 3);
        for (int bits : {4, 2}) {
          const double m = get(key("decode_materialize", s, B, L, bits)), ab = get(key("decode_absorbed_gemm", s, B, L, bits)),
                       fu = get(key("decode_absorbed", s, B, L, bits));
          os << " | " << fmt(m, 3) << " | " << fmt(ab, 3) << " | " << fmt(ab / m) << " | " << fmt(fu, 3) << " | "
             << fmt(fu / m);
          if (bits == 4) os << " | " << fmt(ab / kv, 1);
        }
        os << " |\n";
      }
  os << "\nDecode step (one token appended to every sequence of L - 48 or more tokens, then attend_absorbed with "
        "max_tokens = L), "
        "4-bit: called directly vs replayed from a CUDA graph, timed in turn; GPU ms (the stream held until enqueued) and the "
        "host's enqueue time in us:\n\n"
        "| shape | B | L | direct ms | direct host us | graph ms | graph host us |\n|---|---|---|---|---|---|---|\n";
  for (const Shape& s : {kShapes[1]})
    for (int B : {1, 8})
      for (index_t L : {index_t(4096), index_t(32768)}) {
        const std::string d = key("decode_step", s, B, L, 4), g = key("decode_step_graph", s, B, L, 4);
        os << "| " << s.name << " | " << B << " | " << L / 1024 << "k | " << fmt(get(d), 3) << " | "
           << fmt(g_host_us[d], 1) << " | " << fmt(get(g), 3) << " | " << fmt(g_host_us[g], 1) << " |\n";
      }
  return os.str();
}

}  // namespace

int main(int argc, char** argv) {
  if (xc::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  // XQ_APPEND_VPT fixes the append kernel's values per thread (A/B runs; unset: chosen per launch).
  if (const char* v = std::getenv("XQ_APPEND_VPT")) xc::detail::append_values_per_thread = std::atoi(v);
  // XQ_REMAT_PORTABLE=1 runs remat_fused and the decode's scores on the portable kernels where the
  // wgmma kernels would apply (what a GPU before Hopper runs; A/B runs of those kernels).
  if (const char* v = std::getenv("XQ_REMAT_PORTABLE"))
    xc::detail::remat_wgmma_disabled = xc::detail::decode_wgmma_disabled = std::atoi(v) != 0;
  register_appends();
  register_token_append<U4>(4);
  register_token_append<U2>(2);
  register_rows<U4, U4, U2, U2>(kShapes[0]);
  register_rows<U4, U4, U2, U2>(kShapes[1]);
  register_rows<C4, U4, C2, U2>(kShapes[2]);
  register_step<U4, U4>(kShapes[1]);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  const std::string t = table();
  std::printf("\n%s\n", t.c_str());
  if (const char* f = std::getenv("XQ_BENCH_MD")) std::ofstream(f) << t;
  return 0;
}
