#pragma once
//! \file session.cuh
//! design.md's engine loop on a device cache, a batch at a time: the CUDA backend's
//! counterpart of engine/session.hpp. One policy for every sequence (a batch compresses in one
//! launch sequence), the schedule counted per sequence:
//!   add_sequence -> append (prefill chunks) -> finish_prefill (compress with the window
//!   queries) -> per decode step: for each layer, append (the batch's tokens in one call) and
//!   attend (accumulating slot metrics if the policy's metric does); then end_decode_step
//!   (compresses the sequences whose schedule fires) -> free_sequence.
//! The library allocates nothing on the device: the caller gives one workspace, sized by
//! `workspace_size`, that every step of the session reuses on its stream.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvtrim/backend/cuda/compress.cuh"
#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/cache/device_paged_cache.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/engine/session.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

template <compression_policy P, kv_element T, int32_t HeadDim = dynamic_head_dim, slot_mover<T> M = cuda_mover>
class compression_session {
 public:
  using cache_type = device_paged_cache<T, HeadDim, M>;

  //! Workspace of a session that compresses or attends at most `max_batch` sequences a call
  //! with at most `max_rows` window rows, its compression steps in pieces of `piece_slots`
  //! (compress_arguments::piece_slots; 0: the library's); 0 where the device does not run
  //! `policy`, where no row count up to `max_rows` lets it compress (window scores need rows),
  //! or for a negative piece size.
  [[nodiscard]] static size_t workspace_size(const P& policy, const cache_type& cache, const attention_shape& model,
                                             int32_t max_batch, int32_t max_rows, int64_t piece_slots = 0) {
    if (max_batch < 1 || max_rows < 0 || supports<T>(policy, model) != status::success) return 0;
    const size_t step = step_bytes(policy, cache, model, max_batch, max_rows, piece_slots);
    return step == 0 ? 0 : gather_bytes(model, max_batch, max_rows) + step;
  }

  compression_session() = default;

  //! Validates the policy against the model and the device (cuda::supports: its status), the
  //! limits (invalid_argument below one sequence, below zero rows or for a negative piece
  //! size) and the workspace (invalid_argument if null or smaller than workspace_size with the
  //! same limits); then `out` drives `cache`. Its compression steps run in pieces of
  //! `piece_slots` slots (0: the library's): a smaller piece, a smaller workspace.
  [[nodiscard]] static status create(cache_type& cache, const attention_shape& model, P policy, int32_t max_batch,
                                     int32_t max_rows, void* workspace, size_t workspace_bytes, cudaStream_t stream,
                                     compression_session& out, int64_t piece_slots = 0) {
    if (const status s = supports<T>(policy, model); s != status::success) return s;
    if (max_batch < 1 || max_rows < 0 || piece_slots < 0) return status::invalid_argument;
    const size_t gather = gather_bytes(model, max_batch, max_rows);
    const size_t step = step_bytes(policy, cache, model, max_batch, max_rows, piece_slots);  // workspace_size's parts
    if (!workspace || step == 0 || workspace_bytes < gather + step) return status::invalid_argument;
    compression_session s;
    s.cache_ = &cache;
    s.model_ = model;
    s.policy_ = std::move(policy);
    s.max_batch_ = max_batch;
    s.max_rows_ = max_rows;
    s.gather_ = workspace;
    s.step_ = static_cast<char*>(workspace) + gather;
    s.step_bytes_ = workspace_bytes - gather;
    s.stream_ = stream;
    s.piece_slots_ = piece_slots;
    out = std::move(s);
    return status::success;
  }

  [[nodiscard]] const P& policy() const noexcept { return policy_; }
  [[nodiscard]] bool contains(int64_t seq) const noexcept { return find(seq) != nullptr; }
  //! Decode steps since the sequence's prefill was compressed; -1 for an unknown sequence.
  [[nodiscard]] int64_t decode_steps(int64_t seq) const noexcept {
    const sequence_state* s = find(seq);
    return s ? s->steps : -1;
  }

  //! Adds `seq` to the cache (its status: invalid_argument for a present or negative id,
  //! pool_exhausted when every row is taken) and to the session.
  [[nodiscard]] status add_sequence(int64_t seq) {
    if (!cache_) return status::invalid_argument;
    // Room for one more before the cache changes (push_back below then cannot throw).
    if (sequences_.size() == sequences_.capacity()) sequences_.reserve(2 * sequences_.size() + 1);
    if (const status s = cache_->add_sequence(seq); s != status::success) return s;
    sequences_.push_back({seq, 0});
    return status::success;
  }

  //! 1. Appends K/V (device memory, T) of one layer: positions [t]; k, v [t][Hkv][d].
  [[nodiscard]] status append(int64_t seq, int32_t layer, std::span<const int32_t> positions, std::span<const T> k,
                              std::span<const T> v) {
    if (!contains(seq)) return status::unknown_sequence;
    return cache_->append_layer(seq, layer, positions, k, v);
  }
  //! 1./3. Appends K/V (device memory, T) of one layer to each sequence of `seqs` in one
  //! launch and one mirror update: a decode step's token of a batch. positions [B][t]; k, v
  //! [B][t][Hkv][d]. All or nothing (basic_paged_cache::append_layer); a batch within
  //! max_batch, as every batch call of the session.
  [[nodiscard]] status append(std::span<const int64_t> seqs, int32_t layer, std::span<const int32_t> positions,
                              std::span<const T> k, std::span<const T> v) {
    if (const status s = check_batch(seqs, 0); s != status::success) return s;
    return cache_->append_layer(seqs, layer, positions, k, v);
  }
  //! 1. Appends K/V of every layer: positions [t]; k, v [L][t][Hkv][d].
  [[nodiscard]] status append(int64_t seq, std::span<const int32_t> positions, std::span<const T> k,
                              std::span<const T> v) {
    if (!contains(seq)) return status::unknown_sequence;
    return cache_->append(seq, positions, k, v);
  }

  //! 2. After prefill: compresses `seqs` with their window queries (obs: [batch][L][rows][Hq][d]
  //! and [batch][rows] on the device) and restarts their decode step counts.
  [[nodiscard]] status finish_prefill(std::span<const int64_t> seqs, const device_observation& obs) {
    if (const status s = compress(seqs, obs); s != status::success) return s;
    for (const int64_t seq : seqs) find(seq)->steps = 0;
    return status::success;
  }

  //! Compresses `seqs` now, whatever their schedules say (memory pressure, or a streaming loop
  //! that bounds the cache at every step). Decode step counts are left as they are.
  [[nodiscard]] status compress(std::span<const int64_t> seqs, const device_observation& obs) {
    if (const status s = check_batch(seqs, obs.rows); s != status::success) return s;
    return cuda::compress(policy_, *cache_, seqs, model_, obs, step_, step_bytes_, stream_, window_math::automatic,
                          piece_slots_);
  }

  //! 3. Decode attention of `layer` for `seqs`: q, out [batch][Hq][d] fp32 device. Adds what
  //! the policy's metric accumulates (H2O p, KV-Compress p^2) to the slot metrics.
  [[nodiscard]] status attend(std::span<const int64_t> seqs, int32_t layer, const float* q, float* out) {
    if (const status s = check_batch(seqs, 0); s != status::success) return s;
    return decode_attention(*cache_, seqs, layer, model_.q_heads, q, out, policy_.metric.decode(),
                            decode_reduce(policy_.metric), step_, step_bytes_, stream_);
  }

  //! 3. Ends a decode step of `seqs`: counts it for each and compresses those whose schedule
  //! fires, in one call, with their rows of `obs` (the window queries of every sequence of
  //! `seqs`, laid out as for compress; rows 0 for metrics that need none). `compressed`
  //! receives their ids. On error no step is counted and `compressed` is empty.
  [[nodiscard]] status end_decode_step(std::span<const int64_t> seqs, const device_observation& obs,
                                       std::vector<int64_t>& compressed) {
    compressed.clear();
    if (const status s = check_batch(seqs, obs.rows); s != status::success) return s;
    std::vector<int64_t> firing;
    std::vector<size_t> at;  // index of each firing sequence in seqs
    for (size_t b = 0; b < seqs.size(); ++b)
      if (policy_.schedule.after_decode_step(find(seqs[b])->steps + 1)) {
        firing.push_back(seqs[b]);
        at.push_back(b);
      }
    if (!firing.empty()) {
      device_observation subset = obs;
      if (obs.rows > 0 && firing.size() < seqs.size())
        if (const status s = gather(obs, at, subset); s != status::success) return s;
      if (const status s = cuda::compress(policy_, *cache_, firing, model_, subset, step_, step_bytes_, stream_,
                                          window_math::automatic, piece_slots_);
          s != status::success)
        return s;
    }
    for (const int64_t seq : seqs) ++find(seq)->steps;
    compressed = std::move(firing);
    return status::success;
  }

  //! 4. Frees the sequence: all its blocks return to the pool.
  [[nodiscard]] status free_sequence(int64_t seq) {
    const sequence_state* state = find(seq);
    if (!state) return status::unknown_sequence;
    if (const status s = cache_->free_sequence(seq); s != status::success) return s;
    sequences_.erase(sequences_.begin() + (state - sequences_.data()));
    return status::success;
  }

 private:
  struct sequence_state {
    int64_t id;
    int64_t steps;  // decode steps since the prefill compression
  };

  //! The largest step workspace (compression, decode) of any batch and row count within the
  //! limits: sizes need not grow monotonically with the batch (window splits shrink as heads grow).
  [[nodiscard]] static size_t step_bytes(const P& policy, const cache_type& cache, const attention_shape& model,
                                         int32_t max_batch, int32_t max_rows, int64_t piece_slots) {
    size_t compression = 0, decode = 0;
    for (int32_t batch = 1; batch <= max_batch; ++batch) {
      // 0 where a row count cannot compress (window scores without rows): refused per call.
      for (int32_t rows = 0; rows <= max_rows; ++rows)
        compression = std::max(compression, compress_workspace_size(policy, cache, model, batch, rows, piece_slots));
      decode = std::max(decode, decode_workspace_size(cache, batch, model.q_heads, policy.metric.decode()));
    }
    return compression == 0 ? 0 : std::max(compression, decode);
  }
  //! Room for the window rows of `max_batch` sequences, gathered when only some of a batch
  //! compress: queries [batch][L][rows][Hq][d], positions [batch][rows].
  [[nodiscard]] static size_t gather_bytes(const attention_shape& model, int32_t max_batch, int32_t max_rows) {
    detail::workspace_carver w(nullptr);
    w.take<float>(static_cast<int64_t>(max_batch) * query_floats(model, max_rows));
    w.take<int32_t>(static_cast<int64_t>(max_batch) * max_rows);
    return w.used();
  }
  [[nodiscard]] static int64_t query_floats(const attention_shape& model, int32_t rows) {
    return static_cast<int64_t>(model.layers) * rows * model.q_heads * model.head_dim;
  }

  //! unknown_sequence for a sequence the session does not have; invalid_argument for no
  //! session, more sequences than max_batch, a sequence named twice or more rows than max_rows.
  [[nodiscard]] status check_batch(std::span<const int64_t> seqs, int32_t rows) const {
    if (!cache_) return status::invalid_argument;
    for (size_t b = 0; b < seqs.size(); ++b) {
      if (!contains(seqs[b])) return status::unknown_sequence;
      const auto earlier = seqs.begin() + static_cast<ptrdiff_t>(b);
      if (std::find(seqs.begin(), earlier, seqs[b]) != earlier) return status::invalid_argument;
    }
    if (seqs.size() > static_cast<size_t>(max_batch_) || rows < 0 || rows > max_rows_) return status::invalid_argument;
    return status::success;
  }

  //! Copies the window rows of the sequences at `at` of `obs` into the gather buffer, in
  //! order, on the session's stream.
  [[nodiscard]] status gather(const device_observation& obs, std::span<const size_t> at, device_observation& out) {
    const int64_t floats = query_floats(model_, obs.rows);
    detail::workspace_carver w(gather_);
    float* queries = w.take<float>(static_cast<int64_t>(max_batch_) * query_floats(model_, max_rows_));
    int32_t* positions = w.take<int32_t>(static_cast<int64_t>(max_batch_) * max_rows_);
    for (size_t j = 0; j < at.size(); ++j) {
      KVTRIM_CUDA_TRY(cudaMemcpyAsync(queries + static_cast<int64_t>(j) * floats,
                                      obs.queries + static_cast<int64_t>(at[j]) * floats,
                                      static_cast<size_t>(floats) * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
      KVTRIM_CUDA_TRY(cudaMemcpyAsync(positions + static_cast<int64_t>(j) * obs.rows,
                                      obs.positions + static_cast<int64_t>(at[j]) * obs.rows,
                                      static_cast<size_t>(obs.rows) * sizeof(int32_t), cudaMemcpyDeviceToDevice,
                                      stream_));
    }
    out = {queries, positions, obs.rows};
    return status::success;
  }

  [[nodiscard]] const sequence_state* find(int64_t seq) const noexcept {
    for (const sequence_state& s : sequences_)
      if (s.id == seq) return &s;
    return nullptr;
  }
  [[nodiscard]] sequence_state* find(int64_t seq) noexcept {
    return const_cast<sequence_state*>(std::as_const(*this).find(seq));
  }

  cache_type* cache_ = nullptr;
  attention_shape model_{};
  P policy_{};
  int32_t max_batch_ = 0;
  int32_t max_rows_ = 0;
  void* gather_ = nullptr;
  void* step_ = nullptr;
  size_t step_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  int64_t piece_slots_ = 0;  // of its compression steps (0: the library's)
  std::vector<sequence_state> sequences_;
};

}  // namespace cuda
KVTRIM_NAMESPACE_END
