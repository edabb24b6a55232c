#pragma once
//! \file numeric.hpp
//! The element types a cache may store K/V in: fp32, fp16 and bf16. Policies always compute
//! in fp32; the 16-bit types are storage only, so two bytes per element are all they need.
//! Conversions round to nearest, ties to even (what CUDA's __float2half_rn and
//! __float2bfloat16_rn do), and run on both sides, so the CPU and CUDA backends store the
//! same bits. Budget formulas that both backends evaluate round their products through
//! `product_rn`, so the compilers' fused multiply-adds cannot change a rounding.

#include <concepts>
#include <cstdint>
#include <cstring>

#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

//! IEEE 754 binary16 storage: 1 sign, 5 exponent, 10 mantissa bits.
struct float16 {
  uint16_t bits = 0;
  friend constexpr bool operator==(float16, float16) = default;
};

//! bfloat16 storage: the upper half of an fp32 (1 sign, 8 exponent, 7 mantissa bits).
struct bfloat16 {
  uint16_t bits = 0;
  friend constexpr bool operator==(bfloat16, bfloat16) = default;
};

static_assert(sizeof(float16) == 2 && sizeof(bfloat16) == 2);

//! The element types a kvtrim cache stores K/V in.
template <class T>
concept kv_element = std::same_as<T, float> || std::same_as<T, float16> || std::same_as<T, bfloat16>;

namespace detail {
[[nodiscard]] KVTRIM_HOST_DEVICE inline uint32_t float_bits(float x) noexcept {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
[[nodiscard]] KVTRIM_HOST_DEVICE inline float bits_float(uint32_t u) noexcept {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

//! fp32 -> binary16, round to nearest even; overflow gives infinity, NaN stays NaN (quiet).
[[nodiscard]] KVTRIM_HOST_DEVICE inline uint16_t half_from_float(float x) noexcept {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t mag = u & 0x7fffffffu;
  if (mag >= 0x7f800000u)  // infinity or NaN
    return static_cast<uint16_t>(sign | (mag > 0x7f800000u ? 0x7e00u | ((mag >> 13) & 0x3ffu) : 0x7c00u));
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (mag < 0x38800000u) {  // below 2^-14: a subnormal half, or zero
    if (mag <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 ties to zero
    const uint32_t exponent = mag >> 23;
    const uint32_t mantissa = (mag & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // value = mantissa * 2^(exponent - 150) = h * 2^-24
    uint32_t h = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (mag >> 13) - (112u << 10);  // rebias the exponent from 127 to 15
  const uint32_t rest = mag & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry may bump the exponent: still exact
  return static_cast<uint16_t>(sign | h);
}

[[nodiscard]] KVTRIM_HOST_DEVICE inline float half_to_float(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_float(sign | float_bits(magnitude));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

//! fp32 -> bfloat16, round to nearest even; NaN stays NaN (quiet).
[[nodiscard]] KVTRIM_HOST_DEVICE inline uint16_t bfloat16_from_float(float x) noexcept {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
}  // namespace detail

[[nodiscard]] KVTRIM_HOST_DEVICE inline float to_float(float x) noexcept { return x; }
[[nodiscard]] KVTRIM_HOST_DEVICE inline float to_float(float16 x) noexcept { return detail::half_to_float(x.bits); }
[[nodiscard]] KVTRIM_HOST_DEVICE inline float to_float(bfloat16 x) noexcept {
  return detail::bits_float(static_cast<uint32_t>(x.bits) << 16);
}

//! fp32 -> storage type T, round to nearest even.
template <kv_element T>
[[nodiscard]] KVTRIM_HOST_DEVICE inline T from_float(float x) noexcept {
  if constexpr (std::same_as<T, float>) {
    return x;
  } else if constexpr (std::same_as<T, float16>) {
    return float16{detail::half_from_float(x)};
  } else {
    return bfloat16{detail::bfloat16_from_float(x)};
  }
}

//! a * b rounded to the type before it meets any addition. nvcc fuses `a * b + c` into one
//! FMA by default, and GCC does on targets that have one; a fused sum can land on the other
//! side of a rounding tie (PyramidKV's real form lands on halves), so host and device would
//! keep different tokens. The references compute in Python, unfused.
template <class F>
  requires std::same_as<F, float> || std::same_as<F, double>
[[nodiscard]] KVTRIM_HOST_DEVICE inline F product_rn(F a, F b) noexcept {
#ifdef __CUDA_ARCH__
  if constexpr (std::same_as<F, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  const volatile F product = a * b;  // a value in memory cannot be fused into its user
  return product;
#endif
}

KVTRIM_NAMESPACE_END
