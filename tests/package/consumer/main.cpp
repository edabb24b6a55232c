// Compresses a small dense cache with the SnapKV preset through the installed package.
#include <cstdint>
#include <cstdio>
#include <vector>

#include <kvtrim/kvtrim.hpp>

int main() {
  const kvtrim::attention_shape model{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 8};
  constexpr int32_t tokens = 40, window = 4, budget = 16;
  kvtrim::dense_cache cache(model, /*batch=*/1, /*capacity=*/tokens);

  std::vector<float> k(static_cast<size_t>(model.kv_heads) * model.head_dim), v(k.size());
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t t = 0; t < tokens; ++t) {
      for (size_t i = 0; i < k.size(); ++i) {
        k[i] = static_cast<float>((t * 7 + static_cast<int32_t>(i) * 3 + l) % 11) / 11.f - 0.5f;
        v[i] = 1.f;
      }
      if (cache.append(0, l, t, k, v) != kvtrim::status::success) return 1;
    }
  // The observation window: the last `window` positions' queries, [L][rows][Hq][d].
  std::vector<float> queries(static_cast<size_t>(model.layers) * window * model.q_heads * model.head_dim);
  for (size_t i = 0; i < queries.size(); ++i) queries[i] = static_cast<float>(i % 5) - 2.f;
  std::vector<int32_t> positions;
  for (int32_t r = 0; r < window; ++r) positions.push_back(tokens - window + r);

  const auto policy = kvtrim::snapkv({.budget = kvtrim::token_budget::of_tokens(budget), .window = window});
  const kvtrim::status s = kvtrim::cpu::compress(policy, cache, 0, model, {queries, positions});
  if (s != kvtrim::status::success) {
    std::printf("compress failed: %s\n", kvtrim::to_string(s).data());
    return 1;
  }
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h)
      if (cache.head_length(0, l, h) != budget) {
        std::printf("layer %d head %d kept %d tokens, expected %d\n", l, h, cache.head_length(0, l, h), budget);
        return 1;
      }
  std::printf("kvtrim %d.%d.%d package: snapkv kept %d of %d tokens per head\n", KVTRIM_VERSION_MAJOR,
              KVTRIM_VERSION_MINOR, KVTRIM_VERSION_PATCH, budget, tokens);
  return 0;
}
