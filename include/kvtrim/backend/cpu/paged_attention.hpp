#pragma once
//! \file paged_attention.hpp
//! Decode attention on the CPU over the paged per-head cache and the dense view: the same
//! arithmetic, in the same order, as attend_head (attention.hpp), read through each head's
//! block table instead of a contiguous copy, optionally accumulating each key's probability
//! into its slot metric (H2O sum, KV-Compress squared sum).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "kvtrim/backend/cpu/attention.hpp"
#include "kvtrim/cache/dense_view.hpp"
#include "kvtrim/cache/paged_cache.hpp"
#include "kvtrim/cache/slot_mover.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cpu {

//! Decode attention of one layer of `seq` in a host paged cache: q [Hq][d] -> out [Hq][d];
//! query head i reads stored head i / (Hq / stored heads). With `acc` != none the slot
//! metrics accumulate p (sum) or p^2 (squared_sum), reduced over the group by `reduce`.
//! Everything is checked before any metric changes (strong guarantee).
template <kv_element T, int32_t HeadDim, paged_storage<T> Storage>
[[nodiscard]] status decode_attention(basic_paged_cache<T, HeadDim, Storage>& cache, int64_t seq, int32_t layer,
                                      int32_t q_heads, std::span<const float> q, std::span<float> out,
                                      decode_accumulation acc, gqa_reduce reduce, std::vector<float>& scratch) {
  static_assert(Storage::memory == memory_space::host,
                "kvtrim::cpu::decode_attention rule C3: the CPU backend reads host memory. Fix: use "
                "kvtrim::paged_cache, or the CUDA backend's paged attention for a device cache.");
  int32_t group = 0;
  if (const status s = detail::check_decode(cache, seq, layer, q_heads, q, out, group); s != status::success) return s;
  detail::reserve_decode_scratch(cache, seq, layer, group, scratch);
  const attention_shape shape = cache.shape();
  const auto width = static_cast<size_t>(group) * static_cast<size_t>(cache.head_dim());
  const paged_buffers<T> pool = cache.buffers();
  for (int32_t h = 0; h < shape.kv_heads; ++h) {
    const head_slots head{cache.head_blocks(seq, layer, h), cache.head_length(seq, layer, h), cache.block_size()};
    const size_t off = static_cast<size_t>(h) * width;
    detail::attend_slots<HeadDim>(q.subspan(off, width), group, cache.head_dim(), head, pool.keys, pool.values,
                                  pool.metrics, out.subspan(off, width), acc, reduce, scratch);
  }
  return status::success;
}

//! Decode attention of one layer of batch row `seq` in a dense view; as above.
template <kv_element T, int32_t HeadDim>
[[nodiscard]] status decode_attention(dense_view<T, HeadDim>& view, int64_t seq, int32_t layer, int32_t q_heads,
                                      std::span<const float> q, std::span<float> out, decode_accumulation acc,
                                      gqa_reduce reduce, std::vector<float>& scratch) {
  int32_t group = 0;
  if (const status s = detail::check_decode(view, seq, layer, q_heads, q, out, group); s != status::success) return s;
  detail::reserve_decode_scratch(view, seq, layer, group, scratch);
  const attention_shape shape = view.shape();
  const auto width = static_cast<size_t>(group) * static_cast<size_t>(view.head_dim());
  const int32_t whole_head = 0;  // the head's slots are one contiguous "block" of `capacity` tokens
  for (int32_t h = 0; h < shape.kv_heads; ++h) {
    const head_slots head{{&whole_head, 1}, view.head_length(seq, layer, h), view.capacity()};
    const size_t off = static_cast<size_t>(h) * width;
    detail::attend_slots<HeadDim>(q.subspan(off, width), group, view.head_dim(), head, view.keys(seq, layer, h).data(),
                                  view.values(seq, layer, h).data(), view.metrics(seq, layer, h).data(),
                                  out.subspan(off, width), acc, reduce, scratch);
  }
  return status::success;
}

}  // namespace cpu
KVTRIM_NAMESPACE_END
