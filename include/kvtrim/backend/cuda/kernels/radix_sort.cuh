#pragma once
//! \file radix_sort.cuh
//! The one CUB sort the backend instantiates: (uint64 key, int32 value) pairs, ascending and
//! stable, device-wide over the low `end_bit` bits. Every sort of the backend encodes its
//! segment (head, sequence) in the high bits of a 64-bit key, so that this single
//! instantiation serves them all (nvcc time) and every sort uses the whole GPU rather than one
//! CTA per segment. The key helpers below are shared by those encodings.

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/config.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

struct radix_sort_arguments {
  const uint64_t* keys_in = nullptr;   //!< [items] device
  uint64_t* keys_out = nullptr;        //!< [items] device
  const int32_t* values_in = nullptr;  //!< [items] device
  int32_t* values_out = nullptr;       //!< [items] device
  int64_t items = 0;
  int32_t end_bit = 64;                //!< bits [0, end_bit) of the keys are sorted on
};

[[nodiscard]] inline status can_implement(const radix_sort_arguments& a) noexcept {
  if (a.items < 0 || a.items > INT32_MAX) return status::not_supported;
  if (a.end_bit < 1 || a.end_bit > 64) return status::invalid_argument;
  return status::success;
}

//! CUB's temporary storage for these sizes (no device data is read).
[[nodiscard]] inline size_t workspace_size(const radix_sort_arguments& a) noexcept {
  size_t bytes = 0;
  if (a.items == 0) return 0;
  if (cub::DeviceRadixSort::SortPairs(nullptr, bytes, a.keys_in, a.keys_out, a.values_in, a.values_out,
                                      static_cast<int>(a.items), 0, a.end_bit) != cudaSuccess)
    return 0;
  return bytes;
}

//! Sorts on `stream`; `workspace` holds workspace_size(a) bytes.
[[nodiscard]] inline status radix_sort(const radix_sort_arguments& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.items == 0) return status::success;
  size_t bytes = workspace_size(a);
  KVTRIM_CUDA_TRY(cub::DeviceRadixSort::SortPairs(workspace, bytes, a.keys_in, a.keys_out, a.values_in, a.values_out,
                                                  static_cast<int>(a.items), 0, a.end_bit, stream));
  return status::success;
}

namespace detail {

//! Values [0, count) need this many bits.
[[nodiscard]] __host__ __device__ constexpr int32_t bits_for(int64_t count) noexcept {
  int32_t b = 0;
  while (b < 62 && (int64_t{1} << b) < count) ++b;
  return b;
}
//! The low n bits set.
[[nodiscard]] __host__ __device__ constexpr uint64_t low_bits(int32_t n) noexcept {
  return n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
}

//! Order-preserving bits of a float: a < b  <=>  ordered(a) < ordered(b) (with -0 == +0).
[[nodiscard]] __host__ __device__ __forceinline__ uint32_t ordered_bits(float x) noexcept {
  if (x == 0.f) x = 0.f;  // -0 and +0 compare equal: one key
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
//! Inverse of ordered_bits.
[[nodiscard]] __host__ __device__ __forceinline__ float from_ordered_bits(uint32_t o) noexcept {
  const uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

}  // namespace detail
}  // namespace cuda
KVTRIM_NAMESPACE_END
