// Properties of compression on the CPU backend, for every preset.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "fixtures.hpp"
#include "kvtrim/kvtrim.hpp"

using namespace kvtrim;

namespace {
const attention_shape model{3, 4, 2, 8};

//! The six presets at a budget of `c` tokens per head, each with a small protected set.
auto presets(int32_t c) {
  return std::make_tuple(streaming_llm({.budget = token_budget::of_tokens(c), .sinks = 2}),
                         h2o({.budget = token_budget::of_tokens(c), .recent = 4}),
                         snapkv({.budget = token_budget::of_tokens(c), .window = 4}),
                         pyramidkv({.budget = token_budget::of_tokens(c), .window = 4}),
                         ada_kv({.budget = token_budget::of_tokens(c), .window = 4}),
                         kv_compress({.budget = token_budget::of_tokens(c), .block_size = 4, .protected_window = 5}));
}
constexpr const char* preset_names[] = {"streaming_llm", "h2o", "snapkv", "pyramidkv", "ada_kv", "kv_compress"};

template <class F>
void for_each_preset(int32_t c, F&& f) {
  std::apply([&](const auto&... p) {
    size_t i = 0;
    (f(p, preset_names[i++]), ...);
  }, presets(c));
}

std::vector<int32_t> sorted_positions(const dense_cache& c, int32_t l, int32_t h) {
  const auto p = c.positions(0, l, h);
  std::vector<int32_t> v(p.begin(), p.end());
  std::sort(v.begin(), v.end());
  return v;
}
}  // namespace

TEST_CASE("a sequence within the budget keeps every token", "[cpu][compress]") {
  for_each_preset(40, [](const auto& p, const char* name) {
    CAPTURE(name);
    auto f = fixtures::make_cache(model, 40, 8);
    const auto before = fixtures::take_snapshot(f.cache);
    REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
    const auto after = fixtures::take_snapshot(f.cache);
    CHECK(after.lengths == before.lengths);
    CHECK(after.keys == before.keys);
  });
}

TEST_CASE("compression keeps the protected tokens and what the plan chose", "[cpu][compress]") {
  for_each_preset(16, [](const auto& p, const char* name) {
    CAPTURE(name);
    auto f = fixtures::make_cache(model, 64, 8);
    const auto before = fixtures::take_snapshot(f.cache);
    cpu::compression_result planned;
    REQUIRE(cpu::plan(p, f.cache, 0, f.model, f.observation(), 0, model.layers, planned) == status::success);
    REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        CAPTURE(l, h);
        const auto kept = sorted_positions(f.cache, l, h);
        const auto chosen = planned.plan.kept(l, h);  // fresh cache: slot == position
        CHECK(kept == std::vector<int32_t>(chosen.begin(), chosen.end()));
        const std::set<int32_t> kept_set(kept.begin(), kept.end());
        for (int32_t pos = 0; pos < 64; ++pos)
          if (p.protect.contains(pos, 64)) CHECK(kept_set.count(pos) == 1);
        // K and V of each kept slot are the original token's.
        const auto pos = f.cache.positions(0, l, h);
        const auto keys = f.cache.keys(0, l, h);
        const auto values = f.cache.values(0, l, h);
        const size_t d = model.head_dim, head_base = (static_cast<size_t>(l) * model.kv_heads + h) * 64 * d;
        for (size_t s = 0; s < pos.size(); ++s)
          for (size_t c = 0; c < d; ++c) {
            CHECK(keys[s * d + c] == before.keys[head_base + static_cast<size_t>(pos[s]) * d + c]);
            CHECK(values[s * d + c] == before.values[head_base + static_cast<size_t>(pos[s]) * d + c]);
          }
      }
  });
}

TEST_CASE("uniform presets keep exactly the budget, adaptive and global ones keep the same total", "[cpu][compress]") {
  for_each_preset(16, [](const auto& p, const char* name) {
    CAPTURE(name);
    auto f = fixtures::make_cache(model, 64, 8);
    REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
    int32_t total = 0;
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        const int32_t n = f.cache.head_length(0, l, h);
        CHECK(n >= 1);
        total += n;
        if (std::string(name) == "streaming_llm" || std::string(name) == "h2o" || std::string(name) == "snapkv")
          CHECK(n == 16);
      }
    const int32_t heads = model.layers * model.kv_heads;
    if (std::string(name) == "kv_compress") CHECK(total == 16 * heads);  // block-aligned budget, exact
    if (std::string(name) == "ada_kv") CHECK(std::abs(total - 16 * heads) <= heads);  // float rounding of b_h
    if (std::string(name) == "pyramidkv") CHECK(total >= 16 * heads);  // floor of the step keeps a little more
  });
}

TEST_CASE("compressing twice with the same observation changes nothing more", "[cpu][compress]") {
  const auto p = snapkv({.budget = token_budget::of_tokens(12), .window = 4});
  auto f = fixtures::make_cache(model, 48, 4);
  REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
  const auto once = fixtures::take_snapshot(f.cache);
  REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
  CHECK(fixtures::take_snapshot(f.cache) == once);
}

TEST_CASE("a frozen pyramid keeps each layer's share of it where the head's own length would not", "[cpu][compress]") {
  // C 16, w 4, 3 layers: the pyramid of a 200-token prompt selects 24, 12, 0, so heads keep
  // up to 28, 16, 4. A 20-token head is below 2 (C - w) = 24, where the head's own pyramid is
  // SnapKV's uniform 16.
  auto frozen = fixtures::make_cache(model, 20, 4);
  const auto p = pyramidkv({.budget = token_budget::of_tokens(16), .window = 4, .context = 200});
  REQUIRE(cpu::compress(p, frozen.cache, 0, frozen.model, frozen.observation()) == status::success);
  auto own = fixtures::make_cache(model, 20, 4);
  REQUIRE(cpu::compress(pyramidkv({.budget = token_budget::of_tokens(16), .window = 4}), own.cache, 0, own.model,
                        own.observation()) == status::success);
  const std::vector<int32_t> frozen_lengths{20, 16, 4};
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CAPTURE(l, h);
      CHECK(frozen.cache.head_length(0, l, h) == frozen_lengths[static_cast<size_t>(l)]);
      CHECK(own.cache.head_length(0, l, h) == 16);
      CHECK(sorted_positions(frozen.cache, l, h).back() == 19);  // the window stays
    }
  // Compressing again keeps the same tokens: the caps do not move with the head's length.
  const auto once = fixtures::take_snapshot(frozen.cache);
  REQUIRE(cpu::compress(p, frozen.cache, 0, frozen.model, frozen.observation()) == status::success);
  CHECK(fixtures::take_snapshot(frozen.cache) == once);
}

TEST_CASE("StreamingLLM keeps the sinks and the most recent tokens", "[cpu][compress]") {
  auto f = fixtures::make_cache(model, 50, 0);
  REQUIRE(cpu::compress(streaming_llm({.budget = token_budget::of_tokens(10), .sinks = 3}), f.cache, 0, f.model, {}) ==
          status::success);
  const std::vector<int32_t> expected{0, 1, 2, 43, 44, 45, 46, 47, 48, 49};
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) CHECK(sorted_positions(f.cache, l, h) == expected);
}

namespace {
//! A user metric that scores every token the same: only the tie-break rule decides.
struct flat_metric {
  using kvc_concept = importance_metric_tag;
  static constexpr bool accumulates = false;
  static constexpr score_scope scope = score_scope::across_heads;
  [[nodiscard]] decode_accumulation decode() const noexcept { return decode_accumulation::none; }
  [[nodiscard]] status validate(const attention_shape& s, const protected_set& p) const noexcept {
    return s.validate() == status::success ? p.validate() : s.validate();
  }
  [[nodiscard]] int32_t stored_heads(const attention_shape& s) const noexcept { return s.kv_heads; }
  [[nodiscard]] status score(const layer_view&, const protected_set&, std::span<const std::span<float>> out) const {
    for (auto row : out) std::fill(row.begin(), row.end(), 1.f);
    return status::success;
  }
};
static_assert(importance_metric<flat_metric>);
}  // namespace

TEST_CASE("ties are broken by the lower position", "[cpu][compress][tie-break]") {
  policy<flat_metric, uniform_budget, topk_evictor> p;
  p.allocator.budget = token_budget::of_tokens(6);
  p.protect = {.sinks = 0, .recent = 2};
  auto f = fixtures::make_cache(model, 20, 0);
  REQUIRE(cpu::compress(p, f.cache, 0, f.model, {}) == status::success);
  CHECK(sorted_positions(f.cache, 0, 0) == std::vector<int32_t>{0, 1, 2, 3, 18, 19});
  // The rule itself, on the comparator every backend uses.
  CHECK(ranks_before({1.f, 3, 9}, {1.f, 4, 0}));
  CHECK(ranks_before({2.f, 9, 0}, {1.f, 0, 0}));
  CHECK_FALSE(ranks_before({1.f, 4, 0}, {1.f, 3, 9}));
}

TEST_CASE("a ratio budget keeps at least one token per head", "[cpu][compress]") {
  auto p = streaming_llm({.budget = token_budget::of_ratio(0.01f), .sinks = 0});
  auto f = fixtures::make_cache(model, 30, 0);
  REQUIRE(cpu::compress(p, f.cache, 0, f.model, {}) == status::success);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) CHECK(sorted_positions(f.cache, l, h) == std::vector<int32_t>{29});
}

TEST_CASE("a protected window longer than the sequence evicts nothing", "[cpu][compress]") {
  auto f = fixtures::make_cache(model, 10, 4);
  const auto before = fixtures::take_snapshot(f.cache);
  REQUIRE(cpu::compress(snapkv({.budget = token_budget::of_tokens(20), .window = 20}), f.cache, 0, f.model,
                        f.observation()) == status::success);
  CHECK(fixtures::take_snapshot(f.cache) == before);
}

TEST_CASE("compress_layer touches only its layer", "[cpu][compress]") {
  auto f = fixtures::make_cache(model, 40, 4);
  const size_t per_layer = 4 * static_cast<size_t>(model.q_heads) * model.head_dim;
  const std::span<const float> layer1(f.queries.data() + per_layer, per_layer);
  REQUIRE(cpu::compress_layer(snapkv({.budget = token_budget::of_tokens(10), .window = 4}), f.cache, 0, f.model, 1,
                              layer1, f.positions) == status::success);
  CHECK(f.cache.head_length(0, 0, 0) == 40);
  CHECK(f.cache.head_length(0, 1, 0) == 10);
  CHECK(f.cache.head_length(0, 2, 1) == 40);
}

TEST_CASE("the query-head compatibility mode selects per query head", "[cpu][compress]") {
  auto f = fixtures::make_cache(model, 40, 4, 3, model.q_heads);
  const auto p = snapkv({.budget = token_budget::of_tokens(10), .window = 4, .reduce = gqa_reduce::per_query_head});
  REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
  for (int32_t h = 0; h < model.q_heads; ++h) CHECK(f.cache.head_length(0, 0, h) == 10);
}

TEST_CASE("sequences of a batch are compressed independently", "[cpu][compress]") {
  dense_cache cache({1, 2, 1, 4}, 2, 16);
  const std::vector<float> k{1, 0, 0, 0}, v{0, 1, 0, 0};
  for (int32_t t = 0; t < 16; ++t) {
    REQUIRE(cache.append(0, 0, t, k, v) == status::success);
    if (t < 9) REQUIRE(cache.append(1, 0, t, k, v) == status::success);
  }
  const auto p = streaming_llm({.budget = token_budget::of_tokens(6), .sinks = 1});
  REQUIRE(cpu::compress(p, cache, 1, {1, 2, 1, 4}, {}) == status::success);
  CHECK(cache.head_length(0, 0, 0) == 16);
  CHECK(cache.head_length(1, 0, 0) == 6);
}

TEST_CASE("decode attention accumulates probabilities into slot metrics", "[cpu][compress][decode]") {
  auto f = fixtures::make_cache(model, 12, 1);
  std::vector<float> q(static_cast<size_t>(model.q_heads) * model.head_dim, 0.3f), out(q.size()), scratch;
  // H2O: += mean over the group of p; each head's increments sum to 1.
  REQUIRE(cpu::decode_attention(f.cache, 0, 0, model.q_heads, q, out, decode_accumulation::sum, gqa_reduce::mean,
                                scratch) == status::success);
  for (int32_t h = 0; h < model.kv_heads; ++h) {
    const auto m = f.cache.metrics(0, 0, h);
    CHECK(std::accumulate(m.begin(), m.end(), 0.0) == Approx(1.0).epsilon(1e-5));
  }
  // KV-Compress: += sum over the group of p^2, checked against a direct computation.
  auto g = fixtures::make_cache(model, 12, 1);
  REQUIRE(cpu::decode_attention(g.cache, 0, 1, model.q_heads, q, out, decode_accumulation::squared_sum,
                                gqa_reduce::sum, scratch) == status::success);
  const auto keys = g.cache.keys(0, 1, 0);
  std::vector<double> p(12);
  double expected0 = 0;
  for (int32_t qh = 0; qh < 2; ++qh) {  // query heads 0 and 1 read KV head 0 (all q entries equal)
    double denom = 0;
    for (size_t j = 0; j < 12; ++j) {
      double dot = 0;
      for (size_t c = 0; c < 8; ++c) dot += 0.3 * keys[j * 8 + c];
      p[j] = std::exp(dot / std::sqrt(8.0));
      denom += p[j];
    }
    expected0 += (p[0] / denom) * (p[0] / denom);
  }
  CHECK(g.cache.metrics(0, 1, 0)[0] == Approx(expected0).epsilon(1e-4));
  // Attention output of query head 0 is the softmax-weighted mean of the values.
  CHECK(std::isfinite(out[0]));
}

TEST_CASE("H2O ranks by what decode attention accumulated", "[cpu][compress][decode]") {
  auto f = fixtures::make_cache(model, 20, 20);
  auto p = h2o({.budget = token_budget::of_tokens(8), .recent = 2});
  // Prefill scores go into the metrics; then drive token 5 to the top of every head.
  REQUIRE(cpu::compress(snapkv({.budget = token_budget::of_tokens(20), .window = 2}), f.cache, 0, f.model,
                        f.observation()) == status::success);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) f.cache.metrics(0, l, h)[5] = 100.f;
  REQUIRE(cpu::compress(p, f.cache, 0, f.model, {}) == status::success);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      const auto kept = sorted_positions(f.cache, l, h);
      CHECK(std::count(kept.begin(), kept.end(), 5) == 1);
      CHECK(kept.size() == 8);
    }
}

TEST_CASE("re-rotation turns kept keys to their new positions", "[cpu][compress][positions]") {
  // Keys built as RoPE(base, position) with interleaved pairs; after eviction and
  // re-rotation each kept key must equal RoPE(base, its rank).
  const attention_shape m{1, 1, 1, 8};
  dense_cache cache(m, 1, 16);
  const rope_config rope{.theta = 10000.f, .pairing = rope_pairing::interleaved};
  std::vector<float> base(8);
  std::iota(base.begin(), base.end(), 1.f);
  for (int32_t t = 0; t < 16; ++t) {
    std::vector<float> k = base;
    rotate_key(k.data(), 8, t, rope);
    REQUIRE(cache.append(0, 0, t, k, k) == status::success);
  }
  auto p = streaming_llm({.budget = token_budget::of_tokens(6), .sinks = 2});
  p.positions = position_mode::rerotate;
  p.rope = rope;
  REQUIRE(cpu::compress(p, cache, 0, m, {}) == status::success);
  const auto pos = cache.positions(0, 0, 0);
  const auto keys = cache.keys(0, 0, 0);
  REQUIRE(pos.size() == 6);
  std::vector<int32_t> sorted(pos.begin(), pos.end());
  std::sort(sorted.begin(), sorted.end());
  CHECK(sorted == std::vector<int32_t>{0, 1, 2, 3, 4, 5});
  for (size_t s = 0; s < 6; ++s) {
    std::vector<float> want = base;
    rotate_key(want.data(), 8, pos[s], rope);
    for (size_t c = 0; c < 8; ++c) CHECK(keys[s * 8 + c] == Approx(want[c]).margin(1e-4));
  }
}

TEST_CASE("rotate_key pairs dimensions as configured and round-trips", "[cpu][positions]") {
  std::vector<float> k{1, 2, 3, 4};
  rotate_key(k.data(), 4, 3, {.theta = 100.f, .pairing = rope_pairing::rotate_half});
  rotate_key(k.data(), 4, -3, {.theta = 100.f, .pairing = rope_pairing::rotate_half});
  CHECK(k[0] == Approx(1));
  CHECK(k[3] == Approx(4));
  // Pair 0 of rotate_half is (x0, x2).
  std::vector<float> e{1, 0, 0, 0};
  // Pair 0 turns by delta * theta^0 = 1 radian.
  rotate_key(e.data(), 4, 1, {.theta = 100.f, .pairing = rope_pairing::rotate_half});
  CHECK(e[0] == Approx(std::cos(1.0)).margin(1e-6));
  CHECK(e[2] == Approx(std::sin(1.0)).margin(1e-6));
  CHECK(e[1] == 0.f);
}
