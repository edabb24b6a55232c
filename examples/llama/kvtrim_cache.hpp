#pragma once
//! \file kvtrim_cache.hpp
//! The `kv_cache` contract of forward.hpp served by kvtrim, as an engine integrates it: K/V live
//! in a kvtrim store (by default the paged per-head cache, whose evicted blocks go back to its
//! pool), and one `kvtrim::compression_session` runs the loop of kvtrim's design for the
//! sequence: append -> attend (accumulating the slot metrics H2O and KV-Compress rank by) ->
//! compress with the recent queries of every layer as the observation window -> free.
//! The model code does not change.
//!
//! The store is a template parameter: `kvtrim::paged_cache<float>` (default) or
//! `kvtrim::dense_view<float>` over buffers the example owns (a contiguous engine cache;
//! eviction compacts, the allocation stays). What the example needs of a store beyond the
//! session (building it, bytes held, kept positions) is in `store_traits` below; what every
//! store shares (the readers, the ring of recent queries) is `kvtrim_cache_base`, which the
//! GPU variant (kvtrim_cache_cuda.cuh) shares too.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "kvtrim/kvtrim.hpp"

namespace llama {

//! Throws kvtrim::error "<what>: <kvtrim's sentence for s>" unless s is success.
inline void check(kvtrim::status s, const std::string& what) {
  if (s != kvtrim::status::success) throw kvtrim::error(s, what);
}

//! kvtrim's attention shape of a llama2.c model.
inline kvtrim::attention_shape attention_shape_of(const config& c) {
  return {c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim()};
}

//! Tokens per block of the paged store: KV-Compress's block, and the budgets 36, 68 and 132
//! are whole blocks.
inline constexpr int paged_block_size = 4;

//! How the example builds a store for one sequence (id 0) and reads its memory.
template <class Store>
struct store_traits;

//! A paged pool sized for a full cache of `capacity` tokens in every (layer, KV head).
inline kvtrim::paged_cache_config paged_config(const kvtrim::attention_shape& shape, int capacity) {
  const int blocks_per_head = (capacity + paged_block_size - 1) / paged_block_size;
  return {.shape = shape,
          .block_size = paged_block_size,
          .num_blocks = shape.layers * shape.kv_heads * blocks_per_head,
          .max_sequences = 1,
          .max_tokens_per_head = capacity};
}

//! What the example reads of a paged cache of fp32, in host or device memory: the pool's block
//! accounting (host metadata) and the positions of a head (read_head).
template <class Store>
struct paged_store_reads {
  //! K and V (fp32) of the blocks the pool has lent out: whole blocks, so a head's partly
  //! filled last block counts in full (the 8 bytes of position and metric a slot are not included).
  static std::int64_t kv_bytes(const Store& s) {
    return s.pool().used_blocks * s.block_size() * 2 * s.head_dim() * static_cast<std::int64_t>(sizeof(float));
  }
  //! kv_bytes() of an uncompressed cache of `tokens` in every head.
  static std::int64_t full_kv_bytes(const Store& s, int tokens) {
    const std::int64_t blocks = (tokens + s.block_size() - 1) / s.block_size();
    return blocks * s.shape().layers * s.shape().kv_heads * s.block_size() * 2 * s.head_dim() *
           static_cast<std::int64_t>(sizeof(float));
  }
  static std::vector<int32_t> positions(const Store& s, int layer, int head) {
    const auto n = static_cast<std::size_t>(s.head_length(0, layer, head));
    std::vector<int32_t> p(n);
    std::vector<float> keys(n * static_cast<std::size_t>(s.head_dim())), metric(n);
    check(s.read_head(0, layer, head, p, keys, metric), "kvtrim read_head");
    return p;
  }
};

template <>
struct store_traits<kvtrim::paged_cache<float>> : paged_store_reads<kvtrim::paged_cache<float>> {
  using store = kvtrim::paged_cache<float>;
  struct backing {};  // the paged cache owns its pool
  static store make(backing&, const kvtrim::attention_shape& shape, int capacity) {
    store s;
    check(store::create(paged_config(shape, capacity), s), "kvtrim::paged_cache::create");
    return s;
  }
};

//! The engine's own contiguous cache, [L] x K, V [1][Hkv][capacity][d] with positions,
//! metrics and lengths, seen through `kvtrim::dense_view` (eviction compacts each head in
//! place; the buffers stay allocated).
template <>
struct store_traits<kvtrim::dense_view<float>> {
  using store = kvtrim::dense_view<float>;
  struct backing {
    std::vector<std::vector<float>> keys, values, metrics;  // [L][Hkv * capacity * d] / [L][Hkv * capacity]
    std::vector<std::vector<int32_t>> positions, lengths;   // [L][Hkv * capacity] / [L][Hkv]
  };
  static store make(backing& b, const kvtrim::attention_shape& shape, int capacity) {
    const auto slots = static_cast<std::size_t>(shape.kv_heads) * static_cast<std::size_t>(capacity);
    const auto layers = static_cast<std::size_t>(shape.layers);
    b.keys.assign(layers, std::vector<float>(slots * static_cast<std::size_t>(shape.head_dim)));
    b.values = b.keys;
    b.metrics.assign(layers, std::vector<float>(slots));
    b.positions.assign(layers, std::vector<int32_t>(slots));
    b.lengths.assign(layers, std::vector<int32_t>(static_cast<std::size_t>(shape.kv_heads)));
    std::vector<kvtrim::dense_layer<float>> views;
    for (std::size_t l = 0; l < layers; ++l)
      views.push_back({b.keys[l], b.values[l], b.positions[l], b.metrics[l], b.lengths[l]});
    store s;
    check(store::create(shape, 1, capacity, views, s), "kvtrim::dense_view::create");
    return s;
  }
  //! K and V (fp32) of the tokens held (the buffers themselves never shrink).
  static std::int64_t kv_bytes(const store& s) {
    std::int64_t tokens = 0;
    for (int l = 0; l < s.shape().layers; ++l)
      for (int h = 0; h < s.shape().kv_heads; ++h) tokens += s.head_length(0, l, h);
    return tokens * 2 * s.shape().head_dim * static_cast<std::int64_t>(sizeof(float));
  }
  static std::int64_t full_kv_bytes(const store& s, int tokens) {
    return static_cast<std::int64_t>(tokens) * s.shape().layers * s.shape().kv_heads * 2 * s.shape().head_dim *
           static_cast<std::int64_t>(sizeof(float));
  }
  static std::vector<int32_t> positions(const store& s, int layer, int head) {
    const auto p = s.positions(0, layer, head);
    return {p.begin(), p.end()};
  }
};

//! What the kvtrim caches of the example share, whatever runs them: the store of the one
//! sequence, what the engine and the evaluation read of it, the attention-metric switch, and
//! the ring of recent queries that compress() passes as the observation window.
template <kvtrim::kv_store Store>
class kvtrim_cache_base {
 public:
  using traits = store_traits<Store>;
  static constexpr int64_t seq = 0;  //!< the one sequence this cache serves

  // The store may point into backing_.
  kvtrim_cache_base(const kvtrim_cache_base&) = delete;
  kvtrim_cache_base& operator=(const kvtrim_cache_base&) = delete;

  //! The query hook of `forward`: keeps the last `observed` post-RoPE queries of each layer.
  void observe(int layer, int pos, std::span<const float> q) {
    if (observed_ == 0) return;
    const std::size_t row = static_cast<std::size_t>(pos % observed_);
    std::copy(q.begin(), q.end(),
              ring_queries_.begin() +
                  static_cast<std::ptrdiff_t>((static_cast<std::size_t>(layer) * observed_ + row) * q_width()));
    if (layer == shape_.layers - 1) observed_rows_ = std::min(observed_rows_ + 1, observed_);
  }
  //! A callable for `forward`'s query hook.
  [[nodiscard]] auto query_hook() {
    return [this](int layer, int pos, std::span<const float> q) { observe(layer, pos, q); };
  }

  //! Whether attention adds to the slot metrics what the policy's metric asks for (H2O p,
  //! KV-Compress p^2); off, attention records nothing.
  void set_accumulation(bool on) { accumulate_ = on; }

  // ---- what the engine and the evaluation read
  [[nodiscard]] const kvtrim::attention_shape& shape() const noexcept { return shape_; }
  [[nodiscard]] const Store& store() const noexcept { return store_; }
  [[nodiscard]] int head_length(int layer, int head) const { return store_.head_length(seq, layer, head); }
  //! Tokens held by `layer`, summed over its KV heads.
  [[nodiscard]] int layer_tokens(int layer) const {
    int n = 0;
    for (int h = 0; h < shape_.kv_heads; ++h) n += head_length(layer, h);
    return n;
  }
  [[nodiscard]] std::int64_t total_tokens() const {
    std::int64_t n = 0;
    for (int l = 0; l < shape_.layers; ++l) n += layer_tokens(l);
    return n;
  }
  [[nodiscard]] int max_head_length() const {
    int n = 0;
    for (int l = 0; l < shape_.layers; ++l)
      for (int h = 0; h < shape_.kv_heads; ++h) n = std::max(n, head_length(l, h));
    return n;
  }
  //! Bytes of K and V the store holds now, and what it would hold uncompressed with `tokens`
  //! in every head.
  [[nodiscard]] std::int64_t kv_bytes() const { return traits::kv_bytes(store_); }
  [[nodiscard]] std::int64_t full_kv_bytes(int tokens) const { return traits::full_kv_bytes(store_, tokens); }
  //! Original positions held by every (layer, KV head), [L * Hkv][n_lh], each ascending.
  [[nodiscard]] std::vector<std::vector<int32_t>> kept_positions() const {
    std::vector<std::vector<int32_t>> kept;
    for (int l = 0; l < shape_.layers; ++l)
      for (int h = 0; h < shape_.kv_heads; ++h) {
        kept.push_back(traits::positions(store_, l, h));
        std::sort(kept.back().begin(), kept.back().end());
      }
    return kept;
  }

 protected:
  //! `capacity`: tokens per head the store can hold; `observed`: how many of the most recent
  //! queries of each layer observation() passes (0: none).
  kvtrim_cache_base(const config& c, int capacity, int observed)
      : shape_(attention_shape_of(c)),
        store_(traits::make(backing_, shape_, capacity)),
        observed_(observed),
        ring_queries_(static_cast<std::size_t>(shape_.layers) * static_cast<std::size_t>(std::max(observed, 1)) *
                      q_width()) {}

  //! Records an append (the newest position is the observation window's last).
  void appended(int layer, int pos) {
    if (layer == 0) last_position_ = pos;
  }

  //! The observation window of a compression, in host memory: with `use_observation`, the last
  //! `observed` queries of each layer (all that were seen, if fewer), else none. Valid until
  //! the next call.
  [[nodiscard]] kvtrim::cpu::observation observation(bool use_observation) {
    std::vector<float>& q = obs_queries_;
    std::vector<int32_t>& pos = obs_positions_;
    q.clear();
    pos.clear();
    if (use_observation && observed_rows_ > 0) {
      const int rows = observed_rows_;
      for (int r = 0; r < rows; ++r) pos.push_back(last_position_ - rows + 1 + r);
      q.resize(static_cast<std::size_t>(shape_.layers) * static_cast<std::size_t>(rows) * q_width());
      for (int l = 0; l < shape_.layers; ++l)
        for (int r = 0; r < rows; ++r) {
          const auto src = (static_cast<std::size_t>(l) * observed_ +
                            static_cast<std::size_t>(pos[static_cast<std::size_t>(r)] % observed_)) * q_width();
          const auto dst = (static_cast<std::size_t>(l) * rows + static_cast<std::size_t>(r)) * q_width();
          std::copy_n(ring_queries_.begin() + static_cast<std::ptrdiff_t>(src), q_width(),
                      q.begin() + static_cast<std::ptrdiff_t>(dst));
        }
    }
    return {q, pos};
  }

  //! Forgets the queries and positions of the previous sequence.
  void restart() {
    observed_rows_ = 0;
    last_position_ = -1;
    accumulate_ = true;
  }

  [[nodiscard]] std::size_t q_width() const noexcept {
    return static_cast<std::size_t>(shape_.q_heads) * static_cast<std::size_t>(shape_.head_dim);
  }

  kvtrim::attention_shape shape_;
  typename traits::backing backing_;  // memory the store views, if it does not own it
  Store store_;
  int observed_;                        // rows of the observation window
  bool accumulate_ = true;              // attention accumulates the policy's slot metric

 private:
  int observed_rows_ = 0;               // rows seen so far, at most observed_
  int last_position_ = -1;              // newest appended position
  std::vector<float> ring_queries_;     // [L][observed][Hq][d], row = position % observed
  std::vector<float> obs_queries_;      // [L][rows][Hq][d] gathered by observation()
  std::vector<int32_t> obs_positions_;  // [rows]
};

//! The cache over a host store: kvtrim's CPU backend, through one compression session.
template <kvtrim::compression_policy Policy, kvtrim::kv_store Store = kvtrim::paged_cache<float>>
class kvtrim_cache : public kvtrim_cache_base<Store> {
  using base = kvtrim_cache_base<Store>;
  using base::accumulate_;
  using base::shape_;
  using base::store_;

 public:
  using base::seq;

  //! `capacity`: tokens per head the store can hold; `observed`: how many of the most recent
  //! queries of each layer `compress()` passes as the observation window (0: none).
  kvtrim_cache(const config& c, Policy policy, int capacity, int observed)
      : base(c, capacity, observed), session_(store_, shape_, policy) {
    check(session_.add_sequence(seq), "kvtrim::compression_session::add_sequence");
  }

  // ---- the kv_cache contract (forward.hpp)
  void append(int layer, int pos, std::span<const float> k, std::span<const float> v) {
    const int32_t position = pos;
    check(session_.append(seq, layer, std::span<const int32_t>(&position, 1), k, v),
          "kvtrim append at position " + std::to_string(pos));
    this->appended(layer, pos);
  }
  void attend(int layer, std::span<const float> q, std::span<float> out) {
    if (accumulate_) {
      check(session_.attend(seq, layer, q, out), "kvtrim decode attention");
    } else {
      // Prompt attention that records no metric (KV-Compress scores the prompt from its
      // observation window instead), as an engine's prefill kernel would.
      check(kvtrim::cpu::decode_attention(store_, seq, layer, shape_.q_heads, q, out, kvtrim::decode_accumulation::none,
                                          kvtrim::gqa_reduce::mean, scratch_),
            "kvtrim prompt attention");
    }
  }

  //! Runs the policy over every layer now (the session's compression step). With
  //! `use_observation`, the metric sees the last `observed` queries of each layer (all that
  //! were seen, if fewer); freed blocks return to the pool.
  void compress(bool use_observation) {
    check(session_.compress(seq, this->observation(use_observation)), "kvtrim compression");
  }

  //! Frees the sequence (its blocks return to the pool) and starts a new one at position 0.
  void clear() {
    check(session_.free_sequence(seq), "kvtrim::compression_session::free_sequence");
    check(session_.add_sequence(seq), "kvtrim::compression_session::add_sequence");
    this->restart();
  }

 private:
  kvtrim::compression_session<Policy, Store> session_;
  std::vector<float> scratch_;  // [G][n] probabilities of the prompt attention
};

}  // namespace llama
