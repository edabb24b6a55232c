#pragma once
//! \file tie_break.hpp
//! The one ranking rule every evictor, allocator and backend uses.
//!
//! Tokens are ranked by score, higher first; on equal scores the LOWER position ranks first
//! (is kept first); equal positions (never produced by a cache) fall back to the lower slot.
//! Max pooling makes most top-k cuts fall inside plateaus of equal scores, so this rule, not
//! an accident of a sort implementation, decides which tied tokens survive; the CUDA backend
//! applies the same rule so both backends keep the same set.

#include <cstdint>

#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

//! A token that may be evicted, with the score it is ranked by.
struct ranked_token {
  float score;
  int32_t position;
  int32_t slot;
};

//! True when `a` ranks before (is kept before) `b`. Scores must be finite or +inf.
[[nodiscard]] KVTRIM_HOST_DEVICE constexpr bool ranks_before(const ranked_token& a,
                                                             const ranked_token& b) noexcept {
  if (a.score != b.score) return a.score > b.score;
  if (a.position != b.position) return a.position < b.position;
  return a.slot < b.slot;
}

KVTRIM_NAMESPACE_END
