// The six presets on the CPU backend, on an LLM-shaped synthetic prompt: each KV head has a
// few "heavy" keys that its queries attend to. Prints, per preset, how many tokens each head
// keeps and how many of the heavy keys survive.
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kvtrim/kvtrim.hpp"

namespace {

constexpr kvtrim::attention_shape model{4, 8, 2, 64};  // L, Hq, Hkv, d
constexpr int32_t prompt = 1024;
constexpr int32_t window = 32;

struct prompt_data {
  std::vector<float> keys;         // [L][n][Hkv][d]
  std::vector<float> queries;      // [L][window][Hq][d]
  std::vector<int32_t> positions;  // [window]
  std::set<int32_t> heavy;         // positions the queries attend to
};

//! Heavy keys point along one direction per (layer, KV head); queries of that head too.
prompt_data make_prompt() {
  prompt_data p;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_int_distribution<int32_t> pick(1, prompt - window - 1);
  for (int i = 0; i < 24; ++i) p.heavy.insert(pick(rng));
  const size_t d = model.head_dim;
  std::vector<float> dir(static_cast<size_t>(model.layers) * model.kv_heads * d);
  for (auto& x : dir) x = normal(rng) / 8.f;
  p.keys.resize(static_cast<size_t>(model.layers) * prompt * model.kv_heads * d);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t t = 0; t < prompt; ++t)
      for (int32_t h = 0; h < model.kv_heads; ++h)
        for (size_t c = 0; c < d; ++c) {
          const float boost = (p.heavy.count(t) || t == 0) ? 6.f : 0.f;
          p.keys[((static_cast<size_t>(l) * prompt + t) * model.kv_heads + h) * d + c] =
              normal(rng) + boost * 8.f * dir[(static_cast<size_t>(l) * model.kv_heads + h) * d + c];
        }
  p.queries.resize(static_cast<size_t>(model.layers) * window * model.q_heads * d);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t r = 0; r < window; ++r)
      for (int32_t qh = 0; qh < model.q_heads; ++qh)
        for (size_t c = 0; c < d; ++c)
          p.queries[((static_cast<size_t>(l) * window + r) * model.q_heads + qh) * d + c] =
              normal(rng) + 8.f * dir[(static_cast<size_t>(l) * model.kv_heads + qh / model.group()) * d + c];
  for (int32_t r = 0; r < window; ++r) p.positions.push_back(prompt - window + r);
  return p;
}

template <class Policy>
void run(const char* name, const Policy& policy, const prompt_data& p) {
  kvtrim::dense_cache cache(model, 1, prompt);
  const size_t d = model.head_dim, width = static_cast<size_t>(model.kv_heads) * d;
  const std::vector<float> values(width, 0.f);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t t = 0; t < prompt; ++t)
      kvtrim::throw_if_error(
          cache.append(0, l, t, {p.keys.data() + (static_cast<size_t>(l) * prompt + t) * width, width}, values),
          "append");
  kvtrim::throw_if_error(kvtrim::cpu::compress(policy, cache, 0, model, {p.queries, p.positions}), name);

  int64_t kept = 0, heavy_kept = 0, heavy_total = 0;
  std::string per_head;
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      const auto pos = cache.positions(0, l, h);
      kept += static_cast<int64_t>(pos.size());
      per_head += ' ';
      per_head += std::to_string(pos.size());
      for (const int32_t t : pos) heavy_kept += p.heavy.count(t);
      heavy_total += static_cast<int64_t>(p.heavy.size());
    }
  std::printf("%-14s kept %5.1f%% of %d tokens | heavy keys kept %3lld/%lld | per (layer, head):%s\n", name,
              100.0 * static_cast<double>(kept) / (static_cast<double>(prompt) * model.layers * model.kv_heads),
              prompt, static_cast<long long>(heavy_kept), static_cast<long long>(heavy_total), per_head.c_str());
}

}  // namespace

int main() {
  using namespace kvtrim;
  const prompt_data p = make_prompt();
  const token_budget budget = token_budget::of_tokens(128);
  std::printf("prompt %d tokens, %d layers x %d KV heads (GQA %d/%d, d %d), budget 128 tokens per head\n\n", prompt,
              model.layers, model.kv_heads, model.q_heads, model.kv_heads, model.head_dim);
  run("streaming_llm", streaming_llm({.budget = budget}), p);
  run("h2o", h2o({.budget = budget, .recent = window}), p);
  run("snapkv", snapkv({.budget = budget, .window = window}), p);
  run("pyramidkv", pyramidkv({.budget = budget, .window = window}), p);
  run("ada_kv", ada_kv({.budget = budget, .window = window}), p);
  run("kv_compress", kv_compress({.budget = budget, .protected_window = window}), p);
}
