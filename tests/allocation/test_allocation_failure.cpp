// Host allocation failure (docs/errors.md, "What is not a status"): the CPU backend and the
// host stores allocate with std::vector, and a failed allocation propagates as std::bad_alloc.
// Here every allocation a call makes is made to fail in turn; each time the call must throw
// std::bad_alloc and leave the store exactly as it was (the strong guarantee), until the call
// makes fewer allocations than the one chosen and must then succeed.
//
// This executable replaces the global operator new: an armed countdown makes the n-th
// allocation from the arming point throw. Disarmed, it is malloc.
#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>
#include <new>
#include <numeric>
#include <random>
#include <span>
#include <tuple>
#include <vector>

#include "cache_invariants.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

namespace {
thread_local int64_t allocations_until_failure = 0;  // 0: disarmed
}  // namespace

// Every form is replaced, so each block is freed by the allocator that made it (ASan checks):
// the throwing forms count down, the nothrow ones (std::stable_sort's buffer) never fail.
// Not inlined: GCC would otherwise see std::free reach memory from operator new and warn
// (-Wmismatched-new-delete), not knowing that this operator new is malloc.
namespace {
void* allocate(std::size_t size, std::size_t alignment) noexcept {
  if (size == 0) size = 1;
  if (alignment <= alignof(std::max_align_t)) return std::malloc(size);
  return std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment);
}
void* allocate_or_throw(std::size_t size, std::size_t alignment) {
  if (allocations_until_failure > 0 && --allocations_until_failure == 0) throw std::bad_alloc();
  if (void* p = allocate(size, alignment)) return p;
  throw std::bad_alloc();
}
}  // namespace

[[gnu::noinline]] void* operator new(std::size_t size) { return allocate_or_throw(size, 0); }
[[gnu::noinline]] void* operator new[](std::size_t size) { return allocate_or_throw(size, 0); }
[[gnu::noinline]] void* operator new(std::size_t size, std::align_val_t a) {
  return allocate_or_throw(size, static_cast<std::size_t>(a));
}
[[gnu::noinline]] void* operator new[](std::size_t size, std::align_val_t a) {
  return allocate_or_throw(size, static_cast<std::size_t>(a));
}
[[gnu::noinline]] void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return allocate(size, 0); }
[[gnu::noinline]] void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return allocate(size, 0); }
[[gnu::noinline]] void* operator new(std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate(size, static_cast<std::size_t>(a));
}
[[gnu::noinline]] void* operator new[](std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate(size, static_cast<std::size_t>(a));
}
[[gnu::noinline]] void operator delete(void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
[[gnu::noinline]] void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

using namespace kvtrim;
using paged_fixtures::gaussian;
using paged_fixtures::iota_positions;

namespace {

const attention_shape model{2, 4, 2, 8};
const paged_cache_config config{model, 4, 128, 3, 40};
const std::vector<int64_t> seqs{0, 1, 2};
constexpr int32_t window = 4;

//! Sequences 0 and 1 with 30 and 21 tokens; every slot metric non-zero (an earlier decode).
paged_cache<float> filled() {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  std::mt19937 rng(7);
  for (const auto& [seq, n] : {std::pair<int64_t, int32_t>{0, 30}, {1, 21}}) {
    throw_if_error(cache.add_sequence(seq));
    const size_t count = static_cast<size_t>(model.layers) * n * model.kv_heads * model.head_dim;
    throw_if_error(cache.append(seq, iota_positions(0, n), gaussian(rng, count), gaussian(rng, count)));
    std::vector<float> scratch, out(static_cast<size_t>(model.q_heads) * model.head_dim);
    for (int32_t l = 0; l < model.layers; ++l)
      throw_if_error(cpu::decode_attention(cache, seq, l, model.q_heads,
                                           gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim), out,
                                           decode_accumulation::sum, gqa_reduce::mean, scratch));
  }
  return cache;
}

//! The window queries of sequence 0: its last `window` positions, every layer.
struct observed {
  std::vector<float> queries;
  std::vector<int32_t> positions = iota_positions(30 - window, window);
  observed() {
    std::mt19937 rng(11);
    queries = gaussian(rng, static_cast<size_t>(model.layers) * window * model.q_heads * model.head_dim);
  }
  [[nodiscard]] cpu::observation get() const { return {queries, positions}; }
};

//! A plan for sequence 0 of `store` that keeps every other slot of each head.
template <class Store>
eviction_plan every_other_slot(const Store& store) {
  eviction_plan plan(model.layers, model.kv_heads);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      const int32_t n = store.head_length(0, l, h);
      std::vector<int32_t> kept;
      for (int32_t j = 0; j < n; j += 2) kept.push_back(j);
      plan.set_head(l, h, n, kept);
    }
  return plan;
}

//! Everything observable of a cache: its tables and every head's contents.
struct cache_state {
  block_tables tables;
  paged_fixtures::dump contents;
  friend bool operator==(const cache_state&, const cache_state&) = default;
};
cache_state state_of(const paged_cache<float>& cache) {
  return {cache.tables(), paged_fixtures::take_dump(cache, seqs)};
}

//! Runs `op(*make())` with its n-th allocation failing, for n = 1, 2, ...: after each failure
//! `observe` must see what it saw before the call; the first n that `op` does not reach must
//! see it succeed. Returns the allocations `op` makes.
template <class Make, class Op, class Observe>
int64_t check_every_allocation_failing(Make&& make, Op&& op, Observe&& observe) {
  for (int64_t n = 1; n < 100000; ++n) {
    auto fixture = make();
    const auto before = observe(*fixture);
    status result = status::success;
    bool failed = false;
    allocations_until_failure = n;
    try {
      result = op(*fixture);
    } catch (const std::bad_alloc&) {
      failed = true;
    }
    allocations_until_failure = 0;
    CAPTURE(n);
    if (!failed) {
      CHECK(to_string(result) == to_string(status::success));
      return n - 1;
    }
    CHECK((observe(*fixture) == before));
  }
  FAIL("the call never finished");
  return 0;
}

//! The same on a filled() cache as created, and on a copy of one, whose free list and journal
//! hold only what they held: a call must make its room before it changes anything. The
//! tables must stay valid. Returns the allocations `op` makes on the cache as created.
template <class Op>
int64_t check_every_allocation_failing(Op&& op) {
  const auto observe = [](const paged_cache<float>& c) {
    CHECK(cache_invariants::check_tables(c.tables()).empty());
    return state_of(c);
  };
  const int64_t allocations =
      check_every_allocation_failing([] { return std::make_unique<paged_cache<float>>(filled()); }, op, observe);
  const paged_cache<float> original = filled();
  check_every_allocation_failing([&] { return std::make_unique<paged_cache<float>>(original); }, op, observe);
  return allocations;
}

}  // namespace

TEST_CASE("allocation failure: paged cache appends, adds, frees and plans change nothing", "[cpu][allocation]") {
  std::mt19937 rng(3);
  const auto k = gaussian(rng, static_cast<size_t>(model.layers) * 9 * model.kv_heads * model.head_dim);
  const auto v = gaussian(rng, k.size());
  SECTION("append a prefill chunk") {
    check_every_allocation_failing([&](paged_cache<float>& c) { return c.append(1, iota_positions(21, 9), k, v); });
  }
  SECTION("add a sequence") {
    check_every_allocation_failing([](paged_cache<float>& c) { return c.add_sequence(2); });
  }
  SECTION("free a sequence") {
    check_every_allocation_failing([](paged_cache<float>& c) { return c.free_sequence(0); });
  }
  SECTION("apply a plan that keeps every other slot") {
    check_every_allocation_failing([](paged_cache<float>& c) { return c.apply(0, every_other_slot(c)); });
  }
  SECTION("append a decode token to one layer of both sequences") {
    const std::vector<int32_t> positions{30, 21};
    const auto kb = gaussian(rng, static_cast<size_t>(2) * model.kv_heads * model.head_dim);
    check_every_allocation_failing(
        [&](paged_cache<float>& c) { return c.append_layer(std::vector<int64_t>{0, 1}, 1, positions, kb, kb); });
  }
  SECTION("truncate both sequences") {
    const std::vector<int32_t> lengths(2 * 4, 3);
    check_every_allocation_failing(
        [&](paged_cache<float>& c) { return c.truncate(std::vector<int64_t>{0, 1}, lengths); });
  }
}

TEST_CASE("allocation failure: truncate of a cache as created allocates nothing", "[cpu][allocation]") {
  // What cuda::compress relies on: its commit runs after the device compacted.
  paged_cache<float> cache = filled();
  const std::vector<int64_t> both{0, 1};
  // Shrinks every head of both sequences: 8 freed runs, which only the runs reserved when the
  // cache was created hold (the appends before journaled none).
  const std::vector<int32_t> lengths(8, 1);
  status s = status::invalid_argument;
  bool threw = false;
  allocations_until_failure = 1;  // the first allocation throws (armed outside Catch's macros, which allocate)
  try {
    s = cache.truncate(both, lengths);
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  allocations_until_failure = 0;
  CHECK_FALSE(threw);
  CHECK(to_string(s) == to_string(status::success));
  CHECK(cache.head_length(1, 1, 1) == 1);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEMPLATE_TEST_CASE("allocation failure: compressing with a preset changes nothing", "[cpu][allocation]",
                   streaming_llm_policy, h2o_policy, snapkv_policy, pyramidkv_policy, ada_snapkv_policy,
                   kv_compress_policy) {
  const token_budget budget = token_budget::of_tokens(12);
  TestType policy;
  if constexpr (std::is_same_v<TestType, streaming_llm_policy>) policy = streaming_llm({.budget = budget, .sinks = 2});
  if constexpr (std::is_same_v<TestType, h2o_policy>) policy = h2o({.budget = budget, .recent = window});
  if constexpr (std::is_same_v<TestType, snapkv_policy>) policy = snapkv({.budget = budget, .window = window});
  if constexpr (std::is_same_v<TestType, pyramidkv_policy>) policy = pyramidkv({.budget = budget, .window = window});
  if constexpr (std::is_same_v<TestType, ada_snapkv_policy>) policy = ada_kv({.budget = budget, .window = window});
  if constexpr (std::is_same_v<TestType, kv_compress_policy>)
    policy = kv_compress({.budget = budget, .block_size = 4, .protected_window = window});
  const observed obs;
  const int64_t allocations = check_every_allocation_failing(
      [&](paged_cache<float>& c) { return cpu::compress(policy, c, 0, model, obs.get()); });
  CHECK(allocations > 0);  // the call allocates: the failures above were provoked
}

namespace {

//! Head 0 of layer 1 of sequence 0 (30 tokens) keeps its first 10 slots, the others all: a
//! layer whose second head needs more decode scratch than its first.
eviction_plan uneven_plan() {
  eviction_plan plan(model.layers, model.kv_heads);
  std::vector<int32_t> all(30), first_ten(10);
  std::iota(all.begin(), all.end(), 0);
  std::iota(first_ten.begin(), first_ten.end(), 0);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) plan.set_head(l, h, 30, l == 1 && h == 0 ? first_ten : all);
  return plan;
}

//! A dense view over an engine's buffers, with sequence 0's 30 tokens after uneven_plan().
struct view_fixture {
  paged_fixtures::engine_buffers<float> buffers{model, 1, 40};
  std::vector<dense_layer<float>> layers = buffers.layers();
  dense_view<float> view;
  view_fixture() {
    throw_if_error(dense_view<float>::create(model, 1, 40, layers, view));
    std::mt19937 rng(7);
    const size_t count = static_cast<size_t>(model.layers) * 30 * model.kv_heads * model.head_dim;
    throw_if_error(view.append(0, iota_positions(0, 30), gaussian(rng, count), gaussian(rng, count)));
    throw_if_error(view.apply(0, uneven_plan()));
  }
};

//! A dense cache with sequence 0's 30 tokens after uneven_plan().
std::unique_ptr<dense_cache> uneven_dense_cache() {
  auto cache = std::make_unique<dense_cache>(model, 1, 40);
  std::mt19937 rng(7);
  const auto count = static_cast<size_t>(model.layers) * 30 * model.kv_heads * model.head_dim;
  paged_fixtures::append_dense(*cache, 0, iota_positions(0, 30), gaussian(rng, count), gaussian(rng, count));
  throw_if_error(cache->apply(0, uneven_plan()));
  return cache;
}

const std::vector<int64_t> first_row{0};

//! Sequence 0 of a dense cache: every head's positions, keys, values and metrics in slot order.
std::vector<float> contents_of(const dense_cache& c) {
  std::vector<float> out;
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      for (const int32_t p : c.positions(0, l, h)) out.push_back(static_cast<float>(p));
      for (const auto part : {c.keys(0, l, h), c.values(0, l, h), c.metrics(0, l, h)})
        out.insert(out.end(), part.begin(), part.end());
    }
  return out;
}

}  // namespace

// Each store's decode attention on a layer whose second head is longer than its first, with a
// fresh scratch each time, so the call allocates.
TEST_CASE("allocation failure: decode attention with accumulation changes no metric", "[cpu][allocation]") {
  std::mt19937 rng(5);
  const auto q = gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim);
  const auto acc = GENERATE(decode_accumulation::sum, decode_accumulation::squared_sum);
  const auto attend = [&](auto& store) {
    std::vector<float> scratch, out(q.size());
    return cpu::decode_attention(store, 0, 1, model.q_heads, q, out, acc, gqa_reduce::mean, scratch);
  };
  int64_t allocations = 0;
  SECTION("paged cache") {
    allocations = check_every_allocation_failing(
        [] {
          auto cache = std::make_unique<paged_cache<float>>(filled());
          throw_if_error(cache->apply(0, uneven_plan()));
          return cache;
        },
        attend, [](const paged_cache<float>& c) { return state_of(c); });
  }
  SECTION("dense view") {
    allocations = check_every_allocation_failing(
        [] { return std::make_unique<view_fixture>(); }, [&](view_fixture& f) { return attend(f.view); },
        [](const view_fixture& f) { return paged_fixtures::take_dump(f.view, first_row); });
  }
  SECTION("dense cache") {
    allocations = check_every_allocation_failing(
        uneven_dense_cache, attend, contents_of);
  }
  CHECK(allocations > 0);
}

namespace {

//! A session over a filled() cache whose sequence 2 holds 30 appended tokens.
template <class P>
struct session_fixture {
  paged_cache<float> cache = filled();
  compression_session<P, paged_cache<float>> session;

  explicit session_fixture(const P& policy) : session(cache, model, policy) {
    throw_if_error(session.add_sequence(2));
    std::mt19937 rng(9);
    const auto k = gaussian(rng, static_cast<size_t>(model.layers) * 30 * model.kv_heads * model.head_dim);
    throw_if_error(session.append(2, iota_positions(0, 30), k, k));
  }
};

template <class P>
auto observe_session(const session_fixture<P>& f) {
  return std::pair{state_of(f.cache), f.session.decode_steps(2)};
}

}  // namespace

TEST_CASE("allocation failure: a compression session's prefill and scheduled compression change nothing",
          "[cpu][allocation]") {
  const observed window_queries;
  const cpu::observation obs = window_queries.get();
  SECTION("add_sequence (SnapKV)") {
    const snapkv_policy policy = snapkv({.budget = token_budget::of_tokens(12), .window = window});
    check_every_allocation_failing(
        [&] {
          auto f = std::make_unique<session_fixture<snapkv_policy>>(policy);
          throw_if_error(f->cache.free_sequence(1));  // a free row for the session's new sequence
          return f;
        },
        [](session_fixture<snapkv_policy>& f) { return f.session.add_sequence(1); },
        [](const session_fixture<snapkv_policy>& f) {
          return std::pair{state_of(f.cache), f.session.contains(1)};
        });
  }
  SECTION("finish_prefill (SnapKV)") {
    const snapkv_policy policy = snapkv({.budget = token_budget::of_tokens(12), .window = window});
    const int64_t allocations = check_every_allocation_failing(
        [&] { return std::make_unique<session_fixture<snapkv_policy>>(policy); },
        [&](session_fixture<snapkv_policy>& f) { return f.session.finish_prefill(2, obs); },
        observe_session<snapkv_policy>);
    CHECK(allocations > 0);
  }
  SECTION("end_decode_step compressing on schedule (H2O)") {
    const h2o_policy policy = h2o({.budget = token_budget::of_tokens(12), .recent = window});
    const int64_t allocations = check_every_allocation_failing(
        [&] { return std::make_unique<session_fixture<h2o_policy>>(policy); },
        [](session_fixture<h2o_policy>& f) {
          bool compressed = false;
          const status s = f.session.end_decode_step(2, compressed);
          return s == status::success && !compressed ? status::invalid_plan : s;  // it must compress
        },
        observe_session<h2o_policy>);
    CHECK(allocations > 0);
  }
}

TEST_CASE("allocation failure: a dense view's compression and plans change nothing", "[cpu][allocation]") {
  const auto observe = [](const view_fixture& f) { return paged_fixtures::take_dump(f.view, first_row); };
  SECTION("compress (SnapKV)") {
    const snapkv_policy policy = snapkv({.budget = token_budget::of_tokens(8), .window = window});
    const observed obs;
    const int64_t allocations = check_every_allocation_failing(
        [] { return std::make_unique<view_fixture>(); },
        [&](view_fixture& f) { return cpu::compress(policy, f.view, 0, model, obs.get()); }, observe);
    CHECK(allocations > 0);
  }
  SECTION("apply a plan that keeps every other slot") {
    check_every_allocation_failing(
        [] { return std::make_unique<view_fixture>(); },
        [](view_fixture& f) { return f.view.apply(0, every_other_slot(f.view)); }, observe);
  }
}

TEST_CASE("allocation failure: a dense cache's compression and plans change nothing", "[cpu][allocation]") {
  SECTION("compress (SnapKV)") {
    const snapkv_policy policy = snapkv({.budget = token_budget::of_tokens(8), .window = window});
    const observed obs;
    const int64_t allocations = check_every_allocation_failing(
        uneven_dense_cache, [&](dense_cache& c) { return cpu::compress(policy, c, 0, model, obs.get()); },
        contents_of);
    CHECK(allocations > 0);
  }
  SECTION("apply a plan that keeps every other slot") {
    check_every_allocation_failing(
        uneven_dense_cache, [](dense_cache& c) { return c.apply(0, every_other_slot(c)); }, contents_of);
  }
}

namespace {

//! A device cache over host memory standing in for device buffers (the host mover), with
//! sequences 0 and 1 of 30 and 21 tokens.
struct device_fixture {
  paged_fixtures::device_memory<float> memory{config};
  device_paged_cache<float> cache;
  device_fixture() {
    throw_if_error(device_paged_cache<float>::create(config, device_storage<float>{memory.buffers(), host_mover{}}, cache));
    std::mt19937 rng(7);
    for (const auto& [seq, n] : {std::pair<int64_t, int32_t>{0, 30}, {1, 21}}) {
      throw_if_error(cache.add_sequence(seq));
      const size_t count = static_cast<size_t>(model.layers) * n * model.kv_heads * model.head_dim;
      throw_if_error(cache.append(seq, iota_positions(0, n), gaussian(rng, count), gaussian(rng, count)));
    }
  }
};

//! The host tables, every head's contents and the device buffers (pool and table mirror).
auto observe_device(const device_fixture& f) {
  return std::tuple{f.cache.tables(), paged_fixtures::take_dump(f.cache, seqs), f.memory.keys, f.memory.values,
                    f.memory.positions, f.memory.metrics, f.memory.tables, f.memory.lengths};
}

}  // namespace

TEST_CASE("allocation failure: a device cache (host mover) changes nothing, mirror included", "[cpu][allocation]") {
  const auto make = [] { return std::make_unique<device_fixture>(); };
  SECTION("append a prefill chunk") {
    std::mt19937 rng(3);
    const auto k = gaussian(rng, static_cast<size_t>(model.layers) * 9 * model.kv_heads * model.head_dim);
    check_every_allocation_failing(
        make, [&](device_fixture& f) { return f.cache.append(1, iota_positions(21, 9), k, k); }, observe_device);
  }
  SECTION("apply a plan (KV-Compress's, planned on the host), through the mover") {
    const kv_compress_policy policy =
        kv_compress({.budget = token_budget::of_tokens(12), .block_size = 4, .protected_window = window});
    cpu::compression_result planned;
    {
      const device_fixture f;
      REQUIRE(cpu::plan(policy, f.cache, 0, model, {}, 0, model.layers, planned) == status::success);
    }
    const int64_t allocations = check_every_allocation_failing(
        make, [&](device_fixture& f) { return f.cache.apply(0, planned.plan); }, observe_device);
    CHECK(allocations > 0);
  }
  SECTION("free a sequence") {
    check_every_allocation_failing(make, [](device_fixture& f) { return f.cache.free_sequence(0); }, observe_device);
  }
}
