#pragma once
//! \file topk_keep.hpp
//! Per-head top-k with protected tokens (every reference's selection step): each head keeps
//! its protected slots plus its `select` best-ranked candidates (plan/tie_break.hpp).

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

namespace detail {
//! Writes, for every head, its protected slots plus its first `kept(c, select)` ranked
//! candidates (ascending) into `out`; `select` [L][H] as the allocator decided.
template <class KeptCount>
[[nodiscard]] status plan_heads(const candidate_table& table, std::span<const int32_t> select, eviction_plan& out,
                                KeptCount kept_count) {
  if (select.size() != static_cast<size_t>(table.layers()) * table.heads()) return status::shape_mismatch;
  eviction_plan result(table.layers(), table.heads());
  std::vector<int32_t> kept;
  for (int32_t l = 0; l < table.layers(); ++l)
    for (int32_t h = 0; h < table.heads(); ++h) {
      const head_candidates& c = table.at(l, h);
      const int32_t count = select[static_cast<size_t>(l) * table.heads() + h];
      if (count < 0 || count > static_cast<int32_t>(c.ranked.size())) return status::invalid_argument;
      if (c.length > 0 && count + static_cast<int32_t>(c.protected_slots.size()) == 0) return status::invalid_plan;
      kept.assign(c.protected_slots.begin(), c.protected_slots.end());
      const int32_t best = kept_count(c, count);
      for (int32_t j = 0; j < best; ++j) kept.push_back(c.ranked[static_cast<size_t>(j)].slot);
      std::sort(kept.begin(), kept.end());
      result.set_head(l, h, c.length, kept);
    }
  out = std::move(result);
  return status::success;
}
}  // namespace detail

struct topk_evictor {
  using kvc_concept = evictor_tag;
  static constexpr eviction_granularity granularity = eviction_granularity::token;

  [[nodiscard]] status validate() const noexcept { return status::success; }

  [[nodiscard]] status plan(const candidate_table& table, std::span<const int32_t> select, eviction_plan& out) const {
    return detail::plan_heads(table, select, out, [](const head_candidates&, int32_t count) { return count; });
  }
};
static_assert(evictor<topk_evictor>);

//! Block-granular eviction for paged caches (KV-Compress MoveCache): each head's kept count is
//! rounded UP to a whole number of blocks, so the survivors compact into full blocks and
//! every evicted token frees memory. A head never keeps fewer tokens than it was allocated.
struct block_evictor {
  using kvc_concept = evictor_tag;
  static constexpr eviction_granularity granularity = eviction_granularity::block;

  int32_t block_size = 16;

  [[nodiscard]] status validate() const noexcept {
    return block_size >= 1 ? status::success : status::invalid_argument;
  }

  [[nodiscard]] status plan(const candidate_table& table, std::span<const int32_t> select, eviction_plan& out) const {
    if (const status s = validate(); s != status::success) return s;
    return detail::plan_heads(table, select, out, [bs = block_size](const head_candidates& c, int32_t count) {
      // 64-bit: a block size near 2^31 must round up, not overflow.
      const auto protected_count = static_cast<int64_t>(c.protected_slots.size());
      const int64_t whole = (count + protected_count + bs - 1) / bs * bs;
      return static_cast<int32_t>(
          std::min<int64_t>(static_cast<int64_t>(c.ranked.size()), std::max<int64_t>(count, whole - protected_count)));
    });
  }
};
static_assert(evictor<block_evictor>);

KVTRIM_NAMESPACE_END
