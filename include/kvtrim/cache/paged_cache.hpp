#pragma once
//! \file paged_cache.hpp
//! The native store of kvtrim: KV-Compress's paged per-head cache (docs/cache.md). A pool of
//! fixed-size blocks, one block holding `block_size` tokens of ONE (sequence, layer, KV head),
//! and a block table and length per (sequence, layer, KV head), so per-head budgets free real
//! memory: applying an eviction plan moves surviving tail slots into holes (KV-Compress
//! MoveCache, positions and metrics travel with K/V) and returns the emptied trailing blocks
//! to the pool.
//!
//! `basic_paged_cache<T, HeadDim, Storage>` is the one implementation; `Storage` says where
//! the pool lives. `paged_cache<T, HeadDim>` keeps it in host memory it allocates once at
//! create(); `device_paged_cache` (device_paged_cache.hpp) keeps it in device buffers the
//! caller provides. Every mutating call gives the strong guarantee: on any error nothing
//! changed.

#include <concepts>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvtrim/cache/block_tables.hpp"
#include "kvtrim/cache/paged_layout.hpp"
#include "kvtrim/cache/slot_mover.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/plan/eviction_plan.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! paged_storage: where a paged cache's pool lives and how its data steps run.
//!  Q1. `Storage::memory` (memory_space) and `Storage::source_type`, the element type
//!      append() takes K/V in.
//!  Q2. `s.init(config)` -> status: prepares the buffers of an empty cache.
//!  Q3. `s.buffers()` -> paged_buffers<T> (const: const_paged_buffers<T>).
//!  Q4. `s.mover()` -> a slot_mover for T that runs the data steps.
//!  Q5. `s.sync(tables)` -> status: replays the metadata journal wherever the tables are
//!      mirrored, then clears it.
template <class S, class T>
concept paged_storage =
    kv_element<T> && kv_element<typename S::source_type> && std::movable<S> &&
    requires(S& s, const S& cs, const paged_cache_config& config, block_tables& tables) {
      { S::memory } -> std::convertible_to<memory_space>;
      { s.init(config) } -> std::same_as<status>;
      { s.buffers() } -> std::same_as<paged_buffers<T>>;
      { cs.buffers() } -> std::same_as<const_paged_buffers<T>>;
      { cs.mover() } -> slot_mover<T>;
      { s.sync(tables) } -> std::same_as<status>;
    };

//! The pool in host memory, allocated once by create(); K/V are appended from fp32.
template <kv_element T>
class host_storage {
 public:
  using source_type = float;
  static constexpr memory_space memory = memory_space::host;

  [[nodiscard]] status init(const paged_cache_config& config) {
    const size_t slots = static_cast<size_t>(config.num_blocks) * static_cast<size_t>(config.block_size);
    keys_.assign(slots * static_cast<size_t>(config.shape.head_dim), T{});
    values_.assign(keys_.size(), T{});
    positions_.assign(slots, 0);
    metrics_.assign(slots, 0.f);
    return status::success;
  }
  [[nodiscard]] paged_buffers<T> buffers() noexcept {
    return {keys_.data(), values_.data(), positions_.data(), metrics_.data(), nullptr, nullptr};
  }
  [[nodiscard]] const_paged_buffers<T> buffers() const noexcept {
    return {keys_.data(), values_.data(), positions_.data(), metrics_.data()};
  }
  [[nodiscard]] const host_mover& mover() const noexcept { return mover_; }
  //! The host tables are the only copy: nothing to replay.
  [[nodiscard]] status sync(block_tables& tables) noexcept {
    tables.clear_journal();
    return status::success;
  }

 private:
  host_mover mover_;
  std::vector<T> keys_;            // [num_blocks][block_size][head_dim]
  std::vector<T> values_;          // [num_blocks][block_size][head_dim]
  std::vector<int32_t> positions_; // [num_blocks][block_size]
  std::vector<float> metrics_;     // [num_blocks][block_size]
};

template <kv_element T, int32_t HeadDim, paged_storage<T> Storage>
class basic_paged_cache {
 public:
  using kvc_concept = kv_store_tag;
  using element_type = T;
  using storage_type = Storage;
  //! What append() takes K/V in: fp32 for the host cache, T for the device cache.
  using source_type = typename Storage::source_type;
  static constexpr memory_space memory = Storage::memory;
  static_assert(HeadDim >= 0, "kvtrim::basic_paged_cache: HeadDim is a positive head dim or dynamic_head_dim.");

  //! An empty cache with no shape: contains() is false for every sequence.
  basic_paged_cache() = default;

  //! Validates `config` (and, for a static HeadDim, that the shape's head dim equals it:
  //! shape_mismatch), prepares `storage` and sets `out` to an empty cache.
  [[nodiscard]] static status create(const paged_cache_config& config, Storage storage, basic_paged_cache& out) {
    if (const status s = config.validate(); s != status::success) return s;
    if (HeadDim != dynamic_head_dim && config.shape.head_dim != HeadDim) return status::shape_mismatch;
    basic_paged_cache cache;
    const int64_t block_bytes = slot_bytes<T>(config.shape.head_dim) * config.block_size;
    if (const status s = block_tables::create(config, block_bytes, cache.tables_); s != status::success) return s;
    if (const status s = storage.init(config); s != status::success) return s;
    cache.storage_ = std::move(storage);
    out = std::move(cache);
    return status::success;
  }
  //! For storage that needs nothing from the caller (host memory).
  [[nodiscard]] static status create(const paged_cache_config& config, basic_paged_cache& out)
    requires std::default_initializable<Storage>
  {
    return create(config, Storage{}, out);
  }

  [[nodiscard]] attention_shape shape() const noexcept { return tables_.config().shape; }
  [[nodiscard]] const paged_cache_config& config() const noexcept { return tables_.config(); }
  [[nodiscard]] int32_t block_size() const noexcept { return tables_.config().block_size; }
  [[nodiscard]] int32_t head_dim() const noexcept {
    if constexpr (HeadDim != dynamic_head_dim) {
      return HeadDim;
    } else {
      return shape().head_dim;
    }
  }
  //! The metadata: sequences, block tables, lengths, the pool's free list.
  [[nodiscard]] const block_tables& tables() const noexcept { return tables_; }
  //! The pool buffers (and, for the device cache, the table mirror) kernels read.
  [[nodiscard]] paged_buffers<T> buffers() noexcept { return storage_.buffers(); }
  [[nodiscard]] const_paged_buffers<T> buffers() const noexcept { return storage_.buffers(); }

  [[nodiscard]] bool contains(int64_t seq) const noexcept { return tables_.contains(seq); }
  //! Tokens in head (seq, l, h); 0 for an unknown sequence or head.
  [[nodiscard]] int32_t head_length(int64_t seq, int32_t l, int32_t h) const noexcept { return tables_.length(seq, l, h); }
  //! The blocks of head (seq, l, h) in slot order (host copy of its table).
  [[nodiscard]] std::span<const int32_t> head_blocks(int64_t seq, int32_t l, int32_t h) const noexcept {
    return tables_.blocks(seq, l, h);
  }

  // ---- sequences

  //! Adds an empty sequence: invalid_argument for a negative or present id; pool_exhausted
  //! if `max_sequences` are alive.
  [[nodiscard]] status add_sequence(int64_t seq) { return tables_.add_sequence(seq); }

  //! Returns all of the sequence's blocks to the pool.
  [[nodiscard]] status free_sequence(int64_t seq) { return synced(tables_.free_sequence(seq)); }

  // ---- append

  //! Appends tokens to every head of one layer (a prefill chunk of that layer, or one decode
  //! token). positions [t]; k, v [t][H][d]. New slots get metric 0.
  [[nodiscard]] status append_layer(int64_t seq, int32_t layer, std::span<const int32_t> positions,
                                    std::span<const source_type> k, std::span<const source_type> v) {
    return append_layer(std::span<const int64_t>(&seq, 1), layer, positions, k, v);
  }

  //! Appends tokens to every head of one layer of each sequence of `seqs` as one operation:
  //! a decode step of a batch is one data step (one launch on the device) and one mirror
  //! update, not one per sequence. positions [B][t]; k, v [B][t][H][d]. All or nothing:
  //! invalid_argument for a sequence named twice; pool_exhausted when the pool cannot hold
  //! the whole batch. An empty batch with no data does nothing.
  [[nodiscard]] status append_layer(std::span<const int64_t> seqs, int32_t layer, std::span<const int32_t> positions,
                                    std::span<const source_type> k, std::span<const source_type> v) {
    if (seqs.empty()) return positions.empty() && k.empty() && v.empty() ? status::success : status::shape_mismatch;
    if (layer < 0 || layer >= shape().layers) {
      for (const int64_t seq : seqs)
        if (!contains(seq)) return status::unknown_sequence;
      return status::invalid_argument;
    }
    return append_rows(seqs, layer, 1, positions, k, v);
  }

  //! Appends tokens to every layer and head (a prefill chunk, or one decode token of the
  //! whole model). positions [t]; k, v [L][t][H][d]. Fails, changing nothing, with
  //! pool_exhausted when the pool cannot hold the chunk.
  [[nodiscard]] status append(int64_t seq, std::span<const int32_t> positions, std::span<const source_type> k,
                              std::span<const source_type> v) {
    return append_rows(std::span<const int64_t>(&seq, 1), 0, shape().layers, positions, k, v);
  }

  // ---- kv_store

  //! S6: copies head (seq, l, h) in slot order: positions [n], keys [n][d] as fp32, metric [n].
  [[nodiscard]] status read_head(int64_t seq, int32_t l, int32_t h, std::span<int32_t> positions,
                                 std::span<float> keys, std::span<float> metric) const {
    head_read_params<T> p;
    if (const status s = prepare_read(seq, l, h, p); s != status::success) return s;
    const auto n = static_cast<size_t>(p.head.length);
    if (positions.size() != n || keys.size() != n * static_cast<size_t>(head_dim()) || metric.size() != n)
      return status::shape_mismatch;
    p.positions = positions;
    p.keys = keys;
    p.metrics = metric;
    return storage_.mover().read_head(p);
  }

  //! Copies the values of head (seq, l, h) in slot order: values [n][d] as fp32.
  [[nodiscard]] status read_values(int64_t seq, int32_t l, int32_t h, std::span<float> values) const {
    head_read_params<T> p;
    if (const status s = prepare_read(seq, l, h, p); s != status::success) return s;
    if (values.size() != static_cast<size_t>(p.head.length) * static_cast<size_t>(head_dim()))
      return status::shape_mismatch;
    p.values = values;
    return storage_.mover().read_head(p);
  }

  //! S8: overwrites every slot's position and key of head (seq, l, h): positions [n],
  //! keys [n][d] fp32 (rounded to T). Used by key re-rotation.
  [[nodiscard]] status rewrite_head(int64_t seq, int32_t l, int32_t h, std::span<const int32_t> positions,
                                    std::span<const float> keys) {
    if (!contains(seq)) return status::unknown_sequence;
    if (!tables_.valid_head(l, h)) return status::invalid_argument;
    const int32_t n = head_length(seq, l, h);
    if (positions.size() != static_cast<size_t>(n) || keys.size() != static_cast<size_t>(n) * static_cast<size_t>(head_dim()))
      return status::shape_mismatch;
    for (const int32_t p : positions)
      if (p < 0 || p > max_position) return status::invalid_argument;
    head_write_params<T> p{storage_.buffers(), {tables_.blocks(seq, l, h), n, block_size()}, head_dim(), positions, keys};
    return storage_.mover().write_head(p);
  }

  //! S7: applies an eviction plan of any evictor (token-granular kept sets, KV-Compress's
  //! block-granular plans): writes the plan's metrics, compacts each head with MoveCache
  //! moves and returns the emptied trailing blocks to the pool. invalid_plan if the plan does
  //! not match the sequence's current heads.
  [[nodiscard]] status apply(int64_t seq, const eviction_plan& plan) {
    const status s = tables_.apply(seq, plan, steps_, [&](const compaction_steps& steps) {
      paged_buffers<T> pool = storage_.buffers();
      if (!steps.metric_slots.empty()) {
        if (const status m = storage_.mover().write_metrics({pool.metrics, steps.metric_slots, steps.metric_values});
            m != status::success)
          return m;
      }
      return storage_.mover().move_slots(slot_move_params<T>{pool, steps.moves, head_dim()});
    });
    return synced(s);
  }

  //! Commits a compaction that already moved each head's survivors to its front (the CUDA
  //! backend's `compress_on_device`): every head of `seqs` keeps the first `lengths`
  //! ([seqs][L][H]) slots and returns its emptied trailing blocks to the pool, with one
  //! mirror update for the whole batch. No data moves; all or nothing; a cache as created
  //! allocates nothing here. Errors as block_tables::truncate.
  [[nodiscard]] status truncate(std::span<const int64_t> seqs, std::span<const int32_t> lengths) {
    return synced(tables_.truncate(seqs, lengths));
  }

  // ---- memory accounting (blocks and bytes of K, V, positions and metrics)

  [[nodiscard]] memory_usage usage(int64_t seq) const noexcept { return tables_.usage(seq); }
  [[nodiscard]] memory_usage usage(int64_t seq, int32_t l) const noexcept { return tables_.usage(seq, l); }
  [[nodiscard]] memory_usage usage(int64_t seq, int32_t l, int32_t h) const noexcept { return tables_.usage(seq, l, h); }
  [[nodiscard]] pool_usage pool() const noexcept { return tables_.pool_state(); }

 private:
  //! Replays what `result`'s operation committed onto the mirror, then returns `result`, or
  //! the replay's failure. A failed operation has normally committed nothing; one that failed
  //! part-way through its commit (corrupted metadata: a double free) leaves no journal behind
  //! for the next operation to replay out of order.
  [[nodiscard]] status synced(status result) {
    const status s = storage_.sync(tables_);
    return result != status::success ? result : s;
  }

  //! Appends to layers [first, first + layers) of each sequence of `seqs`: positions [B][t];
  //! k, v [B][layers][t][H][d], with B = 1 or one layer: only then does the mover's rule,
  //! row r at positions[(r / H) % (B t)], give each row its sequence's position.
  [[nodiscard]] status append_rows(std::span<const int64_t> seqs, int32_t first, int32_t layers,
                                   std::span<const int32_t> positions, std::span<const source_type> k,
                                   std::span<const source_type> v) {
    for (const int64_t seq : seqs)
      if (!contains(seq)) return status::unknown_sequence;
    const size_t batch = seqs.size();
    if (positions.empty()) return status::invalid_argument;
    if (positions.size() % batch != 0) return status::shape_mismatch;
    for (const int32_t p : positions)
      if (p < 0 || p > max_position) return status::invalid_argument;
    const size_t tokens = positions.size() / batch;
    const int32_t heads = shape().kv_heads;
    const size_t rows = batch * static_cast<size_t>(layers) * tokens * static_cast<size_t>(heads);
    if (k.size() != rows * static_cast<size_t>(head_dim()) || v.size() != k.size()) return status::shape_mismatch;
    // More than any head holds: refused here, where block_tables would take the count as int32_t.
    if (tokens > static_cast<size_t>(config().max_tokens_per_head)) return status::invalid_argument;
    slots_.resize(rows);
    return synced(tables_.append(seqs, first, layers, static_cast<int32_t>(tokens), slots_, [&] {
      return storage_.mover().write_tokens(
          token_write_params<T, source_type>{storage_.buffers(), k.data(), v.data(), positions, slots_, heads, head_dim()});
    }));
  }

  [[nodiscard]] status prepare_read(int64_t seq, int32_t l, int32_t h, head_read_params<T>& p) const {
    if (!contains(seq)) return status::unknown_sequence;
    if (!tables_.valid_head(l, h)) return status::invalid_argument;
    p.pool = storage_.buffers();
    p.head = {tables_.blocks(seq, l, h), head_length(seq, l, h), block_size()};
    p.head_dim = head_dim();
    return status::success;
  }

  block_tables tables_;
  Storage storage_;
  std::vector<int64_t> slots_;  // scratch: [B][layers][tokens][H] physical slots of an append
  compaction_steps steps_;      // scratch: the data steps of an apply
};

//! The paged cache in host memory. T: fp32, fp16 or bf16 storage; HeadDim: a compile-time
//! head dim or dynamic_head_dim.
template <kv_element T = float, int32_t HeadDim = dynamic_head_dim>
using paged_cache = basic_paged_cache<T, HeadDim, host_storage<T>>;

static_assert(kv_store<paged_cache<float>>);
static_assert(kv_store<paged_cache<float16>>);
static_assert(kv_store<paged_cache<bfloat16, 128>>);

KVTRIM_NAMESPACE_END
