#pragma once
//! \file compress.hpp
//! The CPU reference backend: plain loops that define what every step means. The CUDA
//! backend must keep the same token sets on the same inputs.
//!
//! One compression of a sequence = score every layer (metric), rank each head's evictable
//! tokens (plan/candidates.hpp), size each head (allocator), choose the kept slots
//! (evictor), apply the plan to the store (strong guarantee), re-rotate if asked.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/policy.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cpu {

struct backend {
  using kvc_concept = backend_tag;
  static constexpr memory_space memory = memory_space::host;
};
static_assert(kvtrim::backend<backend>);

//! The queries a compression observes, for every layer: [L][rows][Hq][d] post-RoPE, and the
//! position of each row. Empty for metrics that need none (positional; accumulated metrics
//! ranking what decode attention already accumulated).
struct observation {
  std::span<const float> queries;      //!< [L][rows][Hq][d]
  std::span<const int32_t> positions;  //!< [rows]

  [[nodiscard]] int32_t rows() const noexcept { return static_cast<int32_t>(positions.size()); }
  [[nodiscard]] query_view layer(int32_t l, const attention_shape& shape) const noexcept {
    const size_t per_layer = positions.size() * static_cast<size_t>(shape.q_heads) * shape.head_dim;
    return {queries.subspan(static_cast<size_t>(l) * per_layer, per_layer), positions};
  }
};

//! A policy's result before it is applied: the plan, and what each step decided.
struct compression_result {
  candidate_table candidates;  //!< [L][H] protected slots and ranked candidates
  std::vector<int32_t> select; //!< [L][H] candidates kept, as the allocator decided
  eviction_plan plan;
};

namespace detail {

//! Gathers one head of the store as fp32 into reusable buffers.
struct head_buffers {
  std::vector<int32_t> positions;
  std::vector<float> keys, metric;
};

[[nodiscard]] inline status check_observation(const attention_shape& model, const observation& obs) {
  const size_t expected = static_cast<size_t>(model.layers) * obs.positions.size() * model.q_heads * model.head_dim;
  return obs.queries.size() == expected ? status::success : status::shape_mismatch;
}

}  // namespace detail

//! Plans the compression of layers [first, first + count) of `seq` without touching the store.
//! `model` is the model's shape (Hq, Hkv, d); the store holds `p.metric.stored_heads(model)`
//! heads per layer. Layers outside the range keep everything in the returned plan.
template <compression_policy P, kv_store S>
[[nodiscard]] status plan(const P& p, const S& store, int64_t seq, const attention_shape& model,
                          const observation& obs, int32_t first, int32_t count, compression_result& out) {
  if (const status s = p.validate(model); s != status::success) return s;
  if (!store.contains(seq)) return status::unknown_sequence;
  const attention_shape stored = store.shape();
  const int32_t heads = p.metric.stored_heads(model);
  if (stored.layers != model.layers || stored.head_dim != model.head_dim || stored.kv_heads != heads)
    return status::shape_mismatch;
  if (first < 0 || count < 1 || count > model.layers - first) return status::invalid_argument;
  if (const status s = detail::check_observation(model, obs); s != status::success) return s;

  using metric_t = typename P::metric_type;
  const int32_t layers = model.layers;
  std::vector<int32_t> lengths(static_cast<size_t>(layers) * heads);
  for (int32_t l = 0; l < layers; ++l)
    for (int32_t h = 0; h < heads; ++h) lengths[static_cast<size_t>(l) * heads + h] = store.head_length(seq, l, h);

  compression_result result;
  result.candidates = candidate_table(count, heads);
  ragged_rows new_metrics;
  if constexpr (metric_t::accumulates) new_metrics = ragged_rows(layers, heads, lengths);

  std::vector<detail::head_buffers> buffers(static_cast<size_t>(heads));
  std::vector<head_view> views(static_cast<size_t>(heads));
  std::vector<std::vector<float>> scores(static_cast<size_t>(heads));
  std::vector<std::span<float>> score_spans(static_cast<size_t>(heads));
  const auto d = static_cast<size_t>(model.head_dim);
  for (int32_t l = 0; l < layers; ++l) {
    const bool in_range = l >= first && l < first + count;
    // Layers outside the range are read only to carry their accumulated metrics over.
    if (!in_range && !metric_t::accumulates) continue;
    for (int32_t h = 0; h < heads; ++h) {
      const auto n = static_cast<size_t>(lengths[static_cast<size_t>(l) * heads + h]);
      if (in_range && n == 0) return status::empty_sequence;
      auto& b = buffers[static_cast<size_t>(h)];
      b.positions.resize(n);
      b.keys.resize(n * d);
      b.metric.resize(n);
      if (const status s = store.read_head(seq, l, h, b.positions, b.keys, b.metric); s != status::success) return s;
      views[static_cast<size_t>(h)] = {b.positions, b.keys, b.metric};
      scores[static_cast<size_t>(h)].assign(n, 0.f);
      score_spans[static_cast<size_t>(h)] = scores[static_cast<size_t>(h)];
    }
    if constexpr (metric_t::accumulates) {
      for (int32_t h = 0; h < heads; ++h) {
        const auto& m = buffers[static_cast<size_t>(h)].metric;
        std::copy(m.begin(), m.end(), new_metrics.row(l, h).begin());
      }
    }
    if (!in_range) continue;
    const layer_view layer{l, model, views, obs.layer(l, model)};
    if (obs.rows() > 0 || !metric_t::accumulates) {
      if (const status s = p.metric.score(layer, p.protect, score_spans); s != status::success) return s;
    }
    for (int32_t h = 0; h < heads; ++h) {
      auto& rank = scores[static_cast<size_t>(h)];
      if constexpr (metric_t::accumulates) {
        const auto row = new_metrics.row(l, h);
        const int32_t next = views[static_cast<size_t>(h)].next_position();
        for (size_t j = 0; j < rank.size(); ++j) {
          if (obs.rows() > 0) row[j] += rank[j];
          rank[j] = p.metric.rank_score(row[j], buffers[static_cast<size_t>(h)].positions[j], next);
        }
      }
      if (const status s = rank_head(rank, buffers[static_cast<size_t>(h)].positions, p.protect,
                                     result.candidates.at(l - first, h));
          s != status::success)
        return s;
    }
  }

  result.select.assign(static_cast<size_t>(count) * heads, 0);
  const allocation_context ctx{first, layers, p.protect};
  if (const status s = p.allocator.allocate(result.candidates, ctx, result.select); s != status::success) return s;
  eviction_plan partial;
  if (const status s = p.evictor.plan(result.candidates, result.select, partial); s != status::success) return s;

  // Widen to every layer: layers outside the range keep all their slots.
  result.plan = eviction_plan(layers, heads);
  std::vector<int32_t> all;
  for (int32_t l = 0; l < layers; ++l)
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t n = lengths[static_cast<size_t>(l) * heads + h];
      if (l >= first && l < first + count) {
        result.plan.set_head(l, h, n, partial.kept(l - first, h));
      } else {
        all.resize(static_cast<size_t>(n));
        for (int32_t s = 0; s < n; ++s) all[static_cast<size_t>(s)] = s;
        result.plan.set_head(l, h, n, all);
      }
    }
  result.plan.metrics = std::move(new_metrics);
  out = std::move(result);
  return status::success;
}

//! Re-rotates every head of `seq` so that kept keys sit at positions 0..n-1 in their old
//! position order (kvpress KeyRerotationPress). Later queries must use the compressed length.
template <kv_store S>
[[nodiscard]] status rerotate(S& store, int64_t seq, const rope_config& rope) {
  const attention_shape shape = store.shape();
  if (const status s = rope.validate(shape.head_dim); s != status::success) return s;
  if (!store.contains(seq)) return status::unknown_sequence;
  const auto d = static_cast<size_t>(shape.head_dim);
  std::vector<int32_t> positions, order;
  std::vector<float> keys, metric;
  for (int32_t l = 0; l < shape.layers; ++l)
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      const auto n = static_cast<size_t>(store.head_length(seq, l, h));
      positions.resize(n);
      keys.resize(n * d);
      metric.resize(n);
      if (const status s = store.read_head(seq, l, h, positions, keys, metric); s != status::success) return s;
      order.resize(n);
      for (size_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return positions[a] < positions[b]; });
      for (size_t rank = 0; rank < n; ++rank) {
        const auto slot = static_cast<size_t>(order[rank]);
        rotate_key(keys.data() + slot * d, shape.head_dim, static_cast<int32_t>(rank) - positions[slot], rope);
        positions[slot] = static_cast<int32_t>(rank);
      }
      if (const status s = store.rewrite_head(seq, l, h, positions, keys); s != status::success) return s;
    }
  return status::success;
}

//! Compresses every layer of `seq` in `store` with policy `p`. On error nothing changed.
template <compression_policy P, kv_store S>
[[nodiscard]] status compress(const P& p, S& store, int64_t seq, const attention_shape& model,
                              const observation& obs) {
  static_assert(S::memory == memory_space::host,
                "kvtrim::cpu::compress rule C3: the CPU backend reads host memory. Fix: use a host "
                "store, or the CUDA backend for a device store.");
  compression_result result;
  if (const status s = plan(p, store, seq, model, obs, 0, model.layers, result); s != status::success) return s;
  if (const status s = store.apply(seq, result.plan); s != status::success) return s;
  if (p.positions == position_mode::rerotate) return rerotate(store, seq, p.rope);
  return status::success;
}

//! Compresses one layer, as an engine does during prefill when the layer's window queries
//! are at hand. `queries` [rows][Hq][d] of this layer only.
template <compression_policy P, kv_store S>
[[nodiscard]] status compress_layer(const P& p, S& store, int64_t seq, const attention_shape& model, int32_t layer,
                                    std::span<const float> queries, std::span<const int32_t> positions) {
  static_assert(P::allocator_type::scope == allocation_scope::per_layer,
                "kvtrim::cpu::compress_layer rule C2: this budget allocator spends one budget across "
                "all layers (KV-Compress), so it cannot run one layer at a time. Fix: call "
                "kvtrim::cpu::compress once with every layer's observation.");
  static_assert(S::memory == memory_space::host,
                "kvtrim::cpu::compress_layer rule C3: the CPU backend reads host memory. Fix: use a "
                "host store, or the CUDA backend for a device store.");
  if (const status s = p.validate(model); s != status::success) return s;  // before sizes use the shape
  if (layer < 0 || layer >= model.layers) return status::invalid_argument;
  // Place this layer's queries where plan() looks for them; other layers are not scored.
  const size_t per_layer = positions.size() * static_cast<size_t>(model.q_heads) * model.head_dim;
  if (queries.size() != per_layer) return status::shape_mismatch;
  std::vector<float> all(per_layer * static_cast<size_t>(model.layers), 0.f);
  std::copy(queries.begin(), queries.end(), all.begin() + static_cast<std::ptrdiff_t>(per_layer * layer));
  compression_result result;
  if (const status s = plan(p, store, seq, model, observation{all, positions}, layer, 1, result);
      s != status::success)
    return s;
  if (const status s = store.apply(seq, result.plan); s != status::success) return s;
  if (p.positions == position_mode::rerotate) return rerotate(store, seq, p.rope);
  return status::success;
}

}  // namespace cpu
KVTRIM_NAMESPACE_END
