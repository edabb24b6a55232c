#pragma once
//! \file ranking.cuh
//! Ranking, budgets and eviction planning on the device (CPU semantics: plan/candidates.hpp,
//! plan/tie_break.hpp, policy/budget/*.hpp, policy/evict/topk_keep.hpp).
//!
//! 1. rank keys: per head, protected slots (sinks, recent window) get key 0; every other slot
//!    the 64-bit key (~ordered(score) << 32 | position), so an ascending sort puts protected
//!    slots first and then the candidates by the tie-break rule: higher score first, equal
//!    scores -> lower position (a cache never holds one position twice; the stable sort of
//!    slot-ordered values settles the rest by the lower slot).
//! 2. one sort by (head, key) of every head's entries at once: a stable device-wide radix sort
//!    by key, then a stable one by head (slots past a head's length carry padding keys, which
//!    sort after its entries). Values: the slot in the head.
//! 3. budgets: uniform and pyramid per head; Ada-KV per layer (a second sort, within each
//!    layer, of its candidates keyed (score desc, head, rank) gives each head's share of the
//!    layer's top-k, then the safeguard); KV-Compress per sequence (candidate blocks priced by
//!    their block metric, keyed (metric asc, head, block), cheapest `blocks_to_evict` taken).
//!    The second sort is one device-wide radix sort: the keys carry their group in their
//!    high bits (group_key_format).
//! 4. evictor: top-k, or rounded up to whole blocks; kept flags per slot for compaction.
//! Device-detected input errors (NaN scores, empty heads) are reported through `error` and
//! make every later step of the same compression a no-op (strong guarantee).

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/kernels/radix_sort.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/budget/global_blocks.hpp"
#include "kvtrim/policy/budget/pyramid.hpp"
#include "kvtrim/policy/metric/accumulated_attention.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! Where a head's ranking scores come from.
enum class score_source : uint8_t {
  scores,       //!< the `scores` array (window attention)
  positional,   //!< the slot's position (StreamingLLM)
  accumulated   //!< the slot metric (+ `scores` when an observation was scored), ranked by rank_score
};

//! The budget allocators the device implements, as plain data.
struct device_budget {
  enum class kind : uint8_t { uniform, pyramid, adaptive, global_blocks };
  kind type = kind::uniform;
  token_budget budget = token_budget::of_tokens(1);  //!< uniform / pyramid / adaptive base / global
  bool base_is_pyramid = false;                      //!< adaptive: base budget is pyramid_budget
  int32_t beta = 20;
  pyramid_form form = pyramid_form::integer;
  float alpha = 0.2f;
  int32_t skip_layers = 0;
  int32_t block_size = 16;       //!< global_blocks
  int32_t pending_tokens = 1;    //!< global_blocks
};

struct device_evictor {
  bool whole_blocks = false;  //!< block_evictor
  int32_t block_size = 1;
};

template <kv_element T>
struct plan_arguments {
  paged_view<T> pool;
  const int32_t* rows = nullptr;  //!< [batch] device
  int32_t batch = 0;
  int32_t first_layer = 0;
  int32_t layer_count = 1;        //!< global budgets need every layer
  protected_set protect{};
  score_source source = score_source::scores;
  const float* scores = nullptr;  //!< [batch][layer_count][H][stride] device (scores / accumulated + obs)
  accumulation_norm norm = accumulation_norm::sum;
  device_budget budget{};
  device_evictor evictor{};
  int32_t stride = 0;             //!< >= every head length
  int32_t* keep = nullptr;        //!< [batch][layer_count][H] device out: slots each head keeps
  uint8_t* kept = nullptr;        //!< [batch][layer_count][H][stride] device out: 1 = slot kept
  int64_t* head_index = nullptr;  //!< [batch][layer_count][H] device out: mirror index of each head
  float* new_metrics = nullptr;   //!< [batch][layer_count][H][stride] device out (accumulated only)
  int32_t* error = nullptr;       //!< device: 0, or the status of the first failure
};

template <kv_element T>
[[nodiscard]] status can_implement(const plan_arguments<T>& a) noexcept {
  if (const status s = a.pool.validate(); s != status::success) return s;
  if (const status s = a.protect.validate(); s != status::success) return s;
  if (a.batch < 0 || a.first_layer < 0 || a.layer_count < 1 || a.first_layer + a.layer_count > a.pool.layers ||
      a.stride < 1)
    return status::invalid_argument;
  const int64_t heads = static_cast<int64_t>(a.batch) * a.layer_count * a.pool.heads;
  if (heads > 65535 || heads * a.stride > INT32_MAX) return status::not_supported;
  if (a.budget.type == device_budget::kind::global_blocks) {
    if (a.first_layer != 0 || a.layer_count != a.pool.layers) return status::invalid_argument;
    if (a.budget.block_size < 1) return status::invalid_argument;
    if (static_cast<int64_t>(a.pool.layers) * a.pool.heads * detail::ceil_div(a.stride, a.budget.block_size) > INT32_MAX)
      return status::not_supported;
  }
  if (a.evictor.block_size < 1) return status::invalid_argument;
  if (a.source != score_source::positional && !a.scores && a.source == score_source::scores) return status::invalid_argument;
  if (a.batch > 0 && (!a.rows || !a.keep || !a.kept || !a.head_index || !a.error)) return status::invalid_argument;
  if (a.source == score_source::accumulated && !a.new_metrics) return status::invalid_argument;
  return status::success;
}

namespace detail {

//! Keys of the second sort, [group][score][local] from the high bits down: the candidate's
//! group, its 32 score bits (ascending = better first) and its `local` index in the group
//! (head in the group * span + rank; unique, so no ties). One device-wide sort over the low
//! end_bit bits then orders every group at once, as a segmented sort would. It always fits:
//! groups * locals <= 2^31 (can_implement bounds the items), so group and local need at most
//! 32 bits together. Padding sorts after every candidate of its group: no candidate's score
//! bits are all ones (that is a NaN, refused).
struct group_key_format {
  int32_t group_bits = 0;
  int32_t local_bits = 0;

  [[nodiscard]] __host__ __device__ constexpr uint64_t group_part(int64_t group) const noexcept {
    return group_bits == 0 ? 0 : static_cast<uint64_t>(group) << (32 + local_bits);
  }
  [[nodiscard]] __host__ __device__ constexpr uint64_t encode(int64_t group, uint32_t score, uint32_t local) const noexcept {
    return group_part(group) | (static_cast<uint64_t>(score) << local_bits) | local;
  }
  [[nodiscard]] __host__ __device__ constexpr uint64_t padding(int64_t group) const noexcept {
    return group_part(group) | low_bits(32 + local_bits);
  }
  [[nodiscard]] __host__ __device__ constexpr uint32_t local_of(uint64_t key) const noexcept {
    return static_cast<uint32_t>(key & low_bits(local_bits));
  }
  [[nodiscard]] __host__ __device__ constexpr int32_t end_bit() const noexcept { return group_bits + 32 + local_bits; }
};

//! The format for `groups` groups of `locals` candidates each (groups * locals <= 2^31).
[[nodiscard]] __host__ __device__ constexpr group_key_format group_key_format_of(int64_t groups, int64_t locals) noexcept {
  return {bits_for(groups), bits_for(locals)};
}

struct plan_layout {
  int64_t heads = 0;   // batch * layer_count * H
  int64_t items = 0;   // heads * stride
  int32_t groups = 0;  // second-sort segments: layers (adaptive) or sequences (global)
  bool second = false;
  int64_t span = 0;            // second sort: ranks per head (adaptive: stride; global: blocks per head)
  int64_t group_heads = 0;     // heads per group
  int64_t second_items = 0;    // groups * group_heads * span
  group_key_format format{};
};

template <kv_element T>
[[nodiscard]] plan_layout plan_layout_of(const plan_arguments<T>& a) noexcept {
  plan_layout l;
  l.heads = static_cast<int64_t>(a.batch) * a.layer_count * a.pool.heads;
  l.items = l.heads * a.stride;
  const bool adaptive = a.budget.type == device_budget::kind::adaptive;
  l.second = adaptive || a.budget.type == device_budget::kind::global_blocks;
  l.groups = adaptive ? a.batch * a.layer_count : a.batch;
  if (l.second) {
    l.span = adaptive ? a.stride : ceil_div(a.stride, a.budget.block_size > 0 ? a.budget.block_size : 1);
    l.group_heads = adaptive ? a.pool.heads : static_cast<int64_t>(a.layer_count) * a.pool.heads;
    l.second_items = static_cast<int64_t>(l.groups) * l.group_heads * l.span;
    l.format = group_key_format_of(l.groups, l.group_heads * l.span);
  }
  return l;
}

//! Bits of the first sort's head pass (at least one: CUB sorts on a non-empty bit range).
[[nodiscard]] inline int32_t head_key_bits(const plan_layout& l) noexcept {
  const int32_t bits = bits_for(l.heads);
  return bits > 0 ? bits : 1;
}

//! CUB's storage for the second sort.
[[nodiscard]] inline size_t second_sort_bytes(const plan_layout& l) noexcept {
  if (!l.second) return 0;
  return workspace_size(radix_sort_arguments{nullptr, nullptr, nullptr, nullptr, l.second_items, l.format.end_bit()});
}

}  // namespace detail

//! Sort buffers (three key/value pairs: the first sort's two passes, then the Ada-KV /
//! KV-Compress sort), per-head counters and CUB's temporary storage.
template <kv_element T>
[[nodiscard]] size_t workspace_size(const plan_arguments<T>& a) noexcept {
  const detail::plan_layout l = detail::plan_layout_of(a);
  detail::workspace_carver w(nullptr);
  for (int i = 0; i < 3; ++i) w.take<uint64_t>(l.items);
  for (int i = 0; i < 3; ++i) w.take<int32_t>(l.items);
  w.take<int64_t>(l.heads);  // begin
  w.take<int64_t>(l.heads);  // end
  w.take<int32_t>(l.heads * 4);   // next, protected, select, earned
  w.take<int32_t>(l.groups * 2);  // total / wanted
  const size_t by_key = workspace_size(radix_sort_arguments{nullptr, nullptr, nullptr, nullptr, l.items, 64});
  const size_t by_head =
      workspace_size(radix_sort_arguments{nullptr, nullptr, nullptr, nullptr, l.items, detail::head_key_bits(l)});
  const size_t second = detail::second_sort_bytes(l);
  w.take<char>(static_cast<int64_t>(std::max({by_key, by_head, second})));
  return w.used();
}

namespace detail {

template <kv_element T>
struct plan_params {
  plan_arguments<T> args;
  plan_layout layout;
  uint64_t* keys_in = nullptr;
  uint64_t* keys_out = nullptr;   // sorted: protected first, then candidates best first
  uint64_t* keys2 = nullptr;
  int32_t* values_in = nullptr;
  int32_t* values_out = nullptr;  // slot of each sorted entry
  int32_t* values2 = nullptr;
  int64_t* begin = nullptr;
  int64_t* end = nullptr;
  int32_t* next = nullptr;        // [heads] one past the newest position
  int32_t* protect = nullptr;     // [heads] protected slots
  int32_t* select = nullptr;      // [heads] candidates kept (allocator)
  int32_t* earned = nullptr;      // [heads] Ada-KV share / KV-Compress evicted blocks
  int32_t* group_total = nullptr; // [groups] Ada-KV total / KV-Compress wanted
  int32_t* group_flag = nullptr;  // [groups] Ada-KV: compress this layer
};

__device__ __forceinline__ void report(int32_t* error, status s) {
  atomicCAS(error, 0, static_cast<int32_t>(s));
}

//! Mirror index (and layer) of workspace head hi.
template <kv_element T>
__device__ __forceinline__ int64_t mirror_head(const plan_arguments<T>& a, int64_t hi, int32_t& layer) {
  return batch_head(a.pool, a.rows, a.first_layer, a.layer_count, hi, layer);
}

//! One CTA per head: next position, protected count, new metrics, rank keys.
template <kv_element T, int32_t Threads>
__global__ void __launch_bounds__(Threads) rank_keys_kernel(const __grid_constant__ plan_params<T> p) {
  __shared__ int32_t s_next, s_protect;
  const auto& a = p.args;
  const int64_t hi = blockIdx.x;
  int32_t layer = 0;
  const int64_t head = mirror_head(a, hi, layer);
  const int32_t n = a.pool.lengths[head];
  if (threadIdx.x == 0) {
    s_next = 0;
    s_protect = 0;
    p.begin[hi] = hi * a.stride;
    p.end[hi] = hi * a.stride + n;
    a.head_index[hi] = head;
    if (n == 0) report(a.error, status::empty_sequence);
  }
  __syncthreads();
  int32_t local = 0;
  for (int32_t j = threadIdx.x; j < n; j += Threads) local = max(local, a.pool.positions[a.pool.physical(head, j)] + 1);
  atomicMax(&s_next, local);
  __syncthreads();
  const int32_t next = s_next;
  int32_t protected_here = 0;
  for (int32_t j = threadIdx.x; j < n; j += Threads) {
    const int64_t slot = a.pool.physical(head, j);
    const int32_t pos = a.pool.positions[slot];
    const int64_t at = hi * a.stride + j;
    float score = 0.f;
    if (a.source == score_source::positional) {
      score = static_cast<float>(pos);
    } else if (a.source == score_source::scores) {
      score = a.scores[at];
    } else {
      const float metric = a.pool.metrics[slot] + (a.scores ? a.scores[at] : 0.f);
      a.new_metrics[at] = metric;
      const int32_t queries = next - pos;
      score = (a.norm == accumulation_norm::sum || queries <= 0) ? metric : metric / static_cast<float>(queries);
    }
    const bool is_protected = a.protect.contains(pos, next);
    uint64_t key = 0;
    if (is_protected) {
      ++protected_here;
    } else {
      if (isnan(score) || score == -INFINITY) report(a.error, status::non_finite_input);
      key = (static_cast<uint64_t>(~ordered_bits(score)) << 32) | static_cast<uint32_t>(pos);
    }
    p.keys_in[at] = key;
    p.values_in[at] = static_cast<int32_t>(at);  // the global index until the head pass
  }
  for (int32_t j = n + static_cast<int32_t>(threadIdx.x); j < a.stride; j += Threads) {
    const int64_t at = hi * a.stride + j;
    p.keys_in[at] = ~uint64_t{0};  // padding: after every entry of the head
    p.values_in[at] = static_cast<int32_t>(at);
  }
  atomicAdd(&s_protect, protected_here);
  __syncthreads();
  if (threadIdx.x == 0) {
    p.next[hi] = next;
    p.protect[hi] = s_protect;
  }
}

//! Between the two passes of the first sort: each entry's head (from its global index, the
//! value of the key pass) is the key of the head pass, its place in the key order the value.
template <kv_element T>
__global__ void head_keys_kernel(const __grid_constant__ plan_params<T> p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.layout.items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.keys_in[i] = static_cast<uint64_t>(p.values_out[i] / p.args.stride);
    p.values_in[i] = static_cast<int32_t>(i);
  }
}

//! After the head pass: entry t of the sorted result is entry values2[t] of the key pass, its
//! value the slot within its head. Written to keys_in / values_in, which plan() then names
//! keys_out / values_out.
template <kv_element T>
__global__ void gather_sorted_kernel(const __grid_constant__ plan_params<T> p) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < p.layout.items;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t i = p.values2[t];
    p.keys_in[t] = p.keys_out[i];
    p.values_in[t] = p.values_out[i] % p.args.stride;
  }
}

//! Candidates head (layer, n, P) would keep under a uniform / pyramid budget, before clipping.
__device__ __forceinline__ int32_t nominal_select(const device_budget& d, bool pyramid, int32_t layer, int32_t layers,
                                                  int32_t n, int32_t protect) {
  if (!pyramid) {
    int32_t t = d.budget.tokens;
    if (d.budget.kind == token_budget::unit::ratio) {
      t = static_cast<int32_t>(static_cast<double>(n) * d.budget.ratio);
      t = t < 1 ? 1 : t;
    }
    return max(0, t - protect);
  }
  if (d.form == pyramid_form::integer) return pyramid_integer_select(layer, layers, d.budget.tokens, protect, n, d.beta);
  // pyramid_real_keep, in double as on the host.
  const double c = static_cast<double>(protect) + static_cast<double>(n) * d.budget.ratio;
  const double min_num = (c - protect) / d.beta;
  const double max_num = (c - protect) * 2 - min_num;
  int32_t keep;
  if (!(n >= max_num && max_num >= min_num && min_num >= protect) || layers < 2) {
    keep = static_cast<int32_t>(rint(static_cast<double>(n) * d.budget.ratio));
  } else {
    const double step = (max_num - min_num) / (layers - 1);
    keep = static_cast<int32_t>(rint(max_num - layer * step));
  }
  return max(1, keep) - protect;
}

//! min_candidates (plan/candidates.hpp) from the counts: a non-empty head with nothing
//! protected keeps at least one candidate.
__device__ __forceinline__ int32_t clamp_select(int32_t select, int32_t n, int32_t protect) {
  const int32_t ranked = n - protect;
  const int32_t least = protect == 0 && ranked > 0 ? 1 : 0;
  return min(max(select, least), ranked);
}

//! Uniform / pyramid: one thread per head.
template <kv_element T>
__global__ void per_head_budget_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  for (int64_t hi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; hi < p.layout.heads;
       hi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int32_t layer = 0;
    const int64_t head = mirror_head(a, hi, layer);
    const int32_t n = a.pool.lengths[head], prot = p.protect[hi];
    const int32_t nominal = nominal_select(a.budget, a.budget.type == device_budget::kind::pyramid, layer, a.pool.layers, n, prot);
    p.select[hi] = clamp_select(nominal, n, prot);
  }
}

//! Ada-KV, one thread per (sequence, layer): bases, whether the layer compresses, its total.
template <kv_element T>
__global__ void adaptive_prepare_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  const int32_t g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.layout.groups) return;
  const int32_t layer = a.first_layer + g % a.layer_count;
  bool compress = layer >= a.budget.skip_layers;
  int64_t total = 0;
  for (int32_t h = 0; h < a.pool.heads; ++h) {
    const int64_t hi = static_cast<int64_t>(g) * a.pool.heads + h;
    int32_t ignored = 0;
    const int32_t n = a.pool.lengths[mirror_head(a, hi, ignored)], prot = p.protect[hi];
    const int32_t base = nominal_select(a.budget, a.budget.base_is_pyramid, layer, a.pool.layers, n, prot);
    p.select[hi] = base;  // the base, until the allocation below replaces it
    p.earned[hi] = 0;
    if (base > n - prot) compress = false;
    total += base;
  }
  p.group_flag[g] = compress ? 1 : 0;
  p.group_total[g] = compress ? static_cast<int32_t>(total) : 0;
}

//! Ada-KV second-sort keys: candidate i of head h -> (score desc, h, rank); padding last.
template <kv_element T>
__global__ void adaptive_keys_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.layout.items;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hi = i / a.stride;
    const int32_t idx = static_cast<int32_t>(i - hi * a.stride);
    const int32_t h = static_cast<int32_t>(hi % a.pool.heads);
    const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]), prot = p.protect[hi];
    const int64_t g = hi / a.pool.heads;
    uint64_t key = p.layout.format.padding(g);
    if (idx >= prot && idx < n)
      key = p.layout.format.encode(g, static_cast<uint32_t>(p.keys_out[i] >> 32),
                                   static_cast<uint32_t>(static_cast<int64_t>(h) * a.stride + (idx - prot)));
    p.keys_in[i] = key;
    p.values_in[i] = 0;
  }
}

//! Counts, per head, the entries among the first group_total[g] of each sorted group.
template <kv_element T>
__global__ void count_top_kernel(const __grid_constant__ plan_params<T> p) {
  const plan_layout& l = p.layout;
  const int32_t g = blockIdx.y;
  const int64_t base = g * l.group_heads * l.span;  // groups are contiguous, group_heads * span entries each
  for (int32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < p.group_total[g]; t += gridDim.x * blockDim.x) {
    const uint32_t local = l.format.local_of(p.keys2[base + t]);
    atomicAdd(&p.earned[g * l.group_heads + local / l.span], 1);
  }
}

//! Ada-KV safeguard per head: b = rint(earned (1 - alpha) + int(base alpha)), in float32.
template <kv_element T>
__global__ void adaptive_finish_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  for (int64_t hi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; hi < p.layout.heads;
       hi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
    const int32_t base = p.select[hi];
    int32_t b = base;
    if (p.group_flag[hi / a.pool.heads]) {
      const auto floor_capacity = static_cast<int32_t>(__fmul_rn(static_cast<float>(base), a.budget.alpha));
      const float v = __fadd_rn(__fmul_rn(static_cast<float>(p.earned[hi]), __fsub_rn(1.f, a.budget.alpha)),
                                static_cast<float>(floor_capacity));
      b = static_cast<int32_t>(rintf(v));
    }
    p.select[hi] = clamp_select(b, n, p.protect[hi]);
  }
}

//! KV-Compress, one thread per sequence: blocks to evict (global_block_budget::blocks_to_evict).
template <kv_element T>
__global__ void global_prepare_kernel(const __grid_constant__ plan_params<T> p, int32_t max_blocks) {
  const auto& a = p.args;
  const int32_t b = blockIdx.x * blockDim.x + threadIdx.x;
  const int32_t heads = a.layer_count * a.pool.heads;
  if (b >= a.batch) return;
  const int32_t bs = a.budget.block_size;
  int64_t blocks = 0, tokens = 0, candidates = 0;
  int32_t next = 0;
  for (int32_t i = 0; i < heads; ++i) {
    const int64_t hi = static_cast<int64_t>(b) * heads + i;
    const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]), prot = p.protect[hi];
    blocks += blocks_for(n, bs);
    tokens += n;
    next = max(next, p.next[hi]);
    const int32_t evictable = n - prot;
    const int32_t limit = prot == 0 ? evictable - 1 : evictable;
    const int32_t hanging = hanging_tokens(n, bs);
    candidates += limit >= hanging ? (limit - hanging) / bs + 1 : 0;
    p.earned[hi] = 0;
  }
  int64_t evict = 0;
  if (a.budget.budget.kind == token_budget::unit::tokens) {
    const int64_t m = (static_cast<int64_t>(a.budget.budget.tokens) + bs - 1) / bs * bs;
    evict = max(int64_t{0}, blocks - (m * heads + bs - 1) / bs);
  } else {
    const int64_t window = a.protect.recent + a.budget.pending_tokens;
    const int64_t prot = (window + bs - 1) / bs * bs;
    const int64_t seq_len = next + a.budget.pending_tokens;
    const auto target = static_cast<int64_t>(ceil(static_cast<double>(seq_len - prot) * static_cast<double>(heads) *
                                                  static_cast<double>(a.budget.budget.ratio))) + prot * heads;
    const int64_t excess = tokens - target;
    evict = excess > 0 ? (excess + bs - 1) / bs : 0;
  }
  p.group_total[b] = static_cast<int32_t>(evict < candidates ? evict : candidates);
}

//! KV-Compress candidate blocks: block k of a head costs the score of its (k bs + hanging)-th
//! worst candidate; key (metric asc, head, k), padding last.
template <kv_element T>
__global__ void global_keys_kernel(const __grid_constant__ plan_params<T> p, int32_t max_blocks) {
  const auto& a = p.args;
  const int64_t total = p.layout.heads * max_blocks;
  const int32_t bs = a.budget.block_size;
  const int32_t heads = a.layer_count * a.pool.heads;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hi = i / max_blocks;
    const int32_t k = static_cast<int32_t>(i - hi * max_blocks);
    const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]), prot = p.protect[hi];
    const int32_t evictable = n - prot;
    const int32_t limit = prot == 0 ? evictable - 1 : evictable;
    const int32_t hanging = hanging_tokens(n, bs);
    const int32_t removed = k * bs + hanging;
    const int64_t b = hi / heads;
    uint64_t key = p.layout.format.padding(b);
    if (removed <= limit) {
      const uint64_t sorted = p.keys_out[hi * a.stride + prot + (evictable - removed)];
      const float score = from_ordered_bits(~static_cast<uint32_t>(sorted >> 32));
      const auto local = static_cast<uint32_t>((hi % heads) * max_blocks + k);
      key = p.layout.format.encode(b, ordered_bits(score), local);
    }
    // Entries are laid out [batch][heads * max_blocks]: the same flat index.
    p.keys_in[i] = key;
    p.values_in[i] = 0;
  }
}

//! KV-Compress: select = ranked - evicted tokens of the head's evicted blocks.
template <kv_element T>
__global__ void global_finish_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  for (int64_t hi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; hi < p.layout.heads;
       hi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]), ranked = n - p.protect[hi];
    const int32_t b = p.earned[hi];
    const int32_t evicted = b == 0 ? 0 : (b - 1) * a.budget.block_size + hanging_tokens(n, a.budget.block_size);
    p.select[hi] = ranked - evicted;
  }
}

//! Evictor and kept flags, one CTA per head: keep = protected + (aligned) select; the first
//! `keep` sorted entries are flagged.
template <kv_element T>
__global__ void keep_kernel(const __grid_constant__ plan_params<T> p) {
  __shared__ int32_t s_keep;
  const auto& a = p.args;
  const int64_t hi = blockIdx.x;
  const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
  if (threadIdx.x == 0) {
    const int32_t prot = p.protect[hi], ranked = n - prot;
    const int32_t count = p.select[hi];
    int32_t take = count;
    if (count < 0 || count > ranked) {
      report(a.error, status::invalid_argument);
      take = ranked;
    } else if (n > 0 && count + prot == 0) {
      report(a.error, status::invalid_plan);
    }
    if (a.evictor.whole_blocks) {
      const int32_t bs = a.evictor.block_size;
      const int32_t whole = (take + prot + bs - 1) / bs * bs;
      take = min(ranked, max(take, whole - prot));
    }
    s_keep = prot + take;
    a.keep[hi] = prot + take;
  }
  __syncthreads();
  uint8_t* flags = a.kept + hi * a.stride;
  for (int32_t j = threadIdx.x; j < n; j += blockDim.x) flags[j] = 0;
  __syncthreads();
  for (int32_t i = threadIdx.x; i < s_keep; i += blockDim.x) flags[p.values_out[hi * a.stride + i]] = 1;
}

//! Stores the accumulated metrics (before compaction, which carries them) unless an error
//! was reported.
template <kv_element T>
__global__ void commit_metrics_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  if (*a.error != 0) return;
  const int64_t hi = blockIdx.y;
  const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
  const int64_t head = a.head_index[hi];
  for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x)
    a.pool.metrics[a.pool.physical(head, j)] = a.new_metrics[hi * a.stride + j];
}

//! keys_in -> keys2 (values alongside), each group ordered by its candidates' keys.
template <kv_element T>
[[nodiscard]] status second_sort(const plan_params<T>& p, void* temp, cudaStream_t stream) {
  const plan_layout& l = p.layout;
  return radix_sort({p.keys_in, p.keys2, p.values_in, p.values2, l.second_items, l.format.end_bit()}, temp, stream);
}

}  // namespace detail

//! Ranks, sizes and flags the kept slots of every head of the batch on `stream`; with an
//! accumulated source it also stores the new slot metrics. Compaction is compaction.cuh.
template <kv_element T>
[[nodiscard]] status plan(const plan_arguments<T>& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.batch == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  const detail::plan_layout l = detail::plan_layout_of(a);
  detail::workspace_carver w(workspace);
  detail::plan_params<T> p{a, l};
  p.keys_in = w.take<uint64_t>(l.items);
  p.keys_out = w.take<uint64_t>(l.items);
  p.keys2 = w.take<uint64_t>(l.items);
  p.values_in = w.take<int32_t>(l.items);
  p.values_out = w.take<int32_t>(l.items);
  p.values2 = w.take<int32_t>(l.items);
  p.begin = w.take<int64_t>(l.heads);
  p.end = w.take<int64_t>(l.heads);
  int32_t* counters = w.take<int32_t>(l.heads * 4);
  p.next = counters;
  p.protect = counters + l.heads;
  p.select = counters + 2 * l.heads;
  p.earned = counters + 3 * l.heads;
  int32_t* groups = w.take<int32_t>(l.groups * 2);
  p.group_total = groups;
  p.group_flag = groups + l.groups;
  void* sort_temp = w.take<char>(0);  // the rest: CUB's storage

  KVTRIM_CUDA_TRY(cudaMemsetAsync(a.error, 0, sizeof(int32_t), stream));
  const auto heads = static_cast<unsigned>(l.heads);
  constexpr int32_t pt = default_tuning.planning.threads;
  detail::rank_keys_kernel<T, pt><<<heads, pt, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  // The first sort (file comment, 2.): by key, then stably by head; the result lands in
  // keys_in / values_in, which are then named keys_out / values_out (the buffers swap roles).
  const int32_t et = default_tuning.elementwise.threads;
  if (const status s = radix_sort({p.keys_in, p.keys_out, p.values_in, p.values_out, l.items, 64}, sort_temp, stream);
      s != status::success)
    return s;
  detail::head_keys_kernel<T><<<detail::grid_for(l.items, et), et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  if (const status s = radix_sort({p.keys_in, p.keys2, p.values_in, p.values2, l.items, detail::head_key_bits(l)},
                                  sort_temp, stream);
      s != status::success)
    return s;
  detail::gather_sorted_kernel<T><<<detail::grid_for(l.items, et), et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  std::swap(p.keys_in, p.keys_out);
  std::swap(p.values_in, p.values_out);

  switch (a.budget.type) {
    case device_budget::kind::uniform:
    case device_budget::kind::pyramid:
      detail::per_head_budget_kernel<T><<<detail::grid_for(l.heads, et), et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      break;
    case device_budget::kind::adaptive: {
      detail::adaptive_prepare_kernel<T><<<detail::grid_for(l.groups, 64), 64, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      detail::adaptive_keys_kernel<T><<<detail::grid_for(l.items, et), et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      if (const status s = detail::second_sort(p, sort_temp, stream); s != status::success) return s;
      const int64_t most = static_cast<int64_t>(a.pool.heads) * a.stride;
      detail::count_top_kernel<T><<<dim3(detail::grid_for(most, et, 4096), l.groups), et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      detail::adaptive_finish_kernel<T><<<detail::grid_for(l.heads, et), et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      break;
    }
    case device_budget::kind::global_blocks: {
      const auto max_blocks = static_cast<int32_t>(detail::ceil_div(a.stride, a.budget.block_size));
      detail::global_prepare_kernel<T><<<detail::grid_for(a.batch, 64), 64, 0, stream>>>(p, max_blocks);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      detail::global_keys_kernel<T><<<detail::grid_for(l.heads * max_blocks, et), et, 0, stream>>>(p, max_blocks);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      if (const status s = detail::second_sort(p, sort_temp, stream); s != status::success) return s;
      const int64_t most = static_cast<int64_t>(a.layer_count) * a.pool.heads * max_blocks;
      detail::count_top_kernel<T><<<dim3(detail::grid_for(most, et, 4096), a.batch), et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      detail::global_finish_kernel<T><<<detail::grid_for(l.heads, et), et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      break;
    }
  }
  detail::keep_kernel<T><<<heads, pt, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  if (a.source == score_source::accumulated) {
    const unsigned x = static_cast<unsigned>(detail::ceil_div(a.stride, et) < 64 ? detail::ceil_div(a.stride, et) : 64);
    detail::commit_metrics_kernel<T><<<dim3(x, heads), et, 0, stream>>>(p);
    KVTRIM_CUDA_TRY(cudaGetLastError());
  }
  return status::success;
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
