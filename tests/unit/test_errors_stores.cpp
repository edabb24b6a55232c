// docs/errors.md, store and backend rows not covered elsewhere: the dense cache, the block
// tables with failing data steps, the device cache with a failing mover, the paged cache's
// queries of unknown heads, cpu::plan, compress_layer, rerotate and attend_head.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "cache_invariants.hpp"
#include "fixtures.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;
using paged_fixtures::iota_positions;

namespace {
const attention_shape model{2, 4, 2, 8};
const paged_cache_config config{model, 4, 32, 2, 24};
constexpr int32_t max_i = std::numeric_limits<int32_t>::max();

//! Checks that `op` fails with `expected` and leaves the dense cache as it was.
template <class Op>
void expect_unchanged(dense_cache& cache, status expected, Op&& op) {
  const auto before = fixtures::take_snapshot(cache);
  const status s = op();
  CAPTURE(to_string(s));
  CHECK(s == expected);
  CHECK(fixtures::take_snapshot(cache) == before);
}

paged_cache<float> filled_paged(int32_t n = 10) {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  std::mt19937 rng(3);
  throw_if_error(cache.add_sequence(0));
  const size_t count = static_cast<size_t>(model.layers) * n * model.kv_heads * model.head_dim;
  throw_if_error(cache.append(0, iota_positions(0, n), paged_fixtures::gaussian(rng, count),
                              paged_fixtures::gaussian(rng, count)));
  return cache;
}

//! A mover that runs every step on the host but fails the step `*fail` names with
//! cuda_error: 1 write_tokens, 2 write_metrics, 3 move_slots, 4 write_metadata, 5 write_head.
struct failing_mover : host_mover {
  const int* fail = nullptr;
  [[nodiscard]] bool fails(int step) const noexcept { return fail != nullptr && *fail == step; }
  template <class P>
  [[nodiscard]] status write_tokens(const P& p) const noexcept {
    return fails(1) ? status::cuda_error : host_mover::write_tokens(p);
  }
  [[nodiscard]] status write_metrics(const metric_write_params& p) const noexcept {
    return fails(2) ? status::cuda_error : host_mover::write_metrics(p);
  }
  template <class P>
  [[nodiscard]] status move_slots(const P& p) const noexcept {
    return fails(3) ? status::cuda_error : host_mover::move_slots(p);
  }
  [[nodiscard]] status write_metadata(const metadata_params& p) const noexcept {
    return fails(4) ? status::cuda_error : host_mover::write_metadata(p);
  }
  template <class P>
  [[nodiscard]] status write_head(const P& p) const noexcept {
    return fails(5) ? status::cuda_error : host_mover::write_head(p);
  }
};
static_assert(slot_mover<failing_mover, float>);
using failing_cache = device_paged_cache<float, dynamic_head_dim, failing_mover>;

//! A device cache over host memory whose mover fails when `fail` says so; sequence 0 holds 6 tokens.
failing_cache make_failing(paged_fixtures::device_memory<float>& memory, const int& fail) {
  failing_mover mover;
  mover.fail = &fail;
  failing_cache cache;
  throw_if_error(failing_cache::create(config, device_storage<float, failing_mover>{memory.buffers(), mover}, cache));
  throw_if_error(cache.add_sequence(0));
  const std::vector<float> kv(static_cast<size_t>(model.layers) * 6 * model.kv_heads * model.head_dim, 0.5f);
  throw_if_error(cache.append(0, iota_positions(0, 6), kv, kv));
  return cache;
}

//! Keeps slots 1 and 4 of every head of 6 (one move: 4 -> 0), with metrics or not.
eviction_plan keep_two(bool metrics) {
  eviction_plan plan(model.layers, model.kv_heads);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) plan.set_head(l, h, 6, std::vector<int32_t>{1, 4});
  if (metrics) plan.metrics = ragged_rows(model.layers, model.kv_heads, std::vector<int32_t>(4, 6));
  return plan;
}
}  // namespace

// ---- dense_cache

TEST_CASE("errors: dense_cache::append to an unknown row, a bad layer or a negative position", "[cpu][errors]") {
  dense_cache cache(model, 2, 4);
  const std::vector<float> kv(16, 1.f);
  expect_unchanged(cache, status::unknown_sequence, [&] { return cache.append(2, 0, 0, kv, kv); });
  expect_unchanged(cache, status::unknown_sequence, [&] { return cache.append(-1, 0, 0, kv, kv); });
  expect_unchanged(cache, status::invalid_argument, [&] { return cache.append(0, 2, 0, kv, kv); });
  expect_unchanged(cache, status::invalid_argument, [&] { return cache.append(0, -1, 0, kv, kv); });
  expect_unchanged(cache, status::invalid_argument, [&] { return cache.append(0, 0, -1, kv, kv); });
  expect_unchanged(cache, status::invalid_argument, [&] { return cache.append(0, 0, max_i, kv, kv); });
}

TEST_CASE("errors: dense_cache::append of K/V of the wrong size", "[cpu][errors]") {
  dense_cache cache(model, 1, 4);
  const std::vector<float> kv(16, 1.f), short_kv(15, 1.f);
  expect_unchanged(cache, status::shape_mismatch, [&] { return cache.append(0, 0, 0, short_kv, kv); });
  expect_unchanged(cache, status::shape_mismatch, [&] { return cache.append(0, 0, 0, kv, short_kv); });
}

TEST_CASE("errors: dense_cache::append to a full head", "[cpu][errors]") {
  dense_cache cache(model, 1, 2);
  const std::vector<float> kv(16, 1.f);
  REQUIRE(cache.append(0, 0, 0, kv, kv) == status::success);
  REQUIRE(cache.append(0, 0, 1, kv, kv) == status::success);
  expect_unchanged(cache, status::pool_exhausted, [&] { return cache.append(0, 0, 2, kv, kv); });
  dense_cache none(model, 1, 0);  // a capacity of 0 holds nothing
  CHECK(none.append(0, 0, 0, kv, kv) == status::pool_exhausted);
  dense_cache no_rows(model, 0, 4);  // a batch of 0 has no sequences
  CHECK_FALSE(no_rows.contains(0));
}

TEST_CASE("errors: dense_cache::clear of an unknown row", "[cpu][errors]") {
  dense_cache cache(model, 1, 2);
  expect_unchanged(cache, status::unknown_sequence, [&] { return cache.clear(1); });
}

TEST_CASE("errors: dense_cache::read_head of an unknown row, a bad head or outputs of the wrong size", "[cpu][errors]") {
  auto f = fixtures::make_cache(model, 5, 0);
  std::vector<int32_t> p(5);
  std::vector<float> k(40), m(5), k_short(39);
  REQUIRE(f.cache.read_head(0, 1, 1, p, k, m) == status::success);
  CHECK(f.cache.read_head(1, 0, 0, p, k, m) == status::unknown_sequence);
  CHECK(f.cache.read_head(0, 2, 0, p, k, m) == status::invalid_argument);
  CHECK(f.cache.read_head(0, 0, -1, p, k, m) == status::invalid_argument);
  CHECK(f.cache.read_head(0, 0, 0, p, k_short, m) == status::shape_mismatch);
}

TEST_CASE("errors: dense_cache::rewrite_head of an unknown row, a bad head, wrong sizes or a bad position",
          "[cpu][errors]") {
  auto f = fixtures::make_cache(model, 5, 0);
  std::vector<int32_t> p{4, 3, 2, 1, 0};
  const std::vector<float> k(40, 0.5f), k_short(39, 0.5f);
  expect_unchanged(f.cache, status::unknown_sequence, [&] { return f.cache.rewrite_head(1, 0, 0, p, k); });
  expect_unchanged(f.cache, status::invalid_argument, [&] { return f.cache.rewrite_head(0, 0, 2, p, k); });
  expect_unchanged(f.cache, status::shape_mismatch, [&] { return f.cache.rewrite_head(0, 0, 0, p, k_short); });
  p[2] = -1;
  expect_unchanged(f.cache, status::invalid_argument, [&] { return f.cache.rewrite_head(0, 0, 0, p, k); });
  p[2] = max_i;
  expect_unchanged(f.cache, status::invalid_argument, [&] { return f.cache.rewrite_head(0, 0, 0, p, k); });
}

TEST_CASE("errors: dense_cache::apply to an unknown row", "[cpu][errors]") {
  auto f = fixtures::make_cache(model, 5, 0);
  const eviction_plan plan(model.layers, model.kv_heads);
  expect_unchanged(f.cache, status::unknown_sequence, [&] { return f.cache.apply(3, plan); });
}

// ---- positions at the int32 limit, in every store

TEST_CASE("errors: stores refuse the position 2^31 - 1", "[cpu][errors]") {
  auto paged = filled_paged();
  const std::vector<int32_t> last{max_i};
  const std::vector<float> kv(static_cast<size_t>(model.layers) * model.kv_heads * model.head_dim, 1.f);
  const paged_cache<float> before = paged;
  CHECK(paged.append(0, last, kv, kv) == status::invalid_argument);
  CHECK(paged.append_layer(0, 0, last, std::span<const float>(kv).first(16), std::span<const float>(kv).first(16)) ==
        status::invalid_argument);
  std::vector<int32_t> p = iota_positions(0, 10);
  p[9] = max_i;
  CHECK(paged.rewrite_head(0, 0, 0, p, std::vector<float>(80, 0.f)) == status::invalid_argument);
  CHECK(paged.tables() == before.tables());
  const std::vector<int64_t> seqs{0};
  CHECK(paged_fixtures::take_dump(paged, seqs) == paged_fixtures::take_dump(before, seqs));

  paged_fixtures::engine_buffers<float> memory(model, 1, 4);
  const auto layers = memory.layers();
  dense_view<float> view;
  REQUIRE(dense_view<float>::create(model, 1, 4, layers, view) == status::success);
  CHECK(view.append(0, last, kv, kv) == status::invalid_argument);
  CHECK(view.head_length(0, 0, 0) == 0);
  // The largest accepted position works, and "one past" it is still an int32.
  const std::vector<int32_t> largest{max_i - 1};
  REQUIRE(paged.append(0, largest, kv, kv) == status::success);
  head_candidates c;
  std::vector<int32_t> positions(11);
  std::vector<float> keys(88), metric(11);
  REQUIRE(paged.read_head(0, 0, 0, positions, keys, metric) == status::success);
  CHECK(rank_head(metric, positions, {.recent = 1}, c) == status::success);
  CHECK(c.next_position == max_i);
}

TEST_CASE("errors: decode attention on a dense view with a bad layer or query heads that do not group, and its lengths",
          "[cpu][errors]") {
  paged_fixtures::engine_buffers<float> memory(model, 1, 4);
  const auto layers = memory.layers();
  dense_view<float> view;
  REQUIRE(dense_view<float>::create(model, 1, 4, layers, view) == status::success);
  const std::vector<float> kv(static_cast<size_t>(model.layers) * model.kv_heads * model.head_dim, 1.f);
  REQUIRE(view.append(0, iota_positions(0, 1), kv, kv) == status::success);
  std::vector<float> q(32, 0.1f), out(32, -1.f), scratch;
  const auto attend = [&](int32_t layer, int32_t q_heads) {
    return cpu::decode_attention(view, 0, layer, q_heads, std::span<const float>(q).first(static_cast<size_t>(q_heads > 0 ? q_heads : 0) * 8),
                                 std::span<float>(out).first(static_cast<size_t>(q_heads > 0 ? q_heads : 0) * 8),
                                 decode_accumulation::sum, gqa_reduce::mean, scratch);
  };
  CHECK(attend(2, 4) == status::invalid_argument);
  CHECK(attend(-1, 4) == status::invalid_argument);
  CHECK(attend(0, 3) == status::invalid_group);
  CHECK(attend(0, 1) == status::invalid_group);  // fewer query heads than KV heads
  CHECK(attend(0, 0) == status::invalid_group);
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == -1.f; }));
  CHECK(memory.metrics[0][0] == 0.f);
  CHECK(view.head_length(1, 0, 0) == 0);  // unknown row
  CHECK(view.head_length(0, 2, 0) == 0);  // unknown layer
  CHECK(view.head_length(0, 0, -1) == 0);
  std::vector<int32_t> p{max_i};
  CHECK(view.rewrite_head(0, 0, 0, p, std::vector<float>(8, 0.f)) == status::invalid_argument);
  CHECK(view.positions(0, 0, 0)[0] == 0);
}

// ---- block_tables and the data steps

TEST_CASE("errors: block_tables::create refuses a bad config or a negative block cost", "[cpu][errors]") {
  block_tables t;
  auto c = config;
  c.num_blocks = 0;
  CHECK(block_tables::create(c, 64, t) == status::invalid_argument);
  CHECK(block_tables::create(config, -1, t) == status::invalid_argument);
  CHECK(t.pool().capacity() == 0);  // untouched
  REQUIRE(block_tables::create(config, 64, t) == status::success);
  CHECK(t.pool().capacity() == config.num_blocks);
}

TEST_CASE("errors: block_tables::append refuses a bad layer range, no tokens or slots of the wrong size", "[cpu][errors]") {
  block_tables t;
  REQUIRE(block_tables::create(config, 64, t) == status::success);
  REQUIRE(t.add_sequence(0) == status::success);
  std::vector<int64_t> slots(static_cast<size_t>(model.kv_heads) * 2);  // [1 layer][2 tokens][H]
  const auto ok = [] { return status::success; };
  const block_tables before = t;
  CHECK(t.append(1, 0, 1, 2, slots, ok) == status::unknown_sequence);
  CHECK(t.append(0, -1, 1, 2, slots, ok) == status::invalid_argument);
  CHECK(t.append(0, 1, 2, 2, slots, ok) == status::invalid_argument);  // layers 1..2 of 2
  CHECK(t.append(0, 0, 0, 2, slots, ok) == status::invalid_argument);
  CHECK(t.append(0, 0, 1, 0, slots, ok) == status::invalid_argument);
  CHECK(t.append(0, 0, 1, 3, slots, ok) == status::shape_mismatch);
  CHECK(t.append(0, 0, max_i, 2, slots, ok) == status::invalid_argument);  // no overflow in first + layers
  CHECK(t == before);
}

TEST_CASE("errors: a failing data step of block_tables::append or apply changes nothing", "[cpu][errors]") {
  block_tables t;
  REQUIRE(block_tables::create(config, 64, t) == status::success);
  REQUIRE(t.add_sequence(0) == status::success);
  std::vector<int64_t> slots(static_cast<size_t>(model.layers) * 5 * model.kv_heads);
  REQUIRE(t.append(0, 0, model.layers, 5, slots, [] { return status::success; }) == status::success);
  t.clear_journal();
  const block_tables before = t;
  CHECK(t.append(0, 0, model.layers, 5, slots, [] { return status::cuda_error; }) == status::cuda_error);
  eviction_plan plan(model.layers, model.kv_heads);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) plan.set_head(l, h, 5, std::vector<int32_t>{1, 4});
  compaction_steps steps;
  CHECK(t.apply(0, plan, steps, [](const compaction_steps&) { return status::not_supported; }) == status::not_supported);
  CHECK(t == before);
  CHECK(t.table_writes().empty());
  CHECK(t.length_writes().empty());
  CHECK(cache_invariants::check_tables(t).empty());
}

TEST_CASE("errors: a paged cache whose mover fails a data step changes nothing", "[cpu][errors]") {
  for (const int step : {1, 2, 3, 5}) {
    CAPTURE(step);
    int fail = 0;
    paged_fixtures::device_memory<float> memory(config);
    failing_cache cache = make_failing(memory, fail);
    const block_tables before = cache.tables();
    const std::vector<int32_t> mirror = memory.tables, lengths = memory.lengths;
    const std::vector<int64_t> seqs{0};
    const auto dump = paged_fixtures::take_dump(cache, seqs);
    fail = step;
    const std::vector<float> kv(static_cast<size_t>(model.layers) * model.kv_heads * model.head_dim, 0.25f);
    status got = status::success;
    if (step == 1) got = cache.append(0, iota_positions(6, 1), kv, kv);
    if (step == 2) got = cache.apply(0, keep_two(true));
    if (step == 3) got = cache.apply(0, keep_two(false));
    if (step == 5) got = cache.rewrite_head(0, 0, 0, iota_positions(10, 6), std::vector<float>(48, 0.f));
    CHECK(got == status::cuda_error);
    fail = 0;
    CHECK(cache.tables() == before);
    CHECK(memory.tables == mirror);
    CHECK(memory.lengths == lengths);
    CHECK(paged_fixtures::take_dump(cache, seqs) == dump);
  }
}

TEST_CASE("errors: a device cache whose mirror update fails reports it after the host tables changed", "[cpu][errors]") {
  // Documented behaviour: the mirror is written after the host tables commit; when that write
  // fails (cuda_error) the mirror no longer matches and the cache must be recreated.
  int fail = 0;
  paged_fixtures::device_memory<float> memory(config);
  failing_cache cache = make_failing(memory, fail);
  const block_tables before = cache.tables();
  fail = 4;
  const std::vector<float> kv(static_cast<size_t>(model.layers) * model.kv_heads * model.head_dim, 0.25f);
  CHECK(cache.append(0, iota_positions(6, 1), kv, kv) == status::cuda_error);
  CHECK_FALSE(cache.tables() == before);
  CHECK_FALSE(cache_invariants::check_mirror(cache.tables(), memory.tables, memory.lengths).empty());
  CHECK(cache.tables().length_writes().empty());  // the journal is cleared either way
}

// ---- queries of unknown sequences and heads

TEST_CASE("errors: paged cache queries of an unknown sequence or head give zeros", "[cpu][errors]") {
  const auto cache = filled_paged();
  CHECK(cache.head_length(5, 0, 0) == 0);
  CHECK(cache.head_length(0, 2, 0) == 0);
  CHECK(cache.head_length(0, 0, -1) == 0);
  CHECK(cache.head_blocks(5, 0, 0).empty());
  CHECK(cache.head_blocks(0, 0, 2).empty());
  CHECK(cache.usage(5) == memory_usage{});
  CHECK(cache.usage(0, 2) == memory_usage{});
  CHECK(cache.usage(0, 0, 9) == memory_usage{});
  CHECK_FALSE(cache.contains(-1));
  const paged_cache<float> empty;  // default-constructed: no shape, no sequences
  CHECK_FALSE(empty.contains(0));
  CHECK(empty.pool().total_blocks == 0);
}

// ---- cpu backend entry points

TEST_CASE("errors: cpu::plan refuses a layer range outside the model and leaves its output alone", "[cpu][errors]") {
  auto f = fixtures::make_cache(model, 16, 4);
  const auto p = snapkv({.budget = token_budget::of_tokens(8), .window = 4});
  cpu::compression_result out;
  for (const auto& [first, count] : std::vector<std::pair<int32_t, int32_t>>{{-1, 1}, {0, 0}, {1, 2}, {2, 1}, {0, -1}, {1, max_i}}) {
    CAPTURE(first, count);
    CHECK(cpu::plan(p, f.cache, 0, model, f.observation(), first, count, out) == status::invalid_argument);
  }
  CHECK(out.plan.layers() == 0);
  CHECK(out.select.empty());
  REQUIRE(cpu::plan(p, f.cache, 0, model, f.observation(), 1, 1, out) == status::success);
  CHECK(out.plan.kept_count(0, 0) == 16);  // layers outside the range keep everything
  CHECK(out.plan.kept_count(1, 0) == 8);
}

TEST_CASE("errors: cpu::compress_layer refuses a layer out of range or queries of the wrong size", "[cpu][errors]") {
  auto f = fixtures::make_cache(model, 16, 4);
  const auto p = snapkv({.budget = token_budget::of_tokens(8), .window = 4});
  const std::vector<float> queries(static_cast<size_t>(4) * model.q_heads * model.head_dim, 0.5f);
  const auto positions = iota_positions(12, 4);
  const auto before = fixtures::take_snapshot(f.cache);
  CHECK(cpu::compress_layer(p, f.cache, 0, model, 2, queries, positions) == status::invalid_argument);
  CHECK(cpu::compress_layer(p, f.cache, 0, model, -1, queries, positions) == status::invalid_argument);
  CHECK(cpu::compress_layer(p, f.cache, 0, model, 0, std::span<const float>(queries).first(31), positions) ==
        status::shape_mismatch);
  CHECK(cpu::compress_layer(p, f.cache, 5, model, 0, queries, positions) == status::unknown_sequence);
  CHECK(fixtures::take_snapshot(f.cache) == before);
}

TEST_CASE("errors: cpu::rerotate refuses a bad RoPE or an unknown sequence", "[cpu][errors]") {
  auto f = fixtures::make_cache(model, 6, 0);
  const auto before = fixtures::take_snapshot(f.cache);
  CHECK(cpu::rerotate(f.cache, 0, {.theta = 0.f}) == status::invalid_argument);
  CHECK(cpu::rerotate(f.cache, 0, {.theta = std::numeric_limits<float>::quiet_NaN()}) == status::invalid_argument);
  CHECK(cpu::rerotate(f.cache, 1, {}) == status::unknown_sequence);
  auto odd = fixtures::make_cache({2, 4, 2, 7}, 6, 0);
  CHECK(cpu::rerotate(odd.cache, 0, {}) == status::invalid_argument);
  CHECK(fixtures::take_snapshot(f.cache) == before);
}

TEST_CASE("errors: cpu::attend_head refuses buffers of the wrong size", "[cpu][errors]") {
  const std::vector<float> q(16, 0.5f), keys(24, 0.25f), values(24, 0.25f), q_short(15, 0.5f), k_odd(23, 0.f);
  std::vector<float> out(16, -1.f), metric(3, 0.f), metric_short(2, 0.f), scratch;
  const auto attend = [&](std::span<const float> qq, int32_t group, int32_t d, std::span<const float> k,
                          std::span<const float> v, std::span<float> o, decode_accumulation acc, std::span<float> m) {
    return cpu::attend_head(qq, group, d, k, v, o, acc, gqa_reduce::mean, m, scratch);
  };
  REQUIRE(attend(q, 2, 8, keys, values, out, decode_accumulation::sum, metric) == status::success);
  std::fill(out.begin(), out.end(), -1.f);
  std::fill(metric.begin(), metric.end(), 0.f);
  CHECK(attend(q, 0, 8, keys, values, out, decode_accumulation::none, {}) == status::shape_mismatch);
  CHECK(attend(q, 2, 0, keys, values, out, decode_accumulation::none, {}) == status::shape_mismatch);
  CHECK(attend(q_short, 2, 8, keys, values, out, decode_accumulation::none, {}) == status::shape_mismatch);
  CHECK(attend(q, 2, 8, keys, values, std::span<float>(out).first(8), decode_accumulation::none, {}) == status::shape_mismatch);
  CHECK(attend(q, 2, 8, k_odd, values, out, decode_accumulation::none, {}) == status::shape_mismatch);
  CHECK(attend(q, 2, 8, keys, std::span<const float>(values).first(16), out, decode_accumulation::none, {}) ==
        status::shape_mismatch);
  CHECK(attend(q, 2, 8, keys, values, out, decode_accumulation::sum, metric_short) == status::shape_mismatch);
  CHECK(std::all_of(out.begin(), out.end(), [](float x) { return x == -1.f; }));
  CHECK(metric == std::vector<float>(3, 0.f));
}

TEST_CASE("errors: cpu::attend_head over no keys", "[cpu][errors]") {
  const std::vector<float> q(16, 0.5f), none;
  std::vector<float> out(16, -1.f), metric, scratch;
  CHECK(cpu::attend_head(q, 2, 8, none, none, out, decode_accumulation::sum, gqa_reduce::mean, metric, scratch) ==
        status::empty_sequence);
}
