// A part written outside the library: docs/concepts.md's "Writing a part" is the code between
// the markers, copied verbatim (CTest concepts_doc_examples checks the copy).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

// example-begin custom-metric
#include <kvtrim/kvtrim.hpp>

#include <cmath>
#include <span>

//! Key norm (kvpress's KnormPress): keys of small L2 norm tend to draw the most attention, so
//! a token scores -|k|. It reads no queries, so an engine may compress with it at any time.
struct key_norm {
  using kvc_concept = kvtrim::importance_metric_tag;  // M1: opts in to the concept
  static constexpr bool accumulates = false;          // M2: scores are recomputed, not summed
  // M3: a norm orders the tokens of one head only, so allocators that compare heads (Ada-KV,
  // KV-Compress) refuse it at compile time (rule C1).
  static constexpr kvtrim::score_scope scope = kvtrim::score_scope::within_head;

  // M4: decode attention adds nothing to the slot metrics.
  [[nodiscard]] kvtrim::decode_accumulation decode() const noexcept { return kvtrim::decode_accumulation::none; }
  // M5: checked before any work.
  [[nodiscard]] kvtrim::status validate(const kvtrim::attention_shape& shape,
                                        const kvtrim::protected_set& protect) const noexcept {
    if (const kvtrim::status s = shape.validate(); s != kvtrim::status::success) return s;
    return protect.validate();
  }
  // M6: one selection per KV head (K/V are never repeated per query head).
  [[nodiscard]] int32_t stored_heads(const kvtrim::attention_shape& shape) const noexcept { return shape.kv_heads; }
  // M7: out[h][j] = -|key of slot j of head h|; higher is kept first.
  [[nodiscard]] kvtrim::status score(const kvtrim::layer_view& layer, const kvtrim::protected_set&,
                                     std::span<const std::span<float>> out) const {
    if (out.size() != layer.heads.size()) return kvtrim::status::shape_mismatch;
    const auto d = static_cast<size_t>(layer.shape.head_dim);
    for (size_t h = 0; h < out.size(); ++h) {
      const kvtrim::head_view& head = layer.heads[h];
      if (out[h].size() != head.positions.size() || head.keys.size() != out[h].size() * d)
        return kvtrim::status::shape_mismatch;
      for (size_t j = 0; j < out[h].size(); ++j) {
        float squares = 0.f;
        for (const float x : head.keys.subspan(j * d, d)) squares += x * x;
        out[h][j] = -std::sqrt(squares);
      }
    }
    return kvtrim::status::success;
  }
};
static_assert(kvtrim::importance_metric<key_norm>);

// Composed with the library's allocator and evictor: 4 sinks and the 8 newest tokens always
// kept, then the keys of smallest norm up to `budget` tokens per head. The CPU backend runs it
// on any host store; a device cache is planned with cpu::plan and applied on the device.
using knorm_policy = kvtrim::policy<key_norm, kvtrim::uniform_budget, kvtrim::topk_evictor>;

knorm_policy knorm(int32_t budget) {
  knorm_policy p;
  p.allocator.budget = kvtrim::token_budget::of_tokens(budget);
  p.protect = {.sinks = 4, .recent = 8};
  return p;
}
// example-end custom-metric

namespace {

constexpr kvtrim::attention_shape model{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 8};
constexpr int32_t prompt = 100;

//! Token t of head (l, h) gets a random direction scaled to norms[l][h][t], a shuffled 1..100.
std::vector<float> keys_with_norms(std::vector<float>& norms, std::mt19937& rng) {
  const auto d = static_cast<size_t>(model.head_dim);
  std::normal_distribution<float> normal;
  std::vector<float> keys;  // [L][t][Hkv][d]
  norms.assign(static_cast<size_t>(model.layers) * model.kv_heads * prompt, 0.f);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      std::vector<float> row(prompt);
      for (int32_t t = 0; t < prompt; ++t) row[static_cast<size_t>(t)] = static_cast<float>(t + 1);
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), norms.begin() + (static_cast<std::ptrdiff_t>(l) * model.kv_heads + h) * prompt);
    }
  keys.resize(static_cast<size_t>(model.layers) * prompt * model.kv_heads * d);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t t = 0; t < prompt; ++t)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        std::vector<float> v(d);
        float sq = 0.f;
        for (float& x : v) {
          x = normal(rng);
          sq += x * x;
        }
        const float scale = norms[(static_cast<size_t>(l) * model.kv_heads + h) * prompt + t] / std::sqrt(sq);
        for (size_t c = 0; c < d; ++c)
          keys[((static_cast<size_t>(l) * prompt + t) * model.kv_heads + h) * d + c] = v[c] * scale;
      }
  return keys;
}

}  // namespace

TEST_CASE("a metric written outside the library composes and keeps the keys of smallest norm", "[cpu][custom]") {
  std::mt19937 rng(5);
  std::vector<float> norms;
  const std::vector<float> keys = keys_with_norms(norms, rng);
  const std::vector<float> values(keys.size(), 0.f);
  std::vector<int32_t> positions(prompt);
  for (int32_t t = 0; t < prompt; ++t) positions[static_cast<size_t>(t)] = t;
  kvtrim::paged_cache<float> cache;
  REQUIRE(kvtrim::paged_cache<float>::create({model, 16, 64, 1, prompt}, cache) == kvtrim::status::success);
  REQUIRE(cache.add_sequence(1) == kvtrim::status::success);
  REQUIRE(cache.append(1, positions, keys, values) == kvtrim::status::success);

  const int32_t budget = 24;
  REQUIRE(kvtrim::cpu::compress(knorm(budget), cache, 1, model, {}) == kvtrim::status::success);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CAPTURE(l, h);
      // Expected: sinks 0..3, the newest 92..99, and the 12 smallest norms among 4..91.
      std::vector<std::pair<float, int32_t>> middle;
      for (int32_t t = 4; t < prompt - 8; ++t)
        middle.emplace_back(norms[(static_cast<size_t>(l) * model.kv_heads + h) * prompt + t], t);
      std::sort(middle.begin(), middle.end());
      std::set<int32_t> expected;
      for (int32_t t = 0; t < 4; ++t) expected.insert(t);
      for (int32_t t = prompt - 8; t < prompt; ++t) expected.insert(t);
      for (size_t i = 0; i < 12; ++i) expected.insert(middle[i].second);

      const int32_t n = cache.head_length(1, l, h);
      REQUIRE(n == budget);
      std::vector<int32_t> kept(static_cast<size_t>(n));
      std::vector<float> kept_keys(static_cast<size_t>(n) * model.head_dim), metric(static_cast<size_t>(n));
      REQUIRE(cache.read_head(1, l, h, kept, kept_keys, metric) == kvtrim::status::success);
      CHECK(std::set<int32_t>(kept.begin(), kept.end()) == expected);
    }
}

TEST_CASE("a metric written outside the library: its bad inputs", "[cpu][custom]") {
  CHECK(knorm(24).validate(model) == kvtrim::status::success);
  CHECK(knorm(24).validate({.layers = 2, .q_heads = 3, .kv_heads = 2, .head_dim = 8}) == kvtrim::status::invalid_group);
  CHECK(knorm(8).validate(model) == kvtrim::status::budget_below_protected);  // 4 sinks + 8 newest
  const std::vector<int32_t> positions{0, 1};
  const std::vector<float> keys(2 * 8, 1.f);
  const std::vector<kvtrim::head_view> heads{{positions, keys, {}}, {positions, keys, {}}};
  const kvtrim::layer_view layer{0, model, heads, {}};
  std::vector<float> a(2), b(3);
  const std::vector<std::span<float>> wrong{a, b};
  CHECK(key_norm{}.score(layer, {}, wrong) == kvtrim::status::shape_mismatch);  // head 1 has 2 slots
  const std::vector<std::span<float>> one{a};
  CHECK(key_norm{}.score(layer, {}, one) == kvtrim::status::shape_mismatch);
  const std::vector<std::span<float>> right{a, std::span<float>(b).first(2)};
  REQUIRE(key_norm{}.score(layer, {}, right) == kvtrim::status::success);
  CHECK(a[0] == Approx(-std::sqrt(8.f)));
}
