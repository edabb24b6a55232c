#pragma once
//! \file adaptive.hpp
//! Ada-KV (§5): inside each layer the heads share their total budget by score: a global
//! top-k over all heads' candidates decides how many each head earns, and a safeguard
//! keeps at least `alpha` of the base budget in every head.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/policy/budget/pyramid.hpp"
#include "kvtrim/policy/budget/uniform.hpp"

KVTRIM_NAMESPACE_BEGIN

//! A per-layer allocator whose nominal count can serve as Ada-KV's base budget.
template <class A>
concept base_budget = budget_allocator<A> && A::scope == allocation_scope::per_layer &&
                      requires(const A& a, int32_t i) {
                        { a.nominal_select(i, i, i, i) } -> std::convertible_to<int32_t>;
                      };

//! Ada-KV's safeguard: b = round(n_h (1 - alpha) + int(base * alpha)) in float32, rounding
//! half to even, exactly as the reference (so the heads' sum may miss H * base by a few).
//! The device backend calls it too.
[[nodiscard]] KVTRIM_HOST_DEVICE inline int32_t adaptive_safeguard(int32_t earned, int32_t base, float alpha) noexcept {
  const auto floor_capacity = static_cast<int32_t>(product_rn(static_cast<float>(base), alpha));
  const float b = product_rn(static_cast<float>(earned), 1.f - alpha) + static_cast<float>(floor_capacity);
  return static_cast<int32_t>(rintf(b));
}

//! `Base` gives each layer's base budget: uniform_budget (Ada-SnapKV) or pyramid_budget
//! (Ada-PyramidKV).
template <base_budget Base = uniform_budget>
struct adaptive_budget {
  using kvc_concept = budget_allocator_tag;
  static constexpr allocation_scope scope = allocation_scope::per_layer;
  static constexpr bool needs_scores = true;

  Base base{};
  float alpha = 0.2f;      //!< safeguard: every head keeps at least int(alpha * base)
  bool normalize = false;  //!< KVCache-Factory's init_adakv turns it on; FFY0/AdaKV leaves it off
  int32_t skip_layers = 0; //!< layers below this index use the uniform base budget

  [[nodiscard]] status validate(const attention_shape& shape, const protected_set& protect) const noexcept {
    if (const status s = base.validate(shape, protect); s != status::success) return s;
    if (!(alpha >= 0.f && alpha <= 1.f) || skip_layers < 0) return status::invalid_argument;
    return status::success;
  }

  [[nodiscard]] status allocate(const candidate_table& table, const allocation_context& ctx,
                                std::span<int32_t> select) const {
    if (select.size() != static_cast<size_t>(table.layers()) * table.heads()) return status::shape_mismatch;
    for (int32_t l = 0; l < table.layers(); ++l) {
      const status s = allocate_layer(table, l, ctx, select.subspan(static_cast<size_t>(l) * table.heads(),
                                                                     static_cast<size_t>(table.heads())));
      if (s != status::success) return s;
    }
    return status::success;
  }

 private:
  struct entry {
    float score;
    int32_t head;
    int32_t rank;
  };

  [[nodiscard]] status allocate_layer(const candidate_table& table, int32_t l, const allocation_context& ctx,
                                      std::span<int32_t> select) const {
    const int32_t heads = table.heads();
    const int32_t layer = ctx.first_layer + l;
    std::vector<int32_t> bases(static_cast<size_t>(heads));
    int64_t total = 0, candidates = 0;
    for (int32_t h = 0; h < heads; ++h) {
      const head_candidates& c = table.at(l, h);
      bases[static_cast<size_t>(h)] =
          base.nominal_select(layer, ctx.total_layers, c.length, static_cast<int32_t>(c.protected_slots.size()));
      total += bases[static_cast<size_t>(h)];
      candidates += static_cast<int64_t>(c.ranked.size());
    }
    // The reference compresses a layer only if the base fits the candidates (base <= n - w),
    // its heads all holding the prompt. Heads compressed before hold different counts: the
    // layer compresses when the bases together fit, so a head below its base still shares the
    // layer's total by score instead of sending the layer back to uniform budgets.
    const bool compress = total <= candidates;
    if (!compress || layer < skip_layers) {
      for (int32_t h = 0; h < heads; ++h)
        select[static_cast<size_t>(h)] = std::clamp(bases[static_cast<size_t>(h)], min_candidates(table.at(l, h)),
                                                    static_cast<int32_t>(table.at(l, h).ranked.size()));
      return status::success;
    }
    std::vector<entry> all;
    for (int32_t h = 0; h < heads; ++h) {
      const auto& ranked = table.at(l, h).ranked;
      const int32_t b = bases[static_cast<size_t>(h)];
      float factor = 1.f;
      if (normalize) {  // head's sorted scores times sum(top base) / sum(all), in float32
        double top = 0.0, sum = 0.0;
        for (size_t j = 0; j < ranked.size(); ++j) {
          sum += ranked[j].score;
          if (j < static_cast<size_t>(b)) top += ranked[j].score;
        }
        factor = sum > 0.0 ? static_cast<float>(top / sum) : 1.f;
      }
      for (size_t j = 0; j < ranked.size(); ++j)
        all.push_back({ranked[j].score * factor, h, static_cast<int32_t>(j)});
    }
    // Global top-`total`; ties across heads go to the lower head, then the better rank.
    const auto better = [](const entry& a, const entry& b) {
      if (a.score != b.score) return a.score > b.score;
      if (a.head != b.head) return a.head < b.head;
      return a.rank < b.rank;
    };
    // Clamped: an engine's base may size a layer below zero.
    const auto cut = all.begin() + std::clamp<int64_t>(total, 0, static_cast<int64_t>(all.size()));
    std::nth_element(all.begin(), cut == all.begin() ? cut : cut - 1, all.end(), better);
    std::vector<int32_t> earned(static_cast<size_t>(heads), 0);
    for (auto it = all.begin(); it != cut; ++it) ++earned[static_cast<size_t>(it->head)];
    for (int32_t h = 0; h < heads; ++h)
      select[static_cast<size_t>(h)] = std::clamp(
          adaptive_safeguard(earned[static_cast<size_t>(h)], bases[static_cast<size_t>(h)], alpha),
          min_candidates(table.at(l, h)), static_cast<int32_t>(table.at(l, h).ranked.size()));
    return status::success;
  }
};
static_assert(budget_allocator<adaptive_budget<uniform_budget>>);
static_assert(budget_allocator<adaptive_budget<pyramid_budget>>);

KVTRIM_NAMESPACE_END
