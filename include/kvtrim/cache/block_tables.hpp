#pragma once
//! \file block_tables.hpp
//! The host metadata of the paged per-head cache, shared by its host and device variants:
//! which sequences are alive, the block table and length of every (sequence, layer, KV head),
//! and the pool of free blocks. It decides where tokens go and which blocks a compaction
//! frees; the cache that owns it moves the data (docs/cache.md).
//!
//! Every mutating call validates everything first, computes the data steps, reserves what
//! its commit needs, runs the caller's data step, and commits the metadata only if that step
//! succeeded: on any error, std::bad_alloc included, nothing changed (strong guarantee).
//! Every committed change is also journaled, so a device mirror of the tables can be updated
//! with one scatter per operation: new blocks as single entries, freed blocks as one run per
//! head (a compression frees most of a head's blocks at once).

#include <algorithm>
#include <bit>
#include <concepts>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvtrim/cache/block_pool.hpp"
#include "kvtrim/cache/paged_layout.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/blocks.hpp"
#include "kvtrim/plan/eviction_plan.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! A callable that performs a data step and reports whether it succeeded.
template <class F, class... Args>
concept status_step = std::invocable<F, Args...> && std::same_as<std::invoke_result_t<F, Args...>, status>;

//! One committed change of the metadata, to replay onto a device mirror.
struct metadata_write {
  int64_t index;  //!< flat index into block_tables [S][L][H][max_blocks] or lengths [S][L][H]
  int32_t value;
};

//! One committed run of table entries set to `block_tables::no_block`: the trailing blocks a
//! head freed, contiguous in its table.
struct metadata_clear {
  int64_t first;  //!< flat index into block_tables [S][L][H][max_blocks] of the run's first entry
  int64_t count;  //!< entries, at least 1
};

//! A compaction move between physical slots of the pool (K, V, position and metric travel).
struct physical_move {
  int64_t dst;
  int64_t src;
};

//! The data steps of applying one eviction plan, in physical slots, computed before anything
//! changes. Reused between calls so a steady state allocates nothing.
struct compaction_steps {
  std::vector<int64_t> metric_slots;  //!< [sum of lengths] physical slot of every slot, when the plan writes metrics
  std::vector<float> metric_values;   //!< [sum of lengths] the plan's metric of that slot
  std::vector<physical_move> moves;   //!< MoveCache moves of every head; no two share a dst or a src
  std::vector<slot_move> head_moves;  //!< scratch: one head's moves in logical slots
};

namespace detail {

//! block_tables' check for a row named twice in a batch, O(1) a row: each row keeps the epoch
//! of the last batch that named it, so a new batch clears nothing. After 2^bits(Epoch) - 1
//! batches the epoch wraps; then every mark is cleared once, so no mark that old looks current.
template <std::unsigned_integral Epoch>
class batch_marks {
 public:
  batch_marks() = default;
  explicit batch_marks(int32_t rows) : marks_(static_cast<size_t>(rows), Epoch{0}) {}

  void begin_batch() noexcept {
    if (++epoch_ == 0) {
      std::fill(marks_.begin(), marks_.end(), Epoch{0});
      epoch_ = 1;
    }
  }
  //! False if `row` (in [0, rows)) was already named since begin_batch().
  [[nodiscard]] bool first_visit(int32_t row) noexcept {
    Epoch& mark = marks_[static_cast<size_t>(row)];
    if (mark == epoch_) return false;
    mark = epoch_;
    return true;
  }

 private:
  std::vector<Epoch> marks_;  // [rows] the epoch of the last batch that named each row
  Epoch epoch_ = 0;
};

}  // namespace detail

class block_tables {
 public:
  block_tables() = default;

  //! Validates `config` and sets up an empty cache: no sequence, every block free.
  //! `bytes_per_block` is what one block costs in the store (memory accounting only).
  [[nodiscard]] static status create(const paged_cache_config& config, int64_t bytes_per_block, block_tables& out) {
    if (const status s = config.validate(); s != status::success) return s;
    if (bytes_per_block < 0) return status::invalid_argument;
    block_tables t;
    t.config_ = config;
    t.block_math_ = block_divider(config.block_size);
    t.bytes_per_block_ = bytes_per_block;
    t.pool_ = block_pool(config.num_blocks);
    t.ids_.assign(static_cast<size_t>(config.max_sequences), no_sequence);
    t.index_.assign(std::bit_ceil(2 * static_cast<size_t>(config.max_sequences)), -1);
    t.batch_rows_ = detail::batch_marks<uint32_t>(config.max_sequences);
    const size_t heads = static_cast<size_t>(config.max_sequences) * static_cast<size_t>(config.heads_per_sequence());
    t.lengths_.assign(heads, 0);
    t.tables_.assign(heads * static_cast<size_t>(config.max_blocks_per_head()), no_block);
    // One operation takes at most every block, and clears and resizes every head at most once,
    // so the journal of a cache that replays it after each operation never allocates:
    // `truncate` cannot fail for memory after the device compacted the slots it commits (a
    // copy of the tables loses this).
    t.table_writes_.reserve(static_cast<size_t>(config.num_blocks));
    t.table_clears_.reserve(heads);
    t.length_writes_.reserve(heads);
    out = std::move(t);
    return status::success;
  }

  [[nodiscard]] const paged_cache_config& config() const noexcept { return config_; }
  [[nodiscard]] const block_pool& pool() const noexcept { return pool_; }
  [[nodiscard]] int64_t bytes_per_block() const noexcept { return bytes_per_block_; }

  // ---- sequences

  [[nodiscard]] bool contains(int64_t seq) const noexcept { return sequence_slot(seq) >= 0; }
  //! The row of `seq` in the tables, or -1. O(1): every batch call looks up each of its ids.
  [[nodiscard]] int32_t sequence_slot(int64_t seq) const noexcept {
    if (seq < 0 || index_.empty()) return -1;
    for (size_t i = home(seq);; i = (i + 1) & (index_.size() - 1)) {
      const int32_t row = index_[i];
      if (row < 0 || ids_[static_cast<size_t>(row)] == seq) return row;
    }
  }
  //! The sequence in row `slot`, or -1 if the row is free.
  [[nodiscard]] int64_t sequence_id(int32_t slot) const noexcept {
    return slot >= 0 && slot < config_.max_sequences ? ids_[static_cast<size_t>(slot)] : no_sequence;
  }

  //! Adds an empty sequence. invalid_argument if `seq` is negative or already present;
  //! pool_exhausted if all `max_sequences` rows are taken.
  [[nodiscard]] status add_sequence(int64_t seq) {
    if (seq < 0 || contains(seq)) return status::invalid_argument;
    const auto it = std::find(ids_.begin(), ids_.end(), no_sequence);
    if (it == ids_.end()) return status::pool_exhausted;
    *it = seq;
    size_t i = home(seq);
    while (index_[i] >= 0) i = (i + 1) & (index_.size() - 1);
    index_[i] = static_cast<int32_t>(it - ids_.begin());
    return status::success;
  }

  //! Returns every block of `seq` to the pool and forgets it.
  [[nodiscard]] status free_sequence(int64_t seq) {
    const int32_t row = sequence_slot(seq);
    if (row < 0) return status::unknown_sequence;
    reserve_shrinks(1);
    for (int32_t l = 0; l < config_.shape.layers; ++l)
      for (int32_t h = 0; h < config_.shape.kv_heads; ++h) {
        if (const status s = shrink(row, l, h, 0); s != status::success) return s;
      }
    unindex(seq);
    ids_[static_cast<size_t>(row)] = no_sequence;
    return status::success;
  }

  // ---- heads

  [[nodiscard]] bool valid_head(int32_t l, int32_t h) const noexcept {
    return l >= 0 && l < config_.shape.layers && h >= 0 && h < config_.shape.kv_heads;
  }
  //! Tokens in head (seq, l, h); 0 for an unknown sequence or head.
  [[nodiscard]] int32_t length(int64_t seq, int32_t l, int32_t h) const noexcept {
    const int32_t row = sequence_slot(seq);
    return row >= 0 && valid_head(l, h) ? lengths_[head_index(row, l, h)] : 0;
  }
  //! The blocks of head (seq, l, h) in slot order; empty for an unknown sequence or head.
  [[nodiscard]] std::span<const int32_t> blocks(int64_t seq, int32_t l, int32_t h) const noexcept {
    const int32_t row = sequence_slot(seq);
    if (row < 0 || !valid_head(l, h)) return {};
    const size_t head = head_index(row, l, h);
    return {tables_.data() + head * max_blocks(), static_cast<size_t>(block_math_.blocks_for(lengths_[head]))};
  }
  //! Physical slot of slot `j` of a head whose blocks are `blocks`.
  [[nodiscard]] int64_t physical_slot(std::span<const int32_t> blocks, int32_t j) const noexcept {
    const int64_t block = blocks[static_cast<size_t>(block_math_.block_of(j))];
    return block * config_.block_size + block_math_.offset_of(j);
  }

  //! The whole metadata, as a device mirror holds it.
  [[nodiscard]] std::span<const int32_t> table_data() const noexcept { return tables_; }    // [S][L][H][max_blocks]
  [[nodiscard]] std::span<const int32_t> length_data() const noexcept { return lengths_; }  // [S][L][H]

  // ---- memory accounting

  [[nodiscard]] memory_usage usage(int64_t seq, int32_t l, int32_t h) const noexcept {
    const int32_t n = length(seq, l, h);
    const int64_t b = block_math_.blocks_for(n);
    return {n, b, b * bytes_per_block_};
  }
  //! One layer of a sequence (all its heads).
  [[nodiscard]] memory_usage usage(int64_t seq, int32_t l) const noexcept {
    memory_usage u;
    for (int32_t h = 0; h < config_.shape.kv_heads; ++h) u = add(u, usage(seq, l, h));
    return u;
  }
  //! A whole sequence; all zero for an unknown one.
  [[nodiscard]] memory_usage usage(int64_t seq) const noexcept {
    memory_usage u;
    for (int32_t l = 0; l < config_.shape.layers; ++l) u = add(u, usage(seq, l));
    return u;
  }
  [[nodiscard]] pool_usage pool_state() const noexcept {
    return {pool_.capacity(), pool_.used_count(), bytes_per_block_};
  }

  // ---- operations

  //! Appends `tokens` tokens to every head of layers [first, first + layers) of each sequence
  //! of `seqs`, all or none. `slots` [seqs][layers][tokens][H] receives the physical slot of
  //! each new token (vLLM's slot_mapping per KV head); then `write()` stores the data and, if
  //! it succeeds, the blocks are taken and the lengths grow. Errors: unknown_sequence;
  //! invalid_argument for a sequence named twice, a bad layer range, no tokens, or a head that
  //! would pass max_tokens_per_head; shape_mismatch for a wrong `slots` size; pool_exhausted
  //! when the pool has fewer free blocks than the heads need together.
  template <status_step Write>
  [[nodiscard]] status append(std::span<const int64_t> seqs, int32_t first, int32_t layers, int32_t tokens,
                              std::span<int64_t> slots, Write&& write) {
    batch_rows_.begin_batch();
    for (const int64_t seq : seqs) {
      const int32_t row = sequence_slot(seq);
      if (row < 0) return status::unknown_sequence;
      if (!batch_rows_.first_visit(row)) return status::invalid_argument;
    }
    const int32_t heads = config_.shape.kv_heads;
    if (first < 0 || layers < 1 || layers > config_.shape.layers - first || tokens < 1) return status::invalid_argument;
    if (slots.size() != seqs.size() * static_cast<size_t>(layers) * static_cast<size_t>(tokens) * static_cast<size_t>(heads))
      return status::shape_mismatch;
    int64_t needed = 0;
    for (const int64_t seq : seqs) {
      const int32_t row = sequence_slot(seq);
      for (int32_t l = first; l < first + layers; ++l)
        for (int32_t h = 0; h < heads; ++h) {
          const int32_t n = lengths_[head_index(row, l, h)];
          if (n > config_.max_tokens_per_head - tokens) return status::invalid_argument;
          needed += block_math_.blocks_for(n + tokens) - block_math_.blocks_for(n);
        }
    }
    if (needed > pool_.free_count()) return status::pool_exhausted;
    // Any allocation happens here, before the first change (a cache as created has the room).
    table_writes_.reserve(table_writes_.size() + static_cast<size_t>(needed));
    length_writes_.reserve(length_writes_.size() + slots.size() / static_cast<size_t>(tokens));

    // Where each token goes, taking new blocks in the order allocate() will hand them out.
    const std::span<const int32_t> free_list = pool_.free_list();
    size_t taken = 0;
    const int32_t bs = config_.block_size;
    int64_t* slot = slots.data();
    for (const int64_t seq : seqs) {
      const int32_t row = sequence_slot(seq);
      for (int32_t l = first; l < first + layers; ++l) {
        for (int32_t h = 0; h < heads; ++h) {
          const size_t head = head_index(row, l, h);
          const int32_t n = lengths_[head];
          const int32_t owned = block_math_.blocks_for(n);
          const int32_t* table = tables_.data() + head * max_blocks();
          for (int32_t t = 0; t < tokens; ++t) {
            const int32_t j = n + t;
            const int32_t b = block_math_.block_of(j);
            const int32_t block =
                b < owned ? table[b] : free_list[free_list.size() - 1 - taken - static_cast<size_t>(b - owned)];
            slot[static_cast<size_t>(t) * heads + static_cast<size_t>(h)] =
                static_cast<int64_t>(block) * bs + block_math_.offset_of(j);
          }
          taken += static_cast<size_t>(block_math_.blocks_for(n + tokens) - owned);
        }
        slot += static_cast<size_t>(tokens) * heads;
      }
    }
    if (const status s = write(); s != status::success) return s;

    for (const int64_t seq : seqs) {
      const int32_t row = sequence_slot(seq);
      for (int32_t l = first; l < first + layers; ++l)
        for (int32_t h = 0; h < heads; ++h) {
          const size_t head = head_index(row, l, h);
          const int32_t owned = block_math_.blocks_for(lengths_[head]);
          const int32_t grown = block_math_.blocks_for(lengths_[head] + tokens);
          const std::span<int32_t> fresh(tables_.data() + head * max_blocks() + owned, static_cast<size_t>(grown - owned));
          if (const status s = pool_.allocate(fresh); s != status::success) return s;
          for (size_t i = 0; i < fresh.size(); ++i)
            journal(table_writes_, static_cast<int64_t>(head * max_blocks()) + owned + static_cast<int64_t>(i), fresh[i]);
          lengths_[head] += tokens;
          journal(length_writes_, static_cast<int64_t>(head), lengths_[head]);
        }
    }
    return status::success;
  }

  //! The same for one sequence: `slots` [layers][tokens][H].
  template <status_step Write>
  [[nodiscard]] status append(int64_t seq, int32_t first, int32_t layers, int32_t tokens, std::span<int64_t> slots,
                              Write&& write) {
    return append(std::span<const int64_t>(&seq, 1), first, layers, tokens, slots, std::forward<Write>(write));
  }

  //! Applies `plan` to `seq`: validates it against the current lengths (invalid_plan),
  //! fills `steps` with the metric writes and MoveCache moves in physical slots, runs
  //! `move(steps)`, and then shortens every head to its kept count and returns the emptied
  //! trailing blocks to the pool.
  template <status_step<const compaction_steps&> Move>
  [[nodiscard]] status apply(int64_t seq, const eviction_plan& plan, compaction_steps& steps, Move&& move) {
    const int32_t row = sequence_slot(seq);
    if (row < 0) return status::unknown_sequence;
    const int32_t layers = config_.shape.layers, heads = config_.shape.kv_heads;
    if (plan.layers() != layers || plan.heads() != heads) return status::invalid_plan;
    const std::span<const int32_t> current(lengths_.data() + head_index(row, 0, 0), static_cast<size_t>(layers) * heads);
    if (const status s = plan.validate(current); s != status::success) return s;

    steps.metric_slots.clear();
    steps.metric_values.clear();
    steps.moves.clear();
    for (int32_t l = 0; l < layers; ++l)
      for (int32_t h = 0; h < heads; ++h) {
        const std::span<const int32_t> table = blocks(seq, l, h);
        if (!plan.metrics.empty()) {
          const std::span<const float> m = plan.metrics.row(l, h);
          for (size_t j = 0; j < m.size(); ++j) steps.metric_slots.push_back(physical_slot(table, static_cast<int32_t>(j)));
          steps.metric_values.insert(steps.metric_values.end(), m.begin(), m.end());
        }
        compaction_moves(plan.length_before(l, h), plan.kept(l, h), steps.head_moves);
        for (const slot_move& mv : steps.head_moves)
          steps.moves.push_back({physical_slot(table, mv.dst), physical_slot(table, mv.src)});
      }
    reserve_shrinks(1);
    if (const status s = move(std::as_const(steps)); s != status::success) return s;

    for (int32_t l = 0; l < layers; ++l)
      for (int32_t h = 0; h < heads; ++h) {
        if (const status s = shrink(row, l, h, plan.kept_count(l, h)); s != status::success) return s;
      }
    return status::success;
  }

  //! Shortens every head of the sequences `seqs` to the length `lengths` gives it
  //! ([seqs][L][H]), keeping its first slots, and returns the emptied trailing blocks to the
  //! pool: the commit of a compaction that already moved each head's survivors to its front
  //! (the CUDA backend's). All or nothing, std::bad_alloc included; a cache as created (not
  //! a copy) has the room reserved and allocates nothing here. Errors: shape_mismatch
  //! for a wrong `lengths` size; unknown_sequence; invalid_argument for a sequence named
  //! twice, a length above the head's, or below 1 for a non-empty head (as `apply`, it never
  //! empties a head).
  [[nodiscard]] status truncate(std::span<const int64_t> seqs, std::span<const int32_t> lengths) {
    const int32_t layers = config_.shape.layers, heads = config_.shape.kv_heads;
    const size_t per_sequence = static_cast<size_t>(layers) * static_cast<size_t>(heads);
    if (lengths.size() != seqs.size() * per_sequence) return status::shape_mismatch;
    size_t cleared = 0;  // heads that free blocks: one journal run each
    batch_rows_.begin_batch();
    for (size_t b = 0; b < seqs.size(); ++b) {
      const int32_t row = sequence_slot(seqs[b]);
      if (row < 0) return status::unknown_sequence;
      if (!batch_rows_.first_visit(row)) return status::invalid_argument;
      const std::span<const int32_t> current(lengths_.data() + head_index(row, 0, 0), per_sequence);
      for (size_t i = 0; i < per_sequence; ++i) {
        const int32_t n = lengths[b * per_sequence + i];
        if (n < std::min(current[i], 1) || n > current[i]) return status::invalid_argument;
        if (block_math_.blocks_for(n) < block_math_.blocks_for(current[i])) ++cleared;
      }
    }
    // Any allocation happens here, before the first change.
    table_clears_.reserve(table_clears_.size() + cleared);
    length_writes_.reserve(length_writes_.size() + lengths.size());
    pool_.reserve();
    for (size_t b = 0; b < seqs.size(); ++b) {
      const int32_t row = sequence_slot(seqs[b]);
      const int32_t* length = lengths.data() + b * per_sequence;  // [L][H]
      for (int32_t l = 0; l < layers; ++l)
        for (int32_t h = 0; h < heads; ++h)
          if (const status s = shrink(row, l, h, *length++); s != status::success) return s;
    }
    return status::success;
  }

  // ---- journal

  //! Blocks taken: one entry each.
  [[nodiscard]] std::span<const metadata_write> table_writes() const noexcept { return table_writes_; }
  //! Blocks freed: one run per head and operation, disjoint from the operation's table_writes.
  [[nodiscard]] std::span<const metadata_clear> table_clears() const noexcept { return table_clears_; }
  [[nodiscard]] std::span<const metadata_write> length_writes() const noexcept { return length_writes_; }
  //! Forgets the journal once the owner has replayed it (or needs no mirror).
  void clear_journal() noexcept {
    table_writes_.clear();
    table_clears_.clear();
    length_writes_.clear();
  }

  //! Same sequences, tables, lengths and free list (the journal is not state).
  friend bool operator==(const block_tables& a, const block_tables& b) {
    return a.config_ == b.config_ && a.bytes_per_block_ == b.bytes_per_block_ && a.pool_ == b.pool_ &&
           a.ids_ == b.ids_ && a.lengths_ == b.lengths_ && a.tables_ == b.tables_;
  }

  static constexpr int64_t no_sequence = -1;
  static constexpr int32_t no_block = -1;

 private:
  [[nodiscard]] size_t max_blocks() const noexcept { return static_cast<size_t>(config_.max_blocks_per_head()); }
  [[nodiscard]] size_t head_index(int32_t row, int32_t l, int32_t h) const noexcept {
    return (static_cast<size_t>(row) * config_.shape.layers + static_cast<size_t>(l)) * config_.shape.kv_heads +
           static_cast<size_t>(h);
  }
  [[nodiscard]] static memory_usage add(memory_usage a, memory_usage b) noexcept {
    return {a.tokens + b.tokens, a.blocks + b.blocks, a.bytes + b.bytes};
  }

  //! Room for shrinking every head of `sequences` sequences (journal, free list): any
  //! allocation happens before the first change (a cache as created already has it).
  void reserve_shrinks(size_t sequences) {
    const size_t heads = sequences * static_cast<size_t>(config_.heads_per_sequence());
    table_clears_.reserve(table_clears_.size() + heads);
    length_writes_.reserve(length_writes_.size() + heads);
    pool_.reserve();
  }

  //! Journal entries are built in place: a braced temporary pushed back was written as two
  //! stores and read back as one 16-byte load, a store-forwarding stall per entry (perf,
  //! bench_cache_cpu's decode_step_tables).
  static void journal(std::vector<metadata_write>& writes, int64_t index, int32_t value) {
    metadata_write& w = writes.emplace_back();
    w.index = index;
    w.value = value;
  }
  static void journal(std::vector<metadata_clear>& clears, int64_t first, int64_t count) {
    metadata_clear& c = clears.emplace_back();
    c.first = first;
    c.count = count;
  }
  //! Where the probe for `seq` starts in index_: Fibonacci hashing, the product's top
  //! log2(index size) bits, which every bit of the id reaches (ids are often 0, 1, 2..., or
  //! carry a shard in their high bits).
  [[nodiscard]] size_t home(int64_t seq) const noexcept {
    const int bits = std::countr_zero(index_.size());
    return static_cast<size_t>((static_cast<uint64_t>(seq) * 0x9e3779b97f4a7c15ull) >> (64 - bits));
  }
  //! Removes present `seq` from index_, shifting later entries of its probe run back into the
  //! gap (linear probing without tombstones: lookups stay short however often ids come and go).
  void unindex(int64_t seq) noexcept {
    const size_t mask = index_.size() - 1;
    size_t gap = home(seq);
    while (ids_[static_cast<size_t>(index_[gap])] != seq) gap = (gap + 1) & mask;
    for (size_t i = (gap + 1) & mask; index_[i] >= 0; i = (i + 1) & mask) {
      // The entry at i may fill the gap unless its home lies cyclically in (gap, i].
      const size_t want = home(ids_[static_cast<size_t>(index_[i])]);
      if (((i - want) & mask) >= ((i - gap) & mask)) {
        index_[gap] = index_[i];
        gap = i;
      }
    }
    index_[gap] = -1;
  }

  //! Cuts head (row, l, h) to `length` tokens and returns its emptied trailing blocks.
  [[nodiscard]] status shrink(int32_t row, int32_t l, int32_t h, int32_t length) {
    const size_t head = head_index(row, l, h);
    const int32_t keep = block_math_.blocks_for(length);
    const int32_t owned = block_math_.blocks_for(lengths_[head]);
    int32_t* table = tables_.data() + head * max_blocks();
    // The table owns these blocks, so the pool's double-free check cannot fire unless the
    // metadata was corrupted; it is reported all the same.
    if (const status s = pool_.release({table + keep, static_cast<size_t>(owned - keep)}); s != status::success)
      return s;
    if (keep < owned) {
      std::fill(table + keep, table + owned, no_block);
      journal(table_clears_, static_cast<int64_t>(head * max_blocks()) + keep, owned - keep);
    }
    if (lengths_[head] != length) {
      lengths_[head] = length;
      journal(length_writes_, static_cast<int64_t>(head), length);
    }
    return status::success;
  }

  paged_cache_config config_{};
  block_divider block_math_{paged_cache_config{}.block_size};  // config_.block_size's arithmetic
  int64_t bytes_per_block_ = 0;
  block_pool pool_;
  std::vector<int64_t> ids_;      // [max_sequences] sequence id of each row, no_sequence if free
  std::vector<int32_t> index_;    // id -> row: open addressing, >= 2 max_sequences entries (row or -1)
  detail::batch_marks<uint32_t> batch_rows_;  // a batch's ids are checked in order for repeats
  std::vector<int32_t> lengths_;  // [max_sequences][L][H] tokens
  std::vector<int32_t> tables_;   // [max_sequences][L][H][max_blocks_per_head] block ids, no_block past the end
  // The journal since the last clear_journal().
  std::vector<metadata_write> table_writes_;
  std::vector<metadata_clear> table_clears_;
  std::vector<metadata_write> length_writes_;
};

KVTRIM_NAMESPACE_END
