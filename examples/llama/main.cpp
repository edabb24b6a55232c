// kvtrim-llama: the stories260K Llama model run with every kvtrim policy, kvtrim's cache on the
// CPU backend or (--device cuda, where built with CUDA) on the GPU.
//
//   kvtrim-llama eval                      # full cache + six presets x budgets 36, 68, 132, both protocols
//   kvtrim-llama eval --csv --protocol prefill --policies snapkv,ada_kv --budgets 64
//   kvtrim-llama generate --policy h2o --budget 36 --prompt "Once upon a time" --svg kept.svg
//
// docs/llama-demo.md explains the protocols, the columns and the per-preset settings.

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <iostream>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint.hpp"
#include "device.hpp"
#include "eval.hpp"
#include "generate.hpp"
#include "policies.hpp"
#include "svg.hpp"
#include "text_stream.hpp"
#include "tokenizer.hpp"

#ifndef KVTRIM_SHARED_DIR
#define KVTRIM_SHARED_DIR "../shared"
#endif

namespace {

namespace fs = std::filesystem;

const fs::path shared_dir = KVTRIM_SHARED_DIR;

//! A user error: printed as "kvtrim-llama: error: ..." with exit status 1.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct common_options {
  std::string model = (shared_dir / "models/stories260K/stories260K.bin").string();
  std::string tokenizer = (shared_dir / "models/stories260K/tok512.bin").string();
  std::string device = "cpu";
  int threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 2u));
};

struct eval_cli {
  std::string text = (shared_dir / "data/tinystories/tinystories_valid_subset.txt").string();
  int windows = 4;
  std::vector<std::string> policies = {"streaming_llm", "h2o", "snapkv", "pyramidkv", "ada_kv", "kv_compress"};
  std::vector<int> budgets = {36, 68, 132};
  std::string protocol = "both";
  bool csv = false;
  std::string svg;
  int svg_budget = 0;
};

struct generate_cli {
  std::string prompt = "Once upon a time";
  std::string policy = "snapkv";
  int budget = 36;
  int steps = 200;
  std::string protocol = "streaming";
  std::string svg;
};

void add_common(CLI::App* app, common_options& o) {
  app->add_option("--model", o.model, "llama2.c checkpoint")->capture_default_str();
  app->add_option("--tokenizer", o.tokenizer, "llama2.c tokenizer of the model")->capture_default_str();
  app->add_option("--device", o.device, "backend: cpu, or cuda where the CUDA backend and a GPU exist")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}

//! The commands on the device `--device` names. Without the CUDA part (CMake built no CUDA)
//! `--device cuda` says so rather than run on the CPU.
llama::device_runs runs_for(const common_options& o) {
  if (o.device == "cpu") return llama::runs_on<kvtrim::paged_cache<float>>();
#if KVTRIM_LLAMA_CUDA
  return llama::cuda_runs();
#else
  throw usage_error(
      "--device cuda: the CUDA backend is not built into this kvtrim-llama (it runs kvtrim's CPU "
      "backend only); use --device cpu");
#endif
}

llama::method method_or_throw(const std::string& name) {
  if (const auto m = llama::parse_method(name)) return *m;
  std::string names;
  for (const auto n : llama::method_names) names += (names.empty() ? "" : ", ") + std::string(n);
  throw usage_error("unknown policy '" + name + "' (known: " + names + ")");
}

std::vector<llama::protocol> protocols_of(const std::string& p) {
  if (p == "streaming") return {llama::protocol::streaming};
  if (p == "prefill") return {llama::protocol::prefill};
  return {llama::protocol::streaming, llama::protocol::prefill};
}

struct loaded_model {
  llama::checkpoint model;
  llama::tokenizer tok;
  loaded_model(const common_options& o) : model(o.model), tok(o.tokenizer, model.cfg().vocab_size) {}
};

void check_budgets(const std::vector<llama::method>& methods, const std::vector<int>& budgets,
                   const std::vector<llama::protocol>& protocols, const llama::checkpoint& model) {
  for (const int b : budgets)
    for (const auto p : protocols)
      for (const auto m : methods)
        if (const std::string e = llama::check_budget(m, b, p, llama::attention_shape_of(model.cfg()), model.cfg().seq_len);
            !e.empty())
          throw usage_error(e);
}

std::string thousands(double v) {
  const std::string digits = std::to_string(std::llround(v));
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0 && digits[i - 1] != '-') out += ',';
    out += digits[i];
  }
  return out;
}

void print_table(const llama::eval_result& r, const eval_cli& cli, const llama::config& c) {
  std::printf("stories260K (%d layers, %d query / %d KV heads, d %d) on %d TinyStories windows of 512 tokens\n",
              c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim(), cli.windows);
  std::printf("budget = tokens per (layer, KV head), protected and current token included; mean over heads for "
              "pyramidkv, ada_kv, kv_compress\n\n");
  std::printf("%-9s  %-13s  %6s  %7s  %7s  %6s  %9s  %7s  %8s\n", "protocol", "policy", "budget", "ppl", "nll", "top1",
              "kv_bytes", "kv_frac", "tok/s");
  llama::protocol last = r.rows.empty() ? llama::protocol::streaming : r.rows.front().job.proto;
  for (const llama::eval_row& row : r.rows) {
    if (row.job.proto != last) std::printf("\n");
    last = row.job.proto;
    std::printf("%-9s  %-13s  %6d  %7.3f  %7.4f  %6.3f  %9s  %7.3f  %8.0f\n",
                std::string(llama::to_string(row.job.proto)).c_str(), std::string(llama::to_string(row.job.meth)).c_str(),
                row.job.budget, row.ppl(), row.nll(), row.top1(), thousands(row.kv_bytes()).c_str(), row.kv_fraction(),
                row.tokens_per_s());
  }
}

void print_csv(const llama::eval_result& r) {
  std::printf("protocol,policy,budget,ppl,nll,top1_agreement,kv_bytes,kv_fraction,tokens_per_s\n");
  for (const llama::eval_row& row : r.rows)
    std::printf("%s,%s,%d,%.4f,%.5f,%.4f,%.0f,%.4f,%.0f\n", std::string(llama::to_string(row.job.proto)).c_str(),
                std::string(llama::to_string(row.job.meth)).c_str(), row.job.budget, row.ppl(), row.nll(), row.top1(),
                row.kv_bytes(), row.kv_fraction(), row.tokens_per_s());
}

int run_eval(const common_options& common, const eval_cli& cli) {
  const llama::device_runs device = runs_for(common);
  std::vector<llama::method> methods;
  for (const std::string& name : cli.policies) {
    const llama::method m = method_or_throw(name);
    if (m != llama::method::full && std::find(methods.begin(), methods.end(), m) == methods.end()) methods.push_back(m);
  }
  const std::vector<llama::protocol> protocols = protocols_of(cli.protocol);
  const loaded_model lm(common);
  const llama::config& c = lm.model.cfg();
  if (c.seq_len < static_cast<int>(llama::text_stream::window_tokens))
    throw usage_error("the model's context (seq_len " + std::to_string(c.seq_len) + ") is shorter than the " +
                      std::to_string(llama::text_stream::window_tokens) + "-token evaluation windows");
  check_budgets(methods, cli.budgets, protocols, lm.model);
  const int svg_budget = cli.svg_budget > 0 ? cli.svg_budget : cli.budgets.front();
  if (!cli.svg.empty() && std::find(cli.budgets.begin(), cli.budgets.end(), svg_budget) == cli.budgets.end())
    throw usage_error("--svg-budget " + std::to_string(svg_budget) + " is not one of the evaluated --budgets");

  const llama::text_stream stream(cli.text, lm.tok);
  if (stream.window_count() < static_cast<std::size_t>(cli.windows))
    throw usage_error("text '" + cli.text + "' holds " + std::to_string(stream.window_count()) +
                      " windows of 512 tokens, fewer than --windows " + std::to_string(cli.windows));
  std::vector<std::vector<int>> windows;
  for (int i = 0; i < cli.windows; ++i) windows.push_back(stream.window(static_cast<std::size_t>(i)));

  llama::eval_options opt{.protocols = protocols, .methods = methods, .budgets = {}, .windows = cli.windows,
                          .threads = common.threads};
  opt.budgets.assign(cli.budgets.begin(), cli.budgets.end());
  opt.record_kept = !cli.svg.empty();
  // The heatmap shows the prefill protocol's compression of window 0 when it runs (what each
  // method chose from a 384-token prompt), else the streaming cache after window 0's last step.
  opt.kept_protocol = std::find(protocols.begin(), protocols.end(), llama::protocol::prefill) != protocols.end()
                          ? llama::protocol::prefill
                          : llama::protocol::streaming;
  opt.kept_budget = svg_budget;
  const llama::eval_result result = device.evaluate(lm.model, windows, opt);

  if (cli.csv)
    print_csv(result);
  else
    print_table(result, cli, c);
  std::fflush(stdout);
  std::fprintf(stderr, "kvtrim-llama eval: %zu rows in %.1f s on %d thread(s)\n", result.rows.size(), result.seconds,
               common.threads);

  if (!cli.svg.empty()) {
    llama::heatmap map{.title = "Kept positions, budget " + std::to_string(svg_budget) + " per head: window 0, " +
                                (opt.kept_protocol == llama::protocol::prefill
                                     ? "after compressing its 384-token prompt"
                                     : "streaming cache after its last step"),
                       .subtitle = "Rows: (layer, KV head), layer 0 at the top, " + std::to_string(c.n_kv_heads) +
                                   " KV heads each. Columns: positions. Filled: still in the cache.",
                       .layers = c.n_layers, .kv_heads = c.n_kv_heads, .panels = {}};
    for (const llama::method m : methods)
      for (const auto& k : result.kept)
        if (k.meth == m)
          map.panels.push_back({std::string(llama::to_string(m)), k.columns, k.positions});
    llama::write_svg(cli.svg, map);
    std::fprintf(stderr, "kvtrim-llama eval: wrote %s\n", cli.svg.c_str());
  }
  return 0;
}

int run_generate(const common_options& common, const generate_cli& cli) {
  const llama::device_runs device = runs_for(common);
  const llama::method m = method_or_throw(cli.policy);
  const llama::protocol p = protocols_of(cli.protocol).front();
  const loaded_model lm(common);
  const llama::config& c = lm.model.cfg();
  const int budget = m == llama::method::full ? c.seq_len : cli.budget;
  check_budgets({m}, {budget}, {p}, lm.model);
  const std::vector<int> prompt = lm.tok.encode(cli.prompt, true);
  if (static_cast<int>(prompt.size()) >= c.seq_len)
    throw usage_error("the prompt has " + std::to_string(prompt.size()) + " tokens; the model's context is " +
                      std::to_string(c.seq_len));

  const llama::generation g =
      device.generate(lm.model, {.meth = m, .budget = budget, .proto = p, .prompt = prompt, .steps = cli.steps});
  const int pos = static_cast<int>(g.tokens.size());
  std::string text = cli.prompt;
  for (std::size_t i = prompt.size(); i < g.tokens.size(); ++i) text += lm.tok.decode(g.tokens[i - 1], g.tokens[i]);
  const auto full = static_cast<double>(g.full_kv_bytes);
  const auto bytes = static_cast<double>(g.kv_bytes);
  std::printf("%s\n\n", text.c_str());
  std::printf("[%s, budget %d, %s protocol] %d tokens (%d prompt), compressions: %d, %.0f tokens/s\n",
              std::string(llama::to_string(m)).c_str(), budget, std::string(llama::to_string(p)).c_str(), pos,
              static_cast<int>(prompt.size()), g.compressions, pos / std::max(g.seconds, 1e-9));
  std::printf("KV memory in use: %s bytes of K+V (fp32) against %s bytes for the full cache (%.1f%%)\n",
              thousands(bytes).c_str(), thousands(full).c_str(), 100.0 * bytes / full);
  if (!cli.svg.empty()) {
    llama::heatmap map{.title = "Kept positions after generating " + std::to_string(pos) + " tokens",
                       .subtitle = "Rows: (layer, KV head), layer 0 at the top, " + std::to_string(c.n_kv_heads) +
                                   " KV heads each. Columns: positions. Filled: still in the cache.",
                       .layers = c.n_layers, .kv_heads = c.n_kv_heads, .panels = {}};
    map.panels.push_back({std::string(llama::to_string(m)) + ", budget " + std::to_string(budget) + ", " +
                              std::string(llama::to_string(p)) + " protocol",
                          pos, g.kept});
    llama::write_svg(cli.svg, map);
    std::fflush(stdout);
    std::fprintf(stderr, "kvtrim-llama generate: wrote %s\n", cli.svg.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvtrim-llama: the stories260K Llama model with every kvtrim KV-cache policy"};
  app.require_subcommand(1);
  common_options common;
  eval_cli ev;
  generate_cli gen;
  std::string policy_names;
  for (const auto n : llama::method_names) policy_names += (policy_names.empty() ? "" : ", ") + std::string(n);

  CLI::App* eval = app.add_subcommand("eval", "teacher-forced evaluation on TinyStories windows, every policy vs the full cache");
  add_common(eval, common);
  eval->add_option("--threads", common.threads, "worker threads, each running one (protocol, policy, budget) at a time")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  eval->add_option("--text", ev.text, "evaluation text (stories separated by blank lines)")->capture_default_str();
  eval->add_option("--windows", ev.windows, "512-token windows to evaluate")->check(CLI::Range(1, 100000))->capture_default_str();
  eval->add_option("--policies", ev.policies, "comma-separated policies (" + policy_names + "); full always runs")
      ->delimiter(',')
      ->capture_default_str();
  eval->add_option("--budgets", ev.budgets, "comma-separated budgets in tokens per (layer, KV head)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  eval->add_option("--protocol", ev.protocol, "streaming, prefill or both")
      ->check(CLI::IsMember({"streaming", "prefill", "both"}))
      ->capture_default_str();
  eval->add_flag("--csv", ev.csv, "print CSV rows instead of the table");
  eval->add_option("--svg", ev.svg, "write a heatmap of the positions each (layer, KV head) kept");
  eval->add_option("--svg-budget", ev.svg_budget, "budget the heatmap shows (default: the first of --budgets)")
      ->check(CLI::PositiveNumber);

  CLI::App* generate = app.add_subcommand("generate", "greedy generation from a prompt with one policy");
  add_common(generate, common);
  generate->add_option("--prompt", gen.prompt, "prompt text")->capture_default_str();
  generate->add_option("--policy", gen.policy, "one of " + policy_names)->capture_default_str();
  generate->add_option("--budget", gen.budget, "tokens per (layer, KV head)")->check(CLI::PositiveNumber)->capture_default_str();
  generate->add_option("--steps", gen.steps, "tokens to generate at most")->check(CLI::Range(0, 1 << 20))->capture_default_str();
  generate->add_option("--protocol", gen.protocol,
                       "streaming: the cache never exceeds the budget; prefill: compress the prompt once, then grow")
      ->check(CLI::IsMember({"streaming", "prefill"}))
      ->capture_default_str();
  generate->add_option("--svg", gen.svg, "write a heatmap of the positions each (layer, KV head) kept");

  CLI11_PARSE(app, argc, argv);
  try {
    if (eval->parsed()) return run_eval(common, ev);
    return run_generate(common, gen);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kvtrim-llama: error: %s\n", e.what());
    return 1;
  }
}
