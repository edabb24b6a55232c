#pragma once
//! \file pyramid.hpp
//! PyramidKV (§4): lower layers keep more, upper layers less, an arithmetic sequence whose
//! mean is the uniform budget, so the total matches SnapKV at the same budget.

#include <cmath>
#include <cstdint>
#include <span>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/policy/budget/uniform.hpp"

KVTRIM_NAMESPACE_BEGIN

enum class pyramid_form : uint8_t {
  //! KVCache-Factory `PyramidKVCluster`: integer arithmetic on a token budget C; n < C keeps
  //! all, C <= n < 2(C - w) keeps C - w per head, otherwise the integer pyramid.
  integer,
  //! kvpress `PyramidKVPress`: real-valued steps on a ratio budget, rounded per layer; falls
  //! back to the uniform ratio unless n >= max >= min >= w. Always compresses.
  real
};

//! Pure formula of the integer form: candidates selected in layer `layer` of `layers`.
//! `c` the per-head budget, `w` the protected window, `n` the head length. Below the budget
//! (n < c) it returns c - w, more than the n - w candidates: the head keeps everything.
[[nodiscard]] KVTRIM_HOST_DEVICE constexpr int32_t pyramid_integer_select(int32_t layer, int32_t layers,
                                                                          int32_t c, int32_t w, int32_t n,
                                                                          int32_t beta) noexcept {
  if (n < c) return c - w;
  const int64_t cw = static_cast<int64_t>(c) - w;  // 64-bit: 2 (c - w) passes 2^31 for heads past 2^30 tokens
  if (n < 2 * cw) return c - w;
  int64_t min_num = cw / beta;
  int64_t max_num = 2 * cw - min_num;
  if (max_num >= static_cast<int64_t>(n) - w) {
    max_num = static_cast<int64_t>(n) - w;
    min_num = 2 * cw - max_num;
  }
  const int64_t step = layers > 1 ? (max_num - min_num) / (layers - 1) : 0;
  return static_cast<int32_t>(max_num - layer * step);
}

//! Pure formula of the real form: tokens kept (window included) for keep-ratio `r`. `rint`
//! rounds half to even, as Python's round() in the reference, on the host and the device
//! alike; the products are rounded before their sums, as in Python (product_rn).
[[nodiscard]] KVTRIM_HOST_DEVICE inline int32_t pyramid_real_keep(int32_t layer, int32_t layers, float r, int32_t w,
                                                                  int32_t n, int32_t beta) noexcept {
  const double c = static_cast<double>(w) + product_rn(static_cast<double>(n), static_cast<double>(r));
  const double min_num = (c - w) / beta;
  const double max_num = (c - w) * 2 - min_num;
  if (!(n >= max_num && max_num >= min_num && min_num >= w) || layers < 2)
    return static_cast<int32_t>(rint(static_cast<double>(n) * r));
  const double step = (max_num - min_num) / (layers - 1);
  return static_cast<int32_t>(rint(max_num - product_rn(static_cast<double>(layer), step)));
}

struct pyramid_budget {
  using kvc_concept = budget_allocator_tag;
  static constexpr allocation_scope scope = allocation_scope::per_layer;
  static constexpr bool needs_scores = false;

  token_budget budget = token_budget::of_tokens(512);  //!< mean per head, protected included
  int32_t beta = 20;
  pyramid_form form = pyramid_form::integer;
  //! 0: each compression sizes the pyramid from the head's current length, as the references
  //! do at prefill. > 0: the pyramid of a `context`-token prompt, frozen, of which a head keeps
  //! at most its layer's share: for caches compressed again and again while they grow (AdaKV's
  //! `pyram_mode` likewise sizes it once, at the first prefill).
  int32_t context = 0;

  [[nodiscard]] status validate(const attention_shape& shape, const protected_set& protect) const noexcept {
    if (const status s = shape.validate(); s != status::success) return s;
    if (const status s = budget.validate(); s != status::success) return s;
    if (beta < 1 || context < 0) return status::invalid_argument;
    if (form == pyramid_form::integer && budget.kind != token_budget::unit::tokens) return status::invalid_budget;
    if (form == pyramid_form::real && budget.kind != token_budget::unit::ratio) return status::invalid_budget;
    if (budget.kind == token_budget::unit::tokens && budget.tokens < protect.size())
      return status::budget_below_protected;
    return status::success;
  }

  //! Candidates a head of `length` tokens, `protected_count` of them protected, selects in
  //! `layer`, before clipping to what it has. The device backend calls it too.
  [[nodiscard]] KVTRIM_HOST_DEVICE int32_t nominal_select(int32_t layer, int32_t layers, int32_t length,
                                                          int32_t protected_count) const noexcept {
    const int32_t n = context > 0 ? context : length;
    int32_t keep;  // tokens kept, protected included
    if (form == pyramid_form::integer) {
      keep = pyramid_integer_select(layer, layers, budget.tokens, protected_count, n, beta) + protected_count;
    } else {
      keep = pyramid_real_keep(layer, layers, budget.ratio, protected_count, n, beta);
      keep = keep < 1 ? 1 : keep;
    }
    if (context > 0 && keep > length) keep = length;  // the frozen pyramid caps, never adds
    // The real form may keep fewer than the protected tokens; those are kept all the same.
    return keep > protected_count ? keep - protected_count : 0;
  }

  [[nodiscard]] status allocate(const candidate_table& table, const allocation_context& ctx,
                                std::span<int32_t> select) const {
    return detail::allocate_nominal(*this, table, ctx, select);
  }
};
static_assert(budget_allocator<pyramid_budget>);

KVTRIM_NAMESPACE_END
