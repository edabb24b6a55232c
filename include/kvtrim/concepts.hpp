#pragma once
//! \file concepts.hpp
//! The contract between the parts of a compression policy. A part opts in with a tag
//! (`using kvc_concept = kvtrim::evictor_tag;`) and the structural requirements below are
//! checked on top, so a type that merely looks right is not taken by accident.
//! Rules that cross parts (an adaptive budget needs scores comparable across heads, ...) are
//! `static_assert`s in `kvtrim::policy` (policy/policy.hpp), each naming the rule and the fix.

#include <concepts>
#include <cstdint>
#include <span>

#include "kvtrim/config.hpp"
#include "kvtrim/core/head_view.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/plan/candidates.hpp"
#include "kvtrim/plan/eviction_plan.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

struct importance_metric_tag {};
struct budget_allocator_tag {};
struct evictor_tag {};
struct kv_store_tag {};
struct backend_tag {};
struct policy_tag {};

//! How a metric's scores may be compared.
enum class score_scope : uint8_t {
  within_head,  //!< only the order inside one head means anything (positional recency)
  across_heads  //!< comparable across heads and layers (attention mass): adaptive/global budgets
};

//! How many heads an allocator looks at to size one head.
enum class allocation_scope : uint8_t {
  per_layer,  //!< each layer on its own (uniform, pyramid, Ada-KV): compress_layer works
  global      //!< all layers of a sequence at once (KV-Compress): needs compress()
};

//! What the decode attention adds to each slot's metric per step (accumulating metrics).
enum class decode_accumulation : uint8_t {
  none,         //!< nothing: the metric is recomputed from an observation window
  sum,          //!< += probability (H2O)
  squared_sum,  //!< += probability squared (KV-Compress L2)
};

//! How an evictor's decisions are shaped.
enum class eviction_granularity : uint8_t {
  token,  //!< any number of tokens per head
  block   //!< whole blocks: every eviction frees whole blocks and leaves no partial block
};

//! Where a store keeps its data, and which memory a backend reads.
enum class memory_space : uint8_t { host, device };

namespace detail {
template <class T, class Tag>
concept has_tag = requires { typename T::kvc_concept; } && std::derived_from<typename T::kvc_concept, Tag>;
}  // namespace detail

//! importance_metric: scores every cached token of a layer.
//!  M1. `typename M::kvc_concept` derives from `importance_metric_tag`.
//!  M2. `M::accumulates` (bool): scores are added into the slot metric and ranked from it
//!      (H2O, KV-Compress) rather than recomputed from each observation.
//!  M3. `M::scope` (score_scope): whether scores can be compared across heads.
//!  M4. `m.decode()` -> decode_accumulation: what decode attention adds to the slot metric.
//!  M5. `m.validate(shape, protect)` -> status: parameters and shape checked before any work.
//!  M6. `m.stored_heads(shape)` -> int32_t: Hkv, or Hq in the query-head compatibility mode.
//!  M7. `m.score(layer, protect, out)` -> status: out[h] ([n_h] floats) receives the score
//!      of every slot of stored head h of `layer`; higher means more important. For an
//!      accumulating metric it is the observation's contribution, added to the slot metric.
//!  M8. if `M::accumulates`: `m.rank_score(metric, position, next_position)` -> float turns an
//!      accumulated slot metric into the score it is ranked by (H2O's normalised sum).
template <class M>
concept importance_metric =
    detail::has_tag<M, importance_metric_tag> && std::copy_constructible<M> &&
    requires(const M& m, const attention_shape& shape, const protected_set& protect,
             const layer_view& layer, std::span<const std::span<float>> out) {
      { M::accumulates } -> std::convertible_to<bool>;
      { M::scope } -> std::convertible_to<score_scope>;
      { m.decode() } -> std::same_as<decode_accumulation>;
      { m.validate(shape, protect) } -> std::same_as<status>;
      { m.stored_heads(shape) } -> std::convertible_to<int32_t>;
      { m.score(layer, protect, out) } -> std::same_as<status>;
    } && (!M::accumulates || requires(const M& m, float v, int32_t p) {
      { m.rank_score(v, p, p) } -> std::convertible_to<float>;
    });

//! Which layers an allocation covers: layers [first_layer, first_layer + table.layers()) of a
//! model with `total_layers` (PyramidKV's budget depends on the layer index).
struct allocation_context {
  int32_t first_layer = 0;
  int32_t total_layers = 1;
  protected_set protect;
};

//! budget_allocator: decides how many ranked candidates each head keeps.
//!  B1. `typename A::kvc_concept` derives from `budget_allocator_tag`.
//!  B2. `A::scope` (allocation_scope): per layer or across all layers.
//!  B3. `A::needs_scores` (bool): reads the candidates' scores (Ada-KV, KV-Compress), which
//!      then must be comparable across heads.
//!  B4. `a.validate(shape, protect)` -> status.
//!  B5. `a.allocate(table, ctx, select)` -> status: select [L][H] receives the number of
//!      ranked candidates head (l, h) keeps, in [0, ranked.size()]; protected slots are kept
//!      on top of it.
template <class A>
concept budget_allocator =
    detail::has_tag<A, budget_allocator_tag> && std::copy_constructible<A> &&
    requires(const A& a, const attention_shape& shape, const protected_set& protect,
             const candidate_table& table, const allocation_context& ctx, std::span<int32_t> select) {
      { A::scope } -> std::convertible_to<allocation_scope>;
      { A::needs_scores } -> std::convertible_to<bool>;
      { a.validate(shape, protect) } -> std::same_as<status>;
      { a.allocate(table, ctx, select) } -> std::same_as<status>;
    };

//! evictor: turns counts into an eviction plan.
//!  E1. `typename E::kvc_concept` derives from `evictor_tag`.
//!  E2. `E::granularity` (eviction_granularity).
//!  E3. `e.validate()` -> status.
//!  E4. `e.plan(table, select, plan)` -> status: writes, for every head, the protected slots
//!      plus the first select[l][h] (or, for block evictors, a block-aligned count at least
//!      that large) ranked candidates into `plan`.
template <class E>
concept evictor = detail::has_tag<E, evictor_tag> && std::copy_constructible<E> &&
                  requires(const E& e, const candidate_table& table, std::span<const int32_t> select,
                           eviction_plan& plan) {
                    { E::granularity } -> std::convertible_to<eviction_granularity>;
                    { e.validate() } -> std::same_as<status>;
                    { e.plan(table, select, plan) } -> std::same_as<status>;
                  };

//! kv_store: a cache a backend can compress.
//!  S1. `typename S::kvc_concept` derives from `kv_store_tag`.
//!  S2. `S::memory` (memory_space) names where K/V live.
//!  S3. `s.shape()` -> attention_shape: layers, stored heads as kv_heads, head dim.
//!  S4. `s.contains(seq)` -> bool.
//!  S5. `s.head_length(seq, l, h)` -> int32_t.
//!  S6. `s.read_head(seq, l, h, positions, keys, metric)` -> status: copies the head's slots,
//!      in slot order, into positions [n], keys [n][d] as fp32 and metric [n].
//!  S7. `s.apply(seq, plan)` -> status: writes the plan's metrics (if any), compacts every head
//!      to its kept slots and releases what they no longer need. Strong guarantee: on any
//!      error nothing changed.
//!  S8. `s.rewrite_head(seq, l, h, positions, keys)` -> status: overwrites every slot's
//!      position and key (fp32 in, stored type out); used by key re-rotation.
template <class S>
concept kv_store =
    detail::has_tag<S, kv_store_tag> &&
    requires(S& s, const S& cs, int64_t seq, int32_t l, std::span<int32_t> pos, std::span<float> f,
             const eviction_plan& plan) {
      { S::memory } -> std::convertible_to<memory_space>;
      { cs.shape() } -> std::same_as<attention_shape>;
      { cs.contains(seq) } -> std::same_as<bool>;
      { cs.head_length(seq, l, l) } -> std::convertible_to<int32_t>;
      { cs.read_head(seq, l, l, pos, f, f) } -> std::same_as<status>;
      { s.apply(seq, plan) } -> std::same_as<status>;
      { s.rewrite_head(seq, l, l, std::span<const int32_t>(pos), std::span<const float>(f)) } -> std::same_as<status>;
    };

//! backend: runs the steps of a policy on some memory.
//!  K1. `typename B::kvc_concept` derives from `backend_tag`.
//!  K2. `B::memory` (memory_space): the memory its stores must live in.
template <class B>
concept backend = detail::has_tag<B, backend_tag> && requires {
  { B::memory } -> std::convertible_to<memory_space>;
};

//! compression_policy: a composition of the three parts plus what they share.
//!  P1. `typename P::kvc_concept` derives from `policy_tag`.
//!  P2. `P::metric_type`, `P::allocator_type`, `P::evictor_type` model the three concepts.
//!  P3. members `metric`, `allocator`, `evictor`, `protect`, and `p.validate(shape)` -> status.
template <class P>
concept compression_policy =
    detail::has_tag<P, policy_tag> && importance_metric<typename P::metric_type> &&
    budget_allocator<typename P::allocator_type> && evictor<typename P::evictor_type> &&
    requires(const P& p, const attention_shape& shape) {
      { p.metric } -> std::convertible_to<typename P::metric_type>;
      { p.allocator } -> std::convertible_to<typename P::allocator_type>;
      { p.evictor } -> std::convertible_to<typename P::evictor_type>;
      { p.protect } -> std::convertible_to<protected_set>;
      { p.validate(shape) } -> std::same_as<status>;
    };

KVTRIM_NAMESPACE_END
