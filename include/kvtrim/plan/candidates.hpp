#pragma once
//! \file candidates.hpp
//! Per (layer, head): which slots are protected and the rest ranked by the tie-break rule.
//! Allocators read the ranked scores; evictors keep the protected slots plus a prefix of the
//! ranking.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/config.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/plan/tie_break.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

struct head_candidates {
  int32_t length = 0;                     //!< tokens in the head before eviction
  int32_t next_position = 0;              //!< one past the newest position of the head
  std::vector<int32_t> protected_slots;   //!< always kept
  std::vector<ranked_token> ranked;       //!< evictable tokens, best first (ranks_before)
};

//! The fewest ranked candidates head `c` may keep: one when it has tokens but no protected
//! slot (every head keeps at least one token, design.md), otherwise none. Allocators clamp
//! their counts to [min_candidates(c), c.ranked.size()].
[[nodiscard]] inline int32_t min_candidates(const head_candidates& c) noexcept {
  return c.protected_slots.empty() && !c.ranked.empty() ? 1 : 0;
}

//! [L][H] of head_candidates.
class candidate_table {
 public:
  candidate_table() = default;
  candidate_table(int32_t layers, int32_t heads)
      : layers_(layers), heads_(heads), heads_data_(static_cast<size_t>(layers) * heads) {}

  [[nodiscard]] head_candidates& at(int32_t l, int32_t h) noexcept { return heads_data_[index(l, h)]; }
  [[nodiscard]] const head_candidates& at(int32_t l, int32_t h) const noexcept { return heads_data_[index(l, h)]; }
  [[nodiscard]] int32_t layers() const noexcept { return layers_; }
  [[nodiscard]] int32_t heads() const noexcept { return heads_; }

 private:
  [[nodiscard]] size_t index(int32_t l, int32_t h) const noexcept { return static_cast<size_t>(l) * heads_ + h; }
  int32_t layers_ = 0, heads_ = 0;
  std::vector<head_candidates> heads_data_;
};

//! Splits one head into protected slots and ranked candidates.
//! `scores` [n] in slot order; `positions` [n], each at most max_position (invalid_argument
//! otherwise). Fails on NaN or -inf scores of candidates.
[[nodiscard]] inline status rank_head(std::span<const float> scores, std::span<const int32_t> positions,
                                      const protected_set& protect, head_candidates& out) {
  if (scores.size() != positions.size()) return status::shape_mismatch;
  int32_t next = 0;
  for (const int32_t p : positions) {
    if (p > max_position) return status::invalid_argument;  // p + 1 must be an int32
    next = std::max(next, p + 1);
  }
  head_candidates result;
  result.length = static_cast<int32_t>(positions.size());
  result.next_position = next;
  for (int32_t s = 0; s < result.length; ++s) {
    const int32_t p = positions[static_cast<size_t>(s)];
    if (protect.contains(p, next)) {
      result.protected_slots.push_back(s);
      continue;
    }
    const float v = scores[static_cast<size_t>(s)];
    if (std::isnan(v) || v == -INFINITY) return status::non_finite_input;
    result.ranked.push_back({v, p, s});
  }
  std::sort(result.ranked.begin(), result.ranked.end(), ranks_before);
  out = std::move(result);
  return status::success;
}

KVTRIM_NAMESPACE_END
