// The llama example's kvtrim side: the kvtrim-backed cache against the dense baseline, the
// budget each protocol promises, the evaluation's reference numbers, and the heatmap.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "engine.hpp"
#include "eval.hpp"
#include "forward.hpp"
#include "full_cache.hpp"
#include "kvtrim_cache.hpp"
#include "policies.hpp"
#include "svg.hpp"
#include "text_stream.hpp"
#include "tokenizer.hpp"

#ifndef KVTRIM_SHARED_DIR
#error "KVTRIM_SHARED_DIR must name the shared folder (set by tests/llama/CMakeLists.txt)"
#endif

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

const fs::path shared_dir = KVTRIM_SHARED_DIR;

void require_input(const fs::path& path) {
  if (!fs::is_regular_file(path))
    FAIL("required input " << path.string() << " is missing; point KVTRIM_SHARED_DIR at the shared folder");
}

const llama::checkpoint& model() {
  const fs::path p = shared_dir / "models/stories260K/stories260K.bin";
  require_input(p);
  static const llama::checkpoint loaded(p);
  return loaded;
}

const llama::tokenizer& tok() {
  const fs::path p = shared_dir / "models/stories260K/tok512.bin";
  require_input(p);
  static const llama::tokenizer loaded(p, model().cfg().vocab_size);
  return loaded;
}

const std::vector<std::vector<int>>& windows() {
  const fs::path p = shared_dir / "data/tinystories/tinystories_valid_subset.txt";
  require_input(p);
  static const std::vector<std::vector<int>> w = [&] {
    const llama::text_stream stream(p, tok());
    std::vector<std::vector<int>> out;
    for (std::size_t i = 0; i < 4; ++i) out.push_back(stream.window(i));
    return out;
  }();
  return w;
}

const std::vector<llama::method> all_methods = {llama::method::streaming_llm, llama::method::h2o,
                                                llama::method::snapkv,        llama::method::pyramidkv,
                                                llama::method::ada_kv,        llama::method::kv_compress};

//! Methods that hold the same budget in every head.
bool uniform(llama::method m) {
  return m == llama::method::streaming_llm || m == llama::method::h2o || m == llama::method::snapkv;
}

}  // namespace

TEST_CASE("the kvtrim cache without compression matches the dense baseline", "[llama][kvtrim]") {
  const llama::checkpoint& m = model();
  const std::vector<int> prompt = tok().encode("Once upon a time", true);
  llama::run_state dense_state(m.cfg());
  llama::dense_full_cache dense(m.cfg());
  llama::with_policy(llama::method::full, 0, llama::protocol::streaming, [&](auto policy) {
    llama::sequence_engine engine(m, llama::method::full, m.cfg().seq_len, llama::protocol::streaming,
                                  std::move(policy), m.cfg().seq_len);
    std::vector<int> ids = prompt;
    for (int pos = 0; pos < 28; ++pos) {
      const auto a = engine.step(ids[static_cast<std::size_t>(pos)], pos);
      const std::vector<float> kv(a.begin(), a.end());
      const auto b = llama::forward(m, dense_state, dense, ids[static_cast<std::size_t>(pos)], pos);
      for (std::size_t i = 0; i < kv.size(); ++i) REQUIRE(kv[i] == Approx(b[i]).margin(1e-3));
      if (static_cast<std::size_t>(pos) + 1 == ids.size()) ids.push_back(llama::argmax(kv));
    }
    CHECK(ids == std::vector<int>{1,   403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317,
                                  426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282});
    CHECK(engine.compressions() == 0);
    CHECK(engine.cache().total_tokens() == 28 * 5 * 4);
  });
}

TEST_CASE("full-cache perplexity of the evaluation on 4 windows is 3.889 +- 0.3%", "[llama][kvtrim][eval]") {
  const llama::eval_result r =
      llama::evaluate(model(), windows(), {.protocols = {llama::protocol::streaming}, .methods = {}, .windows = 4});
  REQUIRE(r.rows.size() == 1);
  const llama::eval_row& full = r.rows.front();
  CHECK(full.job.meth == llama::method::full);
  CHECK(full.predictions == 4 * 511);
  CHECK(full.ppl() == Approx(3.889).epsilon(0.003));
  CHECK(full.nll() == Approx(1.358).margin(0.003));
  CHECK(full.top1() == 1.0);
  CHECK(full.kv_fraction() == 1.0);
}

TEST_CASE("streaming: every step attends to at most the budget, and the cache is full at it",
          "[llama][kvtrim][streaming]") {
  const llama::checkpoint& m = model();
  const std::vector<int>& w = windows().front();
  // 39: Ada-KV's safeguard rounds its first compression's layers over their total (regression:
  // one token of headroom per head did not absorb it).
  const int budget = GENERATE(36, 39, 68);
  const std::int64_t heads = 5 * 4;
  for (const llama::method meth : all_methods) {
    CAPTURE(std::string(llama::to_string(meth)), budget);
    llama::with_policy(meth, budget, llama::protocol::streaming, [&](auto policy) {
      llama::sequence_engine engine(m, meth, budget, llama::protocol::streaming, std::move(policy), m.cfg().seq_len);
      const llama::streaming_limits& lim = engine.limits();
      if (uniform(meth))
        for (const int32_t h : lim.head) CHECK(h == budget);
      // Every method holds the same total (PyramidKV's floored step may add a token per head
      // and layer, as in the reference).
      const std::int64_t total_limit = budget * heads + (meth == llama::method::pyramidkv ? 2 * heads : 0);
      std::int64_t least_after_fill = std::numeric_limits<std::int64_t>::max();
      for (int pos = 0; pos < 300; ++pos) {
        engine.step(w[static_cast<std::size_t>(pos)], pos);
        // What the step just attended to, the new token included.
        const auto& cache = engine.cache();
        for (int l = 0; l < 5; ++l) {
          for (int h = 0; h < 4; ++h) {
            REQUIRE(cache.head_length(l, h) >= 1);
            if (lim.head[static_cast<std::size_t>(l)] > 0)
              REQUIRE(cache.head_length(l, h) <= lim.head[static_cast<std::size_t>(l)]);
          }
          if (lim.layer[static_cast<std::size_t>(l)] > 0) REQUIRE(cache.layer_tokens(l) <= lim.layer[static_cast<std::size_t>(l)]);
        }
        if (lim.total > 0) REQUIRE(cache.total_tokens() <= lim.total);
        REQUIRE(cache.total_tokens() <= total_limit);
        if (pos >= 2 * budget) least_after_fill = std::min(least_after_fill, cache.total_tokens());
      }
      CHECK(engine.compressions() > 0);
      // Compressions keep close to the budget: within a KV-Compress block per head, or the
      // few tokens Ada-KV's per-head rounding costs.
      CHECK(least_after_fill >= (static_cast<std::int64_t>(budget) - llama::kvc_block_size) * heads);
    }, m.cfg().seq_len);
  }
}

TEST_CASE("streaming PyramidKV keeps the pyramid of a full-context prompt", "[llama][kvtrim][streaming]") {
  const kvtrim::attention_shape shape{5, 8, 4, 8};
  // C = 35 (36 less the new token), w = 8, n = 512, beta 20: min 1, max 53, step 13.
  const llama::streaming_limits lim = llama::limits_of(llama::method::pyramidkv, 36, shape, 512);
  CHECK(lim.head == std::vector<int32_t>{62, 49, 36, 23, 10});
  CHECK(lim.total == 0);
  const llama::streaming_limits ada = llama::limits_of(llama::method::ada_kv, 36, shape, 512);
  CHECK(ada.layer == std::vector<std::int64_t>{144, 144, 144, 144, 144});
  CHECK(llama::limits_of(llama::method::kv_compress, 36, shape, 512).total == 720);
}

TEST_CASE("prefill: the prompt is compressed once to the budget, then the cache grows",
          "[llama][kvtrim][prefill]") {
  const llama::checkpoint& m = model();
  const std::vector<int>& w = windows().front();
  const int budget = 36;
  for (const llama::method meth : all_methods) {
    CAPTURE(std::string(llama::to_string(meth)));
    llama::with_policy(meth, budget, llama::protocol::prefill, [&](auto policy) {
      llama::sequence_engine engine(m, meth, budget, llama::protocol::prefill, std::move(policy), m.cfg().seq_len);
      int pos = 0;
      for (; pos < llama::prefill_prompt_tokens; ++pos) engine.step(w[static_cast<std::size_t>(pos)], pos);
      CHECK(engine.cache().total_tokens() == 384 * 20);
      engine.end_prompt();
      CHECK(engine.compressions() == 1);
      const std::int64_t after = engine.cache().total_tokens();
      // Every method holds the same total, up to PyramidKV's floored step and Ada-KV's rounding.
      CHECK(after <= 36 * 20 + 20);
      CHECK(after >= 36 * 20 - 20);
      if (uniform(meth))
        for (int l = 0; l < 5; ++l)
          for (int h = 0; h < 4; ++h) CHECK(engine.cache().head_length(l, h) == budget);
      // Protected tokens survive: the last window (and StreamingLLM's sinks).
      const auto kept = engine.cache().kept_positions();
      for (const auto& head : kept) {
        CHECK(head.back() == 383);
        if (meth == llama::method::streaming_llm) CHECK(head.front() == 0);
      }
      for (; pos < 511; ++pos) engine.step(w[static_cast<std::size_t>(pos)], pos);
      CHECK(engine.compressions() == 1);
      CHECK(engine.cache().total_tokens() == after + 127 * 20);
    });
  }
}

TEST_CASE("compressing the paged cache returns its blocks to the pool", "[llama][kvtrim][paged]") {
  const llama::checkpoint& m = model();
  const std::vector<int>& w = windows().front();
  for (const llama::method meth : all_methods) {
    CAPTURE(std::string(llama::to_string(meth)));
    llama::with_policy(meth, 36, llama::protocol::prefill, [&](auto policy) {
      llama::sequence_engine engine(m, meth, 36, llama::protocol::prefill, std::move(policy), m.cfg().seq_len);
      for (int pos = 0; pos < llama::prefill_prompt_tokens; ++pos) engine.step(w[static_cast<std::size_t>(pos)], pos);
      const auto& paged = engine.cache().store();
      const std::int64_t before = paged.pool().used_blocks;
      CHECK(before == 20 * (384 / 4));  // 4-token blocks, one (layer, KV head) each
      engine.end_prompt();
      const std::int64_t after = paged.pool().used_blocks;
      std::int64_t needed = 0;
      for (int l = 0; l < 5; ++l)
        for (int h = 0; h < 4; ++h) needed += (engine.cache().head_length(l, h) + 3) / 4;
      CHECK(after == needed);  // every emptied block is back in the pool
      CHECK(after <= 20 * 10);
      CHECK(engine.cache().kv_bytes() == after * 4 * 2 * 8 * 4);
    });
  }
}

TEST_CASE("the dense and the paged store give the same logits under every method", "[llama][kvtrim][paged]") {
  const llama::checkpoint& m = model();
  const std::vector<int>& w = windows()[1];
  for (const llama::protocol proto : {llama::protocol::streaming, llama::protocol::prefill})
    for (const llama::method meth : all_methods) {
      CAPTURE(std::string(llama::to_string(proto)), std::string(llama::to_string(meth)));
      llama::with_policy(meth, 36, proto, [&](auto policy) {
        using policy_t = decltype(policy);
        llama::sequence_engine<policy_t, kvtrim::paged_cache<float>> paged(m, meth, 36, proto, policy, m.cfg().seq_len);
        llama::sequence_engine<policy_t, kvtrim::dense_view<float>> dense(m, meth, 36, proto, policy, m.cfg().seq_len);
        for (int pos = 0; pos < 450; ++pos) {
          if (proto == llama::protocol::prefill && pos == llama::prefill_prompt_tokens) {
            paged.end_prompt();
            dense.end_prompt();
          }
          const auto a = paged.step(w[static_cast<std::size_t>(pos)], pos);
          const std::vector<float> first(a.begin(), a.end());
          const auto b = dense.step(w[static_cast<std::size_t>(pos)], pos);
          REQUIRE(first == std::vector<float>(b.begin(), b.end()));
        }
        CHECK(paged.cache().kept_positions() == dense.cache().kept_positions());
        CHECK(paged.compressions() == dense.compressions());
      });
    }
}

TEST_CASE("evaluation rows: one per job, agreement in range, less memory than the full cache",
          "[llama][kvtrim][eval]") {
  const std::vector<std::vector<int>> one(windows().begin(), windows().begin() + 1);
  llama::eval_options opt{.protocols = {llama::protocol::streaming, llama::protocol::prefill},
                          .methods = all_methods,
                          .budgets = {36},
                          .windows = 1,
                          .threads = 2};
  opt.record_kept = true;
  opt.kept_protocol = llama::protocol::prefill;
  opt.kept_budget = 36;
  const llama::eval_result r = llama::evaluate(model(), one, opt);
  REQUIRE(r.rows.size() == 2 * (1 + all_methods.size()));
  for (const llama::eval_row& row : r.rows) {
    CAPTURE(std::string(llama::to_string(row.job.proto)), std::string(llama::to_string(row.job.meth)));
    CHECK(row.predictions == (row.job.proto == llama::protocol::streaming ? 511 : 127));
    CHECK(row.top1() >= 0.5);
    CHECK(row.top1() <= 1.0);
    CHECK(std::isfinite(row.ppl()));
    CHECK(row.tokens_per_s() > 0);
    if (row.job.meth == llama::method::full) continue;
    CHECK(row.kv_fraction() < 0.5);
    CHECK(row.kv_bytes() > 0);
  }
  // The heatmap snapshots: one per method, 20 rows, 384 columns, kept sets within the budget.
  REQUIRE(r.kept.size() == all_methods.size());
  for (const llama::kept_snapshot& k : r.kept) {
    CHECK(k.columns == 384);
    REQUIRE(k.positions.size() == 20);
    std::size_t total = 0;
    for (const auto& head : k.positions) total += head.size();
    CHECK(total <= 36 * 20 + 20);
  }
}

TEST_CASE("budget checks name the problem", "[llama][kvtrim][errors]") {
  const kvtrim::attention_shape shape{5, 8, 4, 8};
  using llama::method, llama::protocol;
  CHECK(llama::check_budget(method::snapkv, 36, protocol::streaming, shape, 512).empty());
  CHECK(llama::check_budget(method::kv_compress, 512, protocol::prefill, shape, 512).empty());
  CHECK_THAT(llama::check_budget(method::snapkv, 513, protocol::prefill, shape, 512),
             Contains("larger than the model's context") && Contains("513"));
  CHECK_THAT(llama::check_budget(method::snapkv, 8, protocol::streaming, shape, 512),
             Contains("below the protected set") && Contains("at least 9"));
  CHECK(llama::check_budget(method::snapkv, 8, protocol::prefill, shape, 512).empty());
  CHECK_THAT(llama::check_budget(method::streaming_llm, 4, protocol::streaming, shape, 512),
             Contains("below the protected set"));
  CHECK_THAT(llama::check_budget(method::h2o, 1, protocol::streaming, shape, 512),
             Contains("below the protected set") && Contains("1 protected token per head"));
  CHECK_THAT(llama::check_budget(method::kv_compress, 11, protocol::streaming, shape, 512),
             Contains("below the protected set") && Contains("at least 12"));
  for (const llama::method m : all_methods)
    for (const llama::protocol p : {protocol::streaming, protocol::prefill}) {
      const int least = llama::minimum_budget(m, p);
      CAPTURE(std::string(llama::to_string(m)), std::string(llama::to_string(p)), least);
      CHECK(llama::check_budget(m, least, p, shape, 512).empty());
      CHECK_FALSE(llama::check_budget(m, least - 1, p, shape, 512).empty());
    }
  CHECK(llama::parse_method("snapkv") == method::snapkv);
  CHECK_FALSE(llama::parse_method("snapKV").has_value());
}

TEST_CASE("the heatmap draws one panel per method and a cell per kept run", "[llama][svg]") {
  llama::heatmap map{.title = "kept <positions> & more", .subtitle = "sub", .layers = 2, .kv_heads = 2, .panels = {}};
  map.panels.push_back({"a", 10, {{0, 1, 2, 7}, {9}, {}, {3, 5}}});
  map.panels.push_back({"b", 10, {{0}, {0}, {0}, {0}}});
  const std::string svg = llama::render_svg(map);
  CHECK(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  CHECK_THAT(svg, Contains("kept &lt;positions&gt; &amp; more"));
  CHECK_THAT(svg, Contains(">a</tspan>") && Contains(">b</tspan>"));
  CHECK_THAT(svg, Contains(">7 tokens kept, 1.75 per (layer, KV head)</tspan>"));
  // Runs: [0,2] is one rect 6 px wide, 7, 9, 3, 5, and four single cells in panel b.
  std::size_t cells = 0;
  for (std::size_t at = 0; (at = svg.find("height=\"6\" fill=\"#", at)) != std::string::npos; ++at) ++cells;
  CHECK(cells == 5 + 4);
  CHECK_THAT(svg, Contains("x=\"64\" y=\"74\" width=\"6\""));
}
