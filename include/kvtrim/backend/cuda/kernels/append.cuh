#pragma once
//! \file append.cuh
//! Append: new K/V rows (a prefill chunk or one decode token, every layer and head of a batch
//! in one launch) written into their physical slots, with their position and metric 0
//! (KV-Compress `reshape_and_cache` with a per-KV-head slot mapping, §6).

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! Row r of the source goes to physical slot slots[r] with position positions[(r / heads) % tokens]:
//! the layout [layers][tokens][H] of the paged cache's append, or [tokens][H] of one layer.
template <kv_element T>
struct append_arguments {
  paged_view<T> pool;
  const T* keys = nullptr;             //!< [rows][head_dim] device
  const T* values = nullptr;           //!< [rows][head_dim] device
  const int64_t* slots = nullptr;      //!< [rows] device, physical slot of each row
  const int32_t* positions = nullptr;  //!< [tokens] device
  int64_t rows = 0;
  int32_t heads = 1;                   //!< H: rows per token
  int32_t tokens = 1;
};

template <kv_element T>
[[nodiscard]] status can_implement(const append_arguments<T>& a) noexcept {
  if (!a.pool.keys || !a.pool.values || !a.pool.positions || !a.pool.metrics) return status::invalid_argument;
  if (a.rows < 0 || a.heads < 1 || a.tokens < 1 || a.pool.head_dim < 1) return status::invalid_argument;
  if (a.rows > 0 && (!a.keys || !a.values || !a.slots || !a.positions)) return status::invalid_argument;
  return status::success;
}

template <kv_element T>
[[nodiscard]] constexpr size_t workspace_size(const append_arguments<T>&) noexcept { return 0; }

namespace detail {

template <kv_element T>
struct append_params {
  append_arguments<T> args;
};

//! One thread per `Chunk` of a row (16 bytes where rows and pointers allow, else one element):
//! a prefill chunk moves as wide loads and stores, not element by element.
template <kv_element T, class Chunk>
__global__ void append_kernel(const __grid_constant__ append_params<T> p) {
  static_assert(sizeof(Chunk) % sizeof(T) == 0);
  const auto& a = p.args;
  const int64_t d = a.pool.head_dim;
  const int64_t chunks = d / static_cast<int64_t>(sizeof(Chunk) / sizeof(T));
  const int64_t total = a.rows * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / chunks, c = i - r * chunks;
    const int64_t slot = a.slots[r];
    reinterpret_cast<Chunk*>(a.pool.keys + slot * d)[c] = reinterpret_cast<const Chunk*>(a.keys + r * d)[c];
    reinterpret_cast<Chunk*>(a.pool.values + slot * d)[c] = reinterpret_cast<const Chunk*>(a.values + r * d)[c];
    if (c == 0) {
      a.pool.positions[slot] = a.positions[(r / a.heads) % a.tokens];
      a.pool.metrics[slot] = 0.f;
    }
  }
}

//! Whether every row of every array starts 16-byte aligned.
template <kv_element T>
[[nodiscard]] bool rows_aligned_16(const append_arguments<T>& a) noexcept {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (static_cast<int64_t>(a.pool.head_dim) * static_cast<int64_t>(sizeof(T))) % 16 == 0 && aligned(a.pool.keys) &&
         aligned(a.pool.values) && aligned(a.keys) && aligned(a.values);
}

}  // namespace detail

//! Launches the append on `stream`. No allocation, no synchronisation (graph-capturable).
template <kv_element T>
[[nodiscard]] status append(const append_arguments<T>& a, void* /*workspace*/, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.rows == 0) return status::success;
  const int32_t threads = default_tuning.elementwise.threads;
  if (detail::rows_aligned_16(a)) {
    const int64_t chunks = a.rows * a.pool.head_dim * static_cast<int64_t>(sizeof(T)) / 16;
    detail::append_kernel<T, uint4><<<detail::grid_for(chunks, threads), threads, 0, stream>>>({a});
  } else {
    detail::append_kernel<T, T><<<detail::grid_for(a.rows * a.pool.head_dim, threads), threads, 0, stream>>>({a});
  }
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
