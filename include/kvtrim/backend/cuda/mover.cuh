#pragma once
//! \file mover.cuh
//! `cuda_mover`: the data steps of the device paged cache (cache/slot_mover.hpp) as CUDA
//! kernels on one stream. The block tables stay authoritative on the host; each step copies
//! its host index lists into the mover's device staging buffer (one host-to-device copy per
//! step), then runs one kernel. Reads of a head back to the host (kv_store read_head) copy
//! device-to-host and synchronise the stream: they are a host API, not a run-path step.
//!
//! Staging: caller-allocated device memory, at least `staging_bytes_for(...)` for the largest
//! single operation (the mover allocates nothing).

#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/kernels/append.cuh"
#include "kvtrim/backend/cuda/kernels/compaction.cuh"
#include "kvtrim/backend/cuda/kernels/metadata.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/cache/slot_mover.hpp"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

struct cuda_mover {
  cudaStream_t stream = nullptr;  //!< every step runs here
  void* staging = nullptr;        //!< device staging buffer of `staging_bytes`
  size_t staging_bytes = 0;

  //! Staging one operation needs (whichever is largest): an append of `max_append_tokens`
  //! tokens to every layer of a sequence (a batch append of B sequences and t tokens to one
  //! layer counts as B t tokens), one decode token of one layer for every sequence row, a
  //! compaction of a sequence, a head read.
  [[nodiscard]] static size_t staging_bytes_for(const paged_cache_config& c, int32_t max_append_tokens) noexcept {
    const auto heads = static_cast<size_t>(c.heads_per_sequence());
    const size_t slots = heads * static_cast<size_t>(c.max_tokens_per_head);
    const size_t append = static_cast<size_t>(max_append_tokens) * (sizeof(int32_t) + heads * sizeof(int64_t)) + 512;
    const size_t decode = static_cast<size_t>(c.max_sequences) *
                              (sizeof(int32_t) + static_cast<size_t>(c.shape.kv_heads) * sizeof(int64_t)) +
                          512;
    const size_t moves = slots * sizeof(physical_move) + 256;
    const size_t metrics = slots * (sizeof(int64_t) + sizeof(float)) + 512;
    const size_t journal = (heads * static_cast<size_t>(c.max_blocks_per_head()) + heads) * sizeof(metadata_write) * 2 + 512;
    const size_t read = static_cast<size_t>(c.max_tokens_per_head) *
                            (sizeof(int64_t) + sizeof(int32_t) + sizeof(float) * (1 + 2 * static_cast<size_t>(c.shape.head_dim))) +
                        1024;
    size_t most = append;
    for (const size_t s : {decode, moves, metrics, journal, read}) most = s > most ? s : most;
    return most;
  }

  [[nodiscard]] status fill(int32_t* dst, int64_t count, int32_t value) const {
    return cuda::fill(dst, count, value, stream);
  }

  //! Replays the journal in chunks of what the staging holds: a batch commit (`truncate`)
  //! journals every head of every sequence it shrinks, more than one sequence's staging may
  //! hold. Each upload waits on the stream for the kernel before it, so chunks reuse the
  //! staging. Entries are scattered, freed runs cleared by a CTA each.
  [[nodiscard]] status write_metadata(const metadata_params& p) const {
    static_assert(sizeof(metadata_write) == sizeof(metadata_clear));
    if (staging_bytes < sizeof(metadata_write) &&
        (!p.table_writes.empty() || !p.table_clears.empty() || !p.length_writes.empty()))
      return status::invalid_argument;
    const auto replay = [&]<class Entry, class Kernel>(std::span<const Entry> entries, Kernel&& kernel) -> status {
      const size_t chunk = staging_bytes / sizeof(Entry);
      auto* staged = static_cast<Entry*>(staging);
      for (size_t first = 0; first < entries.size(); first += chunk) {
        const size_t count = entries.size() - first < chunk ? entries.size() - first : chunk;
        if (const status s = upload(staged, entries.data() + first, count * sizeof(Entry)); s != status::success)
          return s;
        if (const status s = kernel(staged, static_cast<int64_t>(count)); s != status::success) return s;
      }
      return status::success;
    };
    if (const status s = replay(p.table_writes, [&](const metadata_write* w, int64_t n) {
          return scatter_metadata(p.block_tables, w, n, stream);
        });
        s != status::success)
      return s;
    if (const status s = replay(p.table_clears, [&](const metadata_clear* c, int64_t n) {
          return clear_metadata(p.block_tables, c, n, stream);
        });
        s != status::success)
      return s;
    return replay(p.length_writes,
                  [&](const metadata_write* w, int64_t n) { return scatter_metadata(p.lengths, w, n, stream); });
  }

  template <kv_element T>
  [[nodiscard]] status write_tokens(const token_write_params<T, T>& p) const {
    detail::workspace_carver w(staging);
    int32_t* positions = w.take<int32_t>(static_cast<int64_t>(p.positions.size()));
    int64_t* slots = w.take<int64_t>(static_cast<int64_t>(p.slots.size()));
    if (w.used() > staging_bytes) return status::invalid_argument;
    if (const status s = upload(positions, p.positions.data(), p.positions.size_bytes()); s != status::success) return s;
    if (const status s = upload(slots, p.slots.data(), p.slots.size_bytes()); s != status::success) return s;
    append_arguments<T> a;
    a.pool.keys = p.pool.keys;
    a.pool.values = p.pool.values;
    a.pool.positions = p.pool.positions;
    a.pool.metrics = p.pool.metrics;
    a.pool.head_dim = p.head_dim;
    a.keys = p.keys;
    a.values = p.values;
    a.slots = slots;
    a.positions = positions;
    a.rows = static_cast<int64_t>(p.slots.size());
    a.heads = p.heads;
    a.tokens = static_cast<int32_t>(p.positions.size());
    return append(a, nullptr, stream);
  }

  [[nodiscard]] status write_metrics(const metric_write_params& p) const {
    detail::workspace_carver w(staging);
    int64_t* slots = w.take<int64_t>(static_cast<int64_t>(p.slots.size()));
    float* values = w.take<float>(static_cast<int64_t>(p.values.size()));
    if (w.used() > staging_bytes || p.slots.size() != p.values.size()) return status::invalid_argument;
    if (const status s = upload(slots, p.slots.data(), p.slots.size_bytes()); s != status::success) return s;
    if (const status s = upload(values, p.values.data(), p.values.size_bytes()); s != status::success) return s;
    return scatter_metrics(p.metrics, slots, values, static_cast<int64_t>(p.slots.size()), stream);
  }

  template <kv_element T>
  [[nodiscard]] status move_slots(const slot_move_params<T>& p) const {
    if (p.moves.empty()) return status::success;
    detail::workspace_carver w(staging);
    physical_move* moves = w.take<physical_move>(static_cast<int64_t>(p.moves.size()));
    if (w.used() > staging_bytes) return status::invalid_argument;
    if (const status s = upload(moves, p.moves.data(), p.moves.size_bytes()); s != status::success) return s;
    move_arguments<T> a;
    a.pool.keys = p.pool.keys;
    a.pool.values = p.pool.values;
    a.pool.positions = p.pool.positions;
    a.pool.metrics = p.pool.metrics;
    a.pool.head_dim = p.head_dim;
    a.moves = moves;
    a.stride = static_cast<int64_t>(p.moves.size());
    a.segments = 1;
    return cuda::move_slots(a, nullptr, stream);
  }

  template <kv_element T>
  [[nodiscard]] status read_head(const head_read_params<T>& p) const {
    const int64_t n = p.head.length, d = p.head_dim;
    if (n == 0) return status::success;
    detail::workspace_carver w(staging);
    int64_t* slots = w.take<int64_t>(n);
    int32_t* positions = w.take<int32_t>(p.positions.empty() ? 0 : n);
    float* keys = w.take<float>(p.keys.empty() ? 0 : n * d);
    float* values = w.take<float>(p.values.empty() ? 0 : n * d);
    float* metrics = w.take<float>(p.metrics.empty() ? 0 : n);
    if (w.used() > staging_bytes) return status::invalid_argument;
    if (const status s = upload_slots(p.head, slots); s != status::success) return s;
    const detail::gather_params<T> g{p.pool.keys, p.pool.values, p.pool.positions, p.pool.metrics, slots, n, p.head_dim,
                                     p.positions.empty() ? nullptr : positions, p.keys.empty() ? nullptr : keys,
                                     p.values.empty() ? nullptr : values, p.metrics.empty() ? nullptr : metrics};
    const int32_t threads = default_tuning.elementwise.threads;
    detail::gather_kernel<T><<<detail::grid_for(n * d, threads), threads, 0, stream>>>(g);
    KVTRIM_CUDA_TRY(cudaGetLastError());
    if (!p.positions.empty()) KVTRIM_CUDA_TRY(cudaMemcpyAsync(p.positions.data(), positions, p.positions.size_bytes(), cudaMemcpyDeviceToHost, stream));
    if (!p.keys.empty()) KVTRIM_CUDA_TRY(cudaMemcpyAsync(p.keys.data(), keys, p.keys.size_bytes(), cudaMemcpyDeviceToHost, stream));
    if (!p.values.empty()) KVTRIM_CUDA_TRY(cudaMemcpyAsync(p.values.data(), values, p.values.size_bytes(), cudaMemcpyDeviceToHost, stream));
    if (!p.metrics.empty()) KVTRIM_CUDA_TRY(cudaMemcpyAsync(p.metrics.data(), metrics, p.metrics.size_bytes(), cudaMemcpyDeviceToHost, stream));
    KVTRIM_CUDA_TRY(cudaStreamSynchronize(stream));
    return status::success;
  }

  template <kv_element T>
  [[nodiscard]] status write_head(const head_write_params<T>& p) const {
    const int64_t n = p.head.length, d = p.head_dim;
    if (n == 0) return status::success;
    detail::workspace_carver w(staging);
    int64_t* slots = w.take<int64_t>(n);
    int32_t* positions = w.take<int32_t>(n);
    float* keys = w.take<float>(n * d);
    if (w.used() > staging_bytes) return status::invalid_argument;
    if (const status s = upload_slots(p.head, slots); s != status::success) return s;
    if (const status s = upload(positions, p.positions.data(), p.positions.size_bytes()); s != status::success) return s;
    if (const status s = upload(keys, p.keys.data(), p.keys.size_bytes()); s != status::success) return s;
    const detail::head_write_kernel_params<T> k{p.pool.keys, p.pool.positions, slots, positions, keys, n, p.head_dim};
    const int32_t threads = default_tuning.elementwise.threads;
    detail::head_write_kernel<T><<<detail::grid_for(n * d, threads), threads, 0, stream>>>(k);
    KVTRIM_CUDA_TRY(cudaGetLastError());
    return status::success;
  }

 private:
  //! Host -> staging. From pageable memory the runtime copies the source before returning, so
  //! the caller may reuse it at once.
  [[nodiscard]] status upload(void* dst, const void* src, size_t bytes) const {
    if (bytes == 0) return status::success;
    KVTRIM_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    return status::success;
  }
  //! The physical slots of a head, computed on the host from its block table, -> staging.
  [[nodiscard]] status upload_slots(const head_slots& head, int64_t* dst) const {
    constexpr int32_t chunk = 1024;
    int64_t buffer[chunk];
    int32_t held = 0;
    status s = status::success;
    // upload() copies from pageable memory: `buffer` may be refilled as soon as it returns.
    const auto send = [&](int32_t last) {  // buffer holds slots (last - held, last]
      if (s == status::success) s = upload(dst + (last + 1 - held), buffer, static_cast<size_t>(held) * sizeof(int64_t));
      held = 0;
    };
    head.for_each([&](int32_t j, int64_t slot) {
      buffer[held++] = slot;
      if (held == chunk) send(j);
    });
    if (held > 0) send(head.length - 1);
    return s;
  }
};
static_assert(slot_mover<cuda_mover, float> && slot_mover<cuda_mover, float16> && slot_mover<cuda_mover, bfloat16>);

}  // namespace cuda
KVTRIM_NAMESPACE_END
