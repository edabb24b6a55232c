// The dense view: a kv_store over an engine's own contiguous [batch][H][n][d] cache.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "fixtures.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;
using paged_fixtures::engine_buffers;
using paged_fixtures::gaussian;
using paged_fixtures::iota_positions;

namespace {
const attention_shape model{2, 4, 2, 8};
constexpr int32_t batch = 2, capacity = 32;

struct view_fixture {
  engine_buffers<float> buffers{model, batch, capacity};
  std::vector<dense_layer<float>> layers = buffers.layers();
  dense_view<float> view;

  view_fixture() { throw_if_error(dense_view<float>::create(model, batch, capacity, layers, view)); }
  //! Appends n tokens to row `seq`; returns K/V [L][n][H][d].
  std::pair<std::vector<float>, std::vector<float>> fill(int64_t seq, int32_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    const size_t count = static_cast<size_t>(model.layers) * n * model.kv_heads * model.head_dim;
    auto k = gaussian(rng, count), v = gaussian(rng, count);
    throw_if_error(view.append(seq, iota_positions(0, n), k, v));
    return {k, v};
  }
};

//! Runs `op`, expects `expected` and checks the engine's buffers did not change.
template <class Op>
void expect_rejected(view_fixture& f, status expected, Op&& op) {
  const engine_buffers<float> before = f.buffers;
  const status s = op();
  CAPTURE(to_string(s));
  CHECK(s == expected);
  CHECK(f.buffers.keys == before.keys);
  CHECK(f.buffers.values == before.values);
  CHECK(f.buffers.positions == before.positions);
  CHECK(f.buffers.metrics == before.metrics);
  CHECK(f.buffers.lengths == before.lengths);
}

std::vector<float> rows(int32_t layers, int32_t tokens) {
  return std::vector<float>(static_cast<size_t>(layers) * tokens * model.kv_heads * model.head_dim, 0.25f);
}
}  // namespace

TEST_CASE("the dense view wraps K/V an engine wrote itself, and every preset compresses it as the dense cache",
          "[cpu][cache][dense-view]") {
  // The engine's own cache: 30 tokens per head, written directly into its buffers.
  auto reference = fixtures::make_cache({2, 4, 2, 8}, 30, 4, 21);
  engine_buffers<float> buffers(model, 1, capacity);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      const std::span<const float> k = reference.cache.keys(0, l, h), v = reference.cache.values(0, l, h);
      const size_t base = static_cast<size_t>(h) * capacity;
      std::copy(k.begin(), k.end(), buffers.keys[l].begin() + static_cast<std::ptrdiff_t>(base * model.head_dim));
      std::copy(v.begin(), v.end(), buffers.values[l].begin() + static_cast<std::ptrdiff_t>(base * model.head_dim));
      for (int32_t t = 0; t < 30; ++t) buffers.positions[l][base + t] = t;
      buffers.lengths[l][h] = 30;
    }
  const auto layers = buffers.layers();
  dense_view<float> view;
  REQUIRE(dense_view<float>::create(model, 1, capacity, layers, view) == status::success);
  REQUIRE(cpu::compress(snapkv({.budget = token_budget::of_tokens(9), .window = 4}), view, 0, model,
                        reference.observation()) == status::success);
  REQUIRE(cpu::compress(snapkv({.budget = token_budget::of_tokens(9), .window = 4}), reference.cache, 0, model,
                        reference.observation()) == status::success);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CHECK(buffers.lengths[l][h] == 9);  // the engine sees the new lengths in its own buffer
      const std::span<const int32_t> p = view.positions(0, l, h), rp = reference.cache.positions(0, l, h);
      CHECK(std::vector<int32_t>(p.begin(), p.end()) == std::vector<int32_t>(rp.begin(), rp.end()));
      const std::span<const float> k = view.keys(0, l, h), rk = reference.cache.keys(0, l, h);
      CHECK(std::vector<float>(k.begin(), k.end()) == std::vector<float>(rk.begin(), rk.end()));
    }
}

TEST_CASE("rows of a dense view are compressed independently, and clear empties one row", "[cpu][cache][dense-view]") {
  view_fixture f;
  f.fill(0, 20, 1);
  f.fill(1, 12, 2);
  REQUIRE(cpu::compress(streaming_llm({.budget = token_budget::of_tokens(6), .sinks = 2}), f.view, 1, model, {}) ==
          status::success);
  CHECK(f.view.head_length(0, 1, 1) == 20);
  CHECK(f.view.head_length(1, 1, 1) == 6);
  const auto p = f.view.positions(1, 0, 0);
  CHECK(std::vector<int32_t>(p.begin(), p.end()) == std::vector<int32_t>{0, 1, 11, 10, 9, 8});
  REQUIRE(f.view.clear(0) == status::success);
  CHECK(f.view.head_length(0, 0, 0) == 0);
  CHECK(f.view.head_length(1, 0, 0) == 6);
}

TEST_CASE("dense view bad input: invalid shape, batch or capacity", "[cpu][cache][dense-view][bad-input]") {
  engine_buffers<float> buffers(model, batch, capacity);
  const auto layers = buffers.layers();
  dense_view<float> view;
  CHECK(dense_view<float>::create({2, 3, 2, 8}, batch, capacity, layers, view) == status::invalid_group);
  CHECK(dense_view<float>::create(model, 0, capacity, layers, view) == status::invalid_argument);
  CHECK(dense_view<float>::create(model, batch, 0, layers, view) == status::invalid_argument);
  CHECK_FALSE(view.contains(0));
}

TEST_CASE("dense view bad input: buffers that do not match the shape", "[cpu][cache][dense-view][bad-input]") {
  engine_buffers<float> buffers(model, batch, capacity);
  auto layers = buffers.layers();
  dense_view<float> view;
  CHECK(dense_view<float>::create(model, batch, capacity, std::span(layers).first(1), view) == status::shape_mismatch);
  layers[1].metrics = layers[1].metrics.first(10);
  CHECK(dense_view<float>::create(model, batch, capacity, layers, view) == status::shape_mismatch);
  CHECK(dense_view<float>::create(model, batch, capacity + 1, buffers.layers(), view) == status::shape_mismatch);
  dense_view<float, 16> fixed;  // head dim 16 at compile time, 8 in the shape
  CHECK(dense_view<float, 16>::create(model, batch, capacity, buffers.layers(), fixed) == status::shape_mismatch);
}

TEST_CASE("dense view bad input: a stored length outside the capacity", "[cpu][cache][dense-view][bad-input]") {
  engine_buffers<float> buffers(model, batch, capacity);
  buffers.lengths[0][3] = capacity + 1;
  dense_view<float> view;
  CHECK(dense_view<float>::create(model, batch, capacity, buffers.layers(), view) == status::invalid_argument);
}

TEST_CASE("dense view bad input: append to a row outside the batch", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  expect_rejected(f, status::unknown_sequence, [&] { return f.view.append(2, iota_positions(0, 1), rows(2, 1), rows(2, 1)); });
  expect_rejected(f, status::unknown_sequence, [&] { return f.view.append_layer(-1, 0, iota_positions(0, 1), rows(1, 1), rows(1, 1)); });
}

TEST_CASE("dense view bad input: append to a layer out of range", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  expect_rejected(f, status::invalid_argument, [&] { return f.view.append_layer(0, 2, iota_positions(0, 1), rows(1, 1), rows(1, 1)); });
}

TEST_CASE("dense view bad input: append of no tokens or a negative position", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  const std::vector<int32_t> negative{-4};
  expect_rejected(f, status::invalid_argument, [&] { return f.view.append(0, {}, {}, {}); });
  expect_rejected(f, status::invalid_argument, [&] { return f.view.append(0, negative, rows(2, 1), rows(2, 1)); });
}

TEST_CASE("dense view bad input: append of K/V of the wrong size", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  expect_rejected(f, status::shape_mismatch, [&] { return f.view.append(0, iota_positions(0, 2), rows(2, 1), rows(2, 2)); });
}

TEST_CASE("dense view bad input: append past the capacity", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  f.fill(0, 30, 3);
  expect_rejected(f, status::invalid_argument, [&] { return f.view.append(0, iota_positions(30, 3), rows(2, 3), rows(2, 3)); });
}

TEST_CASE("dense view bad input: clear of a row outside the batch", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  f.fill(0, 5, 3);
  expect_rejected(f, status::unknown_sequence, [&] { return f.view.clear(batch); });
}

TEST_CASE("dense view bad input: reads of an unknown row, a bad head, outputs of the wrong size",
          "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  f.fill(0, 5, 3);
  std::vector<int32_t> p(5);
  std::vector<float> k(40), m(5), v(40), short_k(39);
  CHECK(f.view.read_head(0, 1, 1, p, k, m) == status::success);
  CHECK(f.view.read_head(3, 1, 1, p, k, m) == status::unknown_sequence);
  CHECK(f.view.read_head(0, 1, 2, p, k, m) == status::invalid_argument);
  CHECK(f.view.read_head(0, 1, 1, p, short_k, m) == status::shape_mismatch);
  CHECK(f.view.read_values(0, 1, 1, v) == status::success);
  CHECK(f.view.read_values(5, 1, 1, v) == status::unknown_sequence);
  CHECK(f.view.read_values(0, 3, 1, v) == status::invalid_argument);
  CHECK(f.view.read_values(0, 1, 1, short_k) == status::shape_mismatch);
}

TEST_CASE("dense view bad input: rewrite_head of an unknown row, bad head, wrong size, negative position",
          "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  f.fill(0, 5, 3);
  std::vector<int32_t> p(5, 1);
  const std::vector<float> k(40, 0.f), short_k(39, 0.f);
  expect_rejected(f, status::unknown_sequence, [&] { return f.view.rewrite_head(7, 0, 0, p, k); });
  expect_rejected(f, status::invalid_argument, [&] { return f.view.rewrite_head(0, 0, -1, p, k); });
  expect_rejected(f, status::shape_mismatch, [&] { return f.view.rewrite_head(0, 0, 0, p, short_k); });
  p[2] = -1;
  expect_rejected(f, status::invalid_argument, [&] { return f.view.rewrite_head(0, 0, 0, p, k); });
}

TEST_CASE("dense view bad input: apply to an unknown row or with an invalid plan", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  f.fill(0, 5, 3);
  eviction_plan plan(model.layers, model.kv_heads);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) plan.set_head(l, h, 5, iota_positions(1, 4));
  expect_rejected(f, status::unknown_sequence, [&] { return f.view.apply(4, plan); });
  expect_rejected(f, status::invalid_plan, [&] { return f.view.apply(1, plan); });  // row 1 is empty
  const eviction_plan other_shape(1, 1);
  expect_rejected(f, status::invalid_plan, [&] { return f.view.apply(0, other_shape); });
}

TEST_CASE("dense view bad input: decode attention on an unknown row or an empty head", "[cpu][cache][dense-view][bad-input]") {
  view_fixture f;
  f.fill(0, 5, 3);
  std::vector<float> q(32, 0.1f), out(32), scratch;
  expect_rejected(f, status::unknown_sequence, [&] {
    return cpu::decode_attention(f.view, 2, 0, 4, q, out, decode_accumulation::sum, gqa_reduce::mean, scratch);
  });
  expect_rejected(f, status::empty_sequence, [&] {
    return cpu::decode_attention(f.view, 1, 0, 4, q, out, decode_accumulation::sum, gqa_reduce::mean, scratch);
  });
  expect_rejected(f, status::shape_mismatch, [&] {
    return cpu::decode_attention(f.view, 0, 0, 4, std::span<const float>(q).first(31), out, decode_accumulation::sum,
                                 gqa_reduce::mean, scratch);
  });
}

// Differential: the same random sequence of appends, compressions with every preset, decode
// steps that accumulate metrics, hand-made plans and clears, on a dense view and on a paged
// cache, must leave both with the same statuses and the same contents after every operation.
TEST_CASE("a dense view and a paged cache stay identical under random operations", "[cpu][cache][dense-view]") {
  const uint32_t seed = GENERATE(1u, 2u, 3u, 4u, 5u, 6u);
  CAPTURE(seed);
  std::mt19937 rng(seed);
  view_fixture f;
  const paged_cache_config config{model, 4, batch * model.layers * model.kv_heads * (capacity / 4), batch, capacity};
  paged_cache<float> paged;
  REQUIRE(paged_cache<float>::create(config, paged) == status::success);
  std::vector<int32_t> next(batch, 0);  // each row's next position
  for (int64_t s = 0; s < batch; ++s) REQUIRE(paged.add_sequence(s) == status::success);
  const auto pick = [&](int32_t lo, int32_t hi) { return std::uniform_int_distribution<int32_t>(lo, hi)(rng); };
  std::vector<float> scratch_view, scratch_paged;
  const std::vector<int64_t> rows_of_batch{0, 1};

  for (int32_t step = 0; step < 60; ++step) {
    const int64_t s = pick(0, batch - 1);
    int32_t longest = 0, shortest = capacity;
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        longest = std::max(longest, f.view.head_length(s, l, h));
        shortest = std::min(shortest, f.view.head_length(s, l, h));
      }
    const int32_t op = pick(0, 9);
    CAPTURE(step, s, op);
    if (op <= 3 && longest < capacity) {  // append a chunk or a decode token to every layer
      const int32_t tokens = pick(1, std::min(capacity - longest, op == 0 ? 12 : 1));
      const size_t count = static_cast<size_t>(model.layers) * tokens * model.kv_heads * model.head_dim;
      const auto k = gaussian(rng, count), v = gaussian(rng, count);
      const auto positions = iota_positions(next[static_cast<size_t>(s)], tokens);
      next[static_cast<size_t>(s)] += tokens;
      CHECK(to_string(f.view.append(s, positions, k, v)) == to_string(paged.append(s, positions, k, v)));
    } else if (op <= 5 && shortest > 0) {  // decode attention of one layer, accumulating or not
      const int32_t layer = pick(0, model.layers - 1);
      const auto acc = static_cast<decode_accumulation>(pick(0, 2));
      const auto q = gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim);
      std::vector<float> out_view(q.size()), out_paged(q.size());
      CHECK(to_string(cpu::decode_attention(f.view, s, layer, model.q_heads, q, out_view, acc, gqa_reduce::mean,
                                            scratch_view)) ==
            to_string(cpu::decode_attention(paged, s, layer, model.q_heads, q, out_paged, acc, gqa_reduce::mean,
                                            scratch_paged)));
      CHECK(out_view == out_paged);
    } else if (op <= 7 && shortest >= 4) {  // compress with a preset and a random budget
      const token_budget b = token_budget::of_tokens(pick(6, 24));
      const int32_t w = 4;
      const size_t rows = static_cast<size_t>(model.layers) * w * model.q_heads * model.head_dim;
      const auto queries = gaussian(rng, rows);
      const auto window = iota_positions(next[static_cast<size_t>(s)] - w, w);
      const cpu::observation obs{queries, window};
      const auto both = [&](const auto& policy) {
        CHECK(to_string(cpu::compress(policy, f.view, s, model, obs)) ==
              to_string(cpu::compress(policy, paged, s, model, obs)));
      };
      switch (pick(0, 5)) {
        case 0: both(streaming_llm({.budget = b, .sinks = 2})); break;
        case 1: both(h2o({.budget = b, .recent = w})); break;
        case 2: both(snapkv({.budget = b, .window = w})); break;
        case 3: both(pyramidkv({.budget = b, .window = w})); break;
        case 4: both(ada_kv({.budget = b, .window = w})); break;
        default: both(kv_compress({.budget = b, .block_size = 4, .protected_window = w})); break;
      }
    } else if (op == 8 && shortest > 0) {  // a hand-made plan: each head keeps a random subset
      eviction_plan plan(model.layers, model.kv_heads);
      for (int32_t l = 0; l < model.layers; ++l)
        for (int32_t h = 0; h < model.kv_heads; ++h) {
          const int32_t n = f.view.head_length(s, l, h);
          std::vector<int32_t> kept;
          for (int32_t j = 0; j < n; ++j)
            if (j == 0 || pick(0, 2) != 0) kept.push_back(j);
          plan.set_head(l, h, n, kept);
        }
      CHECK(to_string(f.view.apply(s, plan)) == to_string(paged.apply(s, plan)));
    } else if (op == 9) {  // the row ends; a new sequence takes it
      CHECK(f.view.clear(s) == status::success);
      CHECK(paged.free_sequence(s) == status::success);
      CHECK(paged.add_sequence(s) == status::success);
      next[static_cast<size_t>(s)] = 0;
    }
    // Every head of every row, in slot order (both compact with compaction_moves).
    CHECK(paged_fixtures::take_dump(f.view, rows_of_batch) == paged_fixtures::take_dump(paged, rows_of_batch));
  }
}
