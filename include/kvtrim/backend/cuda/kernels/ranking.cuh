#pragma once
//! \file ranking.cuh
//! Ranking, budgets and eviction planning on the device (CPU semantics: plan/candidates.hpp,
//! plan/tie_break.hpp, policy/budget/*.hpp, policy/evict/topk_keep.hpp).
//!
//! 1. rank keys: per head, protected slots (sinks, recent window) get key 0; every other slot
//!    the 64-bit key (~ordered(score) << 32 | position), so ascending keys put protected
//!    slots first and then the candidates by the tie-break rule: higher score first, equal
//!    scores -> lower position (a cache never holds one position twice; equal keys fall to
//!    the lower slot). Kept: the `keep` smallest keys of the head in that order.
//! 2. uniform and pyramid budgets size each head alone, so they need its kept set, not its
//!    order: a radix select per head finds the keep-th smallest key (select_kept_kernel).
//! 3. Ada-KV's budgets are per layer: each head earns as many candidates as it has among the
//!    layer's top `total` in the order (score desc, head, rank), then the safeguard. Only
//!    those counts matter, so a radix select per layer finds the top-total-th group key (the
//!    rank key's score bits, then the head) and each head counts its candidates at or above
//!    it (adaptive_select); its kept set is then a per-head select as in 2.
//! 4. KV-Compress's budget is per sequence: candidate blocks priced by their block metric,
//!    keyed (metric asc, head, block), cheapest `blocks_to_evict` taken. A block's price is
//!    the score at a rank of its head's candidates, which needs every head's scores in order
//!    but not which slot holds each: one device-wide radix sort of (head, score bits) keys
//!    (protected slots first in their head, slots past its length last), then a second one
//!    of the blocks, whose keys carry their sequence in their high bits (group_key_format).
//!    Each head then keeps its top (candidates - evicted tokens), a per-head select as in 2.
//! 5. evictor: top-k, or rounded up to whole blocks; kept flags per slot for compaction.
//! Device-detected input errors (NaN scores, empty heads) are reported through `error` and
//! make every later step of the same compression a no-op (strong guarantee).

#include <cub/block/block_scan.cuh>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/kernels/radix_sort.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/budget/adaptive.hpp"
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
  token_budget budget = token_budget::of_tokens(1);  //!< uniform / adaptive base / global
  pyramid_budget pyramid{};                          //!< pyramid / adaptive base
  bool base_is_pyramid = false;                      //!< adaptive: base budget is pyramid_budget
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
  int32_t groups = 0;  // layers (adaptive: its selects) or sequences (global: second-sort segments)
  bool sorted = false; // KV-Compress: the sorts of file comment 4. (else selects)
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
  l.sorted = a.budget.type == device_budget::kind::global_blocks;
  l.groups = adaptive ? a.batch * a.layer_count : a.batch;
  if (l.sorted) {
    l.span = ceil_div(a.stride, a.budget.block_size > 0 ? a.budget.block_size : 1);
    l.group_heads = static_cast<int64_t>(a.layer_count) * a.pool.heads;
    l.second_items = static_cast<int64_t>(l.groups) * l.group_heads * l.span;
    l.format = group_key_format_of(l.groups, l.group_heads * l.span);
  }
  return l;
}

//! KV-Compress's first sort: key = head << 32 | the rank key's score bits (file comment, 4.).
[[nodiscard]] inline int32_t head_score_key_bits(const plan_layout& l) noexcept { return 32 + bits_for(l.heads); }
[[nodiscard]] __host__ __device__ constexpr uint64_t head_score_key(int64_t head, uint64_t rank_key) noexcept {
  return static_cast<uint64_t>(head) << 32 | rank_key >> 32;
}

//! CUB's storage for the second sort.
[[nodiscard]] inline size_t second_sort_bytes(const plan_layout& l) noexcept {
  if (!l.sorted) return 0;
  return workspace_size(radix_sort_arguments{nullptr, nullptr, nullptr, nullptr, l.second_items, l.format.end_bit()});
}

}  // namespace detail

namespace detail {

//! Ada-KV's radix select per layer (file comment, 3.), over group keys (group_key): digits
//! of 8 bits from the top; a group is settled once every candidate matching `prefix` above
//! `shift` is taken. Then a candidate is taken iff its key above `shift` is at most prefix's;
//! at shift 64 (settled from the start), iff remaining > 0 (all or none). Unsettled after the
//! last digit, `prefix` is the threshold key: those below it are taken, and `remaining` of
//! those equal to it, all of one head.
struct adaptive_select_state {
  uint64_t* prefix = nullptr;     // [groups]
  int32_t* remaining = nullptr;   // [groups]
  int32_t* shift = nullptr;       // [groups] the last digit's bit (64: none)
  int32_t* settled = nullptr;     // [groups]
  int32_t* bins = nullptr;        // [groups][256] candidates per digit value (zero between passes)
};

//! A candidate's group key, left-aligned in 64 bits: its rank key's score bits (ascending =
//! higher score), then its head in the group in the next `head_bits` bits, zeros below. Equal
//! group keys are candidates of one head with equal scores.
[[nodiscard]] __host__ __device__ constexpr uint64_t group_key(uint64_t rank_key, int32_t head, int32_t head_bits) noexcept {
  return (rank_key & 0xffffffff00000000ull) | (head_bits == 0 ? 0 : static_cast<uint64_t>(head) << (32 - head_bits));
}
//! Digits of 8 bits that cover the group keys of `heads` heads per group.
[[nodiscard]] __host__ __device__ constexpr int32_t group_key_digits(int64_t heads) noexcept {
  return (32 + bits_for(heads) + 7) / 8;
}

template <kv_element T>
struct plan_params {
  plan_arguments<T> args;
  plan_layout layout;
  uint64_t* keys_in = nullptr;    // [heads][stride] rank keys (file comment, 1.)
  // KV-Compress: the two sorts (keys2, values2) -> (keys_out, values_out); values unused.
  uint64_t* keys_out = nullptr;
  uint64_t* keys2 = nullptr;
  int32_t* values_out = nullptr;
  int32_t* values2 = nullptr;
  int64_t* begin = nullptr;
  int64_t* end = nullptr;
  int32_t* next = nullptr;        // [heads] one past the newest position
  int32_t* protect = nullptr;     // [heads] protected slots
  int32_t* select = nullptr;      // [heads] candidates kept (allocator)
  int32_t* earned = nullptr;      // [heads] Ada-KV share / KV-Compress evicted blocks
  int32_t* group_total = nullptr; // [groups] Ada-KV total / KV-Compress wanted
  int32_t* group_flag = nullptr;  // [groups] Ada-KV: compress this layer
  adaptive_select_state select_state{};  // Ada-KV
  void* sort_temp = nullptr;      // CUB's storage
};

//! Carves the plan's buffers out of `base` (null: only counts) and returns the bytes: rank
//! keys; with the sorts two key / value pairs and CUB's storage (the larger of the two
//! sorts'); head bounds, per-head and per-group counters; Ada-KV's select state.
template <kv_element T>
size_t carve_plan(plan_params<T>& p, void* base) noexcept {
  const plan_layout& l = p.layout;
  const int64_t sorted_items = l.sorted ? l.items : 0;
  workspace_carver w(base);
  p.keys_in = w.take<uint64_t>(l.items);
  p.keys_out = w.take<uint64_t>(sorted_items);
  p.keys2 = w.take<uint64_t>(sorted_items);
  p.values_out = w.take<int32_t>(sorted_items);
  p.values2 = w.take<int32_t>(sorted_items);
  p.begin = w.take<int64_t>(l.heads);
  p.end = w.take<int64_t>(l.heads);
  int32_t* counters = w.take<int32_t>(l.heads * 4);
  p.next = counters;
  p.protect = counters ? counters + l.heads : nullptr;
  p.select = counters ? counters + 2 * l.heads : nullptr;
  p.earned = counters ? counters + 3 * l.heads : nullptr;
  int32_t* groups = w.take<int32_t>(l.groups * 2);
  p.group_total = groups;
  p.group_flag = groups ? groups + l.groups : nullptr;
  if (p.args.budget.type == device_budget::kind::adaptive) {
    adaptive_select_state& st = p.select_state;
    st.prefix = w.take<uint64_t>(l.groups);
    int32_t* state = w.take<int32_t>(l.groups * 3);
    st.remaining = state;
    st.shift = state ? state + l.groups : nullptr;
    st.settled = state ? state + 2 * l.groups : nullptr;
    st.bins = w.take<int32_t>(l.groups * 256);
  }
  size_t sort_bytes = 0;
  if (l.sorted) {
    const size_t first =
        workspace_size(radix_sort_arguments{nullptr, nullptr, nullptr, nullptr, l.items, head_score_key_bits(l)});
    sort_bytes = std::max(first, second_sort_bytes(l));
  }
  p.sort_temp = w.take<char>(static_cast<int64_t>(sort_bytes));
  return w.used();
}

__device__ __forceinline__ void report(int32_t* error, status s) {
  atomicCAS(error, 0, static_cast<int32_t>(s));
}

//! Mirror index (and layer) of workspace head hi.
template <kv_element T>
__device__ __forceinline__ int64_t mirror_head(const plan_arguments<T>& a, int64_t hi, int32_t& layer) {
  return batch_head(a.pool, a.rows, a.first_layer, a.layer_count, hi, layer);
}

//! Slots of one head each thread of the per-slot ranking kernels covers: their loads are
//! issued together (a CTA per head looping over its slots waited on each load in turn).
inline constexpr int32_t rank_items_per_thread = 8;

//! Grid (chunks of the stride, heads): one past the newest position of each head, by an
//! atomic max into the zeroed `next`; the first CTA of a head records its bounds and mirror
//! index (and reports an empty head).
template <kv_element T, int32_t Threads>
__global__ void __launch_bounds__(Threads) head_next_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  const int64_t hi = blockIdx.y;
  int32_t layer = 0;
  const int64_t head = mirror_head(a, hi, layer);
  const int32_t n = a.pool.lengths[head];
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    p.begin[hi] = hi * a.stride;
    p.end[hi] = hi * a.stride + n;
    a.head_index[hi] = head;
    if (n == 0) report(a.error, status::empty_sequence);
  }
  const int32_t first = static_cast<int32_t>(blockIdx.x) * Threads * rank_items_per_thread;
  int32_t next = 0;
#pragma unroll
  for (int32_t i = 0; i < rank_items_per_thread; ++i) {
    const int32_t j = first + i * Threads + static_cast<int32_t>(threadIdx.x);
    if (j < n) next = max(next, a.pool.positions[a.pool.physical(head, j)] + 1);
  }
#pragma unroll
  for (int32_t offset = 16; offset > 0; offset /= 2) next = max(next, __shfl_xor_sync(0xffffffffu, next, offset));
  if (threadIdx.x % 32 == 0 && next > 0) atomicMax(&p.next[hi], next);
}

//! Grid (chunks of the stride, heads), after head_next_kernel: each slot's rank key (file
//! comment, 1.) and new metric, padding keys past the head's length, and the protected count
//! (an atomic add into the zeroed `protect`).
template <kv_element T, int32_t Threads>
__global__ void __launch_bounds__(Threads) rank_keys_kernel(const __grid_constant__ plan_params<T> p) {
  constexpr int32_t items = rank_items_per_thread;
  const auto& a = p.args;
  const int64_t hi = blockIdx.y;
  int32_t layer = 0;
  const int64_t head = mirror_head(a, hi, layer);
  const int32_t n = a.pool.lengths[head];
  const int32_t next = p.next[hi];
  const int32_t first = static_cast<int32_t>(blockIdx.x) * Threads * items;
  // Every load first, so they are in flight together; then keys and stores.
  int32_t pos[items];
  float metric[items];    // accumulated: the slot's metric
  float observed[items];  // the window score (accumulated: added to the metric), if scored
#pragma unroll
  for (int32_t i = 0; i < items; ++i) {
    const int32_t j = first + i * Threads + static_cast<int32_t>(threadIdx.x);
    pos[i] = 0;
    metric[i] = observed[i] = 0.f;
    if (j < n) {
      const int64_t slot = a.pool.physical(head, j);
      pos[i] = a.pool.positions[slot];
      if (a.scores) observed[i] = a.scores[hi * a.stride + j];
      if (a.source == score_source::accumulated) metric[i] = a.pool.metrics[slot];
    }
  }
  int32_t protected_here = 0;
#pragma unroll
  for (int32_t i = 0; i < items; ++i) {
    const int32_t j = first + i * Threads + static_cast<int32_t>(threadIdx.x);
    if (j >= a.stride) break;
    const int64_t at = hi * a.stride + j;
    uint64_t key = ~uint64_t{0};  // padding: after every entry of the head
    if (j < n) {
      float score = observed[i];
      if (a.source == score_source::positional) {
        score = static_cast<float>(pos[i]);
      } else if (a.source == score_source::accumulated) {
        const float total = metric[i] + observed[i];
        a.new_metrics[at] = total;
        const int32_t queries = next - pos[i];
        score = (a.norm == accumulation_norm::sum || queries <= 0) ? total : total / static_cast<float>(queries);
      }
      if (a.protect.contains(pos[i], next)) {
        key = 0;
        ++protected_here;
      } else {
        if (isnan(score) || score == -INFINITY) report(a.error, status::non_finite_input);
        key = (static_cast<uint64_t>(~ordered_bits(score)) << 32) | static_cast<uint32_t>(pos[i]);
      }
    }
    p.keys_in[at] = key;
    if (p.layout.sorted) {  // padding keeps its score bits all ones: last in its head
      p.keys2[at] = head_score_key(hi, key);
      p.values2[at] = 0;
    }
  }
#pragma unroll
  for (int32_t offset = 16; offset > 0; offset /= 2) protected_here += __shfl_xor_sync(0xffffffffu, protected_here, offset);
  if (threadIdx.x % 32 == 0 && protected_here > 0) atomicAdd(&p.protect[hi], protected_here);
}

//! Candidates head (layer, n, P) would keep under a uniform / pyramid budget, before clipping:
//! the host allocators' own nominal_select, so both backends size heads by the same code.
__device__ __forceinline__ int32_t nominal_select(const device_budget& d, bool pyramid, int32_t layer, int32_t layers,
                                                  int32_t n, int32_t protect) {
  if (pyramid) return d.pyramid.nominal_select(layer, layers, n, protect);
  return uniform_budget{d.budget}.nominal_select(layer, layers, n, protect);
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

//! Ada-KV, one thread per (sequence, layer): bases, whether the layer compresses, its total,
//! and the start of its select: settled at once where it takes all of its candidates or none.
template <kv_element T>
__global__ void adaptive_prepare_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  const int32_t g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.layout.groups) return;
  const int32_t layer = a.first_layer + g % a.layer_count;
  bool compress = layer >= a.budget.skip_layers;
  int64_t total = 0, candidates = 0;
  for (int32_t h = 0; h < a.pool.heads; ++h) {
    const int64_t hi = static_cast<int64_t>(g) * a.pool.heads + h;
    int32_t ignored = 0;
    const int32_t n = a.pool.lengths[mirror_head(a, hi, ignored)], prot = p.protect[hi];
    const int32_t base = nominal_select(a.budget, a.budget.base_is_pyramid, layer, a.pool.layers, n, prot);
    p.select[hi] = base;  // the base, until the allocation below replaces it
    p.earned[hi] = 0;
    total += base;
    candidates += n - prot;
  }
  compress = compress && total <= candidates;  // adaptive_budget's rule
  p.group_flag[g] = compress ? 1 : 0;
  p.group_total[g] = compress ? static_cast<int32_t>(total) : 0;
  const adaptive_select_state& st = p.select_state;
  st.prefix[g] = 0;
  st.shift[g] = 64;
  const bool all = compress && total >= candidates, none = !compress || total == 0;
  st.settled[g] = all || none ? 1 : 0;
  st.remaining[g] = all ? 1 : (none ? 0 : static_cast<int32_t>(total));
}

//! Grid (chunks of the stride, heads): one digit pass of Ada-KV's select (the digit at bit
//! `shift`): per group, how many of its candidates whose group keys match the prefix above
//! `shift` have each value of the digit, added into the group's bins.
template <kv_element T, int32_t Threads>
__global__ void __launch_bounds__(Threads) adaptive_digits_kernel(const __grid_constant__ plan_params<T> p,
                                                                   int32_t shift) {
  constexpr int32_t items = rank_items_per_thread;
  __shared__ int32_t bins[256];
  const auto& a = p.args;
  const int64_t hi = blockIdx.y;
  const int64_t g = hi / a.pool.heads;
  const adaptive_select_state& st = p.select_state;
  if (st.settled[g]) return;  // the whole CTA: one group
  for (int32_t i = static_cast<int32_t>(threadIdx.x); i < 256; i += Threads) bins[i] = 0;
  __syncthreads();
  const auto h = static_cast<int32_t>(hi % a.pool.heads);
  const int32_t head_bits = bits_for(a.pool.heads);
  const uint64_t prefix = st.prefix[g];
  const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
  const int32_t first = static_cast<int32_t>(blockIdx.x) * Threads * items;
  const int32_t lane = static_cast<int32_t>(threadIdx.x % 32);
  uint64_t key[items];
#pragma unroll
  for (int32_t i = 0; i < items; ++i) {
    const int32_t j = first + i * Threads + static_cast<int32_t>(threadIdx.x);
    key[i] = j < n ? p.keys_in[hi * a.stride + j] : 0;
  }
#pragma unroll
  for (int32_t i = 0; i < items; ++i) {
    const uint64_t c = group_key(key[i], h, head_bits);
    // Protected slots (rank key 0) and slots past the length are not candidates.
    const bool match = key[i] != 0 && (shift == 56 || (c >> (shift + 8)) == (prefix >> (shift + 8)));
    const int32_t digit = match ? static_cast<int32_t>((c >> shift) & 0xffu) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, digit);  // lanes with one digit add once
    if (match && lane == __ffs(peers) - 1) atomicAdd(&bins[digit], __popc(peers));
  }
  __syncthreads();
  for (int32_t i = static_cast<int32_t>(threadIdx.x); i < 256; i += Threads)
    if (bins[i] != 0) atomicAdd(&st.bins[g * 256 + i], bins[i]);
}

//! One CTA of 256 threads per group, after adaptive_digits_kernel at `shift`: the digit whose
//! candidates hold the remaining-th taken one extends the prefix; the bins are zeroed.
template <kv_element T>
__global__ void __launch_bounds__(256) adaptive_choose_kernel(const __grid_constant__ plan_params<T> p, int32_t shift) {
  using scan = cub::BlockScan<int32_t, 256>;
  __shared__ typename scan::TempStorage temp;
  __shared__ int32_t s_digit, s_below, s_count;
  const int64_t g = blockIdx.x;
  const adaptive_select_state& st = p.select_state;
  if (st.settled[g]) return;  // the whole CTA
  const int32_t remaining = st.remaining[g];
  if (threadIdx.x == 0) s_digit = -1;
  int32_t* bins = st.bins + g * 256;
  const int32_t count = bins[threadIdx.x];
  int32_t below = 0;
  scan(temp).ExclusiveSum(count, below);
  bins[threadIdx.x] = 0;  // for the next pass; this thread alone read it
  __syncthreads();        // s_digit's reset is visible before a thread claims the digit
  if (below < remaining && remaining <= below + count) {
    s_digit = static_cast<int32_t>(threadIdx.x);
    s_below = below;
    s_count = count;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (s_digit < 0) {  // fewer candidates match than remain to take: the counts disagree
    report(p.args.error, status::invalid_plan);
    st.settled[g] = 1;
    st.remaining[g] = 0;
    return;
  }
  st.prefix[g] |= static_cast<uint64_t>(s_digit) << shift;
  st.remaining[g] = remaining - s_below;
  st.shift[g] = shift;
  st.settled[g] = s_count == remaining - s_below ? 1 : 0;
}

//! Grid (chunks of the stride, heads), after the last digit: each head's earned count, its
//! candidates taken by its group's select (adaptive_select_state), added into `earned`.
template <kv_element T, int32_t Threads>
__global__ void __launch_bounds__(Threads) adaptive_earned_kernel(const __grid_constant__ plan_params<T> p) {
  constexpr int32_t items = rank_items_per_thread;
  __shared__ int32_t warp_counts[Threads / 32];
  const auto& a = p.args;
  const int64_t hi = blockIdx.y;
  const int64_t g = hi / a.pool.heads;
  if (!p.group_flag[g]) return;  // the layer keeps its bases
  const adaptive_select_state& st = p.select_state;
  const auto h = static_cast<int32_t>(hi % a.pool.heads);
  const int32_t head_bits = bits_for(a.pool.heads);
  const uint64_t prefix = st.prefix[g];
  const int32_t shift = st.shift[g], remaining = st.remaining[g];
  const bool settled = st.settled[g] != 0;
  const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
  const int32_t first = static_cast<int32_t>(blockIdx.x) * Threads * items;
  int32_t taken = 0;
#pragma unroll
  for (int32_t i = 0; i < items; ++i) {
    const int32_t j = first + i * Threads + static_cast<int32_t>(threadIdx.x);
    const uint64_t key = j < n ? p.keys_in[hi * a.stride + j] : 0;
    if (key == 0) continue;  // protected, or past the length
    const uint64_t c = group_key(key, h, head_bits);
    if (shift == 64) {
      taken += remaining > 0 ? 1 : 0;
    } else if (settled) {
      taken += (c >> shift) <= (prefix >> shift) ? 1 : 0;
    } else {
      taken += c < prefix ? 1 : 0;  // the keys' bits below `shift` are zero
    }
  }
#pragma unroll
  for (int32_t offset = 16; offset > 0; offset /= 2) taken += __shfl_xor_sync(0xffffffffu, taken, offset);
  if (threadIdx.x % 32 == 0) warp_counts[threadIdx.x / 32] = taken;
  __syncthreads();
  if (threadIdx.x != 0) return;
  int32_t total = 0;
  for (int32_t w = 0; w < Threads / 32; ++w) total += warp_counts[w];
  // The threshold's ties are one head's: it takes `remaining` of them.
  const bool holds_ties = !settled && shift != 64 && blockIdx.x == 0 &&
                          (head_bits == 0 || static_cast<int32_t>((prefix >> (32 - head_bits)) & low_bits(head_bits)) == h);
  if (holds_ties) total += remaining;
  if (total != 0) atomicAdd(&p.earned[hi], total);
}

//! Counts, per head, the entries among the first group_total[g] of each sorted group.
template <kv_element T>
__global__ void count_top_kernel(const __grid_constant__ plan_params<T> p) {
  const plan_layout& l = p.layout;
  const int32_t g = blockIdx.y;
  const int64_t base = g * l.group_heads * l.span;  // groups are contiguous, group_heads * span entries each
  for (int32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < p.group_total[g]; t += gridDim.x * blockDim.x) {
    const uint32_t local = l.format.local_of(p.keys_out[base + t]);
    atomicAdd(&p.earned[g * l.group_heads + local / l.span], 1);
  }
}

//! Ada-KV safeguard per head: the host's adaptive_safeguard.
template <kv_element T>
__global__ void adaptive_finish_kernel(const __grid_constant__ plan_params<T> p) {
  const auto& a = p.args;
  for (int64_t hi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; hi < p.layout.heads;
       hi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
    const int32_t base = p.select[hi];
    int32_t b = base;
    if (p.group_flag[hi / a.pool.heads]) b = adaptive_safeguard(p.earned[hi], base, a.budget.alpha);
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
      const uint64_t sorted = p.keys_out[hi * a.stride + prot + (evictable - removed)];  // head_score_key
      const float score = from_ordered_bits(~static_cast<uint32_t>(sorted));
      const auto local = static_cast<uint32_t>((hi % heads) * max_blocks + k);
      key = p.layout.format.encode(b, ordered_bits(score), local);
    }
    // Entries are laid out [batch][heads * max_blocks]: the same flat index.
    p.keys2[i] = key;
    p.values2[i] = 0;
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

//! The evictor: slots head hi keeps, protected + (whole-block aligned) select; stored in
//! `keep`. A select outside [0, ranked] or an empty plan is reported.
template <kv_element T>
__device__ int32_t kept_count(const plan_params<T>& p, int64_t hi, int32_t n) {
  const auto& a = p.args;
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
  a.keep[hi] = prot + take;
  return prot + take;
}

//! Keys of a head each thread loads per round of select_kept_kernel (in flight together).
inline constexpr int32_t select_items_per_thread = 8;

//! Kept flags of a per-head budget without sorting, one CTA per head: a radix select, most
//! significant byte first, finds the keep-th smallest rank key (file comment, 1.); every key
//! below it is kept, and of keys equal to it (a position held twice) the lowest slots, which
//! is the order the stable sort gives. A pass counts, per value of the next byte, the keys
//! that match the bytes chosen so far; it stops early once every key matching them is kept.
template <kv_element T, int32_t Threads>
__global__ void __launch_bounds__(Threads) select_kept_kernel(const __grid_constant__ plan_params<T> p) {
  static_assert(Threads >= 256 && Threads % 32 == 0, "a thread per byte value, whole warps");
  constexpr int32_t items = select_items_per_thread;
  using scan = cub::BlockScan<int32_t, Threads>;
  __shared__ typename scan::TempStorage temp;
  __shared__ int32_t bins[256];
  __shared__ int32_t s_keep, s_digit, s_below, s_count;
  const auto& a = p.args;
  const int64_t hi = blockIdx.x;
  const int32_t n = static_cast<int32_t>(p.end[hi] - p.begin[hi]);
  const int32_t lane = static_cast<int32_t>(threadIdx.x % 32);
  if (threadIdx.x == 0) s_keep = kept_count(p, hi, n);
  __syncthreads();
  const int32_t keep = s_keep;
  const uint64_t* keys = p.keys_in + hi * a.stride;
  uint8_t* flags = a.kept + hi * a.stride;

  // Invariant: every key whose bits from `shift` up are below prefix's is kept, and `remaining`
  // of the keys equal to prefix in those bits are.
  uint64_t prefix = 0;
  int32_t remaining = keep;
  int32_t shift = 64;
  bool settled = keep == 0 || keep == n;  // nothing to choose
  while (!settled && shift > 0) {
    shift -= 8;
    for (int32_t i = static_cast<int32_t>(threadIdx.x); i < 256; i += Threads) bins[i] = 0;
    __syncthreads();
    for (int32_t base = 0; base < n; base += Threads * items) {  // warps run every round together
      uint64_t key[items];
#pragma unroll
      for (int32_t i = 0; i < items; ++i) {
        const int32_t j = base + i * Threads + static_cast<int32_t>(threadIdx.x);
        key[i] = j < n ? keys[j] : 0;
      }
#pragma unroll
      for (int32_t i = 0; i < items; ++i) {
        const int32_t j = base + i * Threads + static_cast<int32_t>(threadIdx.x);
        const bool match = j < n && (shift == 56 || (key[i] >> (shift + 8)) == (prefix >> (shift + 8)));
        const int32_t digit = match ? static_cast<int32_t>((key[i] >> shift) & 0xffu) : -1;
        // Lanes with the same byte add once (scores share their high bytes: few bins).
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (match && lane == __ffs(peers) - 1) atomicAdd(&bins[digit], __popc(peers));
      }
    }
    __syncthreads();
    // The byte value whose keys hold the remaining-th kept one: an exclusive scan of the bins.
    const int32_t count = threadIdx.x < 256 ? bins[threadIdx.x] : 0;
    int32_t below = 0;
    scan(temp).ExclusiveSum(count, below);
    if (threadIdx.x < 256 && below < remaining && remaining <= below + count) {
      s_digit = static_cast<int32_t>(threadIdx.x);
      s_below = below;
      s_count = count;
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(s_digit) << shift;
    remaining -= s_below;
    settled = s_count == remaining;
    __syncthreads();  // bins and s_* are rewritten by the next pass
  }

  if (settled) {  // kept: keys at or below prefix in the bits from `shift` up (all or none)
    for (int32_t j = static_cast<int32_t>(threadIdx.x); j < n; j += Threads) {
      const bool kept = keep == n || (keep > 0 && (keys[j] >> shift) <= (prefix >> shift));
      flags[j] = kept ? 1 : 0;
    }
    return;
  }
  // shift == 0: prefix is the threshold key; `remaining` of the keys equal to it are kept, the
  // lowest slots first (numbered by a block scan in slot order).
  int32_t taken = 0;
  for (int32_t base = 0; base < n; base += Threads) {
    const int32_t j = base + static_cast<int32_t>(threadIdx.x);
    const uint64_t key = j < n ? keys[j] : ~uint64_t{0};
    const int32_t tie = j < n && key == prefix ? 1 : 0;
    int32_t before = 0, ties = 0;
    scan(temp).ExclusiveSum(tie, before, ties);
    if (j < n) flags[j] = key < prefix || (tie && taken + before < remaining) ? 1 : 0;
    taken += ties;
    __syncthreads();  // temp is reused by the next round
  }
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

//! With an accumulated source, stores the new slot metrics (the plan's last step).
template <kv_element T>
[[nodiscard]] status commit_metrics(const plan_params<T>& p, cudaStream_t stream) {
  const auto& a = p.args;
  if (a.source != score_source::accumulated) return status::success;
  const int32_t et = default_tuning.elementwise.threads;
  const unsigned x = static_cast<unsigned>(ceil_div(a.stride, et) < 64 ? ceil_div(a.stride, et) : 64);
  commit_metrics_kernel<T><<<dim3(x, static_cast<unsigned>(p.layout.heads)), et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! keys2 -> keys_out (values alongside), each group ordered by its candidates' keys.
template <kv_element T>
[[nodiscard]] status second_sort(const plan_params<T>& p, void* temp, cudaStream_t stream) {
  const plan_layout& l = p.layout;
  return radix_sort({p.keys2, p.keys_out, p.values2, p.values_out, l.second_items, l.format.end_bit()}, temp, stream);
}

}  // namespace detail

//! Rank keys and values (KV-Compress: sort buffers and CUB's storage too), head bounds and
//! counters (Ada-KV: its select state too).
template <kv_element T>
[[nodiscard]] size_t workspace_size(const plan_arguments<T>& a) noexcept {
  detail::plan_params<T> p{a, detail::plan_layout_of(a)};
  return detail::carve_plan(p, nullptr);
}

//! Ranks, sizes and flags the kept slots of every head of the batch on `stream`; with an
//! accumulated source it also stores the new slot metrics. Compaction is compaction.cuh.
template <kv_element T>
[[nodiscard]] status plan(const plan_arguments<T>& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.batch == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  const detail::plan_layout l = detail::plan_layout_of(a);
  detail::plan_params<T> p{a, l};
  detail::carve_plan(p, workspace);
  KVTRIM_CUDA_TRY(cudaMemsetAsync(a.error, 0, sizeof(int32_t), stream));
  // The per-head counters start at zero: next and protect are atomic maxima and sums.
  KVTRIM_CUDA_TRY(cudaMemsetAsync(p.next, 0, static_cast<size_t>(l.heads) * 4 * sizeof(int32_t), stream));
  const auto heads = static_cast<unsigned>(l.heads);
  constexpr int32_t et = default_tuning.elementwise.threads;
  const dim3 per_slot(static_cast<unsigned>(detail::ceil_div(a.stride, et * detail::rank_items_per_thread)), heads);
  detail::head_next_kernel<T, et><<<per_slot, et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  detail::rank_keys_kernel<T, et><<<per_slot, et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  switch (a.budget.type) {
    case device_budget::kind::uniform:
    case device_budget::kind::pyramid:
      detail::per_head_budget_kernel<T><<<detail::grid_for(l.heads, et), et, 0, stream>>>(p);
      break;
    case device_budget::kind::adaptive: {
      // Each head's share of its layer's top total (file comment, 3.), then the safeguard.
      detail::adaptive_prepare_kernel<T><<<detail::grid_for(l.groups, 64), 64, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      const detail::adaptive_select_state& st = p.select_state;
      KVTRIM_CUDA_TRY(cudaMemsetAsync(st.bins, 0, static_cast<size_t>(l.groups) * 256 * sizeof(int32_t), stream));
      const int32_t digits = detail::group_key_digits(a.pool.heads);
      for (int32_t shift = 56; shift >= 64 - 8 * digits; shift -= 8) {
        detail::adaptive_digits_kernel<T, et><<<per_slot, et, 0, stream>>>(p, shift);
        KVTRIM_CUDA_TRY(cudaGetLastError());
        detail::adaptive_choose_kernel<T><<<static_cast<unsigned>(l.groups), 256, 0, stream>>>(p, shift);
        KVTRIM_CUDA_TRY(cudaGetLastError());
      }
      detail::adaptive_earned_kernel<T, et><<<per_slot, et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      detail::adaptive_finish_kernel<T><<<detail::grid_for(l.heads, et), et, 0, stream>>>(p);
      break;
    }
    case device_budget::kind::global_blocks: {
      // KV-Compress (file comment, 4.): every head's scores in order, then the blocks priced
      // from them, the cheapest evicted.
      if (const status s = radix_sort({p.keys2, p.keys_out, p.values2, p.values_out, l.items,
                                       detail::head_score_key_bits(l)},
                                      p.sort_temp, stream);
          s != status::success)
        return s;
      const auto max_blocks = static_cast<int32_t>(detail::ceil_div(a.stride, a.budget.block_size));
      detail::global_prepare_kernel<T><<<detail::grid_for(a.batch, 64), 64, 0, stream>>>(p, max_blocks);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      detail::global_keys_kernel<T><<<detail::grid_for(l.heads * max_blocks, et), et, 0, stream>>>(p, max_blocks);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      if (const status s = detail::second_sort(p, p.sort_temp, stream); s != status::success) return s;
      const int64_t most = static_cast<int64_t>(a.layer_count) * a.pool.heads * max_blocks;
      detail::count_top_kernel<T><<<dim3(detail::grid_for(most, et, 4096), a.batch), et, 0, stream>>>(p);
      KVTRIM_CUDA_TRY(cudaGetLastError());
      detail::global_finish_kernel<T><<<detail::grid_for(l.heads, et), et, 0, stream>>>(p);
      break;
    }
  }
  KVTRIM_CUDA_TRY(cudaGetLastError());
  // Every budget ends as a count per head; its kept set needs no order (file comment, 2.).
  constexpr int32_t st = default_tuning.planning.select_threads;
  detail::select_kept_kernel<T, st><<<heads, st, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return detail::commit_metrics(p, stream);
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
