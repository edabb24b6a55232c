#pragma once
//! \file golden_case.hpp
//! Runs one golden case folder (format: shared/golden/README.md) through kvtrim's CPU backend
//! and checks the kept sets against what the reference implementation kept, tie-tolerantly:
//! per (layer, head) the counts are equal, every token the reference scored above its
//! threshold is kept, every kept token scores at least the threshold, protected tokens are
//! kept, and where the reference's cut is untied the kept set is exactly the reference's.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvtrim/kvtrim.hpp"
#include "npy.hpp"

namespace golden {

//! The `key = value` lines of a case.txt.
class case_config {
 public:
  explicit case_config(const std::filesystem::path& dir) : dir_(dir) {
    std::ifstream in(dir / "case.txt");
    if (!in) throw std::runtime_error((dir / "case.txt").string() + ": cannot open");
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty() || line[0] == '#') continue;
      const size_t eq = line.find(" = ");
      if (eq != std::string::npos) values_[line.substr(0, eq)] = line.substr(eq + 3);
    }
  }
  [[nodiscard]] bool has(const std::string& key) const { return values_.count(key) != 0; }
  [[nodiscard]] const std::string& text(const std::string& key) const {
    const auto it = values_.find(key);
    if (it == values_.end()) throw std::runtime_error((dir_ / "case.txt").string() + ": no key '" + key + "'");
    return it->second;
  }
  //! The first word of a value ("query_head (default: ...)" -> "query_head").
  [[nodiscard]] std::string word(const std::string& key) const {
    const std::string& v = text(key);
    return v.substr(0, v.find_first_of(" ,"));
  }
  [[nodiscard]] int32_t integer(const std::string& key) const { return std::stoi(text(key)); }
  [[nodiscard]] float real(const std::string& key) const { return std::stof(text(key)); }
  [[nodiscard]] const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
  std::map<std::string, std::string> values_;
};

struct case_result {
  std::string name;
  int32_t selections = 0;         //!< (layer, head) selections checked
  int32_t passed = 0;             //!< selections that pass every check
  int32_t untied = 0;             //!< selections whose reference cut is untied
  int32_t exact = 0;              //!< untied selections equal to the reference's set
  double max_score_error = 0.0;   //!< max |ours - reference| / max |reference| over all scores
  std::vector<std::string> failures;

  [[nodiscard]] double agreement() const { return selections ? static_cast<double>(passed) / selections : 0.0; }
  [[nodiscard]] bool ok() const { return selections > 0 && passed == selections && exact == untied; }
  //! The tool's output line: `NAME agreement=<fraction> exact=<equal>/<untied>`.
  [[nodiscard]] std::string summary() const {
    std::ostringstream s;
    s << name << " agreement=" << agreement() << " exact=" << exact << "/" << untied;
    return s.str();
  }
};

namespace detail {

//! Everything a case's arrays say, in one place.
struct case_data {
  int32_t layers = 0, n = 0, q_heads = 0, kv_heads = 0, d = 0, heads = 0, kept_width = 0;
  npy_array<float> q, k;
  npy_array<int32_t> kept, counts;
};

[[nodiscard]] inline kvtrim::gqa_reduce reduce_of(const case_config& c) {
  if (!c.has("gqa_mode")) return kvtrim::gqa_reduce::sum;
  const std::string mode = c.word("gqa_mode");
  if (mode == "query_head") return kvtrim::gqa_reduce::per_query_head;
  const std::string agg = c.has("gqa_score_agg") ? c.word("gqa_score_agg") : std::string("mean");
  if (agg == "max") return kvtrim::gqa_reduce::max;
  if (agg == "sum") return kvtrim::gqa_reduce::sum;
  return kvtrim::gqa_reduce::mean;
}

[[nodiscard]] inline kvtrim::pooling pooling_of(const case_config& c) {
  return c.word("pooling") == "avgpool" ? kvtrim::pooling::avg : kvtrim::pooling::max;
}

//! Fills a dense cache with the case's keys (repeated per query head in query-head mode)
//! and plans the compression with `policy`.
template <class Policy>
[[nodiscard]] kvtrim::cpu::compression_result plan_case(const Policy& policy, const case_data& data) {
  const kvtrim::attention_shape model{data.layers, data.q_heads, data.kv_heads, data.d};
  kvtrim::dense_cache cache({data.layers, data.q_heads, data.heads, data.d}, 1, data.n);
  const int32_t repeat = data.heads / data.kv_heads;  // 1, or G in query-head mode
  const auto d = static_cast<size_t>(data.d);
  std::vector<float> k_tok(static_cast<size_t>(data.heads) * d), v_tok(k_tok.size(), 0.f);
  for (int32_t l = 0; l < data.layers; ++l)
    for (int32_t t = 0; t < data.n; ++t) {
      for (int32_t h = 0; h < data.heads; ++h) {
        const float* src = data.k.data.data() + ((static_cast<size_t>(l) * data.n + t) * data.kv_heads + h / repeat) * d;
        std::copy_n(src, d, k_tok.begin() + static_cast<std::ptrdiff_t>(h * d));
      }
      kvtrim::throw_if_error(cache.append(0, l, t, k_tok, v_tok), "golden: append");
    }
  const int32_t rows = data.q.shape.empty() ? 0 : static_cast<int32_t>(data.q.dim(1));
  std::vector<int32_t> q_positions(static_cast<size_t>(rows));
  for (int32_t r = 0; r < rows; ++r) q_positions[static_cast<size_t>(r)] = data.n - rows + r;
  kvtrim::cpu::compression_result result;
  kvtrim::throw_if_error(kvtrim::cpu::plan(policy, cache, 0, model, {data.q.data, q_positions}, 0, data.layers, result),
                         "golden: plan");
  return result;
}

//! Sorted kept positions of head (l, h) of the reference.
[[nodiscard]] inline std::vector<int32_t> reference_kept(const case_data& data, int32_t l, int32_t h) {
  const int32_t count = data.counts.data[static_cast<size_t>(l) * data.heads + h];
  const int32_t* row = data.kept.data.data() + (static_cast<size_t>(l) * data.heads + h) * data.kept_width;
  return {row, row + count};
}

inline std::string where(int32_t l, int32_t h) {
  return "layer " + std::to_string(l) + " head " + std::to_string(h);
}

}  // namespace detail

//! Runs one case folder; throws std::runtime_error if the folder cannot be read.
[[nodiscard]] inline case_result run_case(const std::filesystem::path& dir) {
  using namespace kvtrim;
  const case_config cfg(dir);
  case_result out;
  out.name = dir.filename().string();
  if (out.name.empty()) out.name = dir.parent_path().filename().string();

  detail::case_data data;
  data.layers = cfg.integer("L");
  data.n = cfg.integer("n");
  data.q_heads = cfg.integer("Hq");
  data.kv_heads = cfg.integer("Hkv");
  data.d = cfg.integer("d");
  data.k = load_npy<float>((dir / "k.npy").string());
  if (std::filesystem::exists(dir / "q.npy")) data.q = load_npy<float>((dir / "q.npy").string());
  data.kept = load_npy<int32_t>((dir / "kept.npy").string());
  data.counts = load_npy<int32_t>((dir / "counts.npy").string());
  data.heads = static_cast<int32_t>(data.kept.dim(1));
  data.kept_width = static_cast<int32_t>(data.kept.dim(2));

  const std::string kind = cfg.word("policy");
  const gqa_reduce reduce = detail::reduce_of(cfg);
  const bool per_query = reduce == gqa_reduce::per_query_head;
  if ((per_query ? data.q_heads : data.kv_heads) != data.heads && kind != "streamingllm")
    throw std::runtime_error(dir.string() + ": stored heads do not match gqa_mode");

  cpu::compression_result result;
  int32_t window = 0;           // protected recent tokens of the reference
  int32_t sinks = 0;
  if (kind == "snapkv" || kind == "pyramidkv" || kind == "h2o" || kind == "adakv") {
    window = cfg.integer("window_size");
    if (kind == "snapkv")
      result = detail::plan_case(snapkv({.budget = token_budget::of_tokens(cfg.integer("max_capacity_prompt")),
                                         .window = window, .pool = detail::pooling_of(cfg),
                                         .kernel = cfg.integer("kernel_size"), .reduce = reduce}),
                                 data);
    else if (kind == "pyramidkv")
      result = detail::plan_case(pyramidkv({.budget = token_budget::of_tokens(cfg.integer("max_capacity_prompt")),
                                            .window = window, .beta = cfg.integer("beta"),
                                            .form = pyramid_form::integer, .pool = detail::pooling_of(cfg),
                                            .kernel = cfg.integer("kernel_size"), .reduce = reduce}),
                                 data);
    else if (kind == "h2o")
      result = detail::plan_case(
          h2o({.budget = token_budget::of_tokens(cfg.integer("max_capacity_prompt")), .recent = window, .reduce = reduce}),
          data);
    else
      result = detail::plan_case(ada_kv({.budget = token_budget::of_tokens(cfg.integer("base_capacity") + window),
                                         .window = window, .alpha = cfg.real("floor_ratio"),
                                         .normalize = cfg.word("normalize") == "True",
                                         .pool = detail::pooling_of(cfg), .kernel = cfg.integer("kernel_size"),
                                         .reduce = reduce}),
                                 data);
  } else if (kind == "streamingllm") {
    window = cfg.integer("window_size");
    sinks = cfg.integer("max_capacity_prompt") - window;
    result = detail::plan_case(streaming_llm({.budget = token_budget::of_tokens(cfg.integer("max_capacity_prompt")),
                                              .sinks = sinks, .per_query_head = data.heads == data.q_heads}),
                               data);
  } else if (kind == "kvcompress") {
    const int32_t max_tokens = cfg.integer("max_cache_tokens");
    const token_budget budget = max_tokens > 0 ? token_budget::of_tokens(max_tokens)
                                               : token_budget::of_ratio(cfg.real("target_compression_rate"));
    window = cfg.integer("protected_window_size") - 1;  // the pending token is the window's first
    sinks = cfg.integer("num_sinks");
    result = detail::plan_case(kv_compress({.budget = budget, .block_size = cfg.integer("block_size"),
                                            .protected_window = cfg.integer("protected_window_size"),
                                            .sinks = sinks}),
                               data);
  } else {
    throw std::runtime_error(dir.string() + ": unknown policy '" + kind + "'");
  }

  // Reference arrays for the checks.
  const bool has_scores = std::filesystem::exists(dir / "scores.npy");
  const bool has_metric = std::filesystem::exists(dir / "metric.npy");
  const bool has_ties = std::filesystem::exists(dir / "boundary_tie.npy");
  npy_array<float> scores, threshold, cut_gap;
  npy_array<int32_t> tie, selected, evicted_kvs;
  if (has_scores) scores = load_npy<float>((dir / "scores.npy").string());
  if (has_metric) scores = load_npy<float>((dir / "metric.npy").string());
  if (has_ties) {
    tie = load_npy<int32_t>((dir / "boundary_tie.npy").string());
    threshold = load_npy<float>((dir / "threshold.npy").string());
    cut_gap = load_npy<float>((dir / "cut_gap.npy").string());
  }
  if (std::filesystem::exists(dir / "selected.npy")) selected = load_npy<int32_t>((dir / "selected.npy").string());
  if (std::filesystem::exists(dir / "evicted_kvs.npy")) evicted_kvs = load_npy<int32_t>((dir / "evicted_kvs.npy").string());
  const int32_t score_len = scores.shape.empty() ? 0 : static_cast<int32_t>(scores.dim(2));

  for (int32_t l = 0; l < data.layers; ++l)
    for (int32_t h = 0; h < data.heads; ++h) {
      const size_t lh = static_cast<size_t>(l) * data.heads + h;
      ++out.selections;
      std::vector<std::string> why;
      const auto kept_slots = result.plan.kept(l, h);
      // A fresh cache holds token t in slot t, so kept slots are kept positions.
      const std::vector<int32_t> ours(kept_slots.begin(), kept_slots.end());
      const std::vector<int32_t> ref = detail::reference_kept(data, l, h);
      const std::set<int32_t> ours_set(ours.begin(), ours.end());

      if (ours.size() != ref.size())
        why.push_back("kept " + std::to_string(ours.size()) + " tokens, reference " + std::to_string(ref.size()));
      for (int32_t p = 0; p < data.n; ++p)
        if ((p < sinks || p >= data.n - window) && !ours_set.count(p)) {
          why.push_back("protected position " + std::to_string(p) + " evicted");
          break;
        }

      // Our scores against the reference's.
      if (score_len > 0) {
        const float* ref_row = scores.data.data() + lh * static_cast<size_t>(score_len);
        double max_ref = 0.0, max_err = 0.0;
        std::vector<float> mine(static_cast<size_t>(score_len), NAN);
        if (has_metric) {
          const auto row = result.plan.metrics.row(l, h);
          std::copy(row.begin(), row.end(), mine.begin());
        } else {
          for (const auto& r : result.candidates.at(l, h).ranked)
            if (r.position < score_len) mine[static_cast<size_t>(r.position)] = r.score;
        }
        for (int32_t j = 0; j < score_len; ++j) {
          max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref_row[j])));
          max_err = std::max(max_err, std::fabs(static_cast<double>(mine[static_cast<size_t>(j)]) - ref_row[j]));
          if (std::isnan(mine[static_cast<size_t>(j)])) max_err = INFINITY;
        }
        const double rel = max_ref > 0 ? max_err / max_ref : max_err;
        out.max_score_error = std::max(out.max_score_error, rel);
        if (!(rel <= 1e-5)) why.push_back("scores differ from the reference by " + std::to_string(rel) + " (relative)");
      }

      // Ada-KV: the per-head budget itself.
      if (!selected.shape.empty() && result.select[lh] != selected.data[lh])
        why.push_back("selected " + std::to_string(result.select[lh]) + " prefix tokens, reference " +
                      std::to_string(selected.data[lh]));
      if (!evicted_kvs.shape.empty() && data.n - static_cast<int32_t>(ours.size()) != evicted_kvs.data[lh])
        why.push_back("evicted " + std::to_string(data.n - static_cast<int32_t>(ours.size())) + " tokens, reference " +
                      std::to_string(evicted_kvs.data[lh]));

      // Tie-tolerant threshold checks on the reference's scores.
      bool untied = true;
      if (has_ties && score_len > 0) {
        const float th = threshold.data[lh];
        const float* ref_row = scores.data.data() + lh * static_cast<size_t>(score_len);
        const double tol = 1e-6 * std::fabs(static_cast<double>(th));
        untied = tie.data[lh] == 0 && !(cut_gap.data[lh] < 1e-5f);
        if (has_metric) {  // KV-Compress: evicted = evictable positions not kept
          for (int32_t p = 0; p <= data.n - window - 1; ++p) {
            if (p < sinks) continue;
            const bool evicted = !ours_set.count(p);
            if (evicted && !(ref_row[p] <= th + tol)) {
              why.push_back("evicted position " + std::to_string(p) + " scores above the reference threshold");
              break;
            }
            if (!evicted && !std::isnan(th) && ref_row[p] < th - tol) {
              why.push_back("kept position " + std::to_string(p) + " scores below the reference threshold");
              break;
            }
          }
        } else {
          const int32_t prefix = data.n - window;
          for (int32_t p = 0; p < prefix; ++p) {
            const bool kept = ours_set.count(p) != 0;
            if (std::isnan(th)) {
              if (kept) why.push_back("kept prefix position " + std::to_string(p) + " where the reference kept none");
            } else if (!kept && ref_row[p] > th + tol) {
              why.push_back("position " + std::to_string(p) + " scores above the threshold but was evicted");
            } else if (kept && ref_row[p] < th - tol) {
              why.push_back("position " + std::to_string(p) + " scores below the threshold but was kept");
            }
            if (!why.empty()) break;
          }
        }
      }
      if (untied) {
        ++out.untied;
        if (ours == ref) ++out.exact;
        else why.push_back("untied selection differs from the reference's set");
      }
      if (why.empty()) {
        ++out.passed;
      } else {
        out.failures.push_back(detail::where(l, h) + ": " + why.front());
      }
    }
  return out;
}

}  // namespace golden
