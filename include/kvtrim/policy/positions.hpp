#pragma once
//! \file positions.hpp
//! What happens to positions after eviction (StreamingLLM §1; kvpress KeyRerotationPress).
//! Keys are cached after RoPE, so keeping original positions needs nothing; re-rotation
//! turns each kept key to the slot it now occupies in position order.

#include <cmath>
#include <cstdint>
#include <span>

#include "kvtrim/config.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

enum class position_mode : uint8_t {
  keep_original,  //!< default: what every evaluation harness of the references does
  rerotate        //!< rotate kept keys to positions 0..kept-1; later queries use the compressed length
};

//! Which dimensions RoPE pairs.
enum class rope_pairing : uint8_t {
  interleaved,  //!< (x[2i], x[2i+1]): llama2.c, the original Llama
  rotate_half   //!< (x[i], x[i + d/2]): Hugging Face
};

struct rope_config {
  float theta = 10000.f;
  rope_pairing pairing = rope_pairing::rotate_half;

  [[nodiscard]] status validate(int32_t head_dim) const noexcept {
    if (!(theta > 0.f) || !std::isfinite(theta) || head_dim % 2 != 0) return status::invalid_argument;
    return status::success;
  }
};

//! Rotates one post-RoPE key [d] by `delta` positions (negative moves it back), in fp32 as
//! kvpress does: pair i turns by delta * theta^(-2i/d).
KVTRIM_HOST_DEVICE inline void rotate_key(float* key, int32_t head_dim, int32_t delta, const rope_config& rope) noexcept {
  const int32_t pairs = head_dim / 2;
  for (int32_t i = 0; i < pairs; ++i) {
    const double inv_freq = std::pow(static_cast<double>(rope.theta), -2.0 * i / head_dim);
    const double angle = static_cast<double>(delta) * inv_freq;
    const auto c = static_cast<float>(std::cos(angle));
    const auto s = static_cast<float>(std::sin(angle));
    const int32_t a = rope.pairing == rope_pairing::interleaved ? 2 * i : i;
    const int32_t b = rope.pairing == rope_pairing::interleaved ? 2 * i + 1 : i + pairs;
    const float x = key[a], y = key[b];
    key[a] = x * c - y * s;
    key[b] = x * s + y * c;
  }
}

KVTRIM_NAMESPACE_END
