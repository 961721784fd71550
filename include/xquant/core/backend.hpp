#pragma once
// Backend tags. A backend decides how the loops of an operation run; the math (quantizer
// policies, RoPE convention) is shared. Every backend is tested against backend::Reference.

namespace xquant::backend {

/// Plain scalar loops, written for clarity: the reference every optimized path is compared to.
struct Reference {};
/// Eigen 3.4 on the CPU: vectorized quantization and Eigen's GEMM for rematerialization.
struct Eigen {};

template <class B>
inline constexpr bool is_cpu_backend = false;
template <>
inline constexpr bool is_cpu_backend<Reference> = true;
template <>
inline constexpr bool is_cpu_backend<Eigen> = true;

}  // namespace xquant::backend

namespace xquant::detail {
template <class...>
inline constexpr bool always_false = false;
}
