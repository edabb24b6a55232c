// The concurrency contract of docs/reliability.md, exercised with real threads; the tsan
// preset runs these under ThreadSanitizer (any data race fails the test). Each test compares
// what the threads produced with a serial run of the same work, so a lost or torn update
// fails it too, with or without a sanitizer.
//  1. Separate caches, sessions and policy copies are independent: no shared state.
//  2. One policy value may be used by any number of threads at once (policies are immutable).
//  3. Const calls on one cache (reads, accounting, cpu::plan) may run together.
//  4. cpu::decode_attention on one cache may run together on distinct (sequence, layer)
//     pairs, accumulating metrics, each thread with its own scratch.
//  5. Everything that mutates a cache is exclusive: an engine serialises it, e.g. with a
//     std::shared_mutex (4. under the shared lock, appends and compression under the unique one).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <latch>
#include <mutex>
#include <random>
#include <shared_mutex>
#include <span>
#include <thread>
#include <vector>

#include "cache_invariants.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;
using paged_fixtures::gaussian;
using paged_fixtures::iota_positions;

namespace {
const attention_shape model{2, 4, 2, 8};
constexpr int32_t threads = 4;

//! Runs f(t) on `threads` threads that start together, and joins them.
template <class F>
void on_threads(F&& f) {
  std::latch start(threads);
  std::vector<std::thread> pool;
  for (int32_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      start.arrive_and_wait();
      f(t);
    });
  for (std::thread& th : pool) th.join();
}

//! Ten decode steps of every layer of batch row `row` of a dense store, with query `q` and the
//! metric accumulating as `acc` / `reduce` say.
template <class Store>
void decode_row(Store& store, int32_t row, std::span<const float> q, decode_accumulation acc, gqa_reduce reduce) {
  std::vector<float> out(q.size()), scratch;
  for (int32_t i = 0; i < 10; ++i)
    for (int32_t l = 0; l < model.layers; ++l)
      throw_if_error(cpu::decode_attention(store, row, l, model.q_heads, q, out, acc, reduce, scratch));
}

//! K/V rows [L][t][H][d] and queries of one sequence, from its own seed.
struct sequence_data {
  std::vector<float> k, v;           // [L][prompt][H][d]
  std::vector<float> window;         // [L][rows][Hq][d]
  std::vector<int32_t> window_positions;
  std::vector<std::vector<float>> decode_k, decode_v, decode_q;  // per step: [L][1][H][d], q [Hq][d]
};
sequence_data make_data(uint32_t seed, int32_t prompt, int32_t rows, int32_t steps) {
  std::mt19937 rng(seed);
  sequence_data s;
  const size_t per_token = static_cast<size_t>(model.kv_heads) * model.head_dim;
  s.k = gaussian(rng, static_cast<size_t>(model.layers) * prompt * per_token);
  s.v = gaussian(rng, s.k.size());
  s.window = gaussian(rng, static_cast<size_t>(model.layers) * rows * model.q_heads * model.head_dim, 2.f);
  s.window_positions = iota_positions(prompt - rows, rows);
  for (int32_t i = 0; i < steps; ++i) {
    s.decode_k.push_back(gaussian(rng, static_cast<size_t>(model.layers) * per_token));
    s.decode_v.push_back(gaussian(rng, static_cast<size_t>(model.layers) * per_token));
    s.decode_q.push_back(gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim));
  }
  return s;
}

//! The engine loop of one sequence in its own session: prefill, compress, decode steps with
//! accumulating attention and scheduled compression. Returns the attention outputs.
template <class Policy>
std::vector<float> engine_loop(compression_session<Policy, paged_cache<float>>& session, int64_t seq,
                               const sequence_data& s, int32_t prompt) {
  std::vector<float> outputs, out(static_cast<size_t>(model.q_heads) * model.head_dim);
  throw_if_error(session.add_sequence(seq), "add");
  throw_if_error(session.append(seq, iota_positions(0, prompt), s.k, s.v), "prefill");
  throw_if_error(session.finish_prefill(seq, {s.window, s.window_positions}), "finish_prefill");
  for (size_t i = 0; i < s.decode_q.size(); ++i) {
    throw_if_error(session.append(seq, iota_positions(prompt + static_cast<int32_t>(i), 1), s.decode_k[i], s.decode_v[i]),
                   "decode append");
    for (int32_t l = 0; l < model.layers; ++l) {
      throw_if_error(session.attend(seq, l, s.decode_q[i], out), "attend");
      outputs.insert(outputs.end(), out.begin(), out.end());
    }
    bool compressed = false;
    throw_if_error(session.end_decode_step(seq, compressed), "end step");
  }
  return outputs;
}

const paged_cache_config config{model, 4, 256, 4, 96};

//! Every head of row `row` holds the same positions and metrics in both dense caches.
bool fixtures_equal(const dense_cache& a, const dense_cache& b, int64_t row) {
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      const auto ma = a.metrics(row, l, h), mb = b.metrics(row, l, h);
      if (!std::equal(ma.begin(), ma.end(), mb.begin(), mb.end())) return false;
    }
  return true;
}
}  // namespace

TEST_CASE("concurrency: separate caches and sessions on separate threads share one policy value",
          "[cpu][concurrency]") {
  // One H2O policy (accumulating, every-step compression) read by every thread at once.
  const h2o_policy policy = h2o({.budget = token_budget::of_tokens(24), .recent = 4});
  const int32_t prompt = 40;
  std::vector<sequence_data> data;
  for (int32_t t = 0; t < threads; ++t) data.push_back(make_data(100 + t, prompt, 8, 12));

  const auto run = [&](int32_t t, std::vector<float>& outputs, paged_fixtures::dump& dump) {
    auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
    compression_session<h2o_policy, paged_cache<float>> session(cache, model, policy);
    outputs = engine_loop(session, t, data[static_cast<size_t>(t)], prompt);
    const std::vector<int64_t> seqs{t};
    dump = paged_fixtures::take_dump(cache, seqs);
  };
  std::vector<std::vector<float>> serial(threads), parallel(threads);
  std::vector<paged_fixtures::dump> serial_dump(threads), parallel_dump(threads);
  for (int32_t t = 0; t < threads; ++t) run(t, serial[static_cast<size_t>(t)], serial_dump[static_cast<size_t>(t)]);
  on_threads([&](int32_t t) { run(t, parallel[static_cast<size_t>(t)], parallel_dump[static_cast<size_t>(t)]); });
  for (int32_t t = 0; t < threads; ++t) {
    CAPTURE(t);
    CHECK(parallel[static_cast<size_t>(t)] == serial[static_cast<size_t>(t)]);
    CHECK(parallel_dump[static_cast<size_t>(t)] == serial_dump[static_cast<size_t>(t)]);
    CHECK(serial_dump[static_cast<size_t>(t)].lengths.front() <= 24);  // it did compress
  }
}

TEST_CASE("concurrency: const reads and cpu::plan of one cache run together", "[cpu][concurrency]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float16>>(config);
  std::vector<sequence_data> data;
  for (int32_t t = 0; t < threads; ++t) {
    data.push_back(make_data(200 + t, 30 + 3 * t, 6, 0));
    REQUIRE(cache.add_sequence(t) == status::success);
    REQUIRE(cache.append(t, iota_positions(0, 30 + 3 * t), data.back().k, data.back().v) == status::success);
  }
  const snapkv_policy snap = snapkv({.budget = token_budget::of_tokens(12), .window = 6});
  const auto& shared = cache;  // every thread holds it const

  // What each thread must see, computed first on one thread. (Catch2's assertions are not
  // thread-safe: the threads only record, the main thread checks.)
  struct seen {
    cpu::compression_result planned;
    paged_fixtures::dump dump;
    memory_usage usage;
    pool_usage pool;
  };
  const auto reads = [&](int64_t seq, seen& out) {
    cpu::compression_result& planned = out.planned;
    paged_fixtures::dump& dump = out.dump;
    const std::vector<int64_t> all{0, 1, 2, 3};
    dump = paged_fixtures::take_dump(shared, all);  // every sequence, not only its own
    throw_if_error(cpu::plan(snap, shared, seq, model, {data[static_cast<size_t>(seq)].window,
                                                        data[static_cast<size_t>(seq)].window_positions},
                             0, model.layers, planned),
                   "plan");
    out.usage = shared.usage(seq);
    out.pool = shared.pool();
  };
  std::vector<seen> serial(threads), parallel(threads);
  for (int32_t t = 0; t < threads; ++t) reads(t, serial[static_cast<size_t>(t)]);
  on_threads([&](int32_t t) {
    for (int repeat = 0; repeat < 3; ++repeat) reads(t, parallel[static_cast<size_t>(t)]);
  });
  for (int32_t t = 0; t < threads; ++t) {
    CAPTURE(t);
    const seen& a = parallel[static_cast<size_t>(t)];
    const seen& b = serial[static_cast<size_t>(t)];
    CHECK(a.dump == b.dump);
    CHECK(a.usage == b.usage);
    CHECK(a.usage.tokens == static_cast<int64_t>(model.layers) * model.kv_heads * (30 + 3 * t));
    CHECK(a.pool == b.pool);
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        const auto x = a.planned.plan.kept(l, h), y = b.planned.plan.kept(l, h);
        CHECK(std::vector<int32_t>(x.begin(), x.end()) == std::vector<int32_t>(y.begin(), y.end()));
        CHECK(x.size() < static_cast<size_t>(30 + 3 * t));  // the plan does evict
      }
  }
}

TEST_CASE("concurrency: decode attention on distinct (sequence, layer) pairs of one cache accumulates in parallel",
          "[cpu][concurrency]") {
  // Two sequences x two layers = four threads, each accumulating squared probabilities into
  // the metrics of its own pair's slots, with its own scratch.
  const int32_t prompt = 33;  // not a multiple of the block size: partial blocks
  const auto fill = [&] {
    auto cache = paged_fixtures::make_cache<paged_cache<bfloat16>>(config);
    for (int64_t seq = 0; seq < 2; ++seq) {
      const sequence_data d = make_data(300 + static_cast<uint32_t>(seq), prompt, 1, 0);
      throw_if_error(cache.add_sequence(seq));
      throw_if_error(cache.append(seq, iota_positions(0, prompt), d.k, d.v));
    }
    return cache;
  };
  std::mt19937 rng(5);
  std::vector<std::vector<float>> queries;  // [pair][step] q [Hq][d]
  const int32_t steps = 20;
  for (int32_t t = 0; t < threads * steps; ++t) queries.push_back(gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim));
  const auto work = [&](paged_cache<bfloat16>& cache, int32_t t, std::vector<float>& outputs) {
    const int64_t seq = t / model.layers;
    const int32_t layer = t % model.layers;
    std::vector<float> out(static_cast<size_t>(model.q_heads) * model.head_dim), scratch;
    for (int32_t i = 0; i < steps; ++i) {
      throw_if_error(cpu::decode_attention(cache, seq, layer, model.q_heads, queries[static_cast<size_t>(t * steps + i)],
                                           out, decode_accumulation::squared_sum, gqa_reduce::sum, scratch),
                     "decode");
      outputs.insert(outputs.end(), out.begin(), out.end());
    }
  };
  auto serial_cache = fill(), parallel_cache = fill();
  std::vector<std::vector<float>> serial(threads), parallel(threads);
  for (int32_t t = 0; t < threads; ++t) work(serial_cache, t, serial[static_cast<size_t>(t)]);
  on_threads([&](int32_t t) { work(parallel_cache, t, parallel[static_cast<size_t>(t)]); });
  const std::vector<int64_t> seqs{0, 1};
  CHECK(paged_fixtures::take_dump(parallel_cache, seqs) == paged_fixtures::take_dump(serial_cache, seqs));
  for (int32_t t = 0; t < threads; ++t) CHECK(parallel[static_cast<size_t>(t)] == serial[static_cast<size_t>(t)]);
  CHECK(paged_fixtures::take_dump(parallel_cache, seqs).metrics.front() > 0.f);  // it did accumulate
}

TEST_CASE("concurrency: decode attention on distinct rows of one dense view runs in parallel", "[cpu][concurrency]") {
  const int32_t batch = threads, capacity = 24, prompt = 17;
  const auto fill = [&](paged_fixtures::engine_buffers<float16>& memory) {
    dense_view<float16> view;
    const auto layers = memory.layers();
    throw_if_error(dense_view<float16>::create(model, batch, capacity, layers, view));
    for (int64_t row = 0; row < batch; ++row) {
      const sequence_data d = make_data(400 + static_cast<uint32_t>(row), prompt, 1, 0);
      throw_if_error(view.append(row, iota_positions(0, prompt), d.k, d.v));
    }
    return view;
  };
  paged_fixtures::engine_buffers<float16> serial_memory(model, batch, capacity), parallel_memory(model, batch, capacity);
  auto serial_view = fill(serial_memory), parallel_view = fill(parallel_memory);
  std::mt19937 rng(9);
  const auto q = gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim);
  const auto work = [&](dense_view<float16>& view, int32_t row) {
    decode_row(view, row, q, decode_accumulation::sum, gqa_reduce::mean);
  };
  for (int32_t t = 0; t < threads; ++t) work(serial_view, t);
  on_threads([&](int32_t t) { work(parallel_view, t); });
  CHECK(parallel_memory.metrics == serial_memory.metrics);
}

TEST_CASE("concurrency: decode attention on distinct rows of one dense cache runs in parallel", "[cpu][concurrency]") {
  const auto fill = [&] {
    dense_cache cache(model, threads, 20);
    for (int64_t row = 0; row < threads; ++row) {
      const sequence_data d = make_data(600 + static_cast<uint32_t>(row), 12, 1, 0);
      paged_fixtures::append_dense(cache, row, iota_positions(0, 12), d.k, d.v);
    }
    return cache;
  };
  auto serial_cache = fill(), parallel_cache = fill();
  std::mt19937 rng(11);
  const auto q = gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim);
  const auto work = [&](dense_cache& cache, int32_t row) {
    decode_row(cache, row, q, decode_accumulation::squared_sum, gqa_reduce::max);
  };
  for (int32_t t = 0; t < threads; ++t) work(serial_cache, t);
  on_threads([&](int32_t t) { work(parallel_cache, t); });
  for (int64_t row = 0; row < threads; ++row) CHECK(fixtures_equal(parallel_cache, serial_cache, row));
}

TEST_CASE("concurrency: an engine serialises mutations with a shared_mutex and decodes under the shared lock",
          "[cpu][concurrency]") {
  // One thread per sequence, one pool for all: appends and compression (which take blocks and
  // return them to the shared pool) under the unique lock; decode attention on the thread's
  // own sequence under the shared lock. Each sequence ends as a serial run leaves it.
  const int32_t prompt = 30, steps = 16;
  const kv_compress_policy kvc = kv_compress({.budget = token_budget::of_tokens(12), .block_size = config.block_size,
                                              .protected_window = 5});
  std::vector<sequence_data> data;
  for (int32_t t = 0; t < threads; ++t) data.push_back(make_data(500 + t, prompt, 8, steps));

  const auto run_sequence = [&](paged_cache<float>& cache, std::shared_mutex& lock, int64_t seq,
                                std::vector<float>& outputs) {
    const sequence_data& d = data[static_cast<size_t>(seq)];
    std::vector<float> out(static_cast<size_t>(model.q_heads) * model.head_dim), scratch;
    {
      std::unique_lock exclusive(lock);
      throw_if_error(cache.add_sequence(seq), "add");
      throw_if_error(cache.append(seq, iota_positions(0, prompt), d.k, d.v), "prefill");
      throw_if_error(cpu::compress(kvc, cache, seq, model, {d.window, d.window_positions}), "compress");
    }
    for (int32_t i = 0; i < steps; ++i) {
      {
        std::unique_lock exclusive(lock);
        throw_if_error(cache.append(seq, iota_positions(prompt + i, 1), d.decode_k[static_cast<size_t>(i)],
                                    d.decode_v[static_cast<size_t>(i)]),
                       "decode append");
      }
      {
        std::shared_lock shared(lock);
        for (int32_t l = 0; l < model.layers; ++l) {
          throw_if_error(cpu::decode_attention(cache, seq, l, model.q_heads, d.decode_q[static_cast<size_t>(i)], out,
                                               kvc.metric.decode(), gqa_reduce::sum, scratch),
                         "decode");
          outputs.insert(outputs.end(), out.begin(), out.end());
        }
      }
      if (i % 4 == 3) {
        std::unique_lock exclusive(lock);
        throw_if_error(cpu::compress(kvc, cache, seq, model, {}), "decode compress");
      }
    }
  };
  auto serial_cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  auto parallel_cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  std::shared_mutex serial_lock, parallel_lock;
  std::vector<std::vector<float>> serial(threads), parallel(threads);
  for (int32_t t = 0; t < threads; ++t) run_sequence(serial_cache, serial_lock, t, serial[static_cast<size_t>(t)]);
  on_threads([&](int32_t t) { run_sequence(parallel_cache, parallel_lock, t, parallel[static_cast<size_t>(t)]); });

  CHECK(cache_invariants::check_tables(parallel_cache.tables()).empty());
  CHECK(parallel_cache.pool() == serial_cache.pool());
  for (int64_t t = 0; t < threads; ++t) {
    CAPTURE(t);
    CHECK(parallel[static_cast<size_t>(t)] == serial[static_cast<size_t>(t)]);
    const std::vector<int64_t> one{t};
    CHECK(paged_fixtures::take_dump(parallel_cache, one) == paged_fixtures::take_dump(serial_cache, one));
    CHECK(parallel_cache.usage(t) == serial_cache.usage(t));
  }
}

// What the contract forbids, so that ThreadSanitizer's verdict on the tests above can be
// trusted: appends to two different sequences of one cache at once race on the shared block
// tables and pool. Hidden (never run by CTest; it is a data race): run it by hand under the
// tsan preset, where it must be reported:
//   build-tsan/tests/concurrency/kvtrim_concurrency_tests "[.race]"
TEST_CASE("concurrency, forbidden: appends to different sequences of one cache at the same time", "[.race]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  for (int64_t seq = 0; seq < 2; ++seq) REQUIRE(cache.add_sequence(seq) == status::success);
  const std::vector<float> kv(static_cast<size_t>(model.layers) * model.kv_heads * model.head_dim, 0.5f);
  std::latch start(2);
  std::vector<std::thread> pool;
  for (int64_t seq = 0; seq < 2; ++seq)
    pool.emplace_back([&, seq] {
      start.arrive_and_wait();
      for (int32_t i = 0; i < 8; ++i) (void)cache.append(seq, iota_positions(i, 1), kv, kv);
    });
  for (std::thread& th : pool) th.join();
}
