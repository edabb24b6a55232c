#pragma once
//! \file positional.hpp
//! Score-free recency (StreamingLLM §1): a token's score is its position, so after the sinks
//! the most recent tokens are kept.

#include <cstdint>
#include <span>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

struct positional {
  using kvc_concept = importance_metric_tag;
  static constexpr bool accumulates = false;
  //! Positions say nothing about how much one head needs compared with another.
  static constexpr score_scope scope = score_scope::within_head;

  //! Select per query head (compatibility with references that repeat K/V first); the kept
  //! set is the same for every head either way.
  bool per_query_head = false;

  [[nodiscard]] decode_accumulation decode() const noexcept { return decode_accumulation::none; }
  [[nodiscard]] status validate(const attention_shape& shape, const protected_set& protect) const noexcept {
    if (const status s = shape.validate(); s != status::success) return s;
    return protect.validate();
  }
  [[nodiscard]] int32_t stored_heads(const attention_shape& shape) const noexcept {
    return per_query_head ? shape.q_heads : shape.kv_heads;
  }
  [[nodiscard]] status score(const layer_view& layer, const protected_set&,
                             std::span<const std::span<float>> out) const {
    if (layer.heads.size() != out.size() || static_cast<int32_t>(out.size()) != stored_heads(layer.shape))
      return status::shape_mismatch;
    for (size_t h = 0; h < out.size(); ++h) {
      const auto positions = layer.heads[h].positions;
      if (out[h].size() != positions.size()) return status::shape_mismatch;
      for (size_t j = 0; j < positions.size(); ++j) out[h][j] = static_cast<float>(positions[j]);
    }
    return status::success;
  }
};
static_assert(importance_metric<positional>);

KVTRIM_NAMESPACE_END
