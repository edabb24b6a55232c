#pragma once
//! \file global_blocks.hpp
//! KV-Compress (§6): one budget for the whole sequence, spent across all layers and KV heads
//! in whole blocks. Each head's candidate blocks are priced by the "block metric" (the
//! largest metric the eviction of that many blocks would remove) and the cheapest blocks of
//! the sequence are evicted first.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/blocks.hpp"

KVTRIM_NAMESPACE_BEGIN

struct global_block_budget {
  using kvc_concept = budget_allocator_tag;
  static constexpr allocation_scope scope = allocation_scope::global;
  static constexpr bool needs_scores = true;

  //! Tokens: KV-Compress `max_cache_tokens` M, the mean per (layer, head), rounded up to the
  //! block size. Ratio: `target_compression_rate`, the fraction of unprotected tokens kept.
  token_budget budget = token_budget::of_tokens(128);
  int32_t block_size = 16;
  //! Ratio mode counts tokens already sampled but not cached (the reference compresses one
  //! step after prefill, with the first generated token pending).
  int32_t pending_tokens = 1;

  [[nodiscard]] status validate(const attention_shape& shape, const protected_set& protect) const noexcept {
    if (const status s = shape.validate(); s != status::success) return s;
    if (const status s = protect.validate(); s != status::success) return s;
    if (const status s = budget.validate(); s != status::success) return s;
    if (block_size < 1 || pending_tokens < 0) return status::invalid_argument;
    // A head never gives up its protected tokens, so a mean budget (in whole blocks) below
    // them can never be met.
    if (budget.kind == token_budget::unit::tokens &&
        (static_cast<int64_t>(budget.tokens) + block_size - 1) / block_size * block_size < protect.size())
      return status::budget_below_protected;
    return status::success;
  }

  //! Blocks the whole sequence must give back (`_schedule_seq_evictions`).
  [[nodiscard]] int64_t blocks_to_evict(const candidate_table& table, const protected_set& protect) const {
    int64_t blocks = 0, tokens = 0;
    int32_t next = 0;
    for (int32_t l = 0; l < table.layers(); ++l)
      for (int32_t h = 0; h < table.heads(); ++h) {
        const head_candidates& c = table.at(l, h);
        blocks += blocks_for(c.length, block_size);
        tokens += c.length;
        next = std::max(next, c.next_position);
      }
    const int64_t heads = static_cast<int64_t>(table.layers()) * table.heads();
    if (budget.kind == token_budget::unit::tokens) {
      const int64_t m = (static_cast<int64_t>(budget.tokens) + block_size - 1) / block_size * block_size;
      return std::max<int64_t>(0, blocks - (m * heads + block_size - 1) / block_size);
    }
    const int64_t window = static_cast<int64_t>(protect.recent) + pending_tokens;
    const int64_t prot = (window + block_size - 1) / block_size * block_size;
    const int64_t seq_len = static_cast<int64_t>(next) + pending_tokens;
    const auto target = static_cast<int64_t>(std::ceil(static_cast<double>(seq_len - prot) * static_cast<double>(heads) *
                                                       static_cast<double>(budget.ratio))) + prot * heads;
    const int64_t excess = tokens - target;
    return excess > 0 ? (excess + block_size - 1) / block_size : 0;
  }

  [[nodiscard]] status allocate(const candidate_table& table, const allocation_context& ctx,
                                std::span<int32_t> select) const {
    if (select.size() != static_cast<size_t>(table.layers()) * table.heads()) return status::shape_mismatch;
    struct block {
      float metric;
      int32_t head;   // l * H + h
      int32_t index;  // k-th block evicted from that head
    };
    std::vector<block> blocks;
    for (int32_t l = 0; l < table.layers(); ++l)
      for (int32_t h = 0; h < table.heads(); ++h) {
        const head_candidates& c = table.at(l, h);
        const int32_t hanging = hanging_tokens(c.length, block_size);
        const auto evictable = static_cast<int32_t>(c.ranked.size());
        // A head without protected tokens keeps at least one.
        const int32_t limit = c.protected_slots.empty() ? evictable - 1 : evictable;
        // Evicting k + 1 blocks removes the `k * bs + hanging` lowest-ranked candidates;
        // its price is the best of them (ranked is best-first, so count from the back).
        for (int32_t k = 0; static_cast<int64_t>(k) * block_size + hanging <= limit; ++k) {
          const int32_t removed = k * block_size + hanging;
          blocks.push_back({c.ranked[static_cast<size_t>(evictable - removed)].score, l * table.heads() + h, k});
        }
      }
    const int64_t wanted = std::min<int64_t>(blocks_to_evict(table, ctx.protect), static_cast<int64_t>(blocks.size()));
    // Cheapest first; ties go to the lower (layer, head), then the earlier block, so each
    // head's evicted blocks stay a prefix of its own order.
    const auto cheaper = [](const block& a, const block& b) {
      if (a.metric != b.metric) return a.metric < b.metric;
      if (a.head != b.head) return a.head < b.head;
      return a.index < b.index;
    };
    std::vector<int32_t> evicted_blocks(select.size(), 0);
    if (wanted > 0) {
      std::nth_element(blocks.begin(), blocks.begin() + (wanted - 1), blocks.end(), cheaper);
      for (int64_t i = 0; i < wanted; ++i) ++evicted_blocks[static_cast<size_t>(blocks[static_cast<size_t>(i)].head)];
    }
    for (int32_t l = 0; l < table.layers(); ++l)
      for (int32_t h = 0; h < table.heads(); ++h) {
        const size_t i = static_cast<size_t>(l) * table.heads() + h;
        const head_candidates& c = table.at(l, h);
        const int32_t b = evicted_blocks[i];
        const int32_t evicted = b == 0 ? 0 : (b - 1) * block_size + hanging_tokens(c.length, block_size);
        select[i] = static_cast<int32_t>(c.ranked.size()) - evicted;
      }
    return status::success;
  }
};
static_assert(budget_allocator<global_block_budget>);

KVTRIM_NAMESPACE_END
