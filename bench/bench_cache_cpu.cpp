// The paged per-head cache on the CPU at a Llama-3-8B-like shape (32 layers, 32 query heads,
// 8 KV heads, head dim 128, block size 16), fp32 and bf16 storage:
//   append_prefill  a prompt chunk into every layer and head        bytes: K+V stored
//   append_decode   one token into every layer and head             bytes: K+V stored
//   apply           compaction of a SnapKV-like scattered plan      bytes: slots moved (K, V, position, metric)
//   compress        cpu::compress of a whole sequence (StreamingLLM, H2O: metrics without
//                   queries, as in decode-time eviction)              bytes: the sequence's cache before
//   copy            memcpy of the sequence's K/V, the bandwidth reference ("no compression")
//   commit          the host side of a device compression (block tables only, no K/V): the
//                   CUDA issue's shape, 8 sequences of 32k tokens kept to 2048 per head, by
//                   truncate, against what cuda::compress did before it (an eviction plan per
//                   sequence listing its kept prefix, applied one sequence at a time)
//   decode_step_tables  the host side of a batch decode step on a device cache (block tables
//                   only): a token appended to every layer of B sequences, batched or one
//                   call per sequence
// Counters: tokens/s, and blocks freed per compression. The benchmarks that refill a 2048-token
// sequence before each timed step run a fixed number of iterations to keep the suite short.
// Run: build with -DKVTRIM_BUILD_BENCHMARKS=ON, then ./bench/bench_cache_cpu
#include <benchmark/benchmark.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "kvtrim/kvtrim.hpp"

namespace {
using namespace kvtrim;

const attention_shape llama3_8b{32, 32, 8, 128};
constexpr int32_t block_size = 16;
constexpr int32_t head_dim = 128;
constexpr int32_t context = 2048;  //!< tokens per head of the compressed sequence

template <kv_element T>
using cache_t = paged_cache<T, head_dim>;

template <kv_element T>
cache_t<T> make_cache(int32_t max_tokens) {
  const int32_t blocks = llama3_8b.layers * llama3_8b.kv_heads * ((max_tokens + block_size - 1) / block_size);
  cache_t<T> cache;
  throw_if_error(cache_t<T>::create({llama3_8b, block_size, blocks, 1, max_tokens}, cache), "bench cache");
  return cache;
}

//! K or V rows [L][tokens][H][d].
std::vector<float> rows(int32_t tokens, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> v(static_cast<size_t>(llama3_8b.layers) * tokens * llama3_8b.kv_heads * head_dim);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<int32_t> positions(int32_t first, int32_t count) {
  std::vector<int32_t> p(static_cast<size_t>(count));
  for (int32_t i = 0; i < count; ++i) p[static_cast<size_t>(i)] = first + i;
  return p;
}

//! K+V bytes of `tokens` tokens in every layer and head.
template <kv_element T>
int64_t kv_bytes(int64_t tokens) {
  return tokens * llama3_8b.layers * llama3_8b.kv_heads * head_dim * 2 * static_cast<int64_t>(sizeof(T));
}

template <kv_element T>
void append_prefill(benchmark::State& state) {
  const auto chunk = static_cast<int32_t>(state.range(0));
  auto cache = make_cache<T>(chunk);
  const auto k = rows(chunk, 1), v = rows(chunk, 2);
  const auto at = positions(0, chunk);
  for (auto _ : state) {
    throw_if_error(cache.add_sequence(0));
    throw_if_error(cache.append(0, at, k, v));
    throw_if_error(cache.free_sequence(0));
  }
  state.SetBytesProcessed(state.iterations() * kv_bytes<T>(chunk));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * chunk, benchmark::Counter::kIsRate);
}

template <kv_element T>
void append_decode(benchmark::State& state) {
  constexpr int32_t start = 1024, room = 4096;
  auto cache = make_cache<T>(start + room);
  const auto prompt_k = rows(start, 1), prompt_v = rows(start, 2);
  const auto k = rows(1, 3), v = rows(1, 4);
  const auto refill = [&] {
    throw_if_error(cache.add_sequence(0));
    throw_if_error(cache.append(0, positions(0, start), prompt_k, prompt_v));
  };
  refill();
  int32_t next = start;
  std::vector<int32_t> at{next};
  for (auto _ : state) {
    if (next == start + room) {
      state.PauseTiming();
      throw_if_error(cache.free_sequence(0));
      refill();
      next = start;
      state.ResumeTiming();
    }
    at[0] = next++;
    throw_if_error(cache.append(0, at, k, v));
  }
  state.SetBytesProcessed(state.iterations() * kv_bytes<T>(1));
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

//! A SnapKV-like plan: every head keeps a seeded random quarter of its slots (top-k by
//! score is scattered like this), so compaction moves most survivors.
eviction_plan scattered_quarter(int32_t length) {
  std::mt19937 rng(5);
  eviction_plan plan(llama3_8b.layers, llama3_8b.kv_heads);
  std::vector<int32_t> all = positions(0, length), kept;
  for (int32_t l = 0; l < llama3_8b.layers; ++l)
    for (int32_t h = 0; h < llama3_8b.kv_heads; ++h) {
      std::shuffle(all.begin(), all.end(), rng);
      kept.assign(all.begin(), all.begin() + length / 4);
      std::sort(kept.begin(), kept.end());
      plan.set_head(l, h, length, kept);
    }
  return plan;
}

template <kv_element T>
void apply(benchmark::State& state) {
  auto cache = make_cache<T>(context);
  const auto k = rows(context, 1), v = rows(context, 2);
  const auto at = positions(0, context);
  const eviction_plan plan = scattered_quarter(context);
  int64_t moves = 0;
  std::vector<slot_move> head_moves;
  for (int32_t l = 0; l < llama3_8b.layers; ++l)
    for (int32_t h = 0; h < llama3_8b.kv_heads; ++h) {
      compaction_moves(context, plan.kept(l, h), head_moves);
      moves += static_cast<int64_t>(head_moves.size());
    }
  int64_t freed = 0;
  for (auto _ : state) {
    state.PauseTiming();
    throw_if_error(cache.add_sequence(0));
    throw_if_error(cache.append(0, at, k, v));
    const int64_t before = cache.pool().used_blocks;
    state.ResumeTiming();
    throw_if_error(cache.apply(0, plan));
    state.PauseTiming();
    freed = before - cache.pool().used_blocks;
    throw_if_error(cache.free_sequence(0));
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * moves * slot_bytes<T>(head_dim));
  state.counters["moves"] = static_cast<double>(moves);
  state.counters["blocks_freed"] = static_cast<double>(freed);
}

template <kv_element T, class Policy>
void compress(benchmark::State& state, Policy policy) {
  auto cache = make_cache<T>(context);
  const auto k = rows(context, 1), v = rows(context, 2);
  const auto at = positions(0, context);
  int64_t freed = 0, bytes = 0;
  for (auto _ : state) {
    state.PauseTiming();
    throw_if_error(cache.add_sequence(0));
    throw_if_error(cache.append(0, at, k, v));
    const pool_usage before = cache.pool();
    bytes = before.used_bytes();
    state.ResumeTiming();
    throw_if_error(cpu::compress(policy, cache, 0, llama3_8b, {}));
    state.PauseTiming();
    freed = before.used_blocks - cache.pool().used_blocks;
    throw_if_error(cache.free_sequence(0));
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * bytes);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * context, benchmark::Counter::kIsRate);
  state.counters["blocks_freed"] = static_cast<double>(freed);
}

//! memcpy of one sequence's K/V: what moving every byte once costs on this machine.
template <kv_element T>
void copy(benchmark::State& state) {
  const auto bytes = static_cast<size_t>(kv_bytes<T>(context));
  std::vector<char> src(bytes, 1), dst(bytes);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes));
}

constexpr int32_t commit_batch = 8, commit_tokens = 32768, commit_kept = 2048;

//! Block tables of commit_batch sequences of commit_tokens tokens in every head of llama3_8b,
//! with no store: the commit of a device compression only touches the tables.
class commit_tables {
 public:
  commit_tables() : slots_(static_cast<size_t>(llama3_8b.layers) * commit_tokens * llama3_8b.kv_heads) {
    const int32_t blocks_per_head = (commit_tokens + block_size - 1) / block_size;
    const paged_cache_config config{llama3_8b, block_size,
                                    commit_batch * llama3_8b.layers * llama3_8b.kv_heads * blocks_per_head,
                                    commit_batch, commit_tokens};
    throw_if_error(block_tables::create(config, 0, tables_), "bench tables");
    for (int32_t b = 0; b < commit_batch; ++b) throw_if_error(tables_.add_sequence(b));
    refill();
  }
  [[nodiscard]] block_tables& tables() noexcept { return tables_; }
  //! Every sequence back to commit_tokens tokens a head, the journal replayed. The same object
  //! throughout, as an engine's cache: its journal and free list stay allocated.
  void refill() {
    for (int32_t b = 0; b < commit_batch; ++b) {
      throw_if_error(tables_.free_sequence(b));
      throw_if_error(tables_.add_sequence(b));
      throw_if_error(tables_.append(b, 0, llama3_8b.layers, commit_tokens, slots_, [] { return status::success; }));
    }
    tables_.clear_journal();
  }

 private:
  block_tables tables_;
  std::vector<int64_t> slots_;
};

void commit_truncate(benchmark::State& state) {
  commit_tables c;
  std::vector<int64_t> seqs(commit_batch);
  for (int32_t b = 0; b < commit_batch; ++b) seqs[static_cast<size_t>(b)] = b;
  const std::vector<int32_t> kept(static_cast<size_t>(commit_batch) * llama3_8b.layers * llama3_8b.kv_heads, commit_kept);
  for (auto _ : state) {
    throw_if_error(c.tables().truncate(seqs, kept));
    state.PauseTiming();
    c.refill();
    state.ResumeTiming();
  }
}

void commit_prefix_plans(benchmark::State& state) {
  commit_tables c;
  std::vector<int32_t> prefix(commit_kept);
  for (int32_t j = 0; j < commit_kept; ++j) prefix[static_cast<size_t>(j)] = j;
  compaction_steps steps;
  for (auto _ : state) {
    std::vector<eviction_plan> plans(commit_batch, eviction_plan(llama3_8b.layers, llama3_8b.kv_heads));
    for (int32_t b = 0; b < commit_batch; ++b)
      for (int32_t l = 0; l < llama3_8b.layers; ++l)
        for (int32_t h = 0; h < llama3_8b.kv_heads; ++h)
          plans[static_cast<size_t>(b)].set_head(l, h, commit_tokens, prefix);
    for (int32_t b = 0; b < commit_batch; ++b)
      throw_if_error(c.tables().apply(b, plans[static_cast<size_t>(b)], steps,
                                      [](const compaction_steps&) { return status::success; }));
    state.PauseTiming();
    c.refill();
    state.ResumeTiming();
  }
}

constexpr int32_t step_tokens = 1000;  //!< tokens a head before a decode step (a block holds 16)

//! The host side of one decode step of a batch on a device cache, block tables only: for
//! every layer, one token appended to each of B sequences (range(0)), as one batch call
//! (range(1) = 1) or one call per sequence, then the journal cleared as the mover's replay
//! does. Every 16 steps each head crosses a block boundary once; the heads go back to
//! step_tokens then, untimed, so every measured step appends at the same places.
void decode_step_tables(benchmark::State& state) {
  const auto batch = static_cast<int32_t>(state.range(0));
  const bool batched = state.range(1) != 0;
  const int32_t heads = llama3_8b.layers * llama3_8b.kv_heads, most = step_tokens + block_size;
  block_tables tables;
  throw_if_error(block_tables::create({llama3_8b, block_size, batch * heads * ((most + block_size - 1) / block_size),
                                       batch, most},
                                      0, tables),
                 "bench tables");
  std::vector<int64_t> seqs(static_cast<size_t>(batch));
  std::vector<int64_t> slots(static_cast<size_t>(llama3_8b.layers) * step_tokens * llama3_8b.kv_heads);
  const auto noop = [] { return status::success; };
  for (int32_t b = 0; b < batch; ++b) {
    seqs[static_cast<size_t>(b)] = b;
    throw_if_error(tables.add_sequence(b));
    throw_if_error(tables.append(b, 0, llama3_8b.layers, step_tokens, slots, noop));
  }
  tables.clear_journal();
  const std::vector<int32_t> lengths(static_cast<size_t>(batch) * heads, step_tokens);
  slots.resize(static_cast<size_t>(batch) * llama3_8b.kv_heads);  // one token of one layer, [B][H]
  const std::span<int64_t> one(slots.data(), static_cast<size_t>(llama3_8b.kv_heads));
  int32_t steps = 0;
  for (auto _ : state) {
    for (int32_t l = 0; l < llama3_8b.layers; ++l) {
      if (batched) {
        throw_if_error(tables.append(seqs, l, 1, 1, slots, noop));
      } else {
        for (const int64_t seq : seqs) throw_if_error(tables.append(seq, l, 1, 1, one, noop));
      }
      tables.clear_journal();
    }
    if (++steps == block_size) {
      state.PauseTiming();
      throw_if_error(tables.truncate(seqs, lengths));
      tables.clear_journal();
      steps = 0;
      state.ResumeTiming();
    }
  }
  state.SetItemsProcessed(state.iterations() * llama3_8b.layers);  // items: layers appended
}

void compress_streaming_llm(benchmark::State& state) {
  compress<bfloat16>(state, streaming_llm({.budget = token_budget::of_tokens(512), .sinks = 4}));
}
void compress_h2o(benchmark::State& state) {
  compress<bfloat16>(state, h2o({.budget = token_budget::of_tokens(512), .recent = 32}));
}
}  // namespace

BENCHMARK(append_prefill<float>)->Name("llama3_8b/append_prefill/fp32")->Arg(512)->Unit(benchmark::kMillisecond);
BENCHMARK(append_prefill<kvtrim::bfloat16>)->Name("llama3_8b/append_prefill/bf16")->Arg(512)->Unit(benchmark::kMillisecond);
BENCHMARK(append_decode<float>)->Name("llama3_8b/append_decode/fp32")->Unit(benchmark::kMicrosecond);
BENCHMARK(append_decode<kvtrim::bfloat16>)->Name("llama3_8b/append_decode/bf16")->Unit(benchmark::kMicrosecond);
BENCHMARK(apply<float>)->Name("llama3_8b/apply_quarter/fp32")->Iterations(20)->Unit(benchmark::kMillisecond);
BENCHMARK(apply<kvtrim::bfloat16>)->Name("llama3_8b/apply_quarter/bf16")->Iterations(20)->Unit(benchmark::kMillisecond);
BENCHMARK(compress_streaming_llm)->Name("llama3_8b/compress/streaming_llm/bf16")->Iterations(8)->Unit(benchmark::kMillisecond);
BENCHMARK(compress_h2o)->Name("llama3_8b/compress/h2o/bf16")->Iterations(8)->Unit(benchmark::kMillisecond);
BENCHMARK(commit_truncate)->Name("llama3_8b/commit_8x32k_to_2048/truncate")->Unit(benchmark::kMillisecond);
BENCHMARK(commit_prefix_plans)->Name("llama3_8b/commit_8x32k_to_2048/prefix_plans")->Unit(benchmark::kMillisecond);
BENCHMARK(decode_step_tables)->Name("llama3_8b/decode_step_tables")->ArgsProduct({{8, 32, 128}, {0, 1}})
    ->ArgNames({"B", "batched"})->Unit(benchmark::kMicrosecond);
BENCHMARK(copy<float>)->Name("llama3_8b/copy_baseline/fp32")->Unit(benchmark::kMillisecond);
BENCHMARK(copy<kvtrim::bfloat16>)->Name("llama3_8b/copy_baseline/bf16")->Unit(benchmark::kMillisecond);
