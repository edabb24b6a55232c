#pragma once
//! \file paged_layout.hpp
//! Shape and sizes of the paged per-head cache (KV-Compress's layout, docs/cache.md): a pool
//! of `num_blocks` blocks, each holding `block_size` tokens of ONE (sequence, layer, KV head),
//! and a block table plus a length for every (sequence, layer, KV head).
//!
//!   keys, values  [num_blocks][block_size][head_dim]   element T
//!   positions     [num_blocks][block_size]             int32, original token position
//!   metrics       [num_blocks][block_size]             float, accumulated slot metric
//!   block_tables  [max_sequences][L][H][max_blocks_per_head]  int32 block id, -1 past the end
//!   lengths       [max_sequences][L][H]                int32 tokens
//!
//! Slot `j` of a head lives in block `table[j / block_size]` at offset `j % block_size`; its
//! physical slot `block * block_size + offset` indexes the pool arrays (64-bit: a pool may
//! pass 2^31 elements).

#include <cstddef>
#include <cstdint>

#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/core/shape.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! A head dim chosen at run time (the template argument of the stores; mdspan's dynamic_extent).
inline constexpr int32_t dynamic_head_dim = 0;

//! Everything that sizes a paged cache; fixed when it is created.
struct paged_cache_config {
  attention_shape shape;             //!< kv_heads = stored heads per layer (Hq in query-head mode)
  int32_t block_size = 16;           //!< tokens per block
  int32_t num_blocks = 0;            //!< blocks in the pool
  int32_t max_sequences = 1;         //!< sequences alive at once
  int32_t max_tokens_per_head = 0;   //!< tokens one (sequence, layer, head) may hold

  //! Blocks one head's table can name: ceil(max_tokens_per_head / block_size); 0 unless both
  //! are positive. Exact up to max_tokens_per_head = 2^31 - 1 (no overflow).
  [[nodiscard]] constexpr int32_t max_blocks_per_head() const noexcept {
    return block_size > 0 && max_tokens_per_head > 0 ? (max_tokens_per_head - 1) / block_size + 1 : 0;
  }
  //! Heads of one sequence: L * H.
  [[nodiscard]] constexpr int64_t heads_per_sequence() const noexcept {
    return static_cast<int64_t>(shape.layers) * shape.kv_heads;
  }
  //! The most elements one buffer may hold (2^60): past it, a buffer's size in bytes would
  //! wrap around 64 bits and the cache would be smaller than its config.
  static constexpr int64_t max_elements = int64_t{1} << 60;

  [[nodiscard]] constexpr status validate() const noexcept {
    if (const status s = shape.validate(); s != status::success) return s;
    if (block_size < 1 || num_blocks < 1 || max_sequences < 1 || max_tokens_per_head < 1)
      return status::invalid_argument;
    // Every buffer's element count, in 64 bits without overflow (each factor is < 2^31,
    // heads_per_sequence() < 2^62).
    const int64_t slots = static_cast<int64_t>(num_blocks) * block_size;
    if (slots > max_elements / shape.head_dim) return status::invalid_argument;  // keys, values
    if (heads_per_sequence() > max_elements / max_sequences) return status::invalid_argument;  // lengths
    const int64_t heads = heads_per_sequence() * max_sequences;
    if (heads > max_elements / max_blocks_per_head()) return status::invalid_argument;  // block tables
    return status::success;
  }
  friend constexpr bool operator==(const paged_cache_config&, const paged_cache_config&) = default;
};

//! Bytes one slot occupies in the pool: K and V rows, its position and its metric.
template <kv_element T>
[[nodiscard]] constexpr int64_t slot_bytes(int32_t head_dim) noexcept {
  return 2 * static_cast<int64_t>(head_dim) * static_cast<int64_t>(sizeof(T)) +
         static_cast<int64_t>(sizeof(int32_t) + sizeof(float));
}

//! What a sequence, a layer of it or one head holds.
struct memory_usage {
  int64_t tokens = 0;
  int64_t blocks = 0;
  int64_t bytes = 0;  //!< blocks * bytes per block (K, V, positions, metrics)
  friend constexpr bool operator==(const memory_usage&, const memory_usage&) = default;
};

//! The state of the whole pool.
struct pool_usage {
  int64_t total_blocks = 0;
  int64_t used_blocks = 0;
  int64_t bytes_per_block = 0;
  [[nodiscard]] constexpr int64_t free_blocks() const noexcept { return total_blocks - used_blocks; }
  [[nodiscard]] constexpr int64_t used_bytes() const noexcept { return used_blocks * bytes_per_block; }
  [[nodiscard]] constexpr int64_t free_bytes() const noexcept { return free_blocks() * bytes_per_block; }
  friend constexpr bool operator==(const pool_usage&, const pool_usage&) = default;
};

//! Bytes of every buffer of a paged cache: what a caller allocates for the device variant.
struct paged_buffer_sizes {
  size_t keys = 0;          //!< [num_blocks][block_size][head_dim] T
  size_t values = 0;        //!< [num_blocks][block_size][head_dim] T
  size_t positions = 0;     //!< [num_blocks][block_size] int32
  size_t metrics = 0;       //!< [num_blocks][block_size] float
  size_t block_tables = 0;  //!< [max_sequences][L][H][max_blocks_per_head] int32
  size_t lengths = 0;       //!< [max_sequences][L][H] int32
  [[nodiscard]] constexpr size_t total() const noexcept {
    return keys + values + positions + metrics + block_tables + lengths;
  }
};

//! All zero for a config that does not validate (its negative counts would ask for exabytes).
template <kv_element T>
[[nodiscard]] constexpr paged_buffer_sizes buffer_sizes(const paged_cache_config& c) noexcept {
  if (c.validate() != status::success) return {};
  const size_t slots = static_cast<size_t>(c.num_blocks) * static_cast<size_t>(c.block_size);
  const size_t heads = static_cast<size_t>(c.max_sequences) * static_cast<size_t>(c.heads_per_sequence());
  paged_buffer_sizes s;
  s.keys = slots * static_cast<size_t>(c.shape.head_dim) * sizeof(T);
  s.values = s.keys;
  s.positions = slots * sizeof(int32_t);
  s.metrics = slots * sizeof(float);
  s.block_tables = heads * static_cast<size_t>(c.max_blocks_per_head()) * sizeof(int32_t);
  s.lengths = heads * sizeof(int32_t);
  return s;
}

KVTRIM_NAMESPACE_END
