// The fp16 and bf16 storage types: round to nearest even, exact round trips, special values.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "kvtrim/core/numeric.hpp"

using namespace kvtrim;

namespace {
uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

//! True when `r` is the nearest representable value to x among its neighbours r_down and
//! r_up, and an exact tie went to the one with the even mantissa.
bool nearest_even(double x, double r, double other, bool r_is_even) {
  const double dr = std::abs(x - r), dother = std::abs(x - other);
  return dr < dother || (dr == dother && r_is_even);
}
}  // namespace

TEST_CASE("every fp16 value survives a trip through fp32", "[cpu][cache][numeric]") {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float16 x{static_cast<uint16_t>(h)};
    const float f = to_float(x);
    if (std::isnan(f)) {
      CHECK(std::isnan(to_float(from_float<float16>(f))));
      continue;
    }
    CAPTURE(h);
    REQUIRE(from_float<float16>(f).bits == h);
  }
}

TEST_CASE("every bf16 value survives a trip through fp32", "[cpu][cache][numeric]") {
  for (uint32_t h = 0; h < 65536; ++h) {
    const bfloat16 x{static_cast<uint16_t>(h)};
    const float f = to_float(x);
    CAPTURE(h);
    REQUIRE(bits(f) == h << 16);
    if (!std::isnan(f)) REQUIRE(from_float<bfloat16>(f).bits == h);
  }
}

TEST_CASE("fp32 to fp16 rounds to nearest, ties to even", "[cpu][cache][numeric]") {
  // Known values: max finite, the overflow threshold, the smallest subnormal, the halfway case to zero.
  CHECK(from_float<float16>(65504.f).bits == 0x7bff);
  CHECK(from_float<float16>(65519.99f).bits == 0x7bff);
  CHECK(from_float<float16>(65520.f).bits == 0x7c00);
  CHECK(from_float<float16>(-1e9f).bits == 0xfc00);
  CHECK(from_float<float16>(std::ldexp(1.f, -24)).bits == 0x0001);
  CHECK(from_float<float16>(std::ldexp(1.f, -25)).bits == 0x0000);                    // tie to even: 0
  CHECK(from_float<float16>(std::ldexp(1.5f, -25)).bits == 0x0001);
  CHECK(from_float<float16>(std::ldexp(3.f, -25)).bits == 0x0002);                    // 1.5 ulp: tie to even 2
  CHECK(from_float<float16>(1.f + std::ldexp(1.f, -11)).bits == 0x3c00);             // tie: stays at even 1.0
  CHECK(from_float<float16>(1.f + 3 * std::ldexp(1.f, -11)).bits == 0x3c02);         // tie: up to even
  CHECK(from_float<float16>(-0.f).bits == 0x8000);
  CHECK(from_float<float16>(std::numeric_limits<float>::infinity()).bits == 0x7c00);
  CHECK((from_float<float16>(std::numeric_limits<float>::quiet_NaN()).bits & 0x7e00) == 0x7e00);

  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> any;
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    // Finite floats across the fp16 range and beyond: exponents of 2^-30 .. 2^17.
    uint32_t u = any(rng);
    u = (u & 0x807fffffu) | ((97u + (u >> 23) % 48u) << 23);
    const float f = from_bits(u);
    const float16 r = from_float<float16>(f);
    const float rf = to_float(r);
    CAPTURE(f, r.bits);
    if (std::isinf(rf)) {
      REQUIRE(std::abs(f) >= 65520.f);
      continue;
    }
    // Neighbour on the other side of f.
    const bool above = std::abs(static_cast<double>(rf)) > std::abs(static_cast<double>(f));
    const uint16_t magnitude = r.bits & 0x7fff;
    const uint16_t other_mag = static_cast<uint16_t>(above ? magnitude - 1 : magnitude + 1);
    const float other = to_float(float16{static_cast<uint16_t>((r.bits & 0x8000) | other_mag)});
    if (rf != f) REQUIRE(nearest_even(f, rf, other, (r.bits & 1) == 0));
    ++checked;
  }
  CHECK(checked > 100000);
}

TEST_CASE("fp32 to bf16 rounds to nearest, ties to even", "[cpu][cache][numeric]") {
  CHECK(from_float<bfloat16>(1.f).bits == 0x3f80);
  CHECK(from_float<bfloat16>(from_bits(0x3f808000u)).bits == 0x3f80);  // tie: stays even
  CHECK(from_float<bfloat16>(from_bits(0x3f818000u)).bits == 0x3f82);  // tie: up to even
  CHECK(from_float<bfloat16>(from_bits(0x3f808001u)).bits == 0x3f81);
  CHECK(from_float<bfloat16>(from_bits(0x7f7fffffu)).bits == 0x7f80);  // max float rounds to infinity
  CHECK((from_float<bfloat16>(std::numeric_limits<float>::quiet_NaN()).bits & 0x7fc0) == 0x7fc0);
  CHECK((from_float<bfloat16>(from_bits(0x7f800001u)).bits & 0x7f80) == 0x7f80);  // a NaN never becomes infinity
  CHECK(from_float<bfloat16>(from_bits(0x7f800001u)).bits != 0x7f80);

  std::mt19937 rng(2);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 200000; ++i) {
    const uint32_t u = any(rng) & 0xfeffffffu;  // finite (exponent < 255)
    const float f = from_bits(u);
    const bfloat16 r = from_float<bfloat16>(f);
    const uint32_t down = u & 0xffff0000u;
    const float lo = from_bits(down), hi = from_bits(down + 0x10000u);
    const float rf = to_float(r);
    CAPTURE(u, r.bits);
    REQUIRE((rf == lo || rf == hi || std::isinf(rf)));
    if (!std::isinf(rf) && !std::isinf(hi))
      REQUIRE(nearest_even(f, rf, rf == lo ? hi : lo, (r.bits & 1) == 0));
  }
}
