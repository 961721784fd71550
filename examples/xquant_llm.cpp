// xquant-llm — a mini-transformer driver for llama2.c checkpoints, on top of the xquant library.
//
//   xquant-llm                                     the main job (see run_main_job): a short greedy
//                                                  generation and the cache-mode table on
//                                                  ../shared/models/stories260K
//   xquant-llm generate --model M --tokenizer T [--prompt TEXT | TEXT] [--steps N]
//                       [--temperature F] [--top-p F] [--seed N] [cache options] [--json]
//   xquant-llm ppl      --model M --tokenizer T --text F [--split S] [--max-tokens N]
//                       [cache options] [--json] [--quiet]
//   xquant-llm layer-stats --model M --tokenizer T --text F [--max-tokens N] [--group G] [--json]
//   xquant-llm tokenize --tokenizer T --text F [--model M] [--split S] [--out F.u16]
//                       [--check-tokens F.u16] [--json]
//   cache options: --cache MODE --bits B --group G --base-layers N --base-bits B --params P --window N
//
// The library owns the cache and the attention (llm/xquant_attention.hpp: xquant::Cache<Codec> +
// xquant::attend), the driver owns the model (llm/model.hpp). ppl follows the stream convention
// of DESIGN.md §5 (llm/text.hpp): each seq_len window is one prefill chunk, every layer sealed
// right after its append, so attention reads the fully quantized cache (no fp16 window).
// generate prefills the prompt as one chunk, then decodes token by token; the newest tokens wait
// in the codec's fp16 window. layer-stats measures the cross-layer premise of XQuant-CL.
//
// Options are parsed by hand from a table (kOptions below): adding an option is one row; the
// cache modes are the rows of llm/cache_modes.hpp.

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm/checkpoint.hpp"
#include "llm/cache_modes.hpp"
#include "llm/model.hpp"
#include "llm/sampler.hpp"
#include "llm/text.hpp"
#include "llm/tokenizer.hpp"

namespace {

// ---------------------------------------------------------------------------------------------
// Options

enum Mode : unsigned { kGenerate = 1, kPpl = 2, kTokenize = 4, kLayerStats = 8 };

struct Options {
  unsigned mode = 0;
  std::string model, tokenizer, text, prompt, out, check_tokens;
  std::string split = "auto";
  llm::CacheSettings cache;     // --cache, --bits, --group, --base-layers, --base-bits, --window
  std::int64_t max_tokens = 0;  // ppl: stop after this many scored tokens (0 = all)
  int steps = 256;              // generate: total positions incl. the prompt, as run.c's -n
  double temperature = 1.0;
  double top_p = 0.9;
  std::uint64_t seed = 42;
  bool json = false;
  bool quiet = false;
  bool prompt_set = false;
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::int64_t parse_int(const std::string& opt, const std::string& v, std::int64_t lo, std::int64_t hi) {
  std::size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used, 10);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size() || x < lo || x > hi)
    throw UsageError(opt + " expects an integer in " + std::to_string(lo) + ".." + std::to_string(hi) +
                     ", got '" + v + "'");
  return x;
}

double parse_double(const std::string& opt, const std::string& v, double lo, double hi) {
  std::size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != v.size() || !(x >= lo && x <= hi)) {
    char b[96];
    std::snprintf(b, sizeof b, " expects a number in [%g, %g], got '", lo, hi);
    throw UsageError(opt + b + v + "'");
  }
  return x;
}

struct OptSpec {
  const char* name;
  const char* arg;  // nullptr: a flag without value
  unsigned modes;
  const char* help;
  std::function<void(Options&, const std::string&)> set;
};

const std::vector<OptSpec>& options_table() {
  static const std::vector<OptSpec> t = {
      {"--model", "FILE", kGenerate | kPpl | kTokenize | kLayerStats, "llama2.c fp32 checkpoint",
       [](Options& o, const std::string& v) { o.model = v; }},
      {"--tokenizer", "FILE", kGenerate | kPpl | kTokenize | kLayerStats, "llama2.c tokenizer.bin",
       [](Options& o, const std::string& v) { o.tokenizer = v; }},
      {"--text", "FILE", kPpl | kTokenize | kLayerStats, "text to score / tokenize",
       [](Options& o, const std::string& v) { o.text = v; }},
      {"--split", "S", kPpl | kTokenize | kLayerStats,
       "document separator: auto (<|endoftext|> if present, else blank lines), eot, blank, none, "
       "or a literal string (\\n escapes)",
       [](Options& o, const std::string& v) { o.split = v; }},
      {"--max-tokens", "N", kPpl | kLayerStats, "stop after N scored tokens (0 = all)",
       [](Options& o, const std::string& v) { o.max_tokens = parse_int("--max-tokens", v, 0, INT64_MAX / 4); }},
      {"--cache", "MODE", kGenerate | kPpl, "attention cache mode (see below; default fp32)",
       [](Options& o, const std::string& v) { o.cache.mode = v; }},
      {"--bits", "B", kGenerate | kPpl | kLayerStats, "bits of the quantized modes: 2, 3, 4 or 8 (default 4)",
       [](Options& o, const std::string& v) { o.cache.bits = static_cast<int>(parse_int("--bits", v, 1, 64)); }},
      {"--group", "G", kGenerate | kPpl | kLayerStats,
       "group size (default 128, clamped to the width of the axis it runs along)",
       [](Options& o, const std::string& v) { o.cache.group = static_cast<int>(parse_int("--group", v, 1, 1 << 20)); }},
      {"--base-layers", "N", kGenerate | kPpl,
       "first N layers at max(bits, base-bits), every quantized mode alike (default 1)",
       [](Options& o, const std::string& v) { o.cache.base_layers = static_cast<int>(parse_int("--base-layers", v, 0, 1 << 20)); }},
      {"--base-bits", "B", kGenerate | kPpl | kLayerStats, "bits of the base layers (default 4)",
       [](Options& o, const std::string& v) { o.cache.base_bits = static_cast<int>(parse_int("--base-bits", v, 1, 64)); }},
      {"--params", "P", kGenerate | kPpl,
       "group parameters of the quantized modes: fp16 (default) or bf16 (8 significant bits, what the Hopper remat "
       "kernel decodes fastest; xquant::ParamBits)",
       [](Options& o, const std::string& v) {
         if (v != "fp16" && v != "bf16") throw UsageError("--params must be fp16 or bf16, got '" + v + "'");
         o.cache.params = v == "bf16" ? xquant::ParamBits::Bf16 : xquant::ParamBits::Fp16;
       }},
      {"--window", "N", kGenerate,
       "generate: newest tokens kept in fp16 by per-token streams, 0..128 (default 128; per-channel "
       "streams always keep their unfilled group)",
       [](Options& o, const std::string& v) { o.cache.window = static_cast<int>(parse_int("--window", v, 0, 128)); }},
      {"--prompt", "TEXT", kGenerate, "prompt (also accepted as a positional argument)",
       [](Options& o, const std::string& v) { o.prompt = v; o.prompt_set = true; }},
      {"--steps", "N", kGenerate, "total positions incl. the prompt, like run.c -n (capped at seq_len)",
       [](Options& o, const std::string& v) { o.steps = static_cast<int>(parse_int("--steps", v, 1, 1 << 20)); }},
      {"--temperature", "F", kGenerate, "0 = greedy argmax (default 1.0)",
       [](Options& o, const std::string& v) { o.temperature = parse_double("--temperature", v, 0.0, 100.0); }},
      {"--top-p", "F", kGenerate, "nucleus sampling threshold, 0 or 1 = off (default 0.9, as run.c)",
       [](Options& o, const std::string& v) { o.top_p = parse_double("--top-p", v, 0.0, 1.0); }},
      {"--seed", "N", kGenerate, "RNG seed (default 42)",
       [](Options& o, const std::string& v) { o.seed = static_cast<std::uint64_t>(parse_int("--seed", v, 0, INT64_MAX)); }},
      {"--out", "FILE", kTokenize, "write the token stream as uint16 little-endian",
       [](Options& o, const std::string& v) { o.out = v; }},
      {"--check-tokens", "FILE", kTokenize, "compare the token stream with a uint16 little-endian file",
       [](Options& o, const std::string& v) { o.check_tokens = v; }},
      {"--json", nullptr, kGenerate | kPpl | kTokenize | kLayerStats, "print one JSON object on stdout",
       [](Options& o, const std::string&) { o.json = true; }},
      {"--quiet", nullptr, kGenerate | kPpl | kTokenize | kLayerStats, "no progress on stderr",
       [](Options& o, const std::string&) { o.quiet = true; }},
  };
  return t;
}

std::unique_ptr<llm::AttentionCache> make_cache(const llm::Model& m, const Options& o, llm::Fill fill,
                                                llm::CacheInfo& info) {
  llm::CacheSettings s = o.cache;
  s.fill = fill;
  return llm::make_attention(m, s, info);
}

void print_usage(std::FILE* f) {
  std::fprintf(f,
               "usage: xquant-llm generate --model M --tokenizer T [--prompt TEXT | TEXT] [options]\n"
               "       xquant-llm ppl --model M --tokenizer T --text F [options]\n"
               "       xquant-llm layer-stats --model M --tokenizer T --text F [options]\n"
               "       xquant-llm            (no arguments: the main job on ../shared/models/stories260K)\n"
               "       xquant-llm tokenize --tokenizer T --text F [--model M] [--out F.u16] "
               "[--check-tokens F.u16]\n\noptions:\n");
  for (const OptSpec& s : options_table()) {
    std::string modes;
    if (s.modes & kGenerate) modes += "generate ";
    if (s.modes & kPpl) modes += "ppl ";
    if (s.modes & kLayerStats) modes += "layer-stats ";
    if (s.modes & kTokenize) modes += "tokenize";
    const std::string lhs = std::string(s.name) + (s.arg ? std::string(" ") + s.arg : "");
    std::fprintf(f, "  %-20s %s  [%s]\n", lhs.c_str(), s.help, modes.c_str());
  }
  std::fprintf(f, "\ncache modes (--cache):\n");
  for (const llm::CacheMode& c : llm::cache_modes()) std::fprintf(f, "  %-20s %s\n", c.name, c.help);
  for (const std::string& p : llm::pending_cache_modes()) std::fprintf(f, "  %-20s (not available yet)\n", p.c_str());
}

Options parse_args(int argc, char** argv) {
  if (argc < 2) throw UsageError("missing subcommand (generate, ppl, layer-stats or tokenize); try --help");
  Options o;
  const std::string sub = argv[1];
  if (sub == "generate") o.mode = kGenerate;
  else if (sub == "ppl") o.mode = kPpl;
  else if (sub == "tokenize") o.mode = kTokenize;
  else if (sub == "layer-stats") o.mode = kLayerStats;
  else throw UsageError("unknown subcommand '" + sub + "' (expected generate, ppl, layer-stats or tokenize)");
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i], val;
    bool has_inline = false;
    if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
      const auto eq = a.find('=');
      if (eq != std::string::npos) { val = a.substr(eq + 1); a = a.substr(0, eq); has_inline = true; }
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option '" + a + "' (options are spelled --name; a prompt starting with "
                       "'-' goes in --prompt); try --help");
    } else if (o.mode == kGenerate && !o.prompt_set) {  // positional prompt
      o.prompt = a;
      o.prompt_set = true;
      continue;
    } else {
      throw UsageError("unexpected argument '" + a + "'");
    }
    const OptSpec* spec = nullptr;
    for (const OptSpec& s : options_table())
      if (a == s.name) spec = &s;
    if (!spec) throw UsageError("unknown option '" + a + "'; try --help");
    if (!(spec->modes & o.mode)) throw UsageError("option " + a + " does not apply to '" + sub + "'");
    if (spec->arg) {
      if (!has_inline) {
        if (i + 1 >= argc) throw UsageError("option " + a + " needs a value (" + spec->arg + ")");
        val = argv[++i];
      }
    } else if (has_inline) {
      throw UsageError("option " + a + " takes no value");
    }
    spec->set(o, val);
  }
  auto require = [&](const std::string& v, const char* name) {
    if (v.empty()) throw UsageError(sub + " needs " + name);
  };
  if (o.mode != kTokenize) require(o.model, "--model");
  require(o.tokenizer, "--tokenizer");
  if (o.mode != kGenerate) require(o.text, "--text");
  bool known_cache = llm::find_cache_mode(o.cache.mode) != nullptr;
  for (const std::string& p : llm::pending_cache_modes()) known_cache = known_cache || o.cache.mode == p;
  if (!known_cache) throw UsageError("unknown --cache mode '" + o.cache.mode + "'; try --help");
  if (o.cache.bits != 2 && o.cache.bits != 3 && o.cache.bits != 4 && o.cache.bits != 8)
    throw UsageError("--bits must be 2, 3, 4 or 8, got " + std::to_string(o.cache.bits));
  if (o.cache.base_bits != 2 && o.cache.base_bits != 3 && o.cache.base_bits != 4 && o.cache.base_bits != 8)
    throw UsageError("--base-bits must be 2, 3, 4 or 8, got " + std::to_string(o.cache.base_bits));
  return o;
}

// ---------------------------------------------------------------------------------------------
// Output helpers

std::string json_escape(const std::string& s) {
  std::string r;
  for (unsigned char c : s) {
    switch (c) {
      case '"': r += "\\\""; break;
      case '\\': r += "\\\\"; break;
      case '\n': r += "\\n"; break;
      case '\r': r += "\\r"; break;
      case '\t': r += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char b[8];
          std::snprintf(b, sizeof b, "\\u%04x", c);
          r += b;
        } else {
          r += static_cast<char>(c);  // UTF-8 passes through (invalid sequences too)
        }
    }
  }
  return r;
}

struct JsonObject {
  std::string body;
  JsonObject& add(const char* k, const std::string& v) { return raw(k, "\"" + json_escape(v) + "\""); }
  JsonObject& add(const char* k, const char* v) { return add(k, std::string(v)); }
  JsonObject& add(const char* k, std::int64_t v) { return raw(k, std::to_string(v)); }
  JsonObject& add(const char* k, int v) { return raw(k, std::to_string(v)); }
  JsonObject& add(const char* k, bool v) { return raw(k, v ? "true" : "false"); }
  JsonObject& add(const char* k, double v) {
    if (!std::isfinite(v)) return raw(k, "null");
    char b[64];
    std::snprintf(b, sizeof b, "%.10g", v);
    return raw(k, b);
  }
  JsonObject& raw(const char* k, const std::string& v) {
    body += body.empty() ? "{" : ", ";
    body += "\"" + json_escape(k) + "\": " + v;
    return *this;
  }
  std::string str() const { return body.empty() ? "{}" : body + "}"; }
};

// run.c's safe_printf, relaxed: a single-byte piece that is a control character (other than
// whitespace) is dropped; bytes >= 0x80 are kept so byte-fallback UTF-8 comes out whole.
bool printable_piece(const std::string& p) {
  if (p.size() != 1) return !p.empty();
  const unsigned char c = static_cast<unsigned char>(p[0]);
  return c >= 0x80 || std::isprint(c) || std::isspace(c);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Load the model and report its shape on stderr.
std::unique_ptr<llm::Model> load_model(const Options& o) {
  auto m = std::make_unique<llm::Model>(llm::load_checkpoint(o.model));
  const llm::Config& c = m->config();
  if (!o.quiet)
    std::fprintf(stderr,
                 "model %s: dim %d, hidden %d, %d layers, %d heads, %d kv heads, vocab %d, seq_len %d, "
                 "%s classifier, %lld params\n",
                 o.model.c_str(), c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
                 c.seq_len, c.shared_classifier ? "tied" : "untied", static_cast<long long>(m->n_params()));
  return m;
}

// ---------------------------------------------------------------------------------------------
// Subcommands

// One line describing what was built, for stderr and the table.
std::string describe_cache(const llm::CacheInfo& i, llm::Fill fill) {
  std::string s = i.mode + " (" + i.codec;
  if (i.quantized) {
    s += ", " + std::to_string(i.bits) + " bits, group " + std::to_string(i.group) + ", " + i.params + " parameters";
    if (i.base_layers > 0)
      s += ", first " + std::to_string(i.base_layers) + " layer" + (i.base_layers > 1 ? "s" : "") + " at " +
           std::to_string(i.base_bits) + " bits";
    if (fill == llm::Fill::TeacherForce)
      s += "; teacher forcing: each window is one prefill, every layer sealed after its append, no fp16 window";
    else
      s += "; fp16 window: per-token streams keep the newest " + std::to_string(i.window) +
           " tokens, per-channel streams their unfilled group";
  }
  return s + ")";
}

// Bytes of an fp16 K/V cache per token: K and V, every layer, dkv values of 2 bytes.
std::int64_t fp16_kv_bytes_per_token(const llm::Config& c) {
  return 2LL * c.n_layers * c.kv_dim() * 2;
}

struct GenResult {
  llm::CacheInfo info;
  std::string text;
  int prompt_tokens = 0, generated = 0, steps = 0;
  bool stopped_at_bos = false;
  double seconds = 0, tokens_per_s = 0;
  std::int64_t cache_bytes = 0;
};

// Generation as run.c does it: positions 0..steps-1 are forwarded; each forward after the prompt
// yields one sampled token; BOS ends the generation. The prompt is one prefill chunk, then one
// token per forward: each new token's X is appended to every layer's cache, as an engine decodes.
// `print` streams the text to stdout as it comes.
GenResult generate(const llm::Model& model, const llm::Tokenizer& tok, const Options& o, bool print) {
  const llm::Config& c = model.config();
  GenResult g;
  auto cache = make_cache(model, o, llm::Fill::Stream, g.info);
  llm::Sampler sampler(static_cast<float>(o.temperature), static_cast<float>(o.top_p), o.seed);
  const std::vector<int> prompt = tok.encode(o.prompt, /*bos=*/true);
  g.steps = std::min(o.steps, c.seq_len);
  g.prompt_tokens = static_cast<int>(prompt.size());
  if (g.prompt_tokens > g.steps)
    throw std::runtime_error("the prompt has " + std::to_string(g.prompt_tokens) + " tokens (with BOS), more than " +
                             "the " + std::to_string(g.steps) + " positions allowed by --steps/seq_len");
  auto emit = [&](int prev, int next) {
    const std::string piece = tok.decode(prev, next);
    if (!printable_piece(piece)) return;
    g.text += piece;
    if (print) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  };
  for (int i = 1; i < g.prompt_tokens; ++i) emit(prompt[i - 1], prompt[i]);

  const auto t0 = std::chrono::steady_clock::now();
  cache->reset();
  llm::RowMatrixXf logits = model.forward(prompt.data(), g.prompt_tokens, *cache, llm::Model::Logits::Last);
  const double t_prefill = seconds_since(t0);
  int token = prompt.back(), pos = g.prompt_tokens;
  for (;;) {
    const int next = sampler.sample(logits.data(), c.vocab_size);
    if (next == llm::Tokenizer::kBos) { g.stopped_at_bos = true; break; }
    ++g.generated;
    emit(token, next);
    token = next;
    if (pos >= g.steps) break;
    logits = model.forward(&token, 1, *cache, llm::Model::Logits::Last);
    ++pos;
  }
  g.seconds = seconds_since(t0);
  g.tokens_per_s = g.generated > 1 ? (g.generated - 1) / std::max(1e-9, g.seconds - t_prefill) : 0.0;
  g.cache_bytes = static_cast<std::int64_t>(cache->allocated_bytes());
  return g;
}

int run_generate(const Options& o) {
  const auto model = load_model(o);
  const llm::Tokenizer tok(o.tokenizer, model->config().vocab_size);
  if (!o.quiet) {
    llm::CacheInfo info;
    make_cache(*model, o, llm::Fill::Stream, info);
    std::fprintf(stderr, "cache %s\n", describe_cache(info, llm::Fill::Stream).c_str());
  }
  const GenResult g = generate(*model, tok, o, !o.json);
  if (o.json) {
    JsonObject j;
    j.add("command", "generate").add("mode", o.cache.mode).add("model", o.model).add("prompt", o.prompt)
        .add("bits", g.info.bits).add("group", g.info.group).add("base_layers", g.info.base_layers)
        .add("base_bits", g.info.base_bits).add("params", g.info.params).add("window", g.info.window)
        .add("prompt_tokens", g.prompt_tokens).add("tokens", g.generated).add("text", g.text)
        .add("stopped_at_bos", g.stopped_at_bos).add("temperature", o.temperature)
        .add("top_p", o.top_p).add("seed", static_cast<std::int64_t>(o.seed))
        .add("steps", g.steps).add("cache_bytes", g.cache_bytes)
        .add("seconds", g.seconds).add("tokens_per_s", g.tokens_per_s);
    std::printf("%s\n", j.str().c_str());
  } else {
    std::printf("\n");
    if (!o.quiet)
      std::fprintf(stderr, "%d prompt tokens, %d generated%s, %.3f s, %.1f tok/s decode\n", g.prompt_tokens,
                   g.generated, g.stopped_at_bos ? " (stopped at BOS)" : "", g.seconds, g.tokens_per_s);
  }
  return 0;
}

// A tokenized text cut into evaluation windows (DESIGN.md §5).
struct EvalText {
  std::size_t documents = 0;
  std::vector<int> stream;
  std::vector<llm::Window> windows;
};

EvalText load_eval_text(const llm::Tokenizer& tok, const std::string& path, const std::string& split,
                        int seq_len, std::int64_t max_tokens) {
  EvalText t;
  const std::vector<std::string> docs =
      llm::split_documents(llm::read_text_file(path), llm::SplitRule::parse(split));
  t.documents = docs.size();
  t.stream = llm::encode_stream(tok, docs, llm::stream_tokens_needed(max_tokens, seq_len));
  t.windows = llm::make_windows(static_cast<std::int64_t>(t.stream.size()), seq_len, max_tokens);
  if (t.windows.empty()) throw std::runtime_error("text " + path + " yields no scored tokens");
  return t;
}

struct PplResult {
  llm::CacheInfo info;
  std::int64_t tokens = 0;
  double total_nll = 0, nll = 0, ppl = 0, seconds = 0;
  std::int64_t cache_bytes = 0;   // allocated after the first full (seq_len) window
  std::int64_t empty_bytes = 0;   // of those, what an empty sequence holds (fp16 windows)
  std::int64_t held_tokens = 0;   // tokens held then
  double bytes_per_token = 0, stored_bytes_per_token = 0;
};

// Teacher-forced loss over every window, one prefill per window.
PplResult evaluate(const llm::Model& model, const EvalText& t, const Options& o, bool progress) {
  const llm::Config& c = model.config();
  PplResult r;
  auto cache = make_cache(model, o, llm::Fill::TeacherForce, r.info);
  const std::size_t every = t.windows.size() > 64 ? 16 : 4;
  progress = progress && t.windows.size() > 8;
  int measured_len = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t w = 0; w < t.windows.size(); ++w) {
    const llm::Window& win = t.windows[w];
    const int* toks = t.stream.data() + win.begin;
    cache->reset();
    const llm::RowMatrixXf logits = model.forward(toks, win.length, *cache, llm::Model::Logits::All);
    // Memory: the cache's own allocation holding the longest window seen (a full seq_len window
    // once there is one; blocks are reused across windows, so it does not grow after that).
    if (win.length > measured_len) {
      measured_len = win.length;
      r.cache_bytes = static_cast<std::int64_t>(cache->allocated_bytes());
      r.empty_bytes = static_cast<std::int64_t>(cache->empty_bytes());
      r.held_tokens = cache->tokens();
    }
    for (int i = 0; i < win.n_scored; ++i) {
      // -log softmax(logits_i)[target], in double
      const auto row = logits.row(i);
      const double mx = row.maxCoeff();
      double s = 0.0;
      for (int v = 0; v < c.vocab_size; ++v) s += std::exp(static_cast<double>(row(v)) - mx);
      r.total_nll += mx + std::log(s) - static_cast<double>(row(toks[i + 1]));
    }
    r.tokens += win.n_scored;
    if (progress && ((w + 1) % every == 0 || w + 1 == t.windows.size()))
      std::fprintf(stderr, "  %s: window %zu/%zu  tokens %lld  nll %.5f  %.0f tok/s\n", o.cache.mode.c_str(), w + 1,
                   t.windows.size(), static_cast<long long>(r.tokens), r.total_nll / r.tokens,
                   r.tokens / seconds_since(t0));
  }
  r.seconds = seconds_since(t0);
  r.nll = r.total_nll / static_cast<double>(r.tokens);
  r.ppl = std::exp(r.nll);
  r.bytes_per_token = static_cast<double>(r.cache_bytes) / static_cast<double>(r.held_tokens);
  r.stored_bytes_per_token = static_cast<double>(r.cache_bytes - r.empty_bytes) / static_cast<double>(r.held_tokens);
  return r;
}

JsonObject ppl_json(const Options& o, const llm::Config& c, const EvalText& t, const PplResult& r) {
  const double fp16 = static_cast<double>(fp16_kv_bytes_per_token(c));
  JsonObject j;
  j.add("command", "ppl").add("mode", r.info.mode).add("bits", r.info.bits).add("group", r.info.group)
      .add("base_layers", r.info.base_layers).add("base_bits", r.info.base_bits).add("params", r.info.params)
      .add("codec", r.info.codec)
      .add("model", o.model).add("text", o.text).add("split", o.split).add("seq_len", c.seq_len)
      .add("layers", c.n_layers).add("dim", c.dim).add("kv_dim", c.kv_dim())
      .add("documents", static_cast<std::int64_t>(t.documents))
      .add("stream_tokens", static_cast<std::int64_t>(t.stream.size()))
      .add("windows", static_cast<std::int64_t>(t.windows.size())).add("tokens", r.tokens)
      .add("nll", r.nll).add("ppl", r.ppl).add("total_nll", r.total_nll)
      .add("cache_bytes", r.cache_bytes).add("cache_tokens", r.held_tokens)
      .add("window_bytes", r.empty_bytes).add("bytes_per_token", r.bytes_per_token)
      .add("stored_bytes_per_token", r.stored_bytes_per_token)
      .add("fp16_kv_bytes_per_token", static_cast<std::int64_t>(fp16_kv_bytes_per_token(c)))
      .add("ratio_vs_fp16", r.bytes_per_token / fp16).add("stored_ratio_vs_fp16", r.stored_bytes_per_token / fp16)
      .add("seconds", r.seconds).add("tokens_per_s", r.tokens / std::max(1e-9, r.seconds));
  return j;
}

int run_ppl(const Options& o) {
  const auto model = load_model(o);
  const llm::Config& c = model->config();
  if (c.seq_len < 2) throw std::runtime_error("seq_len must be at least 2 for perplexity");
  const llm::Tokenizer tok(o.tokenizer, c.vocab_size);
  const EvalText t = load_eval_text(tok, o.text, o.split, c.seq_len, o.max_tokens);
  if (!o.quiet) {
    llm::CacheInfo info;
    make_cache(*model, o, llm::Fill::TeacherForce, info);
    std::fprintf(stderr, "cache %s\n", describe_cache(info, llm::Fill::TeacherForce).c_str());
  }
  const PplResult r = evaluate(*model, t, o, !o.quiet);
  if (o.max_tokens > 0 && r.tokens < o.max_tokens && !o.quiet)
    std::fprintf(stderr, "note: the text has only %lld scored tokens (< --max-tokens %lld)\n",
                 static_cast<long long>(r.tokens), static_cast<long long>(o.max_tokens));
  if (o.json) {
    std::printf("%s\n", ppl_json(o, c, t, r).str().c_str());
  } else {
    std::printf("tokens %lld  windows %zu  documents %zu  cache %s\n", static_cast<long long>(r.tokens),
                t.windows.size(), t.documents, o.cache.mode.c_str());
    std::printf("nll %.6f nats/token  ppl %.4f  (%.2f s, %.0f tok/s)\n", r.nll, r.ppl, r.seconds,
                r.tokens / std::max(1e-9, r.seconds));
    std::printf("cache %lld bytes for %lld tokens: %.1f bytes/token (%.1f without the empty fp16 windows), "
                "%.3f of fp16 K/V (%lld bytes/token)\n",
                static_cast<long long>(r.cache_bytes), static_cast<long long>(r.held_tokens), r.bytes_per_token,
                r.stored_bytes_per_token, r.bytes_per_token / fp16_kv_bytes_per_token(c),
                static_cast<long long>(fp16_kv_bytes_per_token(c)));
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// layer-stats: the premise of XQuant-CL, measured. Runs the fp32 model over the text and records
// each layer's attention input X; then, per layer i and bit width b (per-token groups, the
// library's quantizer):
//   delta      ‖X_i − X_{i−1}‖ / ‖X_i‖       (fp32, norms over all tokens)
//   cos        mean over tokens of cos(X_i[t], X_{i−1}[t])
//   err_x      ‖X_i − Q_b(X_i)‖ / ‖X_i‖      (plain XQuant's error on this layer)
//   delta_hat  ‖X_i − X̂_{i−1}‖ / ‖X_i‖      (what XQuant-CL quantizes: the delta to the previous
//              layer's reconstruction, X̂_i = X̂_{i−1} + Q_b(X_i − X̂_{i−1}), layer 0 stored as
//              Q(X_0) at max(b, base bits), as the CL layout seeds its accumulator)
//   err_cl     ‖X_i − X̂_i‖ / ‖X_i‖ = the delta's quantization error, relative to ‖X_i‖.
// CL helps on layer i exactly when err_cl < err_x.

// Records X of every layer while delegating attention to a plain fp32 K/V cache.
class RecordingAttention final : public llm::AttentionCache {
 public:
  explicit RecordingAttention(const llm::Model& m) : inner_(m), x_(static_cast<std::size_t>(m.config().n_layers)), dim_(m.config().dim) {}
  void append_and_attend(int layer, const float* x, const float* q, int n_new, float* out) override {
    auto& v = x_[static_cast<std::size_t>(layer)];
    v.insert(v.end(), x, x + static_cast<std::size_t>(n_new) * dim_);
    inner_.append_and_attend(layer, x, q, n_new, out);
  }
  void reset() override {
    inner_.reset();
    for (auto& v : x_) v.clear();
  }
  std::size_t allocated_bytes() const override { return inner_.allocated_bytes(); }
  std::size_t empty_bytes() const override { return 0; }
  long tokens() const override { return inner_.tokens(); }
  const std::vector<float>& x(int layer) const { return x_[static_cast<std::size_t>(layer)]; }

 private:
  llm::Fp32KvAttention inner_;
  std::vector<std::vector<float>> x_;
  int dim_;
};

// x̂ = Q_b(x) for n rows of `width` (per-token groups of `group`), through the library's quantizer.
void quantize_dequantize(int bits, const float* x, xquant::index_t n, int width, int group, float* out);

int run_layer_stats(const Options& o) {
  const auto model = load_model(o);
  const llm::Config& c = model->config();
  const llm::Tokenizer tok(o.tokenizer, c.vocab_size);
  const EvalText t = load_eval_text(tok, o.text, o.split, c.seq_len, o.max_tokens);
  const int L = c.n_layers, d = c.dim, group = std::min(o.cache.group, d);
  const int bit_list[] = {8, 4, 3, 2};
  constexpr int NB = 4;
  struct Acc {
    double xx = 0, dd = 0, cos = 0;
    double ex[NB] = {}, dh[NB] = {}, ecl[NB] = {};
  };
  std::vector<Acc> acc(static_cast<std::size_t>(L));
  std::int64_t tokens = 0;
  RecordingAttention rec(*model);
  std::vector<float> q, prev_hat[NB], hat, delta;
  for (const llm::Window& win : t.windows) {
    rec.reset();
    model->forward(t.stream.data() + win.begin, win.length, rec, llm::Model::Logits::None);
    const std::size_t n = static_cast<std::size_t>(win.length), nd = n * static_cast<std::size_t>(d);
    tokens += win.length;
    q.resize(nd);
    hat.resize(nd);
    delta.resize(nd);
    for (int l = 0; l < L; ++l) {
      const float* x = rec.x(l).data();
      Acc& a = acc[static_cast<std::size_t>(l)];
      for (std::size_t r = 0; r < n; ++r)
        for (int j = 0; j < d; ++j) a.xx += static_cast<double>(x[r * d + j]) * x[r * d + j];
      if (l > 0) {
        const float* xp = rec.x(l - 1).data();
        for (std::size_t r = 0; r < n; ++r) {
          double dot = 0, n1 = 0, n2 = 0;
          for (int j = 0; j < d; ++j) {
            const double u = x[r * d + j], v = xp[r * d + j];
            dot += u * v;
            n1 += u * u;
            n2 += v * v;
            a.dd += (u - v) * (u - v);
          }
          a.cos += dot / std::sqrt(std::max(1e-300, n1 * n2));
        }
      }
      for (int b = 0; b < NB; ++b) {
        const int bits = bit_list[b];
        quantize_dequantize(bits, x, static_cast<xquant::index_t>(n), d, group, q.data());
        for (std::size_t i = 0; i < nd; ++i) a.ex[b] += static_cast<double>(x[i] - q[i]) * (x[i] - q[i]);
        if (l == 0) {
          const int base = std::max(bits, o.cache.base_bits);
          quantize_dequantize(base, x, static_cast<xquant::index_t>(n), d, group, hat.data());
          for (std::size_t i = 0; i < nd; ++i) a.ecl[b] += static_cast<double>(x[i] - hat[i]) * (x[i] - hat[i]);
        } else {
          const std::vector<float>& ph = prev_hat[b];
          for (std::size_t i = 0; i < nd; ++i) {
            delta[i] = x[i] - ph[i];
            a.dh[b] += static_cast<double>(delta[i]) * delta[i];
          }
          quantize_dequantize(bits, delta.data(), static_cast<xquant::index_t>(n), d, group, hat.data());
          for (std::size_t i = 0; i < nd; ++i) {
            a.ecl[b] += static_cast<double>(delta[i] - hat[i]) * (delta[i] - hat[i]);
            hat[i] += ph[i];  // X̂_i = X̂_{i−1} + Q(Δ)
          }
        }
        prev_hat[b].assign(hat.begin(), hat.end());
      }
    }
  }
  if (o.json) {
    for (int l = 0; l < L; ++l) {
      const Acc& a = acc[static_cast<std::size_t>(l)];
      JsonObject j;
      j.add("command", "layer-stats").add("model", o.model).add("text", o.text).add("tokens", tokens)
          .add("group", group).add("base_bits", o.cache.base_bits).add("layer", l)
          .add("delta", l ? std::sqrt(a.dd / a.xx) : NAN).add("cos", l ? a.cos / tokens : NAN);
      for (int b = 0; b < NB; ++b) {
        const std::string s = std::to_string(bit_list[b]);
        j.add(("err_x_" + s).c_str(), std::sqrt(a.ex[b] / a.xx))
            .add(("delta_hat_" + s).c_str(), l ? std::sqrt(a.dh[b] / a.xx) : NAN)
            .add(("err_cl_" + s).c_str(), std::sqrt(a.ecl[b] / a.xx));
      }
      std::printf("%s\n", j.str().c_str());
    }
    return 0;
  }
  std::printf("layer-stats: %lld tokens, per-token groups of %d; layer 0 of the CL chain at max(b, %d) bits\n",
              static_cast<long long>(tokens), group, o.cache.base_bits);
  std::printf("%5s %7s %6s", "layer", "delta", "cos");
  for (int b = 0; b < NB; ++b) std::printf(" | %2db: %6s %6s %6s", bit_list[b], "err_x", "d_hat", "err_cl");
  std::printf("\n");
  for (int l = 0; l < L; ++l) {
    const Acc& a = acc[static_cast<std::size_t>(l)];
    if (l) std::printf("%5d %7.3f %6.3f", l, std::sqrt(a.dd / a.xx), a.cos / tokens);
    else std::printf("%5d %7s %6s", l, "-", "-");
    for (int b = 0; b < NB; ++b) {
      if (l) std::printf(" |      %6.4f %6.3f %6.4f", std::sqrt(a.ex[b] / a.xx), std::sqrt(a.dh[b] / a.xx), std::sqrt(a.ecl[b] / a.xx));
      else std::printf(" |      %6.4f %6s %6.4f", std::sqrt(a.ex[b] / a.xx), "-", std::sqrt(a.ecl[b] / a.xx));
    }
    std::printf("\n");
  }
  return 0;
}

void quantize_dequantize(int bits, const float* x, xquant::index_t n, int width, int group, float* out) {
  xquant::dispatch_bits(bits, [&](auto B) {
    using Q = xquant::quant::Uniform<B(), xquant::Axis::Token>;
    using Ops = xquant::quant::QuantOps<xquant::backend::Eigen>;
    const xquant::index_t groups = width / group;
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(n * Q::code_bytes(width)));
    std::vector<std::uint16_t> params(static_cast<std::size_t>(n * groups * Q::params_per_group));
    Ops::template quantize_tokens<Q>(x, n, width, width, group, codes.data(), params.data());
    Ops::template dequantize_tokens<Q>(codes.data(), params.data(), n, width, group, out, width);
  });
}

// ---------------------------------------------------------------------------------------------
// The main job (no arguments): on ../shared/models/stories260K, a short greedy generation, then
// the table of cache modes × bit widths on tinystories_sample5.txt.

#ifndef XQUANT_SHARED_DIR
#define XQUANT_SHARED_DIR "../shared"
#endif

bool file_exists(const std::string& p) { return static_cast<bool>(std::ifstream(p, std::ios::binary)); }

std::string find_shared_dir() {
  const std::string rel = "/models/stories260K/stories260K.bin";
  for (const std::string& d : {std::string("../shared"), std::string(XQUANT_SHARED_DIR)})
    if (file_exists(d + rel)) return d;
  throw std::runtime_error("cannot find the test models: ../shared" + rel +
                           " does not exist (run from the repository root, next to ../shared, or pass "
                           "--model/--tokenizer to a subcommand; see --help)");
}

int run_main_job() {
  const std::string dir = find_shared_dir();
  Options o;
  o.model = dir + "/models/stories260K/stories260K.bin";
  o.tokenizer = dir + "/models/stories260K/tok512.bin";
  o.text = dir + "/data/tinystories_sample5.txt";
  const auto model = load_model(o);
  const llm::Config& c = model->config();
  const llm::Tokenizer tok(o.tokenizer, c.vocab_size);

  std::printf("== Greedy generation from BOS, 64 positions (token by token through the cache)\n");
  o.temperature = 0;
  o.steps = 64;
  for (const char* mode : {"fp32", "xquant"}) {
    Options g = o;
    g.cache.mode = mode;
    g.cache.bits = 4;
    g.cache.window = 0;
    llm::CacheInfo info;
    make_cache(*model, g, llm::Fill::Stream, info);
    std::printf("-- %s\n", describe_cache(info, llm::Fill::Stream).c_str());
    std::printf("%s\n", generate(*model, tok, g, false).text.c_str());
  }

  const EvalText t = load_eval_text(tok, o.text, o.split, c.seq_len, 0);
  std::int64_t scored = 0;
  for (const llm::Window& w : t.windows) scored += w.n_scored;
  const double fp16 = static_cast<double>(fp16_kv_bytes_per_token(c));
  std::printf("\n== Perplexity on %s: %lld scored tokens in %zu window(s) of up to %d, teacher forced\n",
              "tinystories_sample5.txt", static_cast<long long>(scored), t.windows.size(), c.seq_len);
  std::printf("   each window is one prefill; every layer is sealed right after its append (no fp16 window);\n"
              "   quantized modes: group 128 clamped to the grouped axis, first %d layer at max(bits, %d) bits;\n"
              "   bytes/token = the cache's allocated bytes holding a full window / its tokens (incl. empty fp16\n"
              "   windows that per-channel streams allocate); FP16 K/V = %.0f bytes/token\n\n",
              o.cache.base_layers, o.cache.base_bits, fp16);
  std::printf("%-14s %4s %11s %9s %10s %9s\n", "mode", "bits", "bytes/token", "vs FP16KV", "ppl", "vs fp32");
  double ref = 0;
  auto row = [&](const std::string& mode, int bits) {
    Options r = o;
    r.cache.mode = mode;
    r.cache.bits = bits;
    const PplResult p = evaluate(*model, t, r, false);
    if (mode == "fp32") ref = p.ppl;
    std::printf("%-14s %4d %11.1f %9.3f %10.4f %+8.2f%%\n", mode.c_str(), p.info.bits, p.bytes_per_token,
                p.bytes_per_token / fp16, p.ppl, 100.0 * (p.ppl / ref - 1.0));
    std::fflush(stdout);
  };
  for (const llm::CacheMode& m : llm::cache_modes()) {
    const std::string name = m.name;
    if (name == "fp32-kv") continue;  // the independent check, same numbers as fp32
    llm::CacheInfo info;
    Options probe = o;
    probe.cache.mode = name;
    make_cache(*model, probe, llm::Fill::TeacherForce, info);
    if (!info.quantized) row(name, 4);
    else
      for (int bits : {8, 4, 3, 2}) row(name, bits);
  }
  for (const std::string& p : llm::pending_cache_modes()) std::printf("%-14s not available yet\n", p.c_str());
  return 0;
}

std::vector<std::uint16_t> read_u16_file(const std::string& path) {
  const std::string b = llm::read_text_file(path);
  if (b.size() % 2) throw std::runtime_error(path + ": odd size " + std::to_string(b.size()) + ", not uint16 data");
  std::vector<std::uint16_t> v(b.size() / 2);
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = static_cast<std::uint16_t>(static_cast<unsigned char>(b[2 * i]) |
                                      (static_cast<unsigned char>(b[2 * i + 1]) << 8));
  return v;
}

int run_tokenize(const Options& o) {
  int vocab = 0;
  if (!o.model.empty()) vocab = llm::load_checkpoint(o.model).config.vocab_size;
  const llm::Tokenizer tok(o.tokenizer, vocab);
  const std::vector<std::string> docs =
      llm::split_documents(llm::read_text_file(o.text), llm::SplitRule::parse(o.split));
  const std::vector<int> stream = llm::encode_stream(tok, docs);
  int rc = 0;
  if (!o.out.empty()) {
    if (tok.vocab_size() > 65536) throw std::runtime_error("vocab_size > 65536 does not fit uint16");
    std::string b(stream.size() * 2, '\0');
    for (std::size_t i = 0; i < stream.size(); ++i) {
      b[2 * i] = static_cast<char>(stream[i] & 0xff);
      b[2 * i + 1] = static_cast<char>((stream[i] >> 8) & 0xff);
    }
    std::ofstream f(o.out, std::ios::binary);
    if (!f || !f.write(b.data(), static_cast<std::streamsize>(b.size())))
      throw std::runtime_error("cannot write " + o.out);
  }
  std::string check = "not checked";
  std::int64_t first_mismatch = -1;
  if (!o.check_tokens.empty()) {
    const std::vector<std::uint16_t> ref = read_u16_file(o.check_tokens);
    const std::size_t n = std::min(ref.size(), stream.size());
    for (std::size_t i = 0; i < n && first_mismatch < 0; ++i)
      if (ref[i] != stream[i]) first_mismatch = static_cast<std::int64_t>(i);
    if (first_mismatch < 0 && ref.size() != stream.size()) first_mismatch = static_cast<std::int64_t>(n);
    if (first_mismatch < 0) {
      check = "match";
    } else {
      rc = 1;
      const std::size_t i = static_cast<std::size_t>(first_mismatch);
      check = "MISMATCH at token " + std::to_string(i) + ": ours " +
              (i < stream.size() ? std::to_string(stream[i]) : std::string("<end>")) + ", reference " +
              (i < ref.size() ? std::to_string(ref[i]) : std::string("<end>")) + " (ours " +
              std::to_string(stream.size()) + " tokens, reference " + std::to_string(ref.size()) + ")";
    }
  }
  if (o.json) {
    JsonObject j;
    j.add("mode", "tokenize").add("tokenizer", o.tokenizer).add("text", o.text).add("split", o.split)
        .add("documents", static_cast<std::int64_t>(docs.size()))
        .add("tokens", static_cast<std::int64_t>(stream.size()));
    if (!o.check_tokens.empty()) j.add("check", check).add("match", rc == 0);
    std::printf("%s\n", j.str().c_str());
  } else {
    std::printf("documents %zu  tokens %zu\n", docs.size(), stream.size());
    if (!o.check_tokens.empty()) std::printf("check %s: %s\n", o.check_tokens.c_str(), check.c_str());
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 1) {
    try {
      return run_main_job();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "error: %s\n", e.what());
      return 1;
    }
  }
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      print_usage(stdout);
      return 0;
    }
  try {
    const Options o = parse_args(argc, argv);
    switch (o.mode) {
      case kGenerate: return run_generate(o);
      case kPpl: return run_ppl(o);
      case kLayerStats: return run_layer_stats(o);
      default: return run_tokenize(o);
    }
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
