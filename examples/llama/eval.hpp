#pragma once
//! \file eval.hpp
//! Teacher-forced evaluation of every (protocol, method, budget) on the TinyStories windows of
//! text_stream.hpp, against the full cache: perplexity, top-1 agreement with the full cache,
//! KV bytes held and throughput (docs/llama-demo.md explains each column). `Store` is the kvtrim
//! store every run's cache uses (kvtrim_cache.hpp; the GPU's in kvtrim_cache_cuda.cuh).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint.hpp"
#include "engine.hpp"
#include "math.hpp"
#include "policies.hpp"

namespace llama {

//! Prompt tokens of the prefill protocol; the rest of each 512-token window is teacher-forced.
inline constexpr int prefill_prompt_tokens = 384;

struct eval_job {
  protocol proto = protocol::streaming;
  method meth = method::full;
  int32_t budget = 0;
};

//! One row of the table.
struct eval_row {
  eval_job job;
  double nll_sum = 0.0;          // nats over every evaluated prediction
  std::int64_t predictions = 0;  // evaluated predictions
  std::int64_t agree = 0;        // predictions whose argmax equals the full cache's
  double kv_bytes_sum = 0.0;     // K+V bytes held during each evaluated step's attention
  double full_bytes_sum = 0.0;   // the same for the full cache
  std::int64_t tokens = 0;       // forward steps run (prompt and teacher-forced tokens)
  double seconds = 0.0;          // wall time of those steps, compressions included

  [[nodiscard]] double nll() const { return predictions ? nll_sum / static_cast<double>(predictions) : 0.0; }
  [[nodiscard]] double ppl() const { return std::exp(nll()); }
  [[nodiscard]] double top1() const { return predictions ? static_cast<double>(agree) / static_cast<double>(predictions) : 0.0; }
  [[nodiscard]] double kv_bytes() const { return predictions ? kv_bytes_sum / static_cast<double>(predictions) : 0.0; }
  [[nodiscard]] double kv_fraction() const { return full_bytes_sum > 0 ? kv_bytes_sum / full_bytes_sum : 0.0; }
  [[nodiscard]] double tokens_per_s() const { return seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0; }
};

//! Kept positions of one method after compression, for the heatmap.
struct kept_snapshot {
  method meth = method::full;
  int32_t budget = 0;
  protocol proto = protocol::prefill;
  int columns = 0;                             // positions 0..columns-1 existed
  std::vector<std::vector<int32_t>> positions;  // [L * Hkv] kept positions, ascending
};

struct eval_options {
  std::vector<protocol> protocols = {protocol::streaming, protocol::prefill};
  std::vector<method> methods;  // without `full`, which always runs
  std::vector<int32_t> budgets = {36, 68, 132};
  int windows = 4;
  int threads = 2;
  //! Which (protocol, budget) the heatmap shows; unset: none is recorded.
  bool record_kept = false;
  protocol kept_protocol = protocol::prefill;
  int32_t kept_budget = 36;
};

struct eval_result {
  std::vector<eval_row> rows;  // protocol order, then full, then methods x budgets
  std::vector<kept_snapshot> kept;
  double seconds = 0.0;
};

namespace detail {

//! Full-cache predictions of every window: argmax and NLL at each position 0..510.
struct reference_run {
  std::vector<std::vector<int>> argmax;
  std::vector<std::vector<double>> nll;
  std::vector<std::vector<double>> kv_bytes;  // K+V bytes the full cache holds at each step
  std::int64_t tokens = 0;
  double seconds = 0.0;
};

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <kvtrim::kv_store Store>
reference_run run_reference(const checkpoint& model, const std::vector<std::vector<int>>& windows) {
  reference_run ref;
  const auto t0 = std::chrono::steady_clock::now();
  with_policy(method::full, 0, protocol::streaming, [&](auto policy) {
    sequence_engine<decltype(policy), Store> engine(model, method::full, model.cfg().seq_len, protocol::streaming,
                                                    std::move(policy), model.cfg().seq_len);
    for (const std::vector<int>& w : windows) {
      engine.start();
      auto& am = ref.argmax.emplace_back();
      auto& nl = ref.nll.emplace_back();
      auto& kb = ref.kv_bytes.emplace_back();
      for (int pos = 0; pos + 1 < static_cast<int>(w.size()); ++pos) {
        const auto logits = engine.step(w[static_cast<std::size_t>(pos)], pos);
        am.push_back(argmax(logits));
        nl.push_back(token_nll(logits, w[static_cast<std::size_t>(pos) + 1]));
        kb.push_back(static_cast<double>(engine.cache().kv_bytes()));
        ++ref.tokens;
      }
    }
  });
  ref.seconds = seconds_since(t0);
  return ref;
}

//! Runs one (protocol, method, budget) over every window.
template <kvtrim::kv_store Store>
eval_row run_job(const checkpoint& model, const std::vector<std::vector<int>>& windows, const reference_run& ref,
                 const eval_job& job, kept_snapshot* kept) {
  eval_row row{.job = job};
  const config& c = model.cfg();
  with_policy(job.meth, job.budget, job.proto, [&](auto policy) {
    sequence_engine<decltype(policy), Store> engine(model, job.meth, job.budget, job.proto, std::move(policy),
                                                    c.seq_len);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t wi = 0; wi < windows.size(); ++wi) {
      const std::vector<int>& w = windows[wi];
      const int last = static_cast<int>(w.size()) - 1;  // positions 0..last-1 predict a token
      const int first_scored = job.proto == protocol::prefill ? prefill_prompt_tokens : 0;
      engine.start();
      for (int pos = 0; pos < last; ++pos) {
        if (job.proto == protocol::prefill && pos == prefill_prompt_tokens) {
          engine.end_prompt();
          if (kept != nullptr && wi == 0) {
            kept->positions = engine.cache().kept_positions();
            kept->columns = prefill_prompt_tokens;
          }
        }
        const auto logits = engine.step(w[static_cast<std::size_t>(pos)], pos);
        ++row.tokens;
        if (pos < first_scored) continue;
        row.nll_sum += token_nll(logits, w[static_cast<std::size_t>(pos) + 1]);
        row.agree += argmax(logits) == ref.argmax[wi][static_cast<std::size_t>(pos)] ? 1 : 0;
        ++row.predictions;
        row.kv_bytes_sum += static_cast<double>(engine.cache().kv_bytes());
        row.full_bytes_sum += ref.kv_bytes[wi][static_cast<std::size_t>(pos)];
      }
      if (kept != nullptr && wi == 0 && job.proto == protocol::streaming) {
        kept->positions = engine.cache().kept_positions();
        kept->columns = last;
      }
    }
    row.seconds = seconds_since(t0);
  }, c.seq_len);
  return row;
}

//! Rough relative cost, to start the longest jobs first.
inline double job_cost(const eval_job& j) {
  const method_traits t = traits_of(j.meth);
  if (j.proto == protocol::prefill) return 1.0;
  return 2.0 + (t.observe_in_streaming ? 2.0 : 0.0) + j.budget / 64.0;
}

}  // namespace detail

//! Full-cache rows of each protocol from the reference run.
inline eval_row full_row(protocol p, const detail::reference_run& ref, const config& c) {
  eval_row row{.job = {p, method::full, c.seq_len}};
  const int first = p == protocol::prefill ? prefill_prompt_tokens : 0;
  for (std::size_t wi = 0; wi < ref.nll.size(); ++wi)
    for (std::size_t pos = static_cast<std::size_t>(first); pos < ref.nll[wi].size(); ++pos) {
      row.nll_sum += ref.nll[wi][pos];
      ++row.predictions;
      ++row.agree;
      row.kv_bytes_sum += ref.kv_bytes[wi][pos];
    }
  row.full_bytes_sum = row.kv_bytes_sum;
  row.tokens = ref.tokens;
  row.seconds = ref.seconds;
  return row;
}

//! Evaluates the full cache and every (protocol, method, budget) on `windows`, running jobs on
//! `opt.threads` threads. Throws the first job's error, if any.
template <kvtrim::kv_store Store = kvtrim::paged_cache<float>>
eval_result evaluate(const checkpoint& model, const std::vector<std::vector<int>>& windows, const eval_options& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  eval_result result;
  const detail::reference_run ref = detail::run_reference<Store>(model, windows);

  std::vector<eval_job> jobs;
  for (const protocol p : opt.protocols)
    for (const method m : opt.methods)
      for (const int32_t b : opt.budgets) jobs.push_back({p, m, b});
  std::vector<eval_row> rows(jobs.size());
  std::vector<kept_snapshot> kept(jobs.size());
  std::vector<std::size_t> order(jobs.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return detail::job_cost(jobs[a]) > detail::job_cost(jobs[b]); });

  std::atomic<std::size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  const auto worker = [&] {
    for (std::size_t k; (k = next.fetch_add(1)) < order.size();) {
      const std::size_t i = order[k];
      const eval_job& j = jobs[i];
      const bool record = opt.record_kept && j.proto == opt.kept_protocol && j.budget == opt.kept_budget;
      try {
        rows[i] = detail::run_job<Store>(model, windows, ref, j, record ? &kept[i] : nullptr);
        if (record) kept[i] = {j.meth, j.budget, j.proto, kept[i].columns, std::move(kept[i].positions)};
      } catch (...) {
        const std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next = order.size();
      }
    }
  };
  const int threads = std::max(1, std::min<int>(opt.threads, static_cast<int>(jobs.size())));
  {
    std::vector<std::jthread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
    worker();
  }
  if (failure) std::rethrow_exception(failure);

  for (const protocol p : opt.protocols) {
    result.rows.push_back(full_row(p, ref, model.cfg()));
    for (std::size_t i = 0; i < jobs.size(); ++i)
      if (jobs[i].proto == p) result.rows.push_back(rows[i]);
  }
  for (std::size_t i = 0; i < jobs.size(); ++i)
    if (!kept[i].positions.empty()) result.kept.push_back(std::move(kept[i]));
  result.seconds = detail::seconds_since(t0);
  return result;
}

}  // namespace llama
