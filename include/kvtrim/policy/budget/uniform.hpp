#pragma once
//! \file uniform.hpp
//! The same budget for every head of every layer (SnapKV §3, H2O §2, StreamingLLM §1).

#include <algorithm>
#include <cstdint>
#include <span>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

namespace detail {
//! Every head keeps `a.nominal_select(...)` candidates, clipped to what it has: the allocation
//! of the budgets that need no scores (uniform, pyramid).
template <class A>
[[nodiscard]] status allocate_nominal(const A& a, const candidate_table& table, const allocation_context& ctx,
                                      std::span<int32_t> select) {
  if (select.size() != static_cast<size_t>(table.layers()) * table.heads()) return status::shape_mismatch;
  for (int32_t l = 0; l < table.layers(); ++l)
    for (int32_t h = 0; h < table.heads(); ++h) {
      const head_candidates& c = table.at(l, h);
      const int32_t nominal = a.nominal_select(ctx.first_layer + l, ctx.total_layers, c.length,
                                               static_cast<int32_t>(c.protected_slots.size()));
      select[static_cast<size_t>(l) * table.heads() + h] =
          std::clamp(nominal, min_candidates(c), static_cast<int32_t>(c.ranked.size()));
    }
  return status::success;
}
}  // namespace detail

struct uniform_budget {
  using kvc_concept = budget_allocator_tag;
  static constexpr allocation_scope scope = allocation_scope::per_layer;
  static constexpr bool needs_scores = false;

  token_budget budget = token_budget::of_tokens(2048);  //!< per head, protected tokens included

  [[nodiscard]] status validate(const attention_shape& shape, const protected_set& protect) const noexcept {
    if (const status s = shape.validate(); s != status::success) return s;
    if (const status s = budget.validate(); s != status::success) return s;
    if (budget.kind == token_budget::unit::tokens && budget.tokens < protect.size())
      return status::budget_below_protected;
    return status::success;
  }

  //! Candidates a head of `length` tokens, `protected_count` of them protected, should keep,
  //! before clipping to what it has (C - w: a head no longer than C keeps everything). The
  //! device backend calls it too.
  [[nodiscard]] KVTRIM_HOST_DEVICE int32_t nominal_select(int32_t, int32_t, int32_t length,
                                                          int32_t protected_count) const noexcept {
    const int32_t select = budget.resolve(length) - protected_count;
    return select > 0 ? select : 0;
  }

  [[nodiscard]] status allocate(const candidate_table& table, const allocation_context& ctx,
                                std::span<int32_t> select) const {
    return detail::allocate_nominal(*this, table, ctx, select);
  }
};
static_assert(budget_allocator<uniform_budget>);

KVTRIM_NAMESPACE_END
