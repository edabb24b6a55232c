#pragma once
//! \file compaction.cuh
//! Compaction (KV-Compress MoveCache, §6): from each head's kept flags, the MoveCache moves
//! (every survivor at or past the new length into the lowest hole below it, highest source
//! first: plan/eviction_plan.hpp `compaction_moves`) and their execution (K, V, position and
//! metric travel together). No two moves share a destination or a source, and every
//! destination is below the new length while every source is at or past it, so all moves of
//! all heads run in parallel, in place. The emptied trailing blocks are returned by the host
//! block tables afterwards (cuda::commit in compress.cuh).

#include <cub/block/block_scan.cuh>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/cache/block_tables.hpp"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! Executes moves between physical slots. `moves` holds `segments` lists of at most
//! `stride` moves each; list s has counts[s] moves (or `stride` when counts is null).
template <kv_element T>
struct move_arguments {
  paged_view<T> pool;
  const physical_move* moves = nullptr;  //!< [segments][stride] device
  const int32_t* counts = nullptr;       //!< [segments] device, or null
  int64_t stride = 0;
  int32_t segments = 1;
};

template <kv_element T>
[[nodiscard]] status can_implement(const move_arguments<T>& a) noexcept {
  if (!a.pool.keys || !a.pool.values || !a.pool.positions || !a.pool.metrics) return status::invalid_argument;
  if (a.stride < 0 || a.segments < 0 || a.segments > 65535) return status::invalid_argument;
  if (a.stride > 0 && a.segments > 0 && !a.moves) return status::invalid_argument;
  return status::success;
}
template <kv_element T>
[[nodiscard]] constexpr size_t workspace_size(const move_arguments<T>&) noexcept { return 0; }

//! Plans and runs the compaction of `heads` heads: head i (flat head index heads_index[i] in
//! the view) keeps the slots flagged in kept [i][stride] and ends with keep[i] slots.
template <kv_element T>
struct compaction_arguments {
  paged_view<T> pool;
  const int64_t* head_index = nullptr;  //!< [heads] device flat (row, l, h) index into the mirror
  const uint8_t* kept = nullptr;        //!< [heads][stride] device, 1 = slot survives
  const int32_t* keep = nullptr;        //!< [heads] device, kept slots per head (the new length)
  int32_t heads = 0;
  int32_t stride = 0;                   //!< >= the longest head
  const int32_t* error = nullptr;       //!< device, or null: when it holds a failure nothing moves
};

template <kv_element T>
[[nodiscard]] status can_implement(const compaction_arguments<T>& a) noexcept {
  if (const status s = a.pool.validate(); s != status::success) return s;
  if (a.heads < 0 || a.stride < 0 || a.heads > 65535) return status::invalid_argument;
  if (a.heads > 0 && (!a.head_index || !a.kept || !a.keep)) return status::invalid_argument;
  return status::success;
}
//! holes [heads][stride] int32 + moves [heads][stride] + counts [heads].
template <kv_element T>
[[nodiscard]] size_t workspace_size(const compaction_arguments<T>& a) noexcept {
  detail::workspace_carver w(nullptr);
  const int64_t n = static_cast<int64_t>(a.heads) * a.stride;
  w.take<int32_t>(n);
  w.take<physical_move>(n);
  w.take<int32_t>(a.heads);
  return w.used();
}

namespace detail {

template <kv_element T>
struct move_params {
  move_arguments<T> args;
};

//! One warp per move: the K and V rows are copied by the warp's lanes.
template <kv_element T>
__global__ void move_kernel(const __grid_constant__ move_params<T> p) {
  const auto& a = p.args;
  const int32_t segment = blockIdx.y;
  const int64_t count = a.counts ? a.counts[segment] : a.stride;
  const int32_t warps = blockDim.x / 32;
  const int32_t lane = threadIdx.x % 32;
  const int64_t d = a.pool.head_dim;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; m < count;
       m += static_cast<int64_t>(gridDim.x) * warps) {
    const physical_move mv = a.moves[segment * a.stride + m];
    for (int64_t c = lane; c < d; c += 32) {
      a.pool.keys[mv.dst * d + c] = a.pool.keys[mv.src * d + c];
      a.pool.values[mv.dst * d + c] = a.pool.values[mv.src * d + c];
    }
    if (lane == 0) {
      a.pool.positions[mv.dst] = a.pool.positions[mv.src];
      a.pool.metrics[mv.dst] = a.pool.metrics[mv.src];
    }
  }
}

template <kv_element T>
struct compaction_plan_params {
  compaction_arguments<T> args;
  int32_t* holes;         // [heads][stride]
  physical_move* moves;   // [heads][stride]
  int32_t* counts;        // [heads]
};

//! Slots each thread of compaction_plan_kernel scans per round: a head's rounds run one after
//! another, so each takes Threads * items slots.
inline constexpr int32_t compaction_items_per_thread = 8;

//! One CTA per head: a block scan numbers the holes (evicted slots below the new length) and
//! the survivors (kept slots at or past it); survivor j (ascending) fills hole m - 1 - j. Thread
//! t scans slots [t items, (t + 1) items) of each round, the order the scan numbers them in.
template <kv_element T, int32_t Threads>
__global__ void __launch_bounds__(Threads) compaction_plan_kernel(const __grid_constant__ compaction_plan_params<T> p) {
  constexpr int32_t items = compaction_items_per_thread;
  using scan = cub::BlockScan<int32_t, Threads>;
  __shared__ typename scan::TempStorage temp;
  const auto& a = p.args;
  const int32_t hi = blockIdx.x;
  const int64_t head = a.head_index[hi];
  const int32_t length = a.pool.lengths[head];
  const int32_t k = a.keep[hi];
  const uint8_t* kept = a.kept + static_cast<int64_t>(hi) * a.stride;
  int32_t* holes = p.holes + static_cast<int64_t>(hi) * a.stride;
  physical_move* moves = p.moves + static_cast<int64_t>(hi) * a.stride;

  if (a.error && *a.error != 0) {  // an earlier step failed: leave the cache as it was
    if (threadIdx.x == 0) p.counts[hi] = 0;
    return;
  }
  // Pass 1: holes below k, numbered in ascending slot order.
  int32_t m = 0;
  for (int32_t base = 0; base < k; base += Threads * items) {
    const int32_t first = base + static_cast<int32_t>(threadIdx.x) * items;
    int32_t hole[items], before[items];
#pragma unroll
    for (int32_t i = 0; i < items; ++i) hole[i] = (first + i < k && !kept[first + i]) ? 1 : 0;
    int32_t total = 0;
    scan(temp).ExclusiveSum(hole, before, total);
#pragma unroll
    for (int32_t i = 0; i < items; ++i)
      if (hole[i]) holes[m + before[i]] = first + i;
    m += total;
    __syncthreads();  // temp is reused; the last round also publishes `holes` to pass 2
  }
  // Pass 2: survivors at or past k, ascending; survivor j moves into hole m - 1 - j.
  int32_t moved = 0;
  for (int32_t base = k; base < length; base += Threads * items) {
    const int32_t first = base + static_cast<int32_t>(threadIdx.x) * items;
    int32_t survivor[items], before[items];
#pragma unroll
    for (int32_t i = 0; i < items; ++i) survivor[i] = (first + i < length && kept[first + i]) ? 1 : 0;
    int32_t total = 0;
    scan(temp).ExclusiveSum(survivor, before, total);
#pragma unroll
    for (int32_t i = 0; i < items; ++i)
      if (survivor[i]) {
        const int32_t j = moved + before[i];
        moves[m - 1 - j] = {a.pool.physical(head, holes[m - 1 - j]), a.pool.physical(head, first + i)};
      }
    moved += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) p.counts[hi] = m;
}

}  // namespace detail

//! Runs the moves on `stream`.
template <kv_element T>
[[nodiscard]] status move_slots(const move_arguments<T>& a, void* /*workspace*/, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.stride == 0 || a.segments == 0) return status::success;
  const int32_t threads = default_tuning.elementwise.threads;
  const int64_t per_cta = threads / 32;
  const int64_t x = detail::ceil_div(a.stride, per_cta);
  const dim3 grid(static_cast<unsigned>(x < 4096 ? x : 4096), static_cast<unsigned>(a.segments));
  detail::move_kernel<T><<<grid, threads, 0, stream>>>({a});
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! Plans the MoveCache moves of every head and runs them, on `stream`; `workspace` holds
//! workspace_size(a) bytes.
template <kv_element T>
[[nodiscard]] status compact(const compaction_arguments<T>& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.heads == 0 || a.stride == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  detail::workspace_carver w(workspace);
  const int64_t n = static_cast<int64_t>(a.heads) * a.stride;
  detail::compaction_plan_params<T> p{a, w.take<int32_t>(n), w.take<physical_move>(n), w.take<int32_t>(a.heads)};
  constexpr int32_t threads = default_tuning.planning.threads;
  detail::compaction_plan_kernel<T, threads><<<a.heads, threads, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return move_slots(move_arguments<T>{a.pool, p.moves, p.counts, a.stride, a.heads}, nullptr, stream);
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
