// docs/errors.md, policy rows: each part's validate(), score(), allocate() and plan() called
// directly with invalid inputs, the ranking, eviction plans and compaction moves.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvtrim/kvtrim.hpp"

using namespace kvtrim;

namespace {
constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_f = std::numeric_limits<float>::infinity();
const attention_shape model{1, 4, 2, 2};  // G = 2, d = 2

//! One layer of two heads of `n` tokens (positions 0..n-1, keys all 0.5), observed by
//! `rows` queries (all 0.25) at the last positions.
struct layer_input {
  std::vector<std::vector<int32_t>> positions;
  std::vector<std::vector<float>> keys, metrics, scores;
  std::vector<head_view> heads;
  std::vector<std::span<float>> out;
  std::vector<float> queries;
  std::vector<int32_t> query_positions;

  layer_input(int32_t n, int32_t rows) {
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      positions.emplace_back();
      for (int32_t t = 0; t < n; ++t) positions.back().push_back(t);
      keys.emplace_back(static_cast<size_t>(n) * model.head_dim, 0.5f);
      metrics.emplace_back(static_cast<size_t>(n), 0.f);
      scores.emplace_back(static_cast<size_t>(n), 0.f);
    }
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      heads.push_back({positions[static_cast<size_t>(h)], keys[static_cast<size_t>(h)], metrics[static_cast<size_t>(h)]});
      out.emplace_back(scores[static_cast<size_t>(h)]);
    }
    queries.assign(static_cast<size_t>(rows) * model.q_heads * model.head_dim, 0.25f);
    for (int32_t r = 0; r < rows; ++r) query_positions.push_back(n - rows + r);
  }
  [[nodiscard]] layer_view view() const { return {0, model, heads, {queries, query_positions}}; }
};

//! Two heads with `n` ranked candidates each, no protected tokens.
candidate_table ranked_table(int32_t n, int32_t protect = 0) {
  candidate_table t(1, 2);
  for (int32_t h = 0; h < 2; ++h) {
    head_candidates& c = t.at(0, h);
    c.length = n + protect;
    c.next_position = n + protect;
    for (int32_t s = 0; s < protect; ++s) c.protected_slots.push_back(n + s);
    for (int32_t s = 0; s < n; ++s) c.ranked.push_back({static_cast<float>(n - s), s, s});
  }
  return t;
}
}  // namespace

// ---- metrics

TEST_CASE("errors: window_attention::validate refuses a bad kernel only when it pools", "[cpu][errors]") {
  window_attention m;
  for (const int32_t k : {0, 2, -1, -3}) {
    CAPTURE(k);
    m.pool = pooling::max;
    m.kernel = k;
    CHECK(m.validate(model, {}) == status::invalid_pool_kernel);
    m.pool = pooling::avg;
    CHECK(m.validate(model, {}) == status::invalid_pool_kernel);
    m.pool = pooling::none;  // documented: the kernel is ignored without pooling
    CHECK(m.validate(model, {}) == status::success);
  }
}

TEST_CASE("errors: window_attention::validate refuses a negative buffer, a bad shape or protected set", "[cpu][errors]") {
  window_attention m;
  m.buffer = -1;
  CHECK(m.validate(model, {}) == status::invalid_argument);
  m.buffer = 0;
  CHECK(m.validate({1, 3, 2, 2}, {}) == status::invalid_group);
  CHECK(m.validate(model, {.sinks = -1}) == status::invalid_argument);
  const accumulated_attention acc;  // delegates to its observation's window_attention
  CHECK(acc.validate({0, 4, 2, 2}, {}) == status::invalid_argument);
}

TEST_CASE("errors: window_attention::score refuses outputs or heads of the wrong count or size", "[cpu][errors]") {
  const window_attention m{.pool = pooling::none};
  layer_input in(6, 2);
  REQUIRE(m.score(in.view(), {}, in.out) == status::success);
  CHECK(m.score(in.view(), {}, std::span<const std::span<float>>(in.out).first(1)) == status::shape_mismatch);
  layer_view v = in.view();
  v.heads = v.heads.first(1);
  CHECK(m.score(v, {}, in.out) == status::shape_mismatch);
  in.scores[1].pop_back();
  in.out[1] = in.scores[1];
  CHECK(m.score(in.view(), {}, in.out) == status::shape_mismatch);
}

TEST_CASE("errors: window_attention::score refuses queries or keys of the wrong size", "[cpu][errors]") {
  const window_attention m{.pool = pooling::none};
  layer_input in(6, 2);
  in.queries.pop_back();
  CHECK(m.score(in.view(), {}, in.out) == status::shape_mismatch);
  layer_input k(6, 2);
  k.heads[0].keys = k.heads[0].keys.first(5);
  CHECK(m.score(k.view(), {}, k.out) == status::shape_mismatch);
}

TEST_CASE("errors: window_attention::score on an empty head", "[cpu][errors]") {
  const window_attention m{.pool = pooling::none};
  layer_input in(0, 0);
  CHECK(m.score(in.view(), {}, in.out) == status::empty_sequence);
}

TEST_CASE("errors: window_attention::score with more observed rows than tokens, or none", "[cpu][errors]") {
  const window_attention m{.pool = pooling::none};
  layer_input none(6, 0);
  CHECK(m.score(none.view(), {}, none.out) == status::window_too_large);
  layer_input more(3, 4);
  CHECK(m.score(more.view(), {}, more.out) == status::window_too_large);
}

TEST_CASE("errors: window_attention::score on NaN or infinite queries or keys", "[cpu][errors]") {
  const window_attention m{.pool = pooling::none};
  for (const float bad : {nan_f, inf_f, -inf_f}) {
    CAPTURE(bad);
    layer_input q(6, 2);
    q.queries[3] = bad;
    CHECK(m.score(q.view(), {}, q.out) == status::non_finite_input);
    layer_input k(6, 2);
    k.keys[1][5] = bad;
    CHECK(m.score(k.view(), {}, k.out) == status::non_finite_input);
  }
}

TEST_CASE("errors: window_attention::score with query positions outside the cache", "[cpu][errors]") {
  // Documented behaviour: positions are not validated; a query sees the keys at or before its
  // position, a query that sees none adds nothing, and a buffer never overflows the position.
  window_attention m{.pool = pooling::none, .buffer = std::numeric_limits<int32_t>::max()};
  layer_input in(6, 2);
  in.query_positions = {std::numeric_limits<int32_t>::min(), -1};
  REQUIRE(m.score(in.view(), {}, in.out) == status::success);
  for (const auto& s : in.scores)
    for (const float x : s) CHECK(x == 0.f);
  m.buffer = 0;
  in.query_positions = {std::numeric_limits<int32_t>::max(), 2};
  REQUIRE(m.score(in.view(), {}, in.out) == status::success);
  CHECK(in.scores[0][0] > 0.f);
}

TEST_CASE("errors: positional metric refuses a bad shape, protected set or output count", "[cpu][errors]") {
  const positional m;
  CHECK(m.validate({1, 3, 2, 2}, {}) == status::invalid_group);
  CHECK(m.validate(model, {.recent = -1}) == status::invalid_argument);
  layer_input in(4, 0);
  REQUIRE(m.score(in.view(), {}, in.out) == status::success);
  CHECK(m.score(in.view(), {}, std::span<const std::span<float>>(in.out).first(1)) == status::shape_mismatch);
  in.scores[0].pop_back();
  in.out[0] = in.scores[0];
  CHECK(m.score(in.view(), {}, in.out) == status::shape_mismatch);
}

// ---- allocators

TEST_CASE("errors: every allocator refuses a select buffer of the wrong size", "[cpu][errors]") {
  const candidate_table t = ranked_table(6);
  std::vector<int32_t> select(3);  // [1][2] expected
  const allocation_context ctx{0, 1, {}};
  CHECK(uniform_budget{}.allocate(t, ctx, select) == status::shape_mismatch);
  CHECK(pyramid_budget{}.allocate(t, ctx, select) == status::shape_mismatch);
  CHECK(adaptive_budget<>{}.allocate(t, ctx, select) == status::shape_mismatch);
  CHECK(global_block_budget{}.allocate(t, ctx, select) == status::shape_mismatch);
  CHECK(select == std::vector<int32_t>(3, 0));  // untouched
}

TEST_CASE("errors: uniform_budget::validate", "[cpu][errors]") {
  uniform_budget a{.budget = token_budget::of_tokens(4)};
  CHECK(a.validate(model, {.sinks = 2, .recent = 2}) == status::success);
  CHECK(a.validate(model, {.sinks = 2, .recent = 3}) == status::budget_below_protected);
  CHECK(a.validate(model, {.sinks = std::numeric_limits<int32_t>::max(), .recent = std::numeric_limits<int32_t>::max()}) ==
        status::budget_below_protected);  // sinks + recent past int32 is still compared exactly
  CHECK(a.validate({0, 4, 2, 2}, {}) == status::invalid_argument);
  a.budget = token_budget::of_ratio(0.f);
  CHECK(a.validate(model, {}) == status::invalid_budget);
  a.budget = token_budget::of_ratio(0.5f);
  CHECK(a.validate(model, {.sinks = 1000}) == status::success);  // a ratio is never below the protected set
}

TEST_CASE("errors: pyramid_budget::validate", "[cpu][errors]") {
  pyramid_budget a{.budget = token_budget::of_tokens(16), .beta = 20, .form = pyramid_form::integer};
  CHECK(a.validate(model, {.recent = 8}) == status::success);
  a.beta = 0;
  CHECK(a.validate(model, {}) == status::invalid_argument);
  a.beta = 20;
  a.form = pyramid_form::real;  // the real form needs a ratio
  CHECK(a.validate(model, {}) == status::invalid_budget);
  a.budget = token_budget::of_ratio(0.5f);
  CHECK(a.validate(model, {}) == status::success);
  a.form = pyramid_form::integer;  // the integer form needs tokens
  CHECK(a.validate(model, {}) == status::invalid_budget);
  a.budget = token_budget::of_tokens(4);
  CHECK(a.validate(model, {.recent = 8}) == status::budget_below_protected);
  a.budget = token_budget::of_tokens(16);
  a.context = -1;  // 0 is the head's own length; a negative prompt length means nothing
  CHECK(a.validate(model, {.recent = 8}) == status::invalid_argument);
  a.context = 1;
  CHECK(a.validate(model, {.recent = 8}) == status::success);
}

TEST_CASE("errors: pyramid_integer_select of heads past 2^30 tokens does not overflow", "[cpu][errors]") {
  const int32_t max_i = std::numeric_limits<int32_t>::max();
  CHECK(pyramid_integer_select(0, 2, (1 << 30) + 10, 0, max_i, 20) == (1 << 30) + 10);  // 2 (c - w) > 2^31
  CHECK(pyramid_integer_select(1, 2, (1 << 30) + 10, 8, max_i, 20) == (1 << 30) + 2);
  CHECK(pyramid_integer_select(0, 2, 1 << 29, 0, max_i, 20) == (1 << 30) - (1 << 29) / 20);
  CHECK(pyramid_integer_select(1, 2, 1 << 29, 0, max_i, 20) == (1 << 29) / 20);
}

TEST_CASE("errors: adaptive_budget::validate", "[cpu][errors]") {
  adaptive_budget<> a;
  a.base.budget = token_budget::of_tokens(16);
  CHECK(a.validate(model, {}) == status::success);
  for (const float alpha : {-0.1f, 1.1f, nan_f, inf_f}) {
    CAPTURE(alpha);
    a.alpha = alpha;
    CHECK(a.validate(model, {}) == status::invalid_argument);
  }
  a.alpha = 0.2f;
  a.skip_layers = -1;
  CHECK(a.validate(model, {}) == status::invalid_argument);
  a.skip_layers = 0;
  a.base.budget = token_budget::of_tokens(0);  // the base's own check comes first
  CHECK(a.validate(model, {}) == status::invalid_budget);
}

TEST_CASE("errors: global_block_budget::validate", "[cpu][errors]") {
  global_block_budget a;
  CHECK(a.validate(model, {}) == status::success);
  a.block_size = 0;
  CHECK(a.validate(model, {}) == status::invalid_argument);
  a.block_size = 16;
  a.pending_tokens = -1;
  CHECK(a.validate(model, {}) == status::invalid_argument);
  a.pending_tokens = 1;
  a.budget = token_budget::of_ratio(1.5f);
  CHECK(a.validate(model, {}) == status::invalid_budget);
  a.budget = token_budget::of_tokens(16);
  CHECK(a.validate(model, {.sinks = -2}) == status::invalid_argument);
  // The budget counts whole blocks: 16 tokens cover a protected set of 16, not of 17; 17
  // tokens round up to two blocks.
  CHECK(a.validate(model, {.sinks = 4, .recent = 12}) == status::success);
  CHECK(a.validate(model, {.sinks = 4, .recent = 13}) == status::budget_below_protected);
  a.budget = token_budget::of_tokens(17);
  CHECK(a.validate(model, {.sinks = 4, .recent = 13}) == status::success);
  a.budget = token_budget::of_ratio(0.1f);  // a ratio keeps a fraction of the unprotected tokens
  CHECK(a.validate(model, {.recent = 1000}) == status::success);
}

TEST_CASE("errors: global_block_budget with a huge protected window or block size", "[cpu][errors]") {
  // Documented behaviour: counts past int32 are computed in 64 bits; nothing is evicted.
  const candidate_table t = ranked_table(40);
  std::vector<int32_t> select(2);
  global_block_budget a{.budget = token_budget::of_ratio(0.5f), .block_size = 4, .pending_tokens = 1};
  CHECK(a.blocks_to_evict(t, {.recent = std::numeric_limits<int32_t>::max()}) == 0);
  a.block_size = std::numeric_limits<int32_t>::max();
  a.budget = token_budget::of_tokens(8);
  REQUIRE(a.allocate(t, {0, 1, {}}, select) == status::success);
  CHECK(select == std::vector<int32_t>{40, 40});
}

// ---- evictors

TEST_CASE("errors: evictors refuse a select buffer of the wrong size", "[cpu][errors]") {
  const candidate_table t = ranked_table(6);
  const std::vector<int32_t> select(1, 2);
  eviction_plan out;
  CHECK(topk_evictor{}.plan(t, select, out) == status::shape_mismatch);
  CHECK(block_evictor{.block_size = 4}.plan(t, select, out) == status::shape_mismatch);
  CHECK(out.layers() == 0);  // untouched
}

TEST_CASE("errors: evictors refuse counts outside [0, candidates]", "[cpu][errors]") {
  const candidate_table t = ranked_table(6);
  eviction_plan out;
  for (const std::vector<int32_t>& select : {std::vector<int32_t>{-1, 2}, {2, 7}}) {
    CHECK(topk_evictor{}.plan(t, select, out) == status::invalid_argument);
    CHECK(block_evictor{.block_size = 4}.plan(t, select, out) == status::invalid_argument);
  }
}

TEST_CASE("errors: evictors refuse to empty a head without protected tokens", "[cpu][errors]") {
  const candidate_table t = ranked_table(6);
  const std::vector<int32_t> select{0, 2};
  eviction_plan out;
  CHECK(topk_evictor{}.plan(t, select, out) == status::invalid_plan);
  CHECK(block_evictor{.block_size = 4}.plan(t, select, out) == status::invalid_plan);
  const candidate_table with_protected = ranked_table(6, 1);
  CHECK(topk_evictor{}.plan(with_protected, select, out) == status::success);  // keeps the protected slot
}

TEST_CASE("errors: block_evictor refuses a block size below one", "[cpu][errors]") {
  const candidate_table t = ranked_table(6);
  const std::vector<int32_t> select{2, 2};
  eviction_plan out;
  for (const int32_t bs : {0, -4}) {
    CHECK(block_evictor{.block_size = bs}.validate() == status::invalid_argument);
    CHECK(block_evictor{.block_size = bs}.plan(t, select, out) == status::invalid_argument);
  }
  CHECK(topk_evictor{}.validate() == status::success);  // nothing to configure
  // The largest block size rounds every head up to all its candidates, without overflow.
  REQUIRE(block_evictor{.block_size = std::numeric_limits<int32_t>::max()}.plan(t, select, out) == status::success);
  CHECK(out.kept_count(0, 0) == 6);
}

// ---- ranking, plans, compaction

TEST_CASE("errors: rank_head refuses scores and positions of different sizes", "[cpu][errors]") {
  const std::vector<float> scores{1.f, 2.f};
  const std::vector<int32_t> positions{0, 1, 2};
  head_candidates out;
  out.length = 77;
  CHECK(rank_head(scores, positions, {}, out) == status::shape_mismatch);
  CHECK(out.length == 77);
}

TEST_CASE("errors: rank_head ranks +infinity first and ignores the scores of protected tokens", "[cpu][errors]") {
  const std::vector<float> scores{nan_f, inf_f, 1.f, -inf_f};  // slots 0 (a sink) and 3 (recent) are protected
  const std::vector<int32_t> positions{0, 1, 2, 3};
  head_candidates out;
  REQUIRE(rank_head(scores, positions, {.sinks = 1, .recent = 1}, out) == status::success);
  REQUIRE(out.ranked.size() == 2);
  CHECK(out.ranked[0].slot == 1);
  CHECK(out.protected_slots == std::vector<int32_t>{0, 3});
}

TEST_CASE("errors: rank_head refuses the position 2^31 - 1", "[cpu][errors]") {
  // "One past the newest position" must be an int32: positions are below 2^31 - 1.
  const std::vector<float> scores{1.f, 2.f};
  const std::vector<int32_t> positions{0, std::numeric_limits<int32_t>::max()};
  head_candidates out;
  CHECK(rank_head(scores, positions, {}, out) == status::invalid_argument);
}

TEST_CASE("errors: eviction_plan::validate refuses lengths of another shape", "[cpu][errors]") {
  eviction_plan plan(1, 2);
  plan.set_head(0, 0, 3, std::vector<int32_t>{0, 2});
  plan.set_head(0, 1, 2, std::vector<int32_t>{1});
  CHECK(plan.validate(std::vector<int32_t>{3, 2}) == status::success);
  CHECK(plan.validate(std::vector<int32_t>{3}) == status::invalid_plan);
  CHECK(plan.validate(std::vector<int32_t>{3, 2, 0}) == status::invalid_plan);
  CHECK(plan.validate(std::vector<int32_t>{3, 5}) == status::invalid_plan);
}

TEST_CASE("errors: eviction_plan::validate refuses metrics of another shape", "[cpu][errors]") {
  eviction_plan plan(2, 2);
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t h = 0; h < 2; ++h) plan.set_head(l, h, 2, std::vector<int32_t>{0, 1});
  const std::vector<int32_t> lengths(4, 2);
  plan.metrics = ragged_rows(2, 2, lengths);
  CHECK(plan.validate(lengths) == status::success);
  const std::vector<int32_t> two(2, 2), six(6, 2);
  plan.metrics = ragged_rows(1, 2, two);  // fewer layers: its rows must not be read past the end
  CHECK(plan.validate(lengths) == status::invalid_plan);
  plan.metrics = ragged_rows(2, 1, two);
  CHECK(plan.validate(lengths) == status::invalid_plan);
  plan.metrics = ragged_rows(3, 2, six);
  CHECK(plan.validate(lengths) == status::invalid_plan);
}

TEST_CASE("errors: ragged_rows with fewer lengths than rows gives the missing rows no entries", "[cpu][errors]") {
  const std::vector<int32_t> lengths{3};
  const ragged_rows r(2, 2, lengths);  // documented: missing lengths count as 0, extra ones are ignored
  CHECK(r.row(0, 0).size() == 3);
  CHECK(r.row(1, 1).empty());
  const std::vector<int32_t> extra{1, 1, 1, 1, 1, 1};
  const ragged_rows s(1, 2, extra);
  CHECK(s.row(0, 1).size() == 1);
}

TEST_CASE("errors: compaction_moves of a kept list that keeps all or nothing moves nothing", "[cpu][errors]") {
  std::vector<slot_move> moves{{7, 7}};
  compaction_moves(5, std::vector<int32_t>{0, 1, 2, 3, 4}, moves);
  CHECK(moves.empty());
  compaction_moves(5, std::vector<int32_t>{}, moves);
  CHECK(moves.empty());
  compaction_moves(0, std::vector<int32_t>{}, moves);
  CHECK(moves.empty());
  compaction_moves(10, std::vector<int32_t>{0, 3, 8, 9}, moves);  // docs/cache.md's example
  REQUIRE(moves.size() == 2);
  CHECK((moves[0].dst == 1 && moves[0].src == 9 && moves[1].dst == 2 && moves[1].src == 8));
}

TEST_CASE("errors: compaction_moves of a whole plan gives each head's moves, and none for an empty plan",
          "[cpu][errors]") {
  std::vector<slot_move> moves{{7, 7}}, one;
  std::vector<size_t> offsets{9};
  compaction_moves(eviction_plan(), moves, offsets);
  CHECK(moves.empty());
  CHECK(offsets == std::vector<size_t>{0});
  eviction_plan plan(1, 3);
  plan.set_head(0, 0, 10, std::vector<int32_t>{0, 3, 8, 9});
  plan.set_head(0, 1, 4, std::vector<int32_t>{0, 1, 2, 3});
  plan.set_head(0, 2, 6, std::vector<int32_t>{5});
  compaction_moves(plan, moves, offsets);
  REQUIRE(offsets == std::vector<size_t>{0, 2, 2, 3});
  for (int32_t h = 0; h < 3; ++h) {
    compaction_moves(plan.length_before(0, h), plan.kept(0, h), one);
    REQUIRE(one.size() == offsets[h + 1] - offsets[h]);
    for (size_t m = 0; m < one.size(); ++m)
      CHECK((moves[offsets[h] + m].dst == one[m].dst && moves[offsets[h] + m].src == one[m].src));
  }
}

TEST_CASE("errors: eviction_plan::reserve of a count no vector can hold reserves nothing", "[cpu][errors]") {
  eviction_plan plan(1, 1);
  plan.reserve(std::numeric_limits<size_t>::max());  // no std::length_error: bad_alloc stays the only exception
  plan.set_head(0, 0, 3, std::vector<int32_t>{0, 2});
  CHECK(plan.kept_count(0, 0) == 2);
  CHECK(plan.validate(std::vector<int32_t>{3}) == status::success);
}

// ---- a composed policy

TEST_CASE("errors: policy::validate reports the metric, then the allocator, evictor, schedule and RoPE", "[cpu][errors]") {
  auto p = kv_compress({.budget = token_budget::of_tokens(0), .block_size = 0, .protected_window = 4, .kernel = 4});
  p.schedule.interval = 0;
  p.positions = position_mode::rerotate;
  p.rope.theta = -1.f;
  CHECK(p.validate(model) == status::invalid_pool_kernel);  // metric first
  p.metric.observation.kernel = 7;
  CHECK(p.validate(model) == status::invalid_budget);  // then the allocator
  p.allocator.budget = token_budget::of_tokens(8);
  p.allocator.block_size = 4;
  CHECK(p.validate(model) == status::invalid_argument);  // the evictor's block size
  p.evictor.block_size = 4;
  CHECK(p.validate(model) == status::invalid_argument);  // the schedule
  p.schedule.interval = 1;
  CHECK(p.validate(model) == status::invalid_argument);  // RoPE, only because positions == rerotate
  p.positions = position_mode::keep_original;
  CHECK(p.validate(model) == status::success);
}
