// Every bad input of the policy layer gets a clear status and leaves the cache untouched.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "fixtures.hpp"
#include "kvtrim/kvtrim.hpp"

using namespace kvtrim;

namespace {
const attention_shape model{2, 4, 2, 8};

//! Runs `p` on a fresh cache and checks it fails with `expected` and changes nothing.
template <class Policy>
void expect_rejected(const Policy& p, status expected, fixtures::filled_cache f) {
  const auto before = fixtures::take_snapshot(f.cache);
  const status s = cpu::compress(p, f.cache, 0, f.model, f.observation());
  CAPTURE(to_string(s));
  CHECK(s == expected);
  CHECK(fixtures::take_snapshot(f.cache) == before);
}
}  // namespace

TEST_CASE("bad input: budget of zero tokens", "[cpu][bad-input]") {
  expect_rejected(snapkv({.budget = token_budget::of_tokens(0), .window = 4}), status::invalid_budget,
                  fixtures::make_cache(model, 64, 4));
}

TEST_CASE("bad input: negative budget", "[cpu][bad-input]") {
  expect_rejected(h2o({.budget = token_budget::of_tokens(-5), .recent = 4}), status::invalid_budget,
                  fixtures::make_cache(model, 64, 64));
}

TEST_CASE("bad input: ratio budget not in 0 < r <= 1", "[cpu][bad-input]") {
  expect_rejected(snapkv({.budget = token_budget::of_ratio(0.f), .window = 4}), status::invalid_budget,
                  fixtures::make_cache(model, 64, 4));
  expect_rejected(snapkv({.budget = token_budget::of_ratio(1.5f), .window = 4}), status::invalid_budget,
                  fixtures::make_cache(model, 64, 4));
  expect_rejected(snapkv({.budget = token_budget::of_ratio(std::numeric_limits<float>::quiet_NaN()), .window = 4}),
                  status::invalid_budget, fixtures::make_cache(model, 64, 4));
}

TEST_CASE("bad input: token budget below the protected set", "[cpu][bad-input]") {
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 16}), status::budget_below_protected,
                  fixtures::make_cache(model, 64, 16));
  expect_rejected(streaming_llm({.budget = token_budget::of_tokens(3), .sinks = 4}), status::budget_below_protected,
                  fixtures::make_cache(model, 64, 0));
}

TEST_CASE("bad input: observation window longer than the sequence", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 16, 16);
  // 20 observed rows for 16 cached tokens.
  f.positions.clear();
  for (int32_t r = 0; r < 20; ++r) f.positions.push_back(r);
  f.queries.assign(static_cast<size_t>(model.layers) * 20 * model.q_heads * model.head_dim, 0.5f);
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), status::window_too_large, f);
}

TEST_CASE("bad input: an attention metric with no observed queries", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 32, 0);
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), status::window_too_large, f);
}

TEST_CASE("bad input: query heads not a multiple of KV heads", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 32, 4);
  f.model = {2, 3, 2, 8};
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), status::invalid_group, f);
  f.model = {2, 4, 0, 8};
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), status::invalid_group, f);
}

TEST_CASE("bad input: even pooling kernel", "[cpu][bad-input]") {
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4, .kernel = 4}),
                  status::invalid_pool_kernel, fixtures::make_cache(model, 32, 4));
}

TEST_CASE("bad input: zero pooling kernel", "[cpu][bad-input]") {
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4, .kernel = 0}),
                  status::invalid_pool_kernel, fixtures::make_cache(model, 32, 4));
}

TEST_CASE("bad input: NaN in the observed queries", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 32, 4);
  f.queries[5] = std::numeric_limits<float>::quiet_NaN();
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), status::non_finite_input, f);
}

TEST_CASE("bad input: infinity in the cached keys", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 32, 4);
  f.cache.keys(0, 1, 1)[3] = std::numeric_limits<float>::infinity();
  expect_rejected(ada_kv({.budget = token_budget::of_tokens(8), .window = 4}), status::non_finite_input, f);
}

TEST_CASE("bad input: NaN score from a metric is refused by the ranking", "[cpu][bad-input]") {
  const std::vector<float> scores{1.f, std::numeric_limits<float>::quiet_NaN(), 2.f};
  const std::vector<int32_t> positions{0, 1, 2};
  head_candidates out;
  out.length = 99;
  CHECK(rank_head(scores, positions, {}, out) == status::non_finite_input);
  CHECK(out.length == 99);  // untouched
  const std::vector<float> minus_inf{1.f, -std::numeric_limits<float>::infinity(), 2.f};
  CHECK(rank_head(minus_inf, positions, {}, out) == status::non_finite_input);
}

TEST_CASE("bad input: empty sequence", "[cpu][bad-input]") {
  fixtures::filled_cache f{model, dense_cache({model.layers, model.q_heads, model.kv_heads, model.head_dim}, 1, 16),
                           {}, {}};
  expect_rejected(streaming_llm({.budget = token_budget::of_tokens(8), .sinks = 2}), status::empty_sequence, f);
}

TEST_CASE("bad input: observation of the wrong size", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 32, 4);
  f.queries.pop_back();
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), status::shape_mismatch, f);
}

TEST_CASE("bad input: store shape disagrees with the model", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 32, 4);
  f.model.head_dim = 16;
  f.queries.resize(f.queries.size() * 2, 0.f);
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), status::shape_mismatch, f);
  // Query-head compatibility mode needs a store with Hq heads.
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = 4, .reduce = gqa_reduce::per_query_head}),
                  status::shape_mismatch, fixtures::make_cache(model, 32, 4));
}

TEST_CASE("bad input: unknown sequence", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 32, 4);
  const auto before = fixtures::take_snapshot(f.cache);
  CHECK(cpu::compress(snapkv({.budget = token_budget::of_tokens(8), .window = 4}), f.cache, 7, f.model,
                      f.observation()) == status::unknown_sequence);
  CHECK(fixtures::take_snapshot(f.cache) == before);
}

TEST_CASE("bad input: negative sinks or window", "[cpu][bad-input]") {
  expect_rejected(streaming_llm({.budget = token_budget::of_tokens(8), .sinks = -1}), status::invalid_argument,
                  fixtures::make_cache(model, 32, 0));
  expect_rejected(snapkv({.budget = token_budget::of_tokens(8), .window = -2}), status::invalid_argument,
                  fixtures::make_cache(model, 32, 4));
}

TEST_CASE("bad input: Ada-KV alpha outside [0, 1]", "[cpu][bad-input]") {
  expect_rejected(ada_kv({.budget = token_budget::of_tokens(8), .window = 4, .alpha = 1.5f}),
                  status::invalid_argument, fixtures::make_cache(model, 32, 4));
}

TEST_CASE("bad input: pyramid beta below one or a budget of the wrong kind", "[cpu][bad-input]") {
  expect_rejected(pyramidkv({.budget = token_budget::of_tokens(16), .window = 4, .beta = 0}),
                  status::invalid_argument, fixtures::make_cache(model, 32, 4));
  expect_rejected(pyramidkv({.budget = token_budget::of_ratio(0.5f), .window = 4}), status::invalid_budget,
                  fixtures::make_cache(model, 32, 4));
}

TEST_CASE("bad input: KV-Compress block size zero", "[cpu][bad-input]") {
  expect_rejected(kv_compress({.budget = token_budget::of_tokens(8), .block_size = 0, .protected_window = 4}),
                  status::invalid_argument, fixtures::make_cache(model, 32, 4));
}

TEST_CASE("bad input: plans that do not fit the cache", "[cpu][bad-input]") {
  auto f = fixtures::make_cache(model, 8, 0);
  const auto before = fixtures::take_snapshot(f.cache);
  const std::vector<int32_t> all{0, 1, 2, 3, 4, 5, 6, 7};
  const auto plan_with = [&](std::vector<int32_t> head0) {
    eviction_plan p(model.layers, model.kv_heads);
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) p.set_head(l, h, 8, (l == 0 && h == 0) ? head0 : all);
    return p;
  };
  CHECK(f.cache.apply(0, plan_with({0, 9})) == status::invalid_plan);     // slot out of range
  CHECK(f.cache.apply(0, plan_with({3, 3})) == status::invalid_plan);     // repeated slot
  CHECK(f.cache.apply(0, plan_with({5, 2})) == status::invalid_plan);     // not ascending
  CHECK(f.cache.apply(0, plan_with({})) == status::invalid_plan);         // would empty a head
  CHECK(f.cache.apply(0, eviction_plan(1, model.kv_heads)) == status::invalid_plan);  // wrong shape
  CHECK(fixtures::take_snapshot(f.cache) == before);
}

TEST_CASE("bad input: rerotation needs an even head dim and a positive theta", "[cpu][bad-input]") {
  auto p = streaming_llm({.budget = token_budget::of_tokens(8), .sinks = 2});
  p.positions = position_mode::rerotate;
  p.rope.theta = -1.f;
  expect_rejected(p, status::invalid_argument, fixtures::make_cache(model, 32, 0));
}

TEST_CASE("bad input: decode attention arguments", "[cpu][bad-input]") {
  // Layer 0 holds one token, layer 1 none.
  dense_cache cache({2, 2, 2, 4}, 1, 8);
  const std::vector<float> kv(8, 1.f);
  REQUIRE(cache.append(0, 0, 0, kv, kv) == status::success);
  std::vector<float> q(8, 0.5f), out(8), scratch;
  const auto attend = [&](int64_t seq, int32_t layer, int32_t q_heads, std::span<const float> query) {
    return cpu::decode_attention(cache, seq, layer, q_heads, query, out, decode_accumulation::sum, gqa_reduce::mean,
                                 scratch);
  };
  CHECK(attend(0, 1, 2, q) == status::empty_sequence);
  CHECK(attend(0, 0, 3, q) == status::invalid_group);
  CHECK(attend(0, 0, 2, std::span<const float>(q).first(4)) == status::shape_mismatch);
  CHECK(attend(3, 0, 2, q) == status::unknown_sequence);
  CHECK(attend(0, 2, 2, q) == status::invalid_argument);
  CHECK(cache.metrics(0, 0, 0)[0] == 0.f);  // no failed call accumulated anything
  REQUIRE(attend(0, 0, 2, q) == status::success);
  CHECK(cache.metrics(0, 0, 0)[0] == Approx(1.f));
}
