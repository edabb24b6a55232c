// The README's examples (house style rule 9: docs examples come from compiled tests). The code
// between each pair of markers is copied verbatim into README.md; CTest's readme_examples
// checks that the copies still match.
#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdint>

// example-begin compose
#include <kvtrim/kvtrim.hpp>

#include <random>
#include <vector>

// Ada-KV's adaptive per-head budgets, ranked by accumulated attention (H2O's metric), with
// token-level top-k eviction: a composition none of the presets names.
using ada_h2o_policy =
    kvtrim::policy<kvtrim::accumulated_attention, kvtrim::adaptive_budget<>, kvtrim::topk_evictor>;

kvtrim::dense_cache compose_example() {
  ada_h2o_policy p;
  p.allocator.base.budget = kvtrim::token_budget::of_tokens(24);  // mean per head, protected included
  p.allocator.alpha = 0.2f;               // safeguard: every head keeps >= 20% of the base budget
  p.protect = {.sinks = 4, .recent = 8};  // always kept: 4 attention sinks, the 8 newest tokens

  // A 64-token prompt in a dense cache [batch 1][L 2][Hkv 2][64][d 16]: random keys and values.
  const kvtrim::attention_shape model{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 16};
  const int32_t prompt = 64, window = 8;
  kvtrim::dense_cache cache(model, /*batch=*/1, /*capacity=*/prompt);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> k(model.kv_heads * model.head_dim), v(k.size());  // [Hkv][d]
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t t = 0; t < prompt; ++t) {
      for (float& x : k) x = normal(rng);
      for (float& x : v) x = normal(rng);
      kvtrim::throw_if_error(cache.append(/*seq=*/0, l, /*position=*/t, k, v), "append");
    }

  // The prompt's last `window` queries observe the keys: [L][window][Hq][d], and their positions.
  std::vector<float> queries(model.layers * window * model.q_heads * model.head_dim);
  for (float& x : queries) x = normal(rng);
  std::vector<int32_t> positions;
  for (int32_t r = 0; r < window; ++r) positions.push_back(prompt - window + r);

  kvtrim::throw_if_error(kvtrim::cpu::compress(p, cache, /*seq=*/0, model, {queries, positions}), "compress");
  return cache;
}
// example-end compose

// example-begin preset
// SnapKV with 1024 tokens per head (observation window included) and a 16-token window.
const kvtrim::snapkv_policy snapkv_1k =
    kvtrim::snapkv({.budget = kvtrim::token_budget::of_tokens(1024), .window = 16});
// example-end preset

TEST_CASE("README composition: Ada-KV budgets over accumulated attention on a dense cache", "[cpu][readme]") {
  const kvtrim::dense_cache cache = compose_example();
  const kvtrim::attention_shape shape = cache.shape();
  for (int32_t l = 0; l < shape.layers; ++l) {
    CAPTURE(l);
    int32_t layer_total = 0;
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      CAPTURE(h);
      const auto positions = cache.positions(0, l, h);
      const auto length = static_cast<int32_t>(positions.size());
      layer_total += length;
      CHECK(length >= 12);  // the protected set
      CHECK(length < 64);
      for (const int32_t p : {0, 1, 2, 3, 56, 57, 58, 59, 60, 61, 62, 63})
        CHECK(std::find(positions.begin(), positions.end(), p) != positions.end());
      // The observation was accumulated into every kept slot's metric.
      const auto metrics = cache.metrics(0, l, h);
      CHECK(std::all_of(metrics.begin(), metrics.end(), [](float m) { return m >= 0.f; }));
      CHECK(std::any_of(metrics.begin(), metrics.end(), [](float m) { return m > 0.f; }));
    }
    // Heads share the layer's budget (2 x 24) by score; Ada-KV's rounding may miss it by a few.
    CHECK(layer_total >= 2 * 24 - 2);
    CHECK(layer_total <= 2 * 24 + 2);
  }
}

TEST_CASE("README preset: SnapKV with its options", "[cpu][readme]") {
  CHECK(snapkv_1k.allocator.budget.tokens == 1024);
  CHECK(snapkv_1k.protect.recent == 16);
  CHECK(snapkv_1k.metric.kernel == 7);
  CHECK(snapkv_1k.validate({.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 16}) == kvtrim::status::success);
}
