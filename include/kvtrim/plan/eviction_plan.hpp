#pragma once
//! \file eviction_plan.hpp
//! What an evictor decides and a store applies: the kept slots of every (layer, head), and
//! the compaction moves that turn the survivors into a dense prefix of the head.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/config.hpp"
#include "kvtrim/core/head_view.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! Copy slot `src` of a head into slot `dst` (K, V, position and metric travel together).
struct slot_move {
  int32_t dst;
  int32_t src;
};

//! Kept slots per (layer, head) of one sequence, each list ascending.
class eviction_plan {
 public:
  eviction_plan() = default;
  eviction_plan(int32_t layers, int32_t heads)
      : layers_(layers), heads_(heads), lengths_(static_cast<size_t>(layers) * heads, 0),
        offsets_(static_cast<size_t>(layers) * heads + 1, 0) {}

  //! Room for `kept_slots` kept slots over all heads, so set_head allocates nothing below it.
  //! A count no vector can hold reserves nothing (std::bad_alloc stays the only exception).
  void reserve(size_t kept_slots) {
    if (kept_slots <= kept_.max_size()) kept_.reserve(kept_slots);
  }

  //! Heads must be set in (layer, head) order; `kept` ascending slot indices of `length` slots.
  void set_head(int32_t l, int32_t h, int32_t length, std::span<const int32_t> kept) {
    const size_t i = index(l, h);
    lengths_[i] = length;
    kept_.insert(kept_.end(), kept.begin(), kept.end());
    offsets_[i + 1] = static_cast<int64_t>(kept_.size());
  }
  [[nodiscard]] std::span<const int32_t> kept(int32_t l, int32_t h) const noexcept {
    const size_t i = index(l, h);
    return {kept_.data() + offsets_[i], static_cast<size_t>(offsets_[i + 1] - offsets_[i])};
  }
  [[nodiscard]] int32_t length_before(int32_t l, int32_t h) const noexcept { return lengths_[index(l, h)]; }
  [[nodiscard]] int32_t kept_count(int32_t l, int32_t h) const noexcept {
    return static_cast<int32_t>(kept(l, h).size());
  }
  [[nodiscard]] int32_t layers() const noexcept { return layers_; }
  [[nodiscard]] int32_t heads() const noexcept { return heads_; }

  //! Slot metrics to store before compacting, [L][H][length_before] (accumulating metrics);
  //! empty when the plan leaves metrics as they are.
  ragged_rows metrics;

  //! Checks the plan against a store's current head lengths [L][H]: every list ascending,
  //! unique, in range, at least one token kept in a non-empty head; metrics, if any, [L][H]
  //! rows of the heads' lengths.
  [[nodiscard]] status validate(std::span<const int32_t> current_lengths) const {
    if (current_lengths.size() != lengths_.size()) return status::invalid_plan;
    if (!metrics.empty() && (metrics.layers() != layers_ || metrics.heads() != heads_)) return status::invalid_plan;
    for (int32_t l = 0; l < layers_; ++l)
      for (int32_t h = 0; h < heads_; ++h) {
        const int32_t n = lengths_[index(l, h)];
        if (n != current_lengths[index(l, h)]) return status::invalid_plan;
        const auto k = kept(l, h);
        if (n > 0 && k.empty()) return status::invalid_plan;
        for (size_t j = 0; j < k.size(); ++j) {
          if (k[j] < 0 || k[j] >= n) return status::invalid_plan;
          if (j > 0 && k[j] <= k[j - 1]) return status::invalid_plan;
        }
        if (!metrics.empty() && metrics.row(l, h).size() != static_cast<size_t>(n)) return status::invalid_plan;
      }
    return status::success;
  }

 private:
  [[nodiscard]] size_t index(int32_t l, int32_t h) const noexcept { return static_cast<size_t>(l) * heads_ + h; }
  int32_t layers_ = 0, heads_ = 0;
  std::vector<int32_t> lengths_;  // [L][H] tokens before eviction
  std::vector<int64_t> offsets_;  // [L*H + 1] into kept_
  std::vector<int32_t> kept_;     // concatenated ascending kept slots
};

//! KV-Compress's MoveCache rule: every surviving slot at or beyond the new length moves into
//! the lowest free hole below it, highest source first, so the head becomes a dense prefix of
//! `kept.size()` slots with the fewest copies (one per evicted slot below the new length).
//! No two moves share a destination or a source, so they may run in parallel.
inline void compaction_moves(int32_t length, std::span<const int32_t> kept, std::vector<slot_move>& out) {
  out.clear();
  const auto new_length = static_cast<int32_t>(kept.size());
  std::vector<int32_t> holes;  // evicted slots below new_length, ascending
  size_t j = 0;
  for (int32_t s = 0; s < new_length && s < length; ++s) {
    if (j < kept.size() && kept[j] == s) {
      ++j;
      continue;
    }
    holes.push_back(s);
  }
  // Survivors at or past new_length, taken from the tail.
  size_t hole = 0;
  for (size_t k = kept.size(); k-- > 0 && hole < holes.size();) {
    if (kept[k] < new_length) break;
    out.push_back({holes[hole++], kept[k]});
  }
}

//! The compaction moves of every head of `plan`: head (l, h)'s are moves[offsets[i],
//! offsets[i + 1]) with i = l * heads + h. A store computes them all before it moves anything,
//! so an allocation that fails (std::bad_alloc) leaves it as it was.
inline void compaction_moves(const eviction_plan& plan, std::vector<slot_move>& moves, std::vector<size_t>& offsets) {
  std::vector<slot_move> head;
  moves.clear();
  offsets.assign(static_cast<size_t>(plan.layers()) * static_cast<size_t>(plan.heads()) + 1, 0);
  for (int32_t l = 0; l < plan.layers(); ++l)
    for (int32_t h = 0; h < plan.heads(); ++h) {
      compaction_moves(plan.length_before(l, h), plan.kept(l, h), head);
      moves.insert(moves.end(), head.begin(), head.end());
      offsets[static_cast<size_t>(l) * static_cast<size_t>(plan.heads()) + static_cast<size_t>(h) + 1] = moves.size();
    }
}

KVTRIM_NAMESPACE_END
