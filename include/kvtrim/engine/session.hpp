#pragma once
//! \file session.hpp
//! The loop of design.md "What the engine calls", around one policy type and one host store:
//!   add_sequence -> append (prefill chunks) -> finish_prefill (compress with the window
//!   queries) -> per decode step: append, attend (accumulating slot metrics if the policy's
//!   metric does), end_decode_step (the schedule decides whether to evict) -> free_sequence.
//! Each sequence may carry its own policy value (its own budget); all share the policy type
//! and the store, and each is compressed independently.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/backend/cpu/attention.hpp"
#include "kvtrim/backend/cpu/compress.hpp"
#include "kvtrim/backend/cpu/paged_attention.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! The group reduction decode attention uses for a metric: its observation's (H2O mean,
//! KV-Compress sum) when it has one; metrics without one accumulate nothing at decode.
template <importance_metric M>
[[nodiscard]] gqa_reduce decode_reduce(const M& metric) noexcept {
  if constexpr (requires { metric.observation.reduce; }) {
    return metric.observation.reduce;
  } else {
    return gqa_reduce::mean;
  }
}

template <compression_policy P, kv_store S>
class compression_session {
  static_assert(S::memory == memory_space::host,
                "kvtrim::compression_session rule C3: the session runs the CPU backend, which reads host "
                "memory. Fix: use kvtrim::paged_cache or kvtrim::dense_view; a device cache is driven "
                "by the CUDA backend.");

 public:
  //! `model` is the model's shape (Hq, Hkv, d); `policy` the default for new sequences.
  compression_session(S& store, attention_shape model, P policy)
      : store_(&store), model_(model), default_policy_(std::move(policy)) {}

  [[nodiscard]] const attention_shape& model() const noexcept { return model_; }
  [[nodiscard]] S& store() noexcept { return *store_; }
  [[nodiscard]] bool contains(int64_t seq) const noexcept { return find(seq) != nullptr; }
  //! Decode steps since the sequence's prefill was compressed; -1 for an unknown sequence.
  [[nodiscard]] int64_t decode_steps(int64_t seq) const noexcept {
    const sequence_state* s = find(seq);
    return s ? s->steps : -1;
  }

  //! Starts a sequence with the default policy.
  [[nodiscard]] status add_sequence(int64_t seq) { return add_sequence(seq, default_policy_); }

  //! Starts a sequence with its own policy value. The policy is validated against the model
  //! (its status); invalid_argument if the session already has `seq`; then the store adds
  //! it (a paged cache: pool_exhausted when its sequence rows are taken) or, for stores with
  //! fixed rows, must already contain it (unknown_sequence).
  [[nodiscard]] status add_sequence(int64_t seq, const P& policy) {
    if (const status s = policy.validate(model_); s != status::success) return s;
    if (contains(seq)) return status::invalid_argument;
    // Room for one more before the store changes (push_back below then cannot throw).
    if (sequences_.size() == sequences_.capacity()) sequences_.reserve(2 * sequences_.size() + 1);
    if constexpr (requires { store_->add_sequence(seq); }) {
      if (const status s = store_->add_sequence(seq); s != status::success) return s;
    } else {
      if (!store_->contains(seq)) return status::unknown_sequence;
    }
    sequences_.push_back({seq, policy, 0});
    return status::success;
  }

  //! 1. Appends K/V of one layer: positions [t]; k, v [t][Hkv][d] (a prefill chunk or the
  //! decode token of that layer).
  [[nodiscard]] status append(int64_t seq, int32_t layer, std::span<const int32_t> positions,
                              std::span<const float> k, std::span<const float> v) {
    if (!contains(seq)) return status::unknown_sequence;
    return store_->append_layer(seq, layer, positions, k, v);
  }
  //! 1. Appends K/V of every layer: positions [t]; k, v [L][t][Hkv][d].
  [[nodiscard]] status append(int64_t seq, std::span<const int32_t> positions, std::span<const float> k,
                              std::span<const float> v) {
    if (!contains(seq)) return status::unknown_sequence;
    return store_->append(seq, positions, k, v);
  }

  //! 2. After prefill: runs the sequence's policy with the observed window queries
  //! ([L][rows][Hq][d]); memory goes back to the pool. Restarts the decode step count.
  [[nodiscard]] status finish_prefill(int64_t seq, const cpu::observation& obs) {
    sequence_state* s = find(seq);
    if (!s) return status::unknown_sequence;
    if (const status c = cpu::compress(s->policy, *store_, seq, model_, obs); c != status::success) return c;
    s->steps = 0;
    return status::success;
  }

  //! Compresses now with the sequence's policy, whatever its schedule says (an engine under
  //! memory pressure, or a streaming loop that bounds the cache at every step). The decode
  //! step count is left as it is.
  [[nodiscard]] status compress(int64_t seq, const cpu::observation& obs) {
    const sequence_state* s = find(seq);
    if (!s) return status::unknown_sequence;
    return cpu::compress(s->policy, *store_, seq, model_, obs);
  }

  //! 3. Decode attention of one layer: q [Hq][d] -> out [Hq][d], accumulating into the slot
  //! metrics what the policy's metric asks for (H2O p, KV-Compress p^2).
  [[nodiscard]] status attend(int64_t seq, int32_t layer, std::span<const float> q, std::span<float> out) {
    const sequence_state* s = find(seq);
    if (!s) return status::unknown_sequence;
    return cpu::decode_attention(*store_, seq, layer, model_.q_heads, q, out, s->policy.metric.decode(),
                                 decode_reduce(s->policy.metric), scratch_);
  }

  //! 3. Ends a decode step: counts it and, if the policy's schedule says so, compresses with
  //! `obs` (empty for metrics that need no queries: positional, accumulated). `compressed`
  //! tells whether it did. On error the step is not counted.
  [[nodiscard]] status end_decode_step(int64_t seq, bool& compressed, const cpu::observation& obs = {}) {
    compressed = false;
    sequence_state* s = find(seq);
    if (!s) return status::unknown_sequence;
    const int64_t step = s->steps + 1;
    if (s->policy.schedule.after_decode_step(step)) {
      if (const status c = cpu::compress(s->policy, *store_, seq, model_, obs); c != status::success) return c;
      compressed = true;
    }
    s->steps = step;
    return status::success;
  }

  //! 4. Frees the sequence: a paged cache returns all its blocks, a dense store empties its row.
  [[nodiscard]] status free_sequence(int64_t seq) {
    const auto it = std::find_if(sequences_.begin(), sequences_.end(), [&](const sequence_state& s) { return s.id == seq; });
    if (it == sequences_.end()) return status::unknown_sequence;
    if constexpr (requires { store_->free_sequence(seq); }) {
      if (const status s = store_->free_sequence(seq); s != status::success) return s;
    } else {
      if (const status s = store_->clear(seq); s != status::success) return s;
    }
    sequences_.erase(it);
    return status::success;
  }

 private:
  struct sequence_state {
    int64_t id;
    P policy;
    int64_t steps;  // decode steps since the prefill compression
  };
  [[nodiscard]] sequence_state* find(int64_t seq) noexcept {
    const auto it = std::find_if(sequences_.begin(), sequences_.end(), [&](const sequence_state& s) { return s.id == seq; });
    return it == sequences_.end() ? nullptr : &*it;
  }
  [[nodiscard]] const sequence_state* find(int64_t seq) const noexcept {
    const auto it = std::find_if(sequences_.begin(), sequences_.end(), [&](const sequence_state& s) { return s.id == seq; });
    return it == sequences_.end() ? nullptr : &*it;
  }

  S* store_;
  attention_shape model_;
  P default_policy_;
  std::vector<sequence_state> sequences_;
  std::vector<float> scratch_;  // decode attention's [G][n] probabilities
};

KVTRIM_NAMESPACE_END
