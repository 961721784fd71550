// End-to-end tests of the xquant-llm driver (examples/): the built program is run on the real
// models in ../shared, as a user would run it, and its --json output is checked against the
// reference numbers of DESIGN.md §5. They need ../shared (XQUANT_SHARED_DIR) and fail, saying so,
// without it.

#include <doctest/doctest.h>

#include <sys/wait.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

#ifdef XQUANT_LLM_PATH
const std::string kLlm = XQUANT_LLM_PATH;
#else
const std::string kLlm;
#endif
const std::string kShared = XQUANT_SHARED_DIR;

std::string stories(const char* f) { return kShared + "/models/stories260K/" + f; }
std::string mha8(const char* f) { return kShared + "/models/mha8/" + f; }
std::string data(const char* f) { return kShared + "/data/" + f; }

// Stops the test with a clear message when the program or the shared data are missing.
void require_setup() {
  REQUIRE_MESSAGE(!kLlm.empty(), "xquant-llm was not built (configure with XQUANT_BUILD_EXAMPLES=ON)");
  REQUIRE_MESSAGE(fs::exists(kLlm), "xquant-llm is not built yet: " << kLlm << " not found");
  REQUIRE_MESSAGE(fs::exists(stories("stories260K.bin")),
                  "the shared test data is missing: " << stories("stories260K.bin")
                  << " not found; these tests need ../shared (set XQUANT_SHARED_DIR when configuring)");
  REQUIRE_MESSAGE(fs::exists(mha8("mha8.bin")), "the shared test data is missing: " << mha8("mha8.bin") << " not found");
}

std::string quote(const std::string& s) {
  std::string r = "'";
  for (char c : s) r += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return r + "'";
}

struct Run {
  int status = -1;  // exit code; -1 when the program died of a signal
  std::string out, err;
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

Run run(const std::string& args) {
  const std::string err_file = (fs::temp_directory_path() / ("xquant_llm_test_err_" + std::to_string(::getpid()))).string();
  const std::string cmd = quote(kLlm) + " " + args + " 2>" + quote(err_file);
  Run r;
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.err = slurp(err_file);
  std::remove(err_file.c_str());
  return r;
}

// The value of a number field of a one-line JSON object.
double json_number(const std::string& j, const std::string& key) {
  const std::string k = "\"" + key + "\": ";
  const auto at = j.find(k);
  REQUIRE_MESSAGE(at != std::string::npos, "no field " << key << " in " << j);
  return std::strtod(j.c_str() + at + k.size(), nullptr);
}
// The value of a string field (handles \" and \\ escapes; others kept as written).
std::string json_string(const std::string& j, const std::string& key) {
  const std::string k = "\"" + key + "\": \"";
  auto i = j.find(k);
  REQUIRE_MESSAGE(i != std::string::npos, "no field " << key << " in " << j);
  std::string v;
  for (i += k.size(); i < j.size() && j[i] != '"'; ++i) {
    if (j[i] == '\\' && i + 1 < j.size()) ++i;
    v += j[i];
  }
  return v;
}

std::string stories_ppl(const std::string& opts) {
  return "ppl --model " + quote(stories("stories260K.bin")) + " --tokenizer " + quote(stories("tok512.bin")) +
         " --text " + quote(data("tinystories_sample5.txt")) + " --json --quiet " + opts;
}

Run ok(const std::string& args) {
  Run r = run(args);
  INFO("xquant-llm " << args << "\nstderr: " << r.err);
  REQUIRE(r.status == 0);
  return r;
}

const char* kLily = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.";

}  // namespace

TEST_CASE("stories260K, fp32: greedy generation from BOS reproduces the model's known text") {
  require_setup();
  const std::string gen = "generate --model " + quote(stories("stories260K.bin")) + " --tokenizer " +
                          quote(stories("tok512.bin")) + " --temperature 0 --steps 40 --json --quiet ";
  const std::string text = json_string(ok(gen + "--cache fp32").out, "text");
  CHECK_MESSAGE(text.rfind(kLily, 0) == 0, "generated: " << text);
  // The plain engine-style fp32 K/V path outside the library gives the same tokens.
  CHECK(json_string(ok(gen + "--cache fp32-kv").out, "text") == text);
  // Every token through a quantized cache, decoded token by token: XQuant-CL at 4 bits with no
  // fp16 window still tells the same story's start.
  const std::string q = json_string(ok(gen + "--cache xquant-cl --bits 4 --window 0").out, "text");
  CHECK_MESSAGE(q.rfind("Once upon a time, there was a little girl named Lily.", 0) == 0, "generated: " << q);
}

TEST_CASE("stories260K, fp32: mean loss on tinystories_sample5.txt is the reference 1.30085") {
  require_setup();
  const std::string j = ok(stories_ppl("--cache fp32")).out;
  CHECK(json_number(j, "tokens") == 1805);
  CHECK(std::abs(json_number(j, "nll") - 1.30085) <= 0.0005);
  // The engine-style fp32 K/V cache agrees with the library's fp32 X cache to float rounding.
  CHECK(std::abs(json_number(ok(stories_ppl("--cache fp32-kv")).out, "nll") - json_number(j, "nll")) <= 1e-5);
}

TEST_CASE("stories260K: every quantized mode at 8 bits is within 0.5% of fp32 perplexity") {
  require_setup();
  const double ref = json_number(ok(stories_ppl("--cache fp32")).out, "ppl");
  for (const char* mode : {"fp16", "kivi", "xquant", "xquant-cl", "xquant-svd", "xquant-svd-cl"}) {
    const std::string j = ok(stories_ppl(std::string("--bits 8 --cache ") + mode)).out;
    INFO("mode " << mode << ": " << j);
    CHECK(std::abs(json_number(j, "ppl") / ref - 1.0) < 0.005);
    CHECK(json_number(j, "tokens") == 1805);
  }
}

TEST_CASE("stories260K: --params bf16 (ParamBits::Bf16) in every quantized mode: same bytes, perplexity close") {
  require_setup();
  for (const char* mode : {"kivi", "xquant", "xquant-cl", "xquant-svd", "xquant-svd-cl"}) {
    const std::string opts = std::string("--bits 4 --cache ") + mode;
    const std::string fp16 = ok(stories_ppl(opts)).out, bf16 = ok(stories_ppl(opts + " --params bf16")).out;
    INFO("mode " << mode << ": " << fp16 << "\n" << bf16);
    CHECK(json_string(fp16, "params") == "fp16");
    CHECK(json_string(bf16, "params") == "bf16");
    CHECK(json_number(bf16, "bytes_per_token") == json_number(fp16, "bytes_per_token"));
    // 8 significant bits instead of 11 in the scale and zero: the same error budget within noise
    // (mha8, 10 000 tokens: within 0.4 %; this text has 1805 tokens: allow 3 %).
    CHECK(std::abs(json_number(bf16, "ppl") / json_number(fp16, "ppl") - 1.0) < 0.03);
  }
  const Run bad = run(stories_ppl("--cache xquant --params fp8"));
  CHECK(bad.status == 2);
  CHECK(bad.err.find("--params must be fp16 or bf16, got 'fp8'") != std::string::npos);
}

TEST_CASE("stories260K: the memory columns are the cache's own bytes for a full window") {
  require_setup();
  // 5 layers, d = 64, dkv = 32: FP16 K/V is 2·5·32·2 = 640 bytes per token.
  const std::string fp16 = ok(stories_ppl("--cache fp16")).out;
  CHECK(json_number(fp16, "fp16_kv_bytes_per_token") == 640);
  CHECK(json_number(fp16, "bytes_per_token") == 640);
  CHECK(json_number(fp16, "ratio_vs_fp16") == 1.0);
  CHECK(json_number(fp16, "cache_tokens") == 512);
  // XQuant at 4 bits (every layer at 4 bits, base included): per layer and token, 64 4-bit codes
  // (32 bytes) plus one group's fp16 scale and zero (4 bytes).
  const std::string xq = ok(stories_ppl("--cache xquant --bits 4")).out;
  CHECK(json_number(xq, "group") == 64);  // 128 clamped to d
  CHECK(json_number(xq, "bytes_per_token") == 5 * 36);
  CHECK(json_number(xq, "ratio_vs_fp16") == doctest::Approx(180.0 / 640.0));
  // 2 bits with the first layer at 4: 4·(16 + 4) + 36.
  CHECK(json_number(ok(stories_ppl("--cache xquant --bits 2")).out, "bytes_per_token") == 4 * 20 + 36);
  CHECK(json_number(ok(stories_ppl("--cache xquant --bits 2 --base-layers 0")).out, "bytes_per_token") == 5 * 20);
}

TEST_CASE("mha8, fp32: loss over the first 2044 scored tokens is 2.54152; the tokenizer matches the reference ids") {
  require_setup();
  const std::string j = ok("ppl --model " + quote(mha8("mha8.bin")) + " --tokenizer " + quote(mha8("tok4096.bin")) +
                           " --text " + quote(data("mha8_valid.txt")) +
                           " --split blank --max-tokens 2044 --cache fp32 --json --quiet")
                            .out;
  CHECK(json_number(j, "tokens") == 2044);
  CHECK(std::abs(json_number(j, "nll") - 2.54152) <= 0.0005);
  const std::string t = ok("tokenize --tokenizer " + quote(mha8("tok4096.bin")) + " --model " +
                           quote(mha8("mha8.bin")) + " --text " + quote(data("mha8_valid.txt")) +
                           " --split blank --check-tokens " + quote(data("mha8_valid_tokens.u16")) + " --json")
                            .out;
  CHECK_MESSAGE(t.find("\"match\": true") != std::string::npos, t);
  CHECK(json_number(t, "tokens") == static_cast<double>(fs::file_size(data("mha8_valid_tokens.u16")) / 2));
}

TEST_CASE("bad checkpoint and tokenizer files: a clear error and exit code 1, never a crash") {
  require_setup();
  const fs::path dir = fs::temp_directory_path() / ("xquant_llm_bad_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string model = slurp(stories("stories260K.bin")), tok = slurp(stories("tok512.bin"));
  auto write = [&](const char* name, const std::string& bytes) {
    const std::string p = (dir / name).string();
    std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p;
  };
  const std::string good_model = quote(stories("stories260K.bin")), good_tok = quote(stories("tok512.bin"));
  auto ppl = [&](const std::string& m, const std::string& t) {
    return "ppl --model " + m + " --tokenizer " + t + " --text " + quote(data("tinystories_sample5.txt")) + " --quiet";
  };
  struct Case {
    const char* what;
    std::string args, expect;
  };
  std::vector<Case> cases = {
      {"truncated checkpoint", ppl(quote(write("trunc.bin", model.substr(0, model.size() - 100))), good_tok), "truncated"},
      {"checkpoint cut inside the header", ppl(quote(write("header.bin", model.substr(0, 10))), good_tok), "header"},
      {"oversized checkpoint", ppl(quote(write("big.bin", model + std::string(8, '\0'))), good_tok), "oversized"},
      {"inconsistent header (n_heads does not divide dim)",
       ppl(quote(write("heads.bin", [&] { std::string m = model; m[12] = 7; return m; }())), good_tok), "n_heads"},
      {"missing checkpoint", ppl(quote((dir / "none.bin").string()), good_tok), "cannot open"},
      {"truncated tokenizer", ppl(good_model, quote(write("tok.bin", tok.substr(0, tok.size() - 3)))), "truncated"},
      {"tokenizer of another vocabulary", ppl(good_model, quote(mha8("tok4096.bin"))), "vocab_size"},
  };
  for (const Case& c : cases) {
    const Run r = run(c.args);
    INFO(c.what << ": exit " << r.status << ", stderr: " << r.err);
    CHECK(r.status == 1);
    CHECK(r.err.find("error: ") == 0);
    CHECK(r.err.find(c.expect) != std::string::npos);
  }
  // Usage errors exit with 2.
  CHECK(run(ppl(good_model, good_tok) + " --cache nonsense").status == 2);
  CHECK(run(ppl(good_model, good_tok) + " --bits 5").status == 2);
  fs::remove_all(dir);
}
