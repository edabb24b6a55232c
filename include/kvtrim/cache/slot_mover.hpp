#pragma once
//! \file slot_mover.hpp
//! The data steps of the paged cache, separated from its metadata so one cache template
//! serves host and device memory. The block tables (host) decide every physical slot; a
//! mover only copies: it receives host-side index lists and pointers into the pool buffers.
//! `host_mover` runs each step as plain loops: the host cache uses it, and the device cache
//! uses it as the correct fallback until the CUDA movers land (one kernel per step, the index
//! lists staged through the mover's own workspace; docs/cache.md).

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>

#include "kvtrim/cache/block_tables.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! Every buffer of a paged cache, where they live (host or device).
template <kv_element T>
struct paged_buffers {
  T* keys = nullptr;              //!< [num_blocks][block_size][head_dim]
  T* values = nullptr;            //!< [num_blocks][block_size][head_dim]
  int32_t* positions = nullptr;   //!< [num_blocks][block_size]
  float* metrics = nullptr;       //!< [num_blocks][block_size]
  int32_t* block_tables = nullptr;//!< [max_sequences][L][H][max_blocks_per_head]; null in host storage
  int32_t* lengths = nullptr;     //!< [max_sequences][L][H]; null in host storage
};

//! The pool buffers as read-only views (reads of a const cache).
template <kv_element T>
struct const_paged_buffers {
  const T* keys = nullptr;            //!< [num_blocks][block_size][head_dim]
  const T* values = nullptr;          //!< [num_blocks][block_size][head_dim]
  const int32_t* positions = nullptr; //!< [num_blocks][block_size]
  const float* metrics = nullptr;     //!< [num_blocks][block_size]
};

//! The slots of one head: slot j is at physical slot blocks[j / block_size] * block_size + j % block_size.
struct head_slots {
  std::span<const int32_t> blocks;  //!< host copy of the head's block table
  int32_t length = 0;               //!< tokens
  int32_t block_size = 1;

  //! Calls f(j, physical slot) for the slots j = 0 .. length - 1 in order, a block at a time
  //! (no division per slot).
  template <std::invocable<int32_t, int64_t> F>
  void for_each(F&& f) const {
    int32_t j = 0;
    for (const int32_t block : blocks) {
      if (j >= length) break;
      const int64_t base = static_cast<int64_t>(block) * block_size;
      for (int32_t o = 0; o < block_size && j < length; ++o, ++j) f(j, base + o);
    }
  }
};

//! Append: row r of the source ([layers][tokens][H] rows of head_dim) goes to physical slot
//! slots[r], with position positions[(r / heads) % tokens] and metric 0.
template <kv_element T, kv_element Src>
struct token_write_params {
  paged_buffers<T> pool;
  const Src* keys = nullptr;            //!< [layers][tokens][H][head_dim], memory of the pool
  const Src* values = nullptr;          //!< [layers][tokens][H][head_dim], memory of the pool
  std::span<const int32_t> positions;   //!< [tokens] host
  std::span<const int64_t> slots;       //!< [layers][tokens][H] host
  int32_t heads = 0;
  int32_t head_dim = 0;
};

//! metrics[slots[i]] = values[i] (an accumulating policy's metrics, before compaction).
struct metric_write_params {
  float* metrics = nullptr;
  std::span<const int64_t> slots;  //!< host
  std::span<const float> values;   //!< host, same size
};

//! Compaction: every move copies K, V, position and metric from src to dst.
template <kv_element T>
struct slot_move_params {
  paged_buffers<T> pool;
  std::span<const physical_move> moves;  //!< host; no two share a dst or a src
  int32_t head_dim = 0;
};

//! Gathers one head in slot order into host fp32 outputs; an empty output is skipped.
template <kv_element T>
struct head_read_params {
  const_paged_buffers<T> pool;
  head_slots head;
  int32_t head_dim = 0;
  std::span<int32_t> positions;  //!< [length]
  std::span<float> keys;         //!< [length][head_dim]
  std::span<float> values;       //!< [length][head_dim]
  std::span<float> metrics;      //!< [length]
};

//! Overwrites one head's positions and keys from host fp32 (key re-rotation).
template <kv_element T>
struct head_write_params {
  paged_buffers<T> pool;
  head_slots head;
  int32_t head_dim = 0;
  std::span<const int32_t> positions;  //!< [length]
  std::span<const float> keys;         //!< [length][head_dim]
};

//! Replays one operation's metadata journal onto the mirror of the block tables and lengths.
//! The journal names every table entry and length at most once, so its parts may be
//! replayed in any order.
struct metadata_params {
  int32_t* block_tables = nullptr;
  int32_t* lengths = nullptr;
  std::span<const metadata_write> table_writes;   //!< host: block_tables[index] = value
  std::span<const metadata_clear> table_clears;   //!< host: block_tables[first, first + count) = no_block
  std::span<const metadata_write> length_writes;  //!< host: lengths[index] = value
};

//! slot_mover: runs the data steps of a paged cache of element type T.
//!  V1. `m.fill(dst, count, value)` -> status: dst[0, count) = value (mirror initialisation).
//!  V2. `m.write_metadata(metadata_params)` -> status.
//!  V3. `m.write_tokens(token_write_params<T, T>)` -> status.
//!  V4. `m.write_metrics(metric_write_params)` -> status.
//!  V5. `m.move_slots(slot_move_params<T>)` -> status.
//!  V6. `m.read_head(head_read_params<T>)` -> status.
//!  V7. `m.write_head(head_write_params<T>)` -> status.
//! Every step is const: a mover holds where it runs (a stream, a workspace), not cache state.
template <class M, class T>
concept slot_mover =
    kv_element<T> && std::copy_constructible<M> &&
    requires(const M& m, int32_t* dst, int64_t count, const metadata_params& meta,
             const token_write_params<T, T>& tokens, const metric_write_params& metrics,
             const slot_move_params<T>& moves, const head_read_params<T>& read, const head_write_params<T>& write) {
      { m.fill(dst, count, int32_t{}) } -> std::same_as<status>;
      { m.write_metadata(meta) } -> std::same_as<status>;
      { m.write_tokens(tokens) } -> std::same_as<status>;
      { m.write_metrics(metrics) } -> std::same_as<status>;
      { m.move_slots(moves) } -> std::same_as<status>;
      { m.read_head(read) } -> std::same_as<status>;
      { m.write_head(write) } -> std::same_as<status>;
    };

//! Every step as host loops. Correct wherever the pool buffers are host-addressable: host
//! memory, and for the device cache until its CUDA kernels exist, managed or host-mapped
//! memory (and host memory standing in for device memory in tests).
struct host_mover {
  [[nodiscard]] status fill(int32_t* dst, int64_t count, int32_t value) const noexcept {
    std::fill(dst, dst + count, value);
    return status::success;
  }

  [[nodiscard]] status write_metadata(const metadata_params& p) const noexcept {
    for (const metadata_write& w : p.table_writes) p.block_tables[w.index] = w.value;
    for (const metadata_clear& c : p.table_clears)
      std::fill_n(p.block_tables + c.first, c.count, block_tables::no_block);
    for (const metadata_write& w : p.length_writes) p.lengths[w.index] = w.value;
    return status::success;
  }

  template <kv_element T, kv_element Src>
  [[nodiscard]] status write_tokens(const token_write_params<T, Src>& p) const noexcept {
    const auto d = static_cast<size_t>(p.head_dim);
    const auto tokens = static_cast<int64_t>(p.positions.size());
    for (size_t r = 0; r < p.slots.size(); ++r) {
      const auto slot = static_cast<size_t>(p.slots[r]);
      T* k = p.pool.keys + slot * d;
      T* v = p.pool.values + slot * d;
      const Src* sk = p.keys + r * d;
      const Src* sv = p.values + r * d;
      if constexpr (std::same_as<T, Src>) {
        std::copy_n(sk, d, k);
        std::copy_n(sv, d, v);
      } else {
        for (size_t c = 0; c < d; ++c) {
          k[c] = from_float<T>(to_float(sk[c]));
          v[c] = from_float<T>(to_float(sv[c]));
        }
      }
      p.pool.positions[slot] = p.positions[static_cast<size_t>((static_cast<int64_t>(r) / p.heads) % tokens)];
      p.pool.metrics[slot] = 0.f;
    }
    return status::success;
  }

  [[nodiscard]] status write_metrics(const metric_write_params& p) const noexcept {
    for (size_t i = 0; i < p.slots.size(); ++i) p.metrics[p.slots[i]] = p.values[i];
    return status::success;
  }

  template <kv_element T>
  [[nodiscard]] status move_slots(const slot_move_params<T>& p) const noexcept {
    const auto d = static_cast<size_t>(p.head_dim);
    for (const physical_move& mv : p.moves) {
      const auto dst = static_cast<size_t>(mv.dst), src = static_cast<size_t>(mv.src);
      std::copy_n(p.pool.keys + src * d, d, p.pool.keys + dst * d);
      std::copy_n(p.pool.values + src * d, d, p.pool.values + dst * d);
      p.pool.positions[dst] = p.pool.positions[src];
      p.pool.metrics[dst] = p.pool.metrics[src];
    }
    return status::success;
  }

  template <kv_element T>
  [[nodiscard]] status read_head(const head_read_params<T>& p) const noexcept {
    const auto d = static_cast<size_t>(p.head_dim);
    p.head.for_each([&](int32_t j, int64_t physical) {
      const auto slot = static_cast<size_t>(physical);
      const auto row = static_cast<size_t>(j);
      if (!p.positions.empty()) p.positions[row] = p.pool.positions[slot];
      if (!p.metrics.empty()) p.metrics[row] = p.pool.metrics[slot];
      for (size_t c = 0; c < d && !p.keys.empty(); ++c) p.keys[row * d + c] = to_float(p.pool.keys[slot * d + c]);
      for (size_t c = 0; c < d && !p.values.empty(); ++c) p.values[row * d + c] = to_float(p.pool.values[slot * d + c]);
    });
    return status::success;
  }

  template <kv_element T>
  [[nodiscard]] status write_head(const head_write_params<T>& p) const noexcept {
    const auto d = static_cast<size_t>(p.head_dim);
    p.head.for_each([&](int32_t j, int64_t physical) {
      const auto slot = static_cast<size_t>(physical);
      const auto row = static_cast<size_t>(j);
      p.pool.positions[slot] = p.positions[row];
      for (size_t c = 0; c < d; ++c) p.pool.keys[slot * d + c] = from_float<T>(p.keys[row * d + c]);
    });
    return status::success;
  }
};
static_assert(slot_mover<host_mover, float> && slot_mover<host_mover, float16> && slot_mover<host_mover, bfloat16>);

KVTRIM_NAMESPACE_END
