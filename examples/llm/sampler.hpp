// sampler.hpp — next-token choice exactly as llama2.c run.c does it, so that a generation can be
// compared with run.c's: temperature 0 = argmax (first maximum); otherwise softmax(logits / T) and
// either plain multinomial sampling or top-p (nucleus) sampling, with run.c's xorshift RNG.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace llm {

class Sampler {
 public:
  Sampler(float temperature, float top_p, std::uint64_t seed)
      : temperature_(temperature), top_p_(top_p), state_(seed ? seed : 1) {}

  int sample(const float* logits_in, int n) {
    if (temperature_ == 0.0f) {
      int best = 0;
      for (int i = 1; i < n; ++i)
        if (logits_in[i] > logits_in[best]) best = i;
      return best;
    }
    std::vector<float> p(logits_in, logits_in + n);
    for (float& v : p) v /= temperature_;
    const float mx = *std::max_element(p.begin(), p.end());
    float sum = 0.0f;
    for (float& v : p) { v = std::exp(v - mx); sum += v; }
    for (float& v : p) v /= sum;
    const float coin = random_f32();
    if (top_p_ <= 0.0f || top_p_ >= 1.0f) {
      float cdf = 0.0f;
      for (int i = 0; i < n; ++i) { cdf += p[i]; if (coin < cdf) return i; }
      return n - 1;
    }
    // Top-p: candidates with prob >= (1-top_p)/(n-1), sorted by descending probability, cut after
    // the cumulative probability first exceeds top_p, sampled in proportion.
    const float cutoff = (1.0f - top_p_) / static_cast<float>(n - 1);
    std::vector<std::pair<float, int>> cand;
    for (int i = 0; i < n; ++i)
      if (p[i] >= cutoff) cand.emplace_back(p[i], i);
    std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    float cum = 0.0f;
    int last = static_cast<int>(cand.size()) - 1;
    for (int i = 0; i < static_cast<int>(cand.size()); ++i) {
      cum += cand[i].first;
      if (cum > top_p_) { last = i; break; }
    }
    const float r = coin * cum;
    float cdf = 0.0f;
    for (int i = 0; i <= last; ++i) { cdf += cand[i].first; if (r < cdf) return cand[i].second; }
    return cand[last].second;
  }

 private:
  std::uint32_t random_u32() {  // xorshift*, as run.c
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return static_cast<std::uint32_t>((state_ * 0x2545F4914F6CDD1Dull) >> 32);
  }
  float random_f32() { return static_cast<float>(random_u32() >> 8) / 16777216.0f; }

  float temperature_, top_p_;
  std::uint64_t state_;
};

}  // namespace llm
