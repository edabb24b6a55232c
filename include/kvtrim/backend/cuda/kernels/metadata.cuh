#pragma once
//! \file metadata.cuh
//! The small data steps of the device paged cache: fill (mirror initialisation), replay of
//! the metadata journal (entries scattered, freed runs cleared), scatter of slot metrics, and
//! the gather / overwrite of one head in slot order (kv_store read_head / rewrite_head).
//! Index lists are device arrays.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/cache/block_tables.hpp"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {
namespace detail {

struct fill_params {
  int32_t* dst;
  int64_t count;
  int32_t value;
};
//! A template only so that the header may be included by several translation units.
template <int Unused = 0>
__global__ void fill_kernel(const __grid_constant__ fill_params p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p.dst[i] = p.value;
}

struct scatter_params {
  int32_t* dst;
  const metadata_write* writes;  // [count] device
  int64_t count;
};
//! One operation's journal names every table entry and length at most once, so the writes
//! are independent; the mover launches one scatter per operation, in stream order.
//! A template only so that the header may be included by several translation units.
template <int Unused = 0>
__global__ void scatter_kernel(const __grid_constant__ scatter_params p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p.dst[p.writes[i].index] = p.writes[i].value;
}

struct clear_params {
  int32_t* dst;
  const metadata_clear* clears;  // [count] device
  int64_t count;
};
//! A CTA per run: a run is one head's freed blocks, up to its whole table.
//! A template only so that the header may be included by several translation units.
template <int Unused = 0>
__global__ void clear_kernel(const __grid_constant__ clear_params p) {
  for (int64_t r = blockIdx.x; r < p.count; r += gridDim.x) {
    const metadata_clear c = p.clears[r];
    for (int64_t i = threadIdx.x; i < c.count; i += blockDim.x) p.dst[c.first + i] = block_tables::no_block;
  }
}

struct metric_scatter_params {
  float* metrics;
  const int64_t* slots;  // [count] device
  const float* values;   // [count] device
  int64_t count;
};
//! A template only so that the header may be included by several translation units.
template <int Unused = 0>
__global__ void metric_scatter_kernel(const __grid_constant__ metric_scatter_params p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p.metrics[p.slots[i]] = p.values[i];
}

//! One head's slots [first, first + rows) gathered in slot order as fp32.
template <kv_element T>
struct gather_params {
  const T* keys;
  const T* values;
  const int32_t* positions;
  const float* metrics;
  const int64_t* slots;  // [rows] device physical slot of each row
  int64_t rows;
  int32_t head_dim;
  int32_t* out_positions;  // [rows] or null
  float* out_keys;         // [rows][d] or null
  float* out_values;       // [rows][d] or null
  float* out_metrics;      // [rows] or null
};
template <kv_element T>
__global__ void gather_kernel(const __grid_constant__ gather_params<T> p) {
  const int64_t d = p.head_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.rows * d;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / d, c = i - r * d;
    const int64_t slot = p.slots[r];
    if (p.out_keys) p.out_keys[i] = load(p.keys[slot * d + c]);
    if (p.out_values) p.out_values[i] = load(p.values[slot * d + c]);
    if (c == 0) {
      if (p.out_positions) p.out_positions[r] = p.positions[slot];
      if (p.out_metrics) p.out_metrics[r] = p.metrics[slot];
    }
  }
}

//! Overwrites positions and keys (rounded to T) of `rows` slots.
template <kv_element T>
struct head_write_kernel_params {
  T* keys;
  int32_t* positions;
  const int64_t* slots;      // [rows]
  const int32_t* in_positions;  // [rows]
  const float* in_keys;      // [rows][d]
  int64_t rows;
  int32_t head_dim;
};
template <kv_element T>
__global__ void head_write_kernel(const __grid_constant__ head_write_kernel_params<T> p) {
  const int64_t d = p.head_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.rows * d;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / d, c = i - r * d;
    const int64_t slot = p.slots[r];
    p.keys[slot * d + c] = from_float<T>(p.in_keys[i]);
    if (c == 0) p.positions[slot] = p.in_positions[r];
  }
}

}  // namespace detail

//! dst[0, count) = value on `stream`.
[[nodiscard]] inline status fill(int32_t* dst, int64_t count, int32_t value, cudaStream_t stream) {
  if (count < 0 || (count > 0 && !dst)) return status::invalid_argument;
  if (count == 0) return status::success;
  const int32_t threads = default_tuning.elementwise.threads;
  detail::fill_kernel<><<<detail::grid_for(count, threads), threads, 0, stream>>>({dst, count, value});
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! dst[w.index] = w.value for each of the `count` device journal entries (one operation's).
[[nodiscard]] inline status scatter_metadata(int32_t* dst, const metadata_write* writes, int64_t count,
                                             cudaStream_t stream) {
  if (count < 0 || (count > 0 && (!dst || !writes))) return status::invalid_argument;
  if (count == 0) return status::success;
  const int32_t threads = default_tuning.elementwise.threads;
  detail::scatter_kernel<><<<detail::grid_for(count, threads), threads, 0, stream>>>({dst, writes, count});
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! dst[c.first, c.first + c.count) = no_block for each of the `count` device runs.
[[nodiscard]] inline status clear_metadata(int32_t* dst, const metadata_clear* clears, int64_t count,
                                           cudaStream_t stream) {
  if (count < 0 || (count > 0 && (!dst || !clears))) return status::invalid_argument;
  if (count == 0) return status::success;
  const int32_t threads = default_tuning.elementwise.threads;
  detail::clear_kernel<><<<detail::grid_for(count, 1), threads, 0, stream>>>({dst, clears, count});
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! metrics[slots[i]] = values[i], device arrays.
[[nodiscard]] inline status scatter_metrics(float* metrics, const int64_t* slots, const float* values, int64_t count,
                                            cudaStream_t stream) {
  if (count < 0 || (count > 0 && (!metrics || !slots || !values))) return status::invalid_argument;
  if (count == 0) return status::success;
  const int32_t threads = default_tuning.elementwise.threads;
  detail::metric_scatter_kernel<><<<detail::grid_for(count, threads), threads, 0, stream>>>({metrics, slots, values, count});
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
