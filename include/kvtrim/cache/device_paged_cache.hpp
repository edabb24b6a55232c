#pragma once
//! \file device_paged_cache.hpp
//! The paged per-head cache with its pool (K, V, positions, metrics) and a mirror of its block
//! tables and lengths in device buffers the caller allocates (buffer_sizes<T>(config) says
//! how much); the library allocates nothing on the device. The block allocator and the
//! authoritative tables stay on the host (block_tables.hpp): every operation decides its
//! slots there, runs its data step through the mover, and replays its metadata changes onto
//! the mirror with one scatter, so no step needs a device-to-host round trip per layer or per
//! head (docs/cache.md, "Where the allocator lives").
//!
//! The data steps run through a `slot_mover`. Until the CUDA movers exist (CUDA issue), the
//! default `host_mover` runs them as host loops: correct where the buffers are
//! host-addressable (managed or host-mapped memory), which is how the tests exercise it.

#include <cstdint>
#include <utility>

#include "kvtrim/cache/block_tables.hpp"
#include "kvtrim/cache/paged_cache.hpp"
#include "kvtrim/cache/paged_layout.hpp"
#include "kvtrim/cache/slot_mover.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! The caller's device buffers and their sizes in bytes.
template <kv_element T>
struct device_buffers {
  paged_buffers<T> pointers;  //!< all six buffers, none null
  paged_buffer_sizes bytes;   //!< what was allocated for each: at least buffer_sizes<T>(config)
};

//! The pool and the table mirror in caller-provided device buffers; K/V are appended in T
//! from device memory (the model's activations).
template <kv_element T, slot_mover<T> Mover = host_mover>
class device_storage {
 public:
  using source_type = T;
  static constexpr memory_space memory = memory_space::device;

  device_storage() = default;
  device_storage(const device_buffers<T>& buffers, Mover mover) : buffers_(buffers), mover_(std::move(mover)) {}
  //! Move-only: two caches over the same device buffers would corrupt each other.
  device_storage(const device_storage&) = delete;
  device_storage& operator=(const device_storage&) = delete;
  device_storage(device_storage&&) noexcept = default;
  device_storage& operator=(device_storage&&) noexcept = default;

  //! invalid_argument for a null buffer, shape_mismatch for one smaller than the config
  //! needs; then the mirror is set to "no block" and zero lengths.
  [[nodiscard]] status init(const paged_cache_config& config) {
    const paged_buffer_sizes need = buffer_sizes<T>(config);
    const paged_buffers<T>& p = buffers_.pointers;
    if (!p.keys || !p.values || !p.positions || !p.metrics || !p.block_tables || !p.lengths)
      return status::invalid_argument;
    const paged_buffer_sizes& have = buffers_.bytes;
    if (have.keys < need.keys || have.values < need.values || have.positions < need.positions ||
        have.metrics < need.metrics || have.block_tables < need.block_tables || have.lengths < need.lengths)
      return status::shape_mismatch;
    const auto table_entries = static_cast<int64_t>(need.block_tables / sizeof(int32_t));
    const auto heads = static_cast<int64_t>(need.lengths / sizeof(int32_t));
    if (const status s = mover_.fill(p.block_tables, table_entries, block_tables::no_block); s != status::success)
      return s;
    return mover_.fill(p.lengths, heads, 0);
  }
  [[nodiscard]] paged_buffers<T> buffers() noexcept { return buffers_.pointers; }
  [[nodiscard]] const_paged_buffers<T> buffers() const noexcept {
    const paged_buffers<T>& p = buffers_.pointers;
    return {p.keys, p.values, p.positions, p.metrics};
  }
  [[nodiscard]] const Mover& mover() const noexcept { return mover_; }
  //! One scatter of the operation's table and length changes onto the mirror.
  [[nodiscard]] status sync(block_tables& tables) {
    const status s = mover_.write_metadata(
        {buffers_.pointers.block_tables, buffers_.pointers.lengths, tables.table_writes(), tables.table_clears(),
         tables.length_writes()});
    tables.clear_journal();
    return s;
  }

 private:
  device_buffers<T> buffers_{};
  Mover mover_{};
};

//! The paged cache in device memory. Create with
//! `device_paged_cache<T>::create(config, device_storage<T>{buffers, mover}, out)`.
template <kv_element T = float, int32_t HeadDim = dynamic_head_dim, slot_mover<T> Mover = host_mover>
using device_paged_cache = basic_paged_cache<T, HeadDim, device_storage<T, Mover>>;

static_assert(kv_store<device_paged_cache<float>>);
static_assert(kv_store<device_paged_cache<bfloat16, 128>>);

KVTRIM_NAMESPACE_END
