#pragma once
//! \file shape.hpp
//! The attention shape every part agrees on, and the token budget type.

#include <cmath>
#include <cstdint>

#include "kvtrim/config.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! Model-side shape of one sequence's cache: L layers, Hq query heads, Hkv KV heads, head dim d.
struct attention_shape {
  int32_t layers = 0;
  int32_t q_heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;

  //! G = Hq / Hkv, the query heads that share one KV head.
  [[nodiscard]] constexpr int32_t group() const noexcept { return kv_heads > 0 ? q_heads / kv_heads : 0; }

  [[nodiscard]] constexpr status validate() const noexcept {
    if (layers <= 0 || head_dim <= 0) return status::invalid_argument;
    if (kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0) return status::invalid_group;
    return status::success;
  }
  friend constexpr bool operator==(const attention_shape&, const attention_shape&) = default;
};

//! A per-(layer, head) budget: a count of tokens, or the fraction of a head's tokens to keep.
//! Either way it includes the protected tokens (sinks and recent window), as in SnapKV's `C`.
struct token_budget {
  enum class unit : uint8_t { tokens, ratio };
  unit kind = unit::tokens;
  int32_t tokens = 0;
  float ratio = 0.f;

  [[nodiscard]] static constexpr token_budget of_tokens(int32_t t) noexcept { return {unit::tokens, t, 0.f}; }
  //! `kept` is the fraction of tokens kept (kvpress's `1 - compression_ratio`).
  [[nodiscard]] static constexpr token_budget of_ratio(float kept) noexcept { return {unit::ratio, 0, kept}; }

  [[nodiscard]] constexpr status validate() const noexcept {
    if (kind == unit::tokens) return tokens >= 1 ? status::success : status::invalid_budget;
    return (ratio > 0.f && ratio <= 1.f) ? status::success : status::invalid_budget;
  }
  //! Tokens for a head of n tokens: a ratio keeps `int(n * ratio)`, at least one (kvpress #264).
  [[nodiscard]] KVTRIM_HOST_DEVICE constexpr int32_t resolve(int32_t n) const noexcept {
    if (kind == unit::tokens) return tokens;
    const auto t = static_cast<int32_t>(static_cast<double>(n) * ratio);
    return t < 1 ? 1 : t;
  }
};

//! The largest position a store accepts: "one past the newest position" (the end of the recent
//! window) must still be an int32, so positions are in [0, 2^31 - 2].
inline constexpr int32_t max_position = 2147483646;

//! Tokens every evictor keeps regardless of score: the first `sinks` positions (StreamingLLM's
//! attention sinks) and the `recent` most recent positions (SnapKV's observation window,
//! H2O's recent budget, KV-Compress's protected window).
struct protected_set {
  int32_t sinks = 0;
  int32_t recent = 0;

  [[nodiscard]] constexpr status validate() const noexcept {
    return (sinks >= 0 && recent >= 0) ? status::success : status::invalid_argument;
  }
  //! sinks + recent, in 64 bits (both may be up to 2^31 - 1).
  [[nodiscard]] constexpr int64_t size() const noexcept { return static_cast<int64_t>(sinks) + recent; }
  //! `next_position` is one past the newest cached position of the head.
  [[nodiscard]] KVTRIM_HOST_DEVICE constexpr bool contains(int32_t position,
                                                          int32_t next_position) const noexcept {
    return position < sinks || position >= next_position - recent;
  }
};

KVTRIM_NAMESPACE_END
