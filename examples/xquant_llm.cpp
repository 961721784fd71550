// xquant-llm — a mini-transformer driver for llama2.c checkpoints.
//
//   xquant-llm generate --model M --tokenizer T [--prompt TEXT | TEXT] [--steps N]
//                       [--temperature F] [--top-p F] [--seed N] [--cache MODE] [--json]
//   xquant-llm ppl      --model M --tokenizer T --text F [--split S] [--max-tokens N]
//                       [--cache MODE] [--json] [--quiet]
//   xquant-llm tokenize --tokenizer T --text F [--model M] [--split S] [--out F.u16]
//                       [--check-tokens F.u16] [--json]
//
// ppl follows the stream convention of DESIGN.md §5 (see llm/text.hpp): each seq_len window is
// one prefill chunk through the model. generate prefills the prompt as one chunk, then decodes
// token by token. The attention state lives behind llm::AttentionCache (--cache selects it).
//
// Options are parsed by hand from a table (kOptions below): adding an option is one row, adding a
// cache mode is one row of kCacheModes.

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
#include "llm/fp32_attention.hpp"
#include "llm/model.hpp"
#include "llm/sampler.hpp"
#include "llm/text.hpp"
#include "llm/tokenizer.hpp"

namespace {

// ---------------------------------------------------------------------------------------------
// Options

enum Mode : unsigned { kGenerate = 1, kPpl = 2, kTokenize = 4 };

struct Options {
  unsigned mode = 0;
  std::string model, tokenizer, text, prompt, out, check_tokens;
  std::string split = "auto";
  std::string cache = "fp32";
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
      {"--model", "FILE", kGenerate | kPpl | kTokenize, "llama2.c fp32 checkpoint",
       [](Options& o, const std::string& v) { o.model = v; }},
      {"--tokenizer", "FILE", kGenerate | kPpl | kTokenize, "llama2.c tokenizer.bin",
       [](Options& o, const std::string& v) { o.tokenizer = v; }},
      {"--text", "FILE", kPpl | kTokenize, "text to score / tokenize",
       [](Options& o, const std::string& v) { o.text = v; }},
      {"--split", "S", kPpl | kTokenize,
       "document separator: auto (<|endoftext|> if present, else blank lines), eot, blank, none, "
       "or a literal string (\\n escapes)",
       [](Options& o, const std::string& v) { o.split = v; }},
      {"--max-tokens", "N", kPpl, "stop after N scored tokens (0 = all)",
       [](Options& o, const std::string& v) { o.max_tokens = parse_int("--max-tokens", v, 0, INT64_MAX / 4); }},
      {"--cache", "MODE", kGenerate | kPpl, "attention cache (see below)",
       [](Options& o, const std::string& v) { o.cache = v; }},
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
      {"--json", nullptr, kGenerate | kPpl | kTokenize, "print one JSON object on stdout",
       [](Options& o, const std::string&) { o.json = true; }},
      {"--quiet", nullptr, kGenerate | kPpl | kTokenize, "no progress on stderr",
       [](Options& o, const std::string&) { o.quiet = true; }},
  };
  return t;
}

// Attention cache modes. The library's compressed caches get a row each.
struct CacheMode {
  const char* name;
  const char* help;
  std::function<std::unique_ptr<llm::AttentionCache>(const llm::Model&, const Options&)> make;
};

const std::vector<CacheMode>& cache_modes() {
  static const std::vector<CacheMode> t = {
      {"fp32", "store X in fp32, rebuild K/V from it (reference for XQuant)",
       [](const llm::Model& m, const Options&) { return std::make_unique<llm::Fp32Attention>(m); }},
      {"fp32-kv", "store K (post-RoPE) and V in fp32, as an inference engine does",
       [](const llm::Model& m, const Options&) { return std::make_unique<llm::Fp32KvAttention>(m); }},
  };
  return t;
}

std::unique_ptr<llm::AttentionCache> make_cache(const llm::Model& m, const Options& o) {
  std::string names;
  for (const CacheMode& c : cache_modes()) {
    if (o.cache == c.name) return c.make(m, o);
    names += names.empty() ? "" : ", ";
    names += c.name;
  }
  throw UsageError("unknown --cache mode '" + o.cache + "' (known: " + names + ")");
}

void print_usage(std::FILE* f) {
  std::fprintf(f,
               "usage: xquant-llm generate --model M --tokenizer T [--prompt TEXT | TEXT] [options]\n"
               "       xquant-llm ppl --model M --tokenizer T --text F [options]\n"
               "       xquant-llm tokenize --tokenizer T --text F [--model M] [--out F.u16] "
               "[--check-tokens F.u16]\n\noptions:\n");
  for (const OptSpec& s : options_table()) {
    std::string modes;
    if (s.modes & kGenerate) modes += "generate ";
    if (s.modes & kPpl) modes += "ppl ";
    if (s.modes & kTokenize) modes += "tokenize";
    const std::string lhs = std::string(s.name) + (s.arg ? std::string(" ") + s.arg : "");
    std::fprintf(f, "  %-20s %s  [%s]\n", lhs.c_str(), s.help, modes.c_str());
  }
  std::fprintf(f, "\ncache modes (--cache):\n");
  for (const CacheMode& c : cache_modes()) std::fprintf(f, "  %-20s %s\n", c.name, c.help);
}

Options parse_args(int argc, char** argv) {
  if (argc < 2) throw UsageError("missing subcommand (generate, ppl or tokenize); try --help");
  Options o;
  const std::string sub = argv[1];
  if (sub == "generate") o.mode = kGenerate;
  else if (sub == "ppl") o.mode = kPpl;
  else if (sub == "tokenize") o.mode = kTokenize;
  else throw UsageError("unknown subcommand '" + sub + "' (expected generate, ppl or tokenize)");
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
  bool known_cache = false;
  for (const CacheMode& c : cache_modes()) known_cache = known_cache || o.cache == c.name;
  if (!known_cache) throw UsageError("unknown --cache mode '" + o.cache + "'; try --help");
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

int run_generate(const Options& o) {
  const auto model = load_model(o);
  const llm::Config& c = model->config();
  const llm::Tokenizer tok(o.tokenizer, c.vocab_size);
  auto cache = make_cache(*model, o);
  llm::Sampler sampler(static_cast<float>(o.temperature), static_cast<float>(o.top_p), o.seed);

  const std::vector<int> prompt = tok.encode(o.prompt, /*bos=*/true);
  const int steps = std::min(o.steps, c.seq_len);
  const int n_prompt = static_cast<int>(prompt.size());
  if (n_prompt > steps)
    throw std::runtime_error("the prompt has " + std::to_string(n_prompt) + " tokens (with BOS), more than " +
                             "the " + std::to_string(steps) + " positions allowed by --steps/seq_len");

  std::string text;
  auto emit = [&](int prev, int next) {
    const std::string piece = tok.decode(prev, next);
    if (!printable_piece(piece)) return;
    text += piece;
    if (!o.json) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  };
  for (int i = 1; i < n_prompt; ++i) emit(prompt[i - 1], prompt[i]);

  // run.c semantics: positions 0..steps-1 are forwarded; each forward after the prompt yields one
  // sampled token; BOS ends the generation.
  const auto t0 = std::chrono::steady_clock::now();
  cache->reset();
  llm::RowMatrixXf logits =
      model->forward(prompt.data(), n_prompt, *cache, llm::Model::Logits::Last, /*prefill=*/true);
  const double t_prefill = seconds_since(t0);
  int token = prompt.back(), pos = n_prompt, generated = 0;
  bool stopped_at_bos = false;
  for (;;) {
    const int next = sampler.sample(logits.data(), c.vocab_size);
    if (next == llm::Tokenizer::kBos) { stopped_at_bos = true; break; }
    ++generated;
    emit(token, next);
    token = next;
    if (pos >= steps) break;
    logits = model->forward(&token, 1, *cache, llm::Model::Logits::Last, /*prefill=*/false);
    ++pos;
  }
  const double secs = seconds_since(t0);
  const double tps = generated > 1 ? (generated - 1) / std::max(1e-9, secs - t_prefill) : 0.0;
  if (o.json) {
    JsonObject j;
    j.add("mode", "generate").add("model", o.model).add("cache", o.cache).add("prompt", o.prompt)
        .add("prompt_tokens", n_prompt).add("tokens", generated).add("text", text)
        .add("stopped_at_bos", stopped_at_bos).add("temperature", o.temperature)
        .add("top_p", o.top_p).add("seed", static_cast<std::int64_t>(o.seed))
        .add("steps", steps).add("seconds", secs).add("tokens_per_s", tps);
    std::printf("%s\n", j.str().c_str());
  } else {
    std::printf("\n");
    if (!o.quiet)
      std::fprintf(stderr, "%d prompt tokens, %d generated%s, %.3f s, %.1f tok/s decode\n", n_prompt,
                   generated, stopped_at_bos ? " (stopped at BOS)" : "", secs, tps);
  }
  return 0;
}

int run_ppl(const Options& o) {
  const auto model = load_model(o);
  const llm::Config& c = model->config();
  if (c.seq_len < 2) throw std::runtime_error("seq_len must be at least 2 for perplexity");
  const llm::Tokenizer tok(o.tokenizer, c.vocab_size);
  auto cache = make_cache(*model, o);

  const llm::SplitRule rule = llm::SplitRule::parse(o.split);
  const std::vector<std::string> docs = llm::split_documents(llm::read_text_file(o.text), rule);
  const std::vector<int> stream =
      llm::encode_stream(tok, docs, llm::stream_tokens_needed(o.max_tokens, c.seq_len));
  const std::vector<llm::Window> windows =
      llm::make_windows(static_cast<std::int64_t>(stream.size()), c.seq_len, o.max_tokens);
  if (windows.empty()) throw std::runtime_error("text " + o.text + " yields no scored tokens");

  const bool progress = !o.quiet && windows.size() > 8;
  const std::size_t every = windows.size() > 64 ? 16 : 4;
  double total_nll = 0.0;
  std::int64_t scored = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (std::size_t w = 0; w < windows.size(); ++w) {
    const llm::Window& win = windows[w];
    const int* toks = stream.data() + win.begin;
    cache->reset();
    const llm::RowMatrixXf logits =
        model->forward(toks, win.length, *cache, llm::Model::Logits::All, /*prefill=*/true);
    for (int i = 0; i < win.n_scored; ++i) {
      // -log softmax(logits_i)[target], in double
      const auto row = logits.row(i);
      const double mx = row.maxCoeff();
      double s = 0.0;
      for (int v = 0; v < c.vocab_size; ++v) s += std::exp(static_cast<double>(row(v)) - mx);
      total_nll += mx + std::log(s) - static_cast<double>(row(toks[i + 1]));
    }
    scored += win.n_scored;
    if (progress && ((w + 1) % every == 0 || w + 1 == windows.size()))
      std::fprintf(stderr, "  window %zu/%zu  tokens %lld  nll %.5f  %.0f tok/s\n", w + 1, windows.size(),
                   static_cast<long long>(scored), total_nll / scored, scored / seconds_since(t0));
  }
  const double secs = seconds_since(t0);
  const double nll = total_nll / static_cast<double>(scored);
  const double ppl = std::exp(nll);
  if (o.max_tokens > 0 && scored < o.max_tokens && !o.quiet)
    std::fprintf(stderr, "note: the text has only %lld scored tokens (< --max-tokens %lld)\n",
                 static_cast<long long>(scored), static_cast<long long>(o.max_tokens));
  if (o.json) {
    JsonObject j;
    j.add("mode", "ppl").add("model", o.model).add("tokenizer", o.tokenizer).add("text", o.text)
        .add("split", o.split).add("cache", o.cache).add("seq_len", c.seq_len)
        .add("documents", static_cast<std::int64_t>(docs.size()))
        .add("stream_tokens", static_cast<std::int64_t>(stream.size()))
        .add("windows", static_cast<std::int64_t>(windows.size())).add("tokens", scored)
        .add("nll", nll).add("ppl", ppl).add("total_nll", total_nll).add("seconds", secs)
        .add("tokens_per_s", scored / std::max(1e-9, secs));
    std::printf("%s\n", j.str().c_str());
  } else {
    std::printf("tokens %lld  windows %zu  documents %zu  cache %s\n", static_cast<long long>(scored),
                windows.size(), docs.size(), o.cache.c_str());
    std::printf("nll %.6f nats/token  ppl %.4f  (%.2f s, %.0f tok/s)\n", nll, ppl, secs,
                scored / std::max(1e-9, secs));
  }
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
