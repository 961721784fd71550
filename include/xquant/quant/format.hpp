#pragma once
// Vocabulary shared by every quantizer policy, and the unquantized storage formats.

#include <type_traits>

#include "../config.hpp"

namespace xquant {

/// Which axis a quantization group runs along.
enum class Axis {
  Token,   ///< `group` consecutive channels of one token (per-token quantization).
  Channel  ///< `group` consecutive tokens of one channel (per-channel quantization).
};

/// Asymmetric (scale + zero) or symmetric (scale only) uniform quantization.
enum class Scheme { Asymmetric, Symmetric };

/// How a uniform quantizer stores its group parameters (2 bytes each either way).
/// Fp16: scale and zero rounded to nearest fp16. Bf16: stored as bf16, the scale rounded up and
/// the zero down (so that the levels still span the group), the scale at least 2^-24, and a zero
/// below 2^-20 of the scale stored as 0. Then a packed bf16 fma of scale, code and zero (one
/// rounding, to bf16) equals the float decode rounded to bf16 for codes of up to 4 bits, and the
/// GPU's remat kernel decodes two codes in three instructions, bit for bit the CPU's X̂
/// (bench/cuda/NOTES.md items 77-80). Perplexity on mha8's held-out text moves by −0.12 % to
/// +0.16 % (docs/ACCURACY.md).
enum class ParamBits { Fp16, Bf16 };

namespace quant {

/// Unquantized storage in fp32 (`Fp32`) or fp16 (`Fp16`): the reference and FP16-KV modes.
/// They behave as per-token quantizers with no parameters, so every cache and codec accepts them.
template <class Storage>
struct Float {
  static_assert(std::is_same_v<Storage, float> || std::is_same_v<Storage, std::uint16_t>,
                "xquant::quant::Float: Storage must be float (fp32) or std::uint16_t (fp16 bits)");
  static constexpr int bits = 8 * sizeof(Storage);
  static constexpr Axis axis = Axis::Token;
  static constexpr bool is_float = true;
  static constexpr int params_per_group = 0;
  static constexpr index_t code_bytes(index_t width) {
    return width * static_cast<index_t>(sizeof(Storage));
  }
  /// Exact storage of `tokens` tokens (no parameters; `group` is ignored).
  static constexpr index_t storage_bytes(index_t tokens, index_t width, index_t /*group*/ = 0) {
    return tokens * code_bytes(width);
  }
};
using Fp32 = Float<float>;
using Fp16 = Float<std::uint16_t>;

}  // namespace quant
}  // namespace xquant
