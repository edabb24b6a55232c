#pragma once
//! \file compress.cuh
//! The CUDA backend's host entry points, `kvtrim::cuda::`:
//!
//! - `compress_on_device(args, workspace, stream)`: one compression step of a batch of
//!   sequences (scores -> ranking -> budgets -> plan -> compaction) on device buffers. No
//!   allocation, no host synchronisation: graph-capturable. Outputs each head's new length.
//!   The window scores and the compaction run in pieces of the batch (step_tuning), so the
//!   workspace does not hold their buffers for every layer of every sequence at once.
//! - `compress(policy, cache, seqs, obs, workspace, bytes, stream)`: the same on a
//!   `device_paged_cache`, then the commit: the host block tables are authoritative, so the
//!   new lengths come back with ONE device-to-host copy and one stream synchronisation per
//!   compression step (not per layer or head); the host then shortens every head, returns
//!   the emptied trailing blocks to the pool and replays the table changes onto the device
//!   mirror (`truncate`: one scatter for the batch).
//! - `decode_attention(cache, seqs, layer, q, out, ...)`: paged decode attention of a batch.
//! - `supports<T>(policy, model)`: whether the device runs a policy (host-only).
//!
//! Supported compositions: metrics window_attention, accumulated_attention, positional;
//! allocators uniform_budget, pyramid_budget, adaptive_budget (normalize off),
//! global_block_budget; evictors topk_evictor, block_evictor; positions keep_original.
//! Anything else: status::not_supported (use the CPU backend).

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/kernels/compaction.cuh"
#include "kvtrim/backend/cuda/kernels/paged_attention.cuh"
#include "kvtrim/backend/cuda/kernels/ranking.cuh"
#include "kvtrim/backend/cuda/kernels/window_scores.cuh"
#include "kvtrim/backend/cuda/mover.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/cache/device_paged_cache.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/budget/adaptive.hpp"
#include "kvtrim/policy/evict/topk_keep.hpp"
#include "kvtrim/policy/metric/positional.hpp"
#include "kvtrim/policy/policy.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

struct backend {
  using kvc_concept = backend_tag;
  static constexpr memory_space memory = memory_space::device;
};
static_assert(kvtrim::backend<backend>);

//! The window queries of a compression, in device memory.
struct device_observation {
  const float* queries = nullptr;      //!< [batch][layer_count][rows][Hq][d] post-RoPE
  const int32_t* positions = nullptr;  //!< [batch][rows]
  int32_t rows = 0;                    //!< 0: none (positional, or accumulated metrics ranking what decode accumulated)
};

namespace detail {

inline status device_budget_of(const uniform_budget& u, device_budget& d) {
  d.type = device_budget::kind::uniform;
  d.budget = u.budget;
  return status::success;
}
inline status device_budget_of(const pyramid_budget& p, device_budget& d) {
  d.type = device_budget::kind::pyramid;
  d.pyramid = p;
  return status::success;
}
template <base_budget Base>
status device_budget_of(const adaptive_budget<Base>& a, device_budget& d) {
  if (a.normalize) return status::not_supported;  // its float sums depend on summation order
  if (const status s = device_budget_of(a.base, d); s != status::success) return s;
  d.base_is_pyramid = d.type == device_budget::kind::pyramid;
  d.type = device_budget::kind::adaptive;
  d.alpha = a.alpha;
  d.skip_layers = a.skip_layers;
  return status::success;
}
inline status device_budget_of(const global_block_budget& g, device_budget& d) {
  d.type = device_budget::kind::global_blocks;
  d.budget = g.budget;
  d.block_size = g.block_size;
  d.pending_tokens = g.pending_tokens;
  return status::success;
}
template <class A>
status device_budget_of(const A&, device_budget&) {
  return status::not_supported;
}

inline status device_evictor_of(const topk_evictor&, device_evictor& e) {
  e = {false, 1};
  return status::success;
}
inline status device_evictor_of(const block_evictor& b, device_evictor& e) {
  e = {true, b.block_size};
  return status::success;
}
template <class E>
status device_evictor_of(const E&, device_evictor&) {
  return status::not_supported;
}

//! Which scores a metric ranks by, and the window metric that produces them (if any).
inline status device_metric_of(const window_attention& m, int32_t rows, score_source& src, window_attention& window,
                               accumulation_norm&, bool& scored) {
  src = score_source::scores;
  window = m;
  scored = true;
  return rows > 0 ? status::success : status::window_too_large;
}
inline status device_metric_of(const accumulated_attention& m, int32_t rows, score_source& src, window_attention& window,
                               accumulation_norm& norm, bool& scored) {
  src = score_source::accumulated;
  window = m.observation;
  norm = m.norm;
  scored = rows > 0;
  return status::success;
}
inline status device_metric_of(const positional&, int32_t, score_source& src, window_attention&, accumulation_norm&,
                               bool& scored) {
  src = score_source::positional;
  scored = false;
  return status::success;
}
template <class M>
status device_metric_of(const M&, int32_t, score_source&, window_attention&, accumulation_norm&, bool&) {
  return status::not_supported;
}

}  // namespace detail

template <compression_policy P, kv_element T>
struct compress_arguments {
  P policy{};
  attention_shape model{};         //!< the model's Hq, Hkv, d (the store holds policy.metric.stored_heads(model))
  paged_view<T> pool{};
  const int32_t* rows = nullptr;   //!< [batch] device mirror rows
  int32_t batch = 0;
  int32_t first_layer = 0;
  int32_t layer_count = 0;         //!< 0: every layer
  device_observation obs{};
  int32_t stride = 0;              //!< >= every head length (the cache's max_tokens_per_head)
  int32_t* keep = nullptr;         //!< [batch][layer_count][H] device out: each head's new length
  int32_t* error = nullptr;        //!< device out: 0 or the status of a failure found on the device
  window_math math = window_math::automatic;  //!< how window scores compute q . k (window_scores.cuh)
  //! Slots (heads x stride) of a piece of the window scores and of the compaction, which run
  //! piece by piece: less workspace, one more launch a piece. 0: step_tuning::piece_slots.
  int64_t piece_slots = 0;
};

namespace detail {

//! Everything one step needs, derived from the arguments.
template <compression_policy P, kv_element T>
struct compress_parts {
  window_score_arguments<T> window{};
  plan_arguments<T> plan{};
  compaction_arguments<T> compaction{};
  bool scored = false;
  int64_t piece_slots = 0;  //!< of the window scores and the compaction, > 0
};

//! A piece of a step's window scores: sequences [first_sequence, + sequences) x layers
//! [first_layer, + layers), layers counted from the step's first. Either whole sequences or
//! one sequence's layers, so each piece is one contiguous run of the step's [batch][layers]
//! queries and scores.
struct step_piece {
  int32_t first_sequence = 0;
  int32_t sequences = 0;
  int32_t first_layer = 0;
  int32_t layers = 0;
};

//! (sequence, layer) pairs of `heads` heads of `stride` slots that a piece of `piece_slots`
//! slots holds, at least one.
[[nodiscard]] constexpr int64_t piece_pairs(int32_t heads, int32_t stride, int64_t piece_slots) noexcept {
  const int64_t slots = static_cast<int64_t>(heads > 1 ? heads : 1) * (stride > 1 ? stride : 1);
  const int64_t pairs = piece_slots / slots;
  return pairs > 1 ? pairs : 1;
}

//! `total` items in the fewest pieces of at most `most`, as even as can be: the first `extra`
//! pieces hold one item more than the rest. Even pieces keep the last one from being a sliver
//! that pays a whole launch's latency for little work (8 sequences at 7 a piece run as 4 + 4,
//! not 7 + 1).
struct even_split {
  int64_t count = 0, base = 0, extra = 0;
  constexpr even_split(int64_t total, int64_t most) noexcept {
    if (total < 1) return;
    count = (total + most - 1) / most;
    base = total / count;
    extra = total % count;
  }
  [[nodiscard]] constexpr int64_t size(int64_t i) const noexcept { return base + (i < extra ? 1 : 0); }
  [[nodiscard]] constexpr int64_t begin(int64_t i) const noexcept { return i * base + (i < extra ? i : extra); }
  [[nodiscard]] constexpr int64_t largest() const noexcept { return base + (extra > 0 ? 1 : 0); }
};

//! Calls f(piece) for the pieces of at most `pairs` (sequence, layer) pairs that cover
//! `batch` sequences x `layers` layers once, in the step's order: whole sequences where a piece
//! holds every layer of one, else runs of one sequence's layers; the fewest pieces, evenly sized.
template <class F>
void for_each_step_piece(int32_t batch, int32_t layers, int64_t pairs, F&& f) {
  if (batch < 1 || layers < 1) return;
  if (pairs >= layers) {
    const even_split split(batch, std::min<int64_t>(batch, pairs / layers));
    for (int64_t i = 0; i < split.count; ++i)
      f(step_piece{static_cast<int32_t>(split.begin(i)), static_cast<int32_t>(split.size(i)), 0, layers});
  } else {
    const even_split split(layers, pairs);
    for (int32_t s = 0; s < batch; ++s)
      for (int64_t i = 0; i < split.count; ++i)
        f(step_piece{s, 1, static_cast<int32_t>(split.begin(i)), static_cast<int32_t>(split.size(i))});
  }
}

//! The shapes of for_each_step_piece's pieces (workspace sizes depend on nothing else): the
//! first piece's, the largest, then the smaller one where the sizes differ, else a piece of no
//! sequences.
[[nodiscard]] inline std::array<step_piece, 2> step_piece_shapes(int32_t batch, int32_t layers, int64_t pairs) {
  std::array<step_piece, 2> shapes{};
  if (batch < 1 || layers < 1) return shapes;
  if (pairs >= layers) {
    const even_split split(batch, std::min<int64_t>(batch, pairs / layers));
    shapes[0] = {0, static_cast<int32_t>(split.largest()), 0, layers};
    if (split.extra > 0) shapes[1] = {0, static_cast<int32_t>(split.base), 0, layers};
  } else {
    const even_split split(layers, pairs);
    shapes[0] = {0, 1, 0, static_cast<int32_t>(split.largest())};
    if (split.extra > 0) shapes[1] = {0, 1, 0, static_cast<int32_t>(split.base)};
  }
  return shapes;
}

//! The pieces of the window scores `w` of a step of `piece_slots` a piece: their shapes, and
//! each in turn.
template <kv_element T>
[[nodiscard]] std::array<step_piece, 2> window_piece_shapes(const window_score_arguments<T>& w, int64_t piece_slots) {
  return step_piece_shapes(w.batch, w.layer_count, piece_pairs(w.pool.heads, w.stride, piece_slots));
}
template <kv_element T, class F>
void for_each_window_piece(const window_score_arguments<T>& w, int64_t piece_slots, F&& f) {
  for_each_step_piece(w.batch, w.layer_count, piece_pairs(w.pool.heads, w.stride, piece_slots), std::forward<F>(f));
}

//! `p + n`, or null for a null `p` (arguments built for sizes and checks carry no buffers).
template <class U>
[[nodiscard]] constexpr U* advanced(U* p, int64_t n) noexcept {
  return p ? p + n : p;
}

//! The window-score arguments of piece `c` of the step's `a`: its sequences' mirror rows,
//! query rows, query positions and scores.
template <kv_element T>
[[nodiscard]] window_score_arguments<T> window_piece(const window_score_arguments<T>& a, const step_piece& c) {
  const int64_t lb = batch_layer(a, c.first_sequence, a.first_layer + c.first_layer);
  window_score_arguments<T> w = a;
  w.batch = c.sequences;
  w.first_layer = a.first_layer + c.first_layer;
  w.layer_count = c.layers;
  w.rows = advanced(a.rows, c.first_sequence);
  w.queries = advanced(a.queries, lb * a.window * a.q_heads * a.pool.head_dim);
  w.query_positions = advanced(a.query_positions, static_cast<int64_t>(c.first_sequence) * a.window);
  w.scores = advanced(a.scores, lb * a.pool.heads * a.stride);
  return w;
}

//! The compaction pieces of a step of `heads` heads: at most `piece_slots` / stride heads a
//! piece, but at least min_compaction_heads, and within the grid's 65,535; evenly sized.
[[nodiscard]] constexpr even_split compaction_pieces(int32_t heads, int32_t stride, int64_t piece_slots) noexcept {
  const int64_t per =
      std::max<int64_t>(piece_slots / (stride > 1 ? stride : 1), default_tuning.step.min_compaction_heads);
  return even_split(heads, std::min<int64_t>(per, 65535));
}

//! The compaction arguments of heads [first, first + heads) of the step's `a`.
template <kv_element T>
[[nodiscard]] compaction_arguments<T> compaction_piece(const compaction_arguments<T>& a, int32_t first,
                                                       int32_t heads) {
  compaction_arguments<T> c = a;
  c.heads = heads;
  c.head_index = advanced(a.head_index, first);
  c.kept = advanced(a.kept, static_cast<int64_t>(first) * a.stride);
  c.keep = advanced(a.keep, first);
  return c;
}

template <compression_policy P, kv_element T>
[[nodiscard]] status parts_of(const compress_arguments<P, T>& a, compress_parts<P, T>& out) {
  if (const status s = a.policy.validate(a.model); s != status::success) return s;
  if (a.policy.positions != position_mode::keep_original) return status::not_supported;
  if (a.piece_slots < 0) return status::invalid_argument;
  if (a.pool.heads != a.policy.metric.stored_heads(a.model) || a.pool.head_dim != a.model.head_dim ||
      a.pool.layers != a.model.layers)
    return status::shape_mismatch;
  compress_parts<P, T> p;
  const int32_t layers = a.layer_count == 0 ? a.model.layers : a.layer_count;
  score_source src{};
  accumulation_norm norm = accumulation_norm::sum;
  if (const status s = device_metric_of(a.policy.metric, a.obs.rows, src, p.window.metric, norm, p.scored);
      s != status::success)
    return s;
  if (p.scored)
    if (const status s = check_math<T>(a.math, a.model.head_dim); s != status::success) return s;
  if (const status s = device_budget_of(a.policy.allocator, p.plan.budget); s != status::success) return s;
  if (const status s = device_evictor_of(a.policy.evictor, p.plan.evictor); s != status::success) return s;
  p.window.pool = a.pool;
  p.window.rows = a.rows;
  p.window.batch = a.batch;
  p.window.first_layer = a.first_layer;
  p.window.layer_count = layers;
  p.window.q_heads = a.model.q_heads;
  p.window.window = a.obs.rows;
  p.window.queries = a.obs.queries;
  p.window.query_positions = a.obs.positions;
  p.window.protect = a.policy.protect;
  p.window.stride = a.stride;
  p.window.math = a.math;
  p.plan.pool = a.pool;
  p.plan.rows = a.rows;
  p.plan.batch = a.batch;
  p.plan.first_layer = a.first_layer;
  p.plan.layer_count = layers;
  p.plan.protect = a.policy.protect;
  p.plan.source = src;
  p.plan.norm = norm;
  p.plan.stride = a.stride;
  p.plan.keep = a.keep;
  p.plan.error = a.error;
  p.compaction.pool = a.pool;
  p.compaction.heads = a.batch * layers * a.pool.heads;
  p.compaction.stride = a.stride;
  p.compaction.keep = a.keep;
  p.compaction.error = a.error;
  p.piece_slots = a.piece_slots > 0 ? a.piece_slots : default_tuning.step.piece_slots;
  out = p;
  return status::success;
}

//! Where the stage region starts in a step's workspace, and the bytes of the whole.
struct compress_layout {
  size_t stage_offset = 0;
  size_t bytes = 0;
};

//! Workspace layout: scores, kept flags, head indices, new metrics, then the stage region, the
//! largest of the three stages' own workspaces (they run one after another).
template <compression_policy P, kv_element T>
compress_layout carve(compress_parts<P, T>& p, void* base) {
  workspace_carver w(base);
  const int64_t heads = static_cast<int64_t>(p.plan.batch) * p.plan.layer_count * p.plan.pool.heads;
  const int64_t items = heads * p.plan.stride;
  float* scores = w.take<float>(p.scored ? items : 0);
  p.window.scores = scores;
  p.plan.scores = p.scored ? scores : nullptr;
  p.plan.kept = w.take<uint8_t>(items);
  p.plan.head_index = w.take<int64_t>(heads);
  p.plan.new_metrics = w.take<float>(p.plan.source == score_source::accumulated ? items : 0);
  p.compaction.kept = p.plan.kept;
  p.compaction.head_index = p.plan.head_index;
  // The window scores and the compaction run piece by piece (compress_on_device): the stage
  // holds the largest piece of each, and the ranking of the whole batch.
  size_t stage = workspace_size(p.plan);
  if (p.scored)
    for (const step_piece& shape : window_piece_shapes(p.window, p.piece_slots))
      if (shape.sequences > 0) stage = std::max(stage, workspace_size(window_piece(p.window, shape)));
  const even_split compacted = compaction_pieces(p.compaction.heads, p.compaction.stride, p.piece_slots);
  stage = std::max(stage, workspace_size(compaction_piece(p.compaction, 0, static_cast<int32_t>(compacted.largest()))));
  const size_t stage_offset = w.used();
  w.take<char>(static_cast<int64_t>(stage));
  return {stage_offset, w.used()};
}

//! The cache-level workspace: mirror rows, new lengths and the error word ahead of
//! compress_on_device's `step_bytes`.
struct cache_step_buffers {
  int32_t* rows = nullptr;
  int32_t* keep = nullptr;
  int32_t* error = nullptr;
  void* step = nullptr;
  size_t bytes = 0;
};
[[nodiscard]] inline cache_step_buffers carve_cache_step(void* base, int32_t batch, int64_t heads, size_t step_bytes) {
  workspace_carver w(base);
  cache_step_buffers b;
  b.rows = w.take<int32_t>(batch);
  b.keep = w.take<int32_t>(heads);
  b.error = w.take<int32_t>(1);
  b.step = w.take<char>(static_cast<int64_t>(step_bytes));
  b.bytes = w.used();
  return b;
}

//! The mirror row of each of `seqs`: unknown_sequence for one the cache does not hold,
//! invalid_argument for one named twice (two CTAs would compact, or accumulate into, the
//! same head at once).
template <class Cache>
[[nodiscard]] status mirror_rows(const Cache& cache, std::span<const int64_t> seqs, std::vector<int32_t>& rows) {
  const size_t batch = seqs.size();
  rows.resize(2 * batch);  // the rows, then a sorted copy to find a repeat in O(B log B)
  for (size_t i = 0; i < batch; ++i) {
    rows[i] = cache.tables().sequence_slot(seqs[i]);
    if (rows[i] < 0) return status::unknown_sequence;
  }
  const auto copy = rows.begin() + static_cast<ptrdiff_t>(batch);
  std::copy(rows.begin(), copy, copy);
  std::sort(copy, rows.end());
  const bool repeated = std::adjacent_find(copy, rows.end()) != rows.end();
  rows.resize(batch);
  return repeated ? status::invalid_argument : status::success;
}

}  // namespace detail

template <compression_policy P, kv_element T>
[[nodiscard]] status can_implement(const compress_arguments<P, T>& a) {
  detail::compress_parts<P, T> p;
  if (const status s = detail::parts_of(a, p); s != status::success) return s;
  if (a.batch > 0 && (!a.keep || !a.error)) return status::invalid_argument;
  if (p.scored) {
    // Pointers are checked at launch; sizes here, for each shape of piece the step runs.
    for (const detail::step_piece& shape : detail::window_piece_shapes(p.window, p.piece_slots)) {
      if (shape.sequences == 0) continue;
      window_score_arguments<T> w = detail::window_piece(p.window, shape);
      w.scores = reinterpret_cast<float*>(1);
      if (const status s = can_implement(w); s != status::success) return s;
    }
  }
  plan_arguments<T> pa = p.plan;
  pa.kept = reinterpret_cast<uint8_t*>(1);
  pa.head_index = reinterpret_cast<int64_t*>(1);
  pa.new_metrics = reinterpret_cast<float*>(1);
  pa.scores = reinterpret_cast<const float*>(1);
  return can_implement(pa);
}

template <compression_policy P, kv_element T>
[[nodiscard]] size_t workspace_size(const compress_arguments<P, T>& a) {
  detail::compress_parts<P, T> p;
  if (detail::parts_of(a, p) != status::success) return 0;
  return detail::carve(p, nullptr).bytes;
}

//! Whether the CUDA backend runs `policy` on keys of type T of a model of this shape: success,
//! or why not (`not_supported` for a composition or setting the device does not implement, the
//! policy's own validation status otherwise). Host-only: an engine picks `compress` or the CPU
//! planner with it, before allocating anything.
template <kv_element T, compression_policy P>
[[nodiscard]] status supports(const P& policy, const attention_shape& model, window_math math = window_math::automatic) {
  compress_arguments<P, T> a;
  a.policy = policy;
  a.model = model;
  a.pool.layers = model.layers;
  a.pool.heads = policy.metric.stored_heads(model);
  a.pool.head_dim = model.head_dim;
  a.obs.rows = 1;  // a window is given, if the metric wants one
  a.math = math;
  detail::compress_parts<P, T> parts;
  if (const status s = detail::parts_of(a, parts); s != status::success) return s;
  return parts.scored && model.head_dim > max_window_head_dim ? status::not_supported : status::success;
}

//! One compression step on device buffers, on `stream`; `workspace` holds workspace_size(a)
//! bytes. The new lengths land in `a.keep`; the caller commits them to its block tables.
//! A failure found on the device (NaN scores, an empty head) lands in `a.error` and leaves
//! the pool untouched.
template <compression_policy P, kv_element T>
[[nodiscard]] status compress_on_device(const compress_arguments<P, T>& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.batch == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  detail::compress_parts<P, T> p;
  if (const status s = detail::parts_of(a, p); s != status::success) return s;
  void* stage = static_cast<char*>(workspace) + detail::carve(p, workspace).stage_offset;
  // Pieces one after another on the stream, each reusing the stage (detail::carve).
  if (p.scored) {
    status s = status::success;
    const auto score = [&](const detail::step_piece& c) {
      if (s == status::success) s = window_scores(detail::window_piece(p.window, c), stage, stream);
    };
    detail::for_each_window_piece(p.window, p.piece_slots, score);
    if (s != status::success) return s;
  }
  if (const status s = plan(p.plan, stage, stream); s != status::success) return s;
  const detail::even_split pieces = detail::compaction_pieces(p.compaction.heads, p.compaction.stride, p.piece_slots);
  for (int64_t i = 0; i < pieces.count; ++i) {
    const auto first = static_cast<int32_t>(pieces.begin(i)), heads = static_cast<int32_t>(pieces.size(i));
    if (const status s = compact(detail::compaction_piece(p.compaction, first, heads), stage, stream);
        s != status::success)
      return s;
  }
  return status::success;
}

// ---- on a device_paged_cache

namespace detail {

//! The arguments `compress` derives from a cache, without device pointers (for sizes and checks).
template <compression_policy P, kv_element T, int32_t HeadDim, slot_mover<T> M>
[[nodiscard]] compress_arguments<P, T> probe_arguments(const P& policy, const device_paged_cache<T, HeadDim, M>& cache,
                                                      const attention_shape& model, int32_t batch, int32_t obs_rows,
                                                      window_math math = window_math::automatic,
                                                      int64_t piece_slots = 0) {
  compress_arguments<P, T> a;
  a.policy = policy;
  a.model = model;
  a.pool = make_view(paged_buffers<T>{}, cache.config());
  a.batch = batch;
  a.obs.rows = obs_rows;
  a.stride = cache.config().max_tokens_per_head;
  a.math = math;
  a.piece_slots = piece_slots;
  return a;
}

}  // namespace detail

//! Workspace of `compress` for `batch` sequences of `cache` and `obs_rows` window queries in
//! pieces of `piece_slots` (compress_arguments::piece_slots; 0: the library's); 0 for a policy
//! the device does not implement or a negative piece size.
template <compression_policy P, kv_element T, int32_t HeadDim, slot_mover<T> M>
[[nodiscard]] size_t compress_workspace_size(const P& policy, const device_paged_cache<T, HeadDim, M>& cache,
                                             const attention_shape& model, int32_t batch, int32_t obs_rows,
                                             int64_t piece_slots = 0) {
  const size_t steps = workspace_size(
      detail::probe_arguments(policy, cache, model, batch, obs_rows, window_math::automatic, piece_slots));
  if (steps == 0) return 0;
  const int64_t heads = static_cast<int64_t>(batch) * cache.shape().layers * cache.shape().kv_heads;
  return detail::carve_cache_step(nullptr, batch, heads, steps).bytes;
}

//! Compresses every layer of the sequences `seqs` of a device cache with `policy`, then
//! commits: one device-to-host copy of the new lengths and one synchronisation of `stream`
//! per call. `obs` holds the window queries of every sequence and layer (rows 0 for none).
//! `math` chooses how window scores compute q . k, `piece_slots` the size of the step's pieces
//! (compress_arguments::piece_slots; the workspace must be sized with the same). On error
//! nothing changed.
template <compression_policy P, kv_element T, int32_t HeadDim, slot_mover<T> M>
[[nodiscard]] status compress(const P& policy, device_paged_cache<T, HeadDim, M>& cache, std::span<const int64_t> seqs,
                              const attention_shape& model, const device_observation& obs, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream, window_math math = window_math::automatic,
                              int64_t piece_slots = 0) {
  const auto batch = static_cast<int32_t>(seqs.size());
  if (batch == 0) return status::success;
  // Host checks first: the policy, every head, then the workspace.
  {
    detail::compress_parts<P, T> parts;
    if (const status s =
            detail::parts_of(detail::probe_arguments(policy, cache, model, batch, obs.rows, math, piece_slots), parts);
        s != status::success)
      return s;
  }
  const attention_shape stored = cache.shape();
  std::vector<int32_t> rows;
  if (const status s = detail::mirror_rows(cache, seqs, rows); s != status::success) return s;
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (int32_t l = 0; l < stored.layers; ++l)
      for (int32_t h = 0; h < stored.kv_heads; ++h) {
        const int32_t n = cache.head_length(seqs[i], l, h);
        if (n == 0) return status::empty_sequence;
        if (obs.rows > n && std::same_as<typename P::metric_type, window_attention>) return status::window_too_large;
      }
  }
  if (!workspace || workspace_bytes < compress_workspace_size(policy, cache, model, batch, obs.rows, piece_slots))
    return status::invalid_argument;
  const int64_t heads = static_cast<int64_t>(batch) * stored.layers * stored.kv_heads;
  const detail::cache_step_buffers buffers = detail::carve_cache_step(workspace, batch, heads, 0);
  compress_arguments<P, T> a;
  a.policy = policy;
  a.model = model;
  a.pool = make_view(cache.buffers(), cache.config());
  a.rows = buffers.rows;
  a.batch = batch;
  a.obs = obs;
  a.stride = cache.config().max_tokens_per_head;
  a.keep = buffers.keep;
  a.error = buffers.error;
  a.math = math;
  a.piece_slots = piece_slots;
  // The commit's host memory is allocated before the device changes anything (truncate
  // allocates nothing), so a failed allocation (std::bad_alloc) leaves the cache as it was.
  std::vector<int32_t> keep(static_cast<size_t>(heads) + 1);
  KVTRIM_CUDA_TRY(cudaMemcpyAsync(const_cast<int32_t*>(a.rows), rows.data(), rows.size() * sizeof(int32_t),
                                  cudaMemcpyHostToDevice, stream));
  if (const status s = compress_on_device(a, buffers.step, stream); s != status::success) return s;

  // The commit: one copy back, one synchronisation.
  KVTRIM_CUDA_TRY(cudaMemcpyAsync(keep.data(), a.keep, static_cast<size_t>(heads) * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, stream));
  KVTRIM_CUDA_TRY(cudaMemcpyAsync(keep.data() + heads, a.error, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  KVTRIM_CUDA_TRY(cudaStreamSynchronize(stream));
  if (keep[static_cast<size_t>(heads)] != 0) return static_cast<status>(keep[static_cast<size_t>(heads)]);
  // The device already compacted: each head's survivors are its first `keep` slots.
  return cache.truncate(seqs, std::span<const int32_t>(keep.data(), static_cast<size_t>(heads)));
}

//! Workspace of `decode_attention` on a device cache.
template <kv_element T, int32_t HeadDim, slot_mover<T> M>
[[nodiscard]] size_t decode_workspace_size(const device_paged_cache<T, HeadDim, M>& cache, int32_t batch,
                                           int32_t q_heads, decode_accumulation acc) {
  decode_arguments<T> a;
  a.pool = make_view(paged_buffers<T>{}, cache.config());
  a.batch = batch;
  a.q_heads = q_heads;
  a.max_length = cache.config().max_tokens_per_head;
  a.accumulate = acc;
  detail::workspace_carver w(nullptr);
  w.take<int32_t>(batch);
  w.take<char>(static_cast<int64_t>(workspace_size(a)));
  return w.used();
}

//! Decode attention of `layer` for the sequences `seqs`: q, out [batch][Hq][d] fp32 device.
//! With `acc` != none, slot metrics accumulate p or p^2 reduced over the group by `reduce`.
template <kv_element T, int32_t HeadDim, slot_mover<T> M>
[[nodiscard]] status decode_attention(device_paged_cache<T, HeadDim, M>& cache, std::span<const int64_t> seqs,
                                      int32_t layer, int32_t q_heads, const float* q, float* out,
                                      decode_accumulation acc, gqa_reduce reduce, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream) {
  const auto batch = static_cast<int32_t>(seqs.size());
  if (batch == 0) return status::success;
  if (layer < 0 || layer >= cache.shape().layers) return status::invalid_argument;
  if (!workspace || workspace_bytes < decode_workspace_size(cache, batch, q_heads, acc)) return status::invalid_argument;
  std::vector<int32_t> rows;
  if (const status s = detail::mirror_rows(cache, seqs, rows); s != status::success) return s;
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (int32_t h = 0; h < cache.shape().kv_heads; ++h)
      if (cache.head_length(seqs[i], layer, h) == 0) return status::empty_sequence;
  }
  detail::workspace_carver w(workspace);
  decode_arguments<T> a;
  a.pool = make_view(cache.buffers(), cache.config());
  a.rows = w.take<int32_t>(batch);
  a.batch = batch;
  a.layer = layer;
  a.q_heads = q_heads;
  a.max_length = cache.config().max_tokens_per_head;
  a.q = q;
  a.out = out;
  a.accumulate = acc;
  a.reduce = reduce;
  KVTRIM_CUDA_TRY(cudaMemcpyAsync(const_cast<int32_t*>(a.rows), rows.data(), rows.size() * sizeof(int32_t),
                                  cudaMemcpyHostToDevice, stream));
  return decode_attention(a, w.take<char>(0), stream);
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
