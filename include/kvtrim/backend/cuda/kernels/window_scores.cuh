#pragma once
//! \file window_scores.cuh
//! Observation-window scores, fused (SnapKV §3, PyramidKV §4, Ada-KV §5, KV-Compress §6
//! prefill; CPU semantics: policy/metric/window_attention.hpp). For every (sequence, layer,
//! stored head): the window queries of its G query heads against all the head's keys read
//! through the block table (K never repeated), softmax in fp32 over all keys with the causal
//! mask by position, plain or squared probabilities summed (or averaged) over the window
//! queries, the GQA reduction, and max / avg pooling along positions.
//!
//! Two passes over K per head: pass 1 the softmax max and denominator of every window query
//! (split over keys, merged), pass 2 the probabilities, aggregated per key in the CPU's order
//! (rows ascending, then the group). No w x n matrix is stored. The dot products run on fp32
//! CUDA cores; a tensor-core path is future work (docs/performance.md).

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/kernels/segmented_sort.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

template <kv_element T>
struct window_score_arguments {
  paged_view<T> pool;                  //!< stored heads H = Hkv, or Hq in per_query_head mode
  const int32_t* rows = nullptr;       //!< [batch] device mirror row of each sequence
  int32_t batch = 0;
  int32_t first_layer = 0;
  int32_t layer_count = 1;
  int32_t q_heads = 0;                 //!< Hq
  int32_t window = 0;                  //!< observed query rows w
  const float* queries = nullptr;      //!< [batch][layer_count][w][Hq][d] device, post-RoPE
  const int32_t* query_positions = nullptr;  //!< [batch][w] device
  window_attention metric{};
  protected_set protect{};             //!< its `recent` bounds the pooled prefix (evictable_prefix)
  int32_t stride = 0;                  //!< >= every head length; row pitch of `scores`
  float* scores = nullptr;             //!< [batch][layer_count][H][stride] device, slot order
};

template <kv_element T>
[[nodiscard]] status can_implement(const window_score_arguments<T>& a) noexcept {
  if (const status s = a.pool.validate(); s != status::success) return s;
  const attention_shape shape{a.pool.layers, a.q_heads, a.metric.reduce == gqa_reduce::per_query_head ? a.q_heads : a.pool.heads,
                              a.pool.head_dim};
  if (const status s = a.metric.validate(shape, a.protect); s != status::success) return s;
  if (a.metric.reduce == gqa_reduce::per_query_head ? a.pool.heads != a.q_heads : a.q_heads % a.pool.heads != 0)
    return status::invalid_group;
  if (a.batch < 0 || a.batch > 65535 || a.first_layer < 0 || a.layer_count < 1 ||
      a.first_layer + a.layer_count > a.pool.layers || a.stride < 1)
    return status::invalid_argument;
  if (a.window < 1) return status::window_too_large;
  if (a.pool.head_dim > 1024) return status::not_supported;
  if (a.batch > 0 && (!a.rows || !a.queries || !a.query_positions || !a.scores)) return status::invalid_argument;
  return status::success;
}

namespace detail {

struct window_layout {
  int32_t per_row = 1;      // query heads per stored head
  int32_t pairs = 1;        // per_row * w
  int32_t splits = 1;
  int32_t tile = 1;         // keys per shared-memory tile
  int32_t out_rows = 1;     // aggregated rows per head: per_row (after_pool) or 1
  bool pool = false;
  bool after_pool = false;
  int64_t heads = 0;        // batch * layer_count * H
  int64_t partial = 0;      // [heads][pairs][splits][2]
  int64_t stats = 0;        // [heads][pairs][2]
  int64_t agg = 0;          // [heads][out_rows][stride]
  int64_t pooled = 0;       // [heads][out_rows][stride] (after_pool with pooling)
  int64_t items = 0;        // [heads][stride] sort items
};

template <kv_element T>
[[nodiscard]] window_layout window_layout_of(const window_score_arguments<T>& a) noexcept {
  window_layout l;
  const bool per_query = a.metric.reduce == gqa_reduce::per_query_head;
  l.per_row = per_query ? 1 : (a.pool.heads > 0 ? a.q_heads / a.pool.heads : 1);
  l.pairs = l.per_row * a.window;
  l.splits = static_cast<int32_t>(ceil_div(a.stride, default_tuning.window.keys_per_split));
  const int32_t fit = default_tuning.window.smem_floats / (a.pool.head_dim + 1);
  l.tile = fit < 1 ? 1 : (fit > 64 ? 64 : fit);
  l.pool = a.metric.pool != pooling::none && a.metric.kernel > 1;
  l.after_pool = !per_query && a.metric.order == reduce_order::after_pool;
  l.out_rows = l.after_pool ? l.per_row : 1;
  l.heads = static_cast<int64_t>(a.batch) * a.layer_count * a.pool.heads;
  l.partial = l.heads * l.pairs * l.splits * 2;
  l.stats = l.heads * l.pairs * 2;
  l.agg = l.heads * l.out_rows * a.stride;
  l.pooled = (l.pool && l.after_pool) ? l.agg : 0;
  l.items = l.pool ? l.heads * a.stride : 0;
  return l;
}

}  // namespace detail

//! fp32 softmax statistics and aggregated rows, plus the position sort used by pooling.
template <kv_element T>
[[nodiscard]] size_t workspace_size(const window_score_arguments<T>& a) noexcept {
  const detail::window_layout l = detail::window_layout_of(a);
  detail::workspace_carver w(nullptr);
  w.take<float>(l.partial);
  w.take<float>(l.stats);
  w.take<float>(l.agg);
  w.take<float>(l.pooled);
  w.take<uint64_t>(l.items);
  w.take<uint64_t>(l.items);
  w.take<int32_t>(l.items);
  w.take<int32_t>(l.items);
  w.take<int64_t>(l.pool ? l.heads : 0);
  w.take<int64_t>(l.pool ? l.heads : 0);
  w.take<char>(static_cast<int64_t>(
      l.pool ? workspace_size(segmented_sort_arguments{nullptr, nullptr, nullptr, nullptr, l.items,
                                                       static_cast<int32_t>(l.heads), nullptr, nullptr})
             : 0));
  return w.used();
}

namespace detail {

template <kv_element T>
struct window_params {
  window_score_arguments<T> args;
  window_layout layout;
  float sqrt_d;
  float* partial;
  float* stats;
  float* agg;
  float* pooled;
  uint64_t* keys_in;
  uint64_t* keys_out;
  int32_t* values_in;
  int32_t* values_out;
  int64_t* begin;
  int64_t* end;
};

//! Decodes blockIdx.z = (b * layer_count + l') and blockIdx.y = h into the flat head and the
//! workspace head index.
template <kv_element T>
struct window_head {
  int32_t b, layer, h;
  int64_t head;   // mirror index
  int64_t index;  // workspace index [batch][layer_count][H]
  int32_t length;
};
template <kv_element T>
__device__ __forceinline__ window_head<T> window_head_of(const window_params<T>& p) {
  const auto& a = p.args;
  window_head<T> w;
  w.b = blockIdx.z / a.layer_count;
  w.layer = a.first_layer + static_cast<int32_t>(blockIdx.z % a.layer_count);
  w.h = blockIdx.y;
  w.head = a.pool.head_index(a.rows[w.b], w.layer, w.h);
  w.index = static_cast<int64_t>(blockIdx.z) * a.pool.heads + w.h;
  w.length = a.pool.lengths[w.head];
  return w;
}

//! Shared memory of both passes: key tile [tile][d+1], query chunk [chunk][d+1],
//! logits [chunk][tile], key positions [tile], and per pass 1 the running max/sum [pairs][2]
//! or per pass 2 the per-key accumulators [per_row][tile].
[[nodiscard]] inline size_t window_smem(const window_layout& l, int32_t d) noexcept {
  const int64_t chunk = default_tuning.window.query_chunk;
  const int64_t floats = static_cast<int64_t>(l.tile) * (d + 1) + chunk * (d + 1) + chunk * l.tile +
                         2 * static_cast<int64_t>(l.pairs) + static_cast<int64_t>(l.per_row) * l.tile;
  return static_cast<size_t>(floats) * sizeof(float) + static_cast<size_t>(l.tile + l.pairs) * sizeof(int32_t);
}

//! Loads key tile [base, base + count) of a head as fp32 with its positions.
template <kv_element T>
__device__ void load_key_tile(const paged_view<T>& pool, int64_t head, int32_t base, int32_t count, int32_t d,
                              float* sk, int32_t* skpos) {
  for (int32_t i = threadIdx.x; i < count * d; i += blockDim.x) {
    const int32_t k = i / d, c = i - k * d;
    const int64_t slot = pool.physical(head, base + k);
    sk[k * (d + 1) + c] = load(pool.keys[slot * d + c]);
    if (c == 0) skpos[k] = pool.positions[slot];
  }
}

//! Loads pairs [first, first + count) (pair = g * w + r) of query head base qh0.
template <kv_element T>
__device__ void load_query_chunk(const window_params<T>& p, const window_head<T>& wh, int32_t first, int32_t count,
                                 int32_t d, float* sq) {
  const auto& a = p.args;
  const int32_t qh0 = a.metric.reduce == gqa_reduce::per_query_head ? wh.h : wh.h * p.layout.per_row;
  const int64_t lb = static_cast<int64_t>(wh.b) * a.layer_count + (wh.layer - a.first_layer);
  for (int32_t i = threadIdx.x; i < count * d; i += blockDim.x) {
    const int32_t q = i / d, c = i - q * d;
    const int32_t pair = first + q;
    const int32_t g = pair / a.window, r = pair - g * a.window;
    sq[q * (d + 1) + c] = a.queries[((lb * a.window + r) * a.q_heads + qh0 + g) * d + c];
  }
}

//! logits[q][k] = q . k / sqrt(d) for the staged chunk and tile.
__device__ __forceinline__ void chunk_logits(const float* sq, const float* sk, float* sl, int32_t count, int32_t keys,
                                             int32_t tile, int32_t d, float sqrt_d) {
  for (int32_t i = threadIdx.x; i < count * tile; i += blockDim.x) {
    const int32_t q = i / tile, k = i - q * tile;
    if (k >= keys) continue;
    float dot = 0.f;
    for (int32_t c = 0; c < d; ++c) dot += sq[q * (d + 1) + c] * sk[k * (d + 1) + c];
    sl[i] = dot / sqrt_d;
  }
}

template <kv_element T>
__global__ void window_stats_kernel(const __grid_constant__ window_params<T> p) {
  extern __shared__ float smem[];
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const int32_t d = a.pool.head_dim, chunk = default_tuning.window.query_chunk;
  const window_head<T> wh = window_head_of(p);
  float* sk = smem;
  float* sq = sk + l.tile * (d + 1);
  float* sl = sq + chunk * (d + 1);
  float* run = sl + chunk * l.tile;  // [pairs][2]
  int32_t* skpos = reinterpret_cast<int32_t*>(run + 2 * l.pairs + l.per_row * l.tile);
  int32_t* sqpos = skpos + l.tile;  // [w]
  for (int32_t i = threadIdx.x; i < l.pairs; i += blockDim.x) {
    run[2 * i] = -INFINITY;
    run[2 * i + 1] = 0.f;
  }
  for (int32_t i = threadIdx.x; i < a.window; i += blockDim.x) sqpos[i] = a.query_positions[static_cast<int64_t>(wh.b) * a.window + i];
  const int32_t begin = blockIdx.x * default_tuning.window.keys_per_split;
  const int32_t end = min(wh.length, begin + default_tuning.window.keys_per_split);
  for (int32_t base = begin; base < end; base += l.tile) {
    const int32_t keys = min(l.tile, end - base);
    __syncthreads();
    load_key_tile(a.pool, wh.head, base, keys, d, sk, skpos);
    for (int32_t first = 0; first < l.pairs; first += chunk) {
      const int32_t count = min(chunk, l.pairs - first);
      __syncthreads();
      load_query_chunk(p, wh, first, count, d, sq);
      __syncthreads();
      chunk_logits(sq, sk, sl, count, keys, l.tile, d, p.sqrt_d);
      __syncthreads();
      for (int32_t q = threadIdx.x; q < count; q += blockDim.x) {
        const int32_t pair = first + q;
        const int32_t qpos = sqpos[pair % a.window];
        float m = run[2 * pair], s = run[2 * pair + 1];
        for (int32_t k = 0; k < keys; ++k) {
          if (skpos[k] > qpos) continue;
          const float x = sl[q * l.tile + k];
          if (x > m) {
            s = s * expf(m - x) + 1.f;
            m = x;
          } else {
            s += expf(x - m);
          }
        }
        run[2 * pair] = m;
        run[2 * pair + 1] = s;
      }
    }
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < l.pairs; i += blockDim.x) {
    const int64_t at = ((wh.index * l.pairs + i) * l.splits + blockIdx.x) * 2;
    p.partial[at] = run[2 * i];
    p.partial[at + 1] = run[2 * i + 1];
  }
}

template <kv_element T>
__global__ void window_merge_kernel(const __grid_constant__ window_params<T> p) {
  const window_layout& l = p.layout;
  const int64_t total = l.heads * l.pairs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float m = -INFINITY;
    for (int32_t t = 0; t < l.splits; ++t) m = fmaxf(m, p.partial[(i * l.splits + t) * 2]);
    float s = 0.f;
    if (m != -INFINITY)
      for (int32_t t = 0; t < l.splits; ++t) {
        const float pm = p.partial[(i * l.splits + t) * 2];
        if (pm != -INFINITY) s += p.partial[(i * l.splits + t) * 2 + 1] * expf(pm - m);
      }
    p.stats[i * 2] = m;
    p.stats[i * 2 + 1] = s;
  }
}

template <kv_element T>
__global__ void window_probs_kernel(const __grid_constant__ window_params<T> p) {
  extern __shared__ float smem[];
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const int32_t d = a.pool.head_dim, chunk = default_tuning.window.query_chunk;
  const window_head<T> wh = window_head_of(p);
  float* sk = smem;
  float* sq = sk + l.tile * (d + 1);
  float* sl = sq + chunk * (d + 1);
  float* sstat = sl + chunk * l.tile;    // [pairs][2]
  float* sacc = sstat + 2 * l.pairs;     // [per_row][tile]
  int32_t* skpos = reinterpret_cast<int32_t*>(sacc + l.per_row * l.tile);
  int32_t* sqpos = skpos + l.tile;
  for (int32_t i = threadIdx.x; i < 2 * l.pairs; i += blockDim.x) sstat[i] = p.stats[wh.index * l.pairs * 2 + i];
  for (int32_t i = threadIdx.x; i < a.window; i += blockDim.x) sqpos[i] = a.query_positions[static_cast<int64_t>(wh.b) * a.window + i];
  const int32_t begin = blockIdx.x * default_tuning.window.keys_per_split;
  const int32_t end = min(wh.length, begin + default_tuning.window.keys_per_split);
  const bool squared = a.metric.squared;
  for (int32_t base = begin; base < end; base += l.tile) {
    const int32_t keys = min(l.tile, end - base);
    __syncthreads();
    load_key_tile(a.pool, wh.head, base, keys, d, sk, skpos);
    for (int32_t i = threadIdx.x; i < l.per_row * l.tile; i += blockDim.x) sacc[i] = 0.f;
    for (int32_t first = 0; first < l.pairs; first += chunk) {
      const int32_t count = min(chunk, l.pairs - first);
      __syncthreads();
      load_query_chunk(p, wh, first, count, d, sq);
      __syncthreads();
      chunk_logits(sq, sk, sl, count, keys, l.tile, d, p.sqrt_d);
      __syncthreads();
      for (int32_t i = threadIdx.x; i < count * l.tile; i += blockDim.x) {
        const int32_t q = i / l.tile, k = i - q * l.tile;
        if (k >= keys) continue;
        const int32_t pair = first + q;
        const int32_t qpos = sqpos[pair % a.window];
        const float m = sstat[2 * pair], s = sstat[2 * pair + 1];
        float x = 0.f;
        if (m != -INFINITY && skpos[k] <= qpos - a.metric.buffer) {
          x = expf(sl[i] - m) / s;
          if (squared) x *= x;
        }
        sl[i] = x;
      }
      __syncthreads();
      // Rows ascending per (g, key): the CPU's summation order.
      for (int32_t i = threadIdx.x; i < l.per_row * keys; i += blockDim.x) {
        const int32_t g = i / keys, k = i - g * keys;
        float v = sacc[g * l.tile + k];
        for (int32_t q = 0; q < count; ++q)
          if ((first + q) / a.window == g) v += sl[q * l.tile + k];
        sacc[g * l.tile + k] = v;
      }
    }
    __syncthreads();
    for (int32_t k = threadIdx.x; k < keys; k += blockDim.x) {
      const int32_t j = base + k;
      float v = 0.f;
      for (int32_t g = 0; g < l.per_row; ++g) {
        float x = sacc[g * l.tile + k];
        if (a.metric.aggregation == query_aggregation::mean) x /= static_cast<float>(a.window);
        if (l.after_pool) {
          p.agg[(wh.index * l.out_rows + g) * a.stride + j] = x;
        } else {
          v = g == 0 ? x : (a.metric.reduce == gqa_reduce::max ? fmaxf(v, x) : v + x);
        }
      }
      if (!l.after_pool) {
        if (a.metric.reduce == gqa_reduce::mean) v /= static_cast<float>(l.per_row);
        p.agg[wh.index * a.stride + j] = v;
      }
    }
  }
}

//! Position sort keys: key = position, value = slot; segment i = [i * stride, i * stride + n).
template <kv_element T>
__global__ void position_keys_kernel(const __grid_constant__ window_params<T> p) {
  const auto& a = p.args;
  const int32_t hi = blockIdx.y;  // workspace head index
  const int32_t b = hi / (a.layer_count * a.pool.heads);
  const int32_t rest = hi - b * a.layer_count * a.pool.heads;
  const int32_t layer = a.first_layer + rest / a.pool.heads, h = rest % a.pool.heads;
  const int64_t head = a.pool.head_index(a.rows[b], layer, h);
  const int32_t n = a.pool.lengths[head];
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.begin[hi] = static_cast<int64_t>(hi) * a.stride;
    p.end[hi] = static_cast<int64_t>(hi) * a.stride + n;
  }
  for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) {
    p.keys_in[static_cast<int64_t>(hi) * a.stride + j] = static_cast<uint32_t>(a.pool.positions[a.pool.physical(head, j)]);
    p.values_in[static_cast<int64_t>(hi) * a.stride + j] = j;
  }
}

//! Pools row `in` into `out` along positions (slots in position order: values_out).
template <kv_element T>
__global__ void pool_kernel(const __grid_constant__ window_params<T> p, const float* in, float* out) {
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const int64_t row = blockIdx.y;  // [heads][out_rows]
  const int64_t hi = row / l.out_rows;
  const int64_t seg = hi * a.stride;
  const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
  if (n == 0) return;
  const uint64_t* pos = p.keys_out + seg;  // ascending positions
  const int32_t* by_position = p.values_out + seg;
  int32_t m = n;
  if (a.metric.range == pool_range::evictable_prefix) {  // keys before the recent window
    const int64_t limit = static_cast<int64_t>(pos[n - 1]) + 1 - a.protect.recent;
    int32_t lo = 0, hi2 = n;
    while (lo < hi2) {
      const int32_t mid = (lo + hi2) / 2;
      if (static_cast<int64_t>(pos[mid]) < limit) lo = mid + 1; else hi2 = mid;
    }
    m = lo;
  }
  const int32_t half = a.metric.kernel / 2;
  const float* src = in + row * a.stride;
  float* dst = out + row * a.stride;
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int32_t j = by_position[i];
    if (i >= m) {
      dst[j] = src[j];
      continue;
    }
    const bool is_max = a.metric.pool == pooling::max;
    float v = is_max ? -INFINITY : 0.f;
    for (int32_t t = max(0, i - half); t <= min(m - 1, i + half); ++t) {
      const float x = src[by_position[t]];
      v = is_max ? fmaxf(v, x) : v + x;
    }
    dst[j] = is_max ? v : v / static_cast<float>(a.metric.kernel);
  }
}

//! scores = reduction over the group of the (pooled) per-query-head rows.
template <kv_element T>
__global__ void group_reduce_kernel(const __grid_constant__ window_params<T> p, const float* in) {
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const int64_t total = l.heads * a.stride;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hi = i / a.stride, j = i - hi * a.stride;
    float v = 0.f;
    for (int32_t g = 0; g < l.out_rows; ++g) {
      const float x = in[(hi * l.out_rows + g) * a.stride + j];
      v = g == 0 ? x : (a.metric.reduce == gqa_reduce::max ? fmaxf(v, x) : v + x);
    }
    if (a.metric.reduce == gqa_reduce::mean) v /= static_cast<float>(l.out_rows);
    a.scores[i] = v;
  }
}

}  // namespace detail

//! Scores every slot of layers [first_layer, first_layer + layer_count) of the batch into
//! `scores`, on `stream`. Entries past a head's length are left alone.
template <kv_element T>
[[nodiscard]] status window_scores(const window_score_arguments<T>& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.batch == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  const detail::window_layout l = detail::window_layout_of(a);
  detail::workspace_carver w(workspace);
  detail::window_params<T> p{a, l, std::sqrt(static_cast<float>(a.pool.head_dim))};
  p.partial = w.take<float>(l.partial);
  p.stats = w.take<float>(l.stats);
  p.agg = w.take<float>(l.agg);
  p.pooled = w.take<float>(l.pooled);
  p.keys_in = w.take<uint64_t>(l.items);
  p.keys_out = w.take<uint64_t>(l.items);
  p.values_in = w.take<int32_t>(l.items);
  p.values_out = w.take<int32_t>(l.items);
  p.begin = w.take<int64_t>(l.pool ? l.heads : 0);
  p.end = w.take<int64_t>(l.pool ? l.heads : 0);
  // Without pooling and without a late reduction the aggregate IS the score.
  if (!l.pool && !l.after_pool) p.agg = a.scores;

  const size_t smem = detail::window_smem(l, a.pool.head_dim);
  if (smem > 48 * 1024) {
    KVTRIM_CUDA_TRY(cudaFuncSetAttribute(detail::window_stats_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    KVTRIM_CUDA_TRY(cudaFuncSetAttribute(detail::window_probs_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int32_t threads = default_tuning.window.threads;
  const dim3 grid(static_cast<unsigned>(l.splits), static_cast<unsigned>(a.pool.heads),
                  static_cast<unsigned>(a.batch * a.layer_count));
  detail::window_stats_kernel<T><<<grid, threads, smem, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  const int32_t et = default_tuning.elementwise.threads;
  detail::window_merge_kernel<T><<<detail::grid_for(l.heads * l.pairs, et), et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  detail::window_probs_kernel<T><<<grid, threads, smem, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());

  const float* reduce_in = p.agg;
  if (l.pool) {
    const unsigned x = static_cast<unsigned>(detail::ceil_div(a.stride, et) < 64 ? detail::ceil_div(a.stride, et) : 64);
    detail::position_keys_kernel<T><<<dim3(x, static_cast<unsigned>(l.heads)), et, 0, stream>>>(p);
    KVTRIM_CUDA_TRY(cudaGetLastError());
    const segmented_sort_arguments sort{p.keys_in, p.keys_out, p.values_in, p.values_out, l.items,
                                        static_cast<int32_t>(l.heads), p.begin, p.end};
    if (const status s = segmented_sort(sort, w.take<char>(static_cast<int64_t>(workspace_size(sort))), stream);
        s != status::success)
      return s;
    float* pool_out = l.after_pool ? p.pooled : a.scores;
    detail::pool_kernel<T><<<dim3(x, static_cast<unsigned>(l.heads * l.out_rows)), et, 0, stream>>>(p, p.agg, pool_out);
    KVTRIM_CUDA_TRY(cudaGetLastError());
    reduce_in = pool_out;
  }
  if (l.after_pool) {
    detail::group_reduce_kernel<T><<<detail::grid_for(l.heads * a.stride, et), et, 0, stream>>>(p, reduce_in);
    KVTRIM_CUDA_TRY(cudaGetLastError());
  }
  return status::success;
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
