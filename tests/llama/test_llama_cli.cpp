// The kvtrim-llama command line: what it prints on success, and a clear error with a non-zero
// exit status for every bad input (missing or truncated checkpoint, wrong header, tokenizer
// mismatch, unknown policy, budgets too large or below the protected set, unreadable text,
// --device cuda without the CUDA backend or without a GPU).

#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#ifndef KVTRIM_LLAMA_BIN
#error "KVTRIM_LLAMA_BIN must name the kvtrim-llama binary (set by tests/llama/CMakeLists.txt)"
#endif
#ifndef KVTRIM_SHARED_DIR
#error "KVTRIM_SHARED_DIR must name the shared folder (set by tests/llama/CMakeLists.txt)"
#endif
#ifndef KVTRIM_LLAMA_CUDA
#error "KVTRIM_LLAMA_CUDA must say whether kvtrim-llama has the CUDA backend (set by tests/llama/CMakeLists.txt)"
#endif

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;

namespace {

const fs::path shared_dir = KVTRIM_SHARED_DIR;
const fs::path model_path = shared_dir / "models/stories260K/stories260K.bin";
const fs::path tokenizer_path = shared_dir / "models/stories260K/tok512.bin";

struct run_result {
  int status = -1;     // exit status
  std::string output;  // stdout and stderr
};

//! Runs kvtrim-llama with `args` (already shell-quoted where needed).
run_result run(const std::string& args) {
  const std::string command = std::string("'") + KVTRIM_LLAMA_BIN + "' " + args + " 2>&1";
  run_result r;
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buffer{};
  for (std::size_t n; (n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0;) r.output.append(buffer.data(), n);
  const int raw = pclose(pipe);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  INFO("$ kvtrim-llama " << args << "\n" << r.output);
  return r;
}

std::string quote(const fs::path& p) {
  std::string q = "'";
  q += p.string();
  q += '\'';
  return q;
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

struct temp_dir {
  temp_dir()
      : path(fs::temp_directory_path() / ("kvtrim_llama_cli_" + std::to_string(std::random_device{}()))) {
    fs::create_directories(path);
  }
  ~temp_dir() { fs::remove_all(path); }
  fs::path write(const std::string& name, const std::string& bytes) const {
    const fs::path file = path / name;
    std::ofstream(file, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return file;
  }
  fs::path path;
};

//! A failing run: non-zero exit and a message containing every one of `parts`.
void require_error(const run_result& r, const std::vector<std::string>& parts) {
  INFO(r.output);
  CHECK(r.status != 0);
  for (const std::string& p : parts) CHECK_THAT(r.output, Contains(p));
}

}  // namespace

TEST_CASE("kvtrim-llama --help lists both commands", "[llama][cli]") {
  const run_result r = run("--help");
  CHECK(r.status == 0);
  CHECK_THAT(r.output, Contains("eval") && Contains("generate"));
  const run_result e = run("eval --help");
  CHECK(e.status == 0);
  CHECK_THAT(e.output, Contains("--policies") && Contains("--budgets") && Contains("--windows") &&
                           Contains("--csv") && Contains("--svg") && Contains("--device"));
}

TEST_CASE("eval --csv prints the documented header and one row per (protocol, policy, budget)", "[llama][cli]") {
  const run_result r = run("eval --csv --windows 1 --protocol prefill --policies snapkv,kv_compress --budgets 36,68");
  REQUIRE(r.status == 0);
  std::istringstream lines(r.output);
  std::string line;
  std::vector<std::string> rows;
  while (std::getline(lines, line))
    if (!line.starts_with("kvtrim-llama")) rows.push_back(line);
  REQUIRE(rows.size() == 1 + 5);
  CHECK(rows[0] == "protocol,policy,budget,ppl,nll,top1_agreement,kv_bytes,kv_fraction,tokens_per_s");
  CHECK_THAT(rows[1], StartsWith("prefill,full,512,"));
  CHECK_THAT(rows[2], StartsWith("prefill,snapkv,36,"));
  CHECK_THAT(rows[5], StartsWith("prefill,kv_compress,68,"));
  for (std::size_t i = 1; i < rows.size(); ++i) CHECK(std::count(rows[i].begin(), rows[i].end(), ',') == 8);
}

TEST_CASE("eval --svg writes one panel per policy", "[llama][cli]") {
  const temp_dir dir;
  const fs::path svg = dir.path / "kept.svg";
  const run_result r = run("eval --windows 1 --protocol prefill --budgets 36 --svg " + quote(svg));
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, Contains("ppl") && Contains("kv_frac"));
  const std::string text = read_bytes(svg);
  CHECK_THAT(text, StartsWith("<svg"));
  for (const char* name : {">streaming_llm</tspan>", ">h2o</tspan>", ">snapkv</tspan>", ">pyramidkv</tspan>",
                           ">ada_kv</tspan>", ">kv_compress</tspan>"})
    CHECK_THAT(text, Contains(name));
}

TEST_CASE("generate prints the text and the KV memory against the full cache", "[llama][cli]") {
  const run_result full = run("generate --policy full --steps 24");
  REQUIRE(full.status == 0);
  CHECK_THAT(full.output, Contains("Once upon a time, there was a little girl named Lily. She loved to play outside"));
  CHECK_THAT(full.output, Contains("(100.0%)"));

  const temp_dir dir;
  const fs::path svg = dir.path / "gen.svg";
  const run_result r = run("generate --policy h2o --budget 16 --steps 100 --svg " + quote(svg));
  REQUIRE(r.status == 0);
  CHECK_THAT(r.output, StartsWith("Once upon a time"));
  CHECK_THAT(r.output, Contains("KV memory in use") && Contains("against") && Contains("full cache"));
  CHECK_THAT(r.output, Contains("[h2o, budget 16, streaming protocol]"));
  CHECK_THAT(read_bytes(svg), StartsWith("<svg"));
}

TEST_CASE("a missing, truncated or malformed checkpoint is a clear error", "[llama][cli][errors]") {
  const temp_dir dir;
  const std::string real = read_bytes(model_path);
  REQUIRE(real.size() > 1000);
  require_error(run("eval --model " + quote(dir.path / "absent.bin")), {"error", "absent.bin", "cannot open"});
  require_error(run("generate --model " + quote(dir.path / "absent.bin")), {"error", "cannot open"});
  const fs::path cut = dir.write("cut.bin", real.substr(0, real.size() / 2));
  require_error(run("eval --model " + quote(cut)), {"error", "cut.bin", "truncated"});
  std::string header = real;
  const std::int32_t bad_heads = 7;  // 64 is not divisible by 7
  header.replace(12, 4, reinterpret_cast<const char*>(&bad_heads), 4);
  require_error(run("eval --model " + quote(dir.write("header.bin", header))), {"error", "bad header"});
}

TEST_CASE("a tokenizer of another model is a clear error", "[llama][cli][errors]") {
  const temp_dir dir;
  std::string small = read_bytes(tokenizer_path).substr(0, 4);
  for (const std::string piece : {"<unk>", "a", "b"}) {
    const float score = 0.0f;
    const auto len = static_cast<std::int32_t>(piece.size());
    small.append(reinterpret_cast<const char*>(&score), 4).append(reinterpret_cast<const char*>(&len), 4) += piece;
  }
  require_error(run("eval --tokenizer " + quote(dir.write("small.bin", small))),
                {"error", "tokenizer mismatch", "512"});
  require_error(run("eval --tokenizer " + quote(dir.path / "absent.bin")), {"error", "cannot open"});
}

TEST_CASE("unknown policies are clear errors", "[llama][cli][errors]") {
  require_error(run("eval --policies snapkv,foo"), {"unknown policy 'foo'", "snapkv", "kv_compress"});
  require_error(run("generate --policy SnapKV"), {"unknown policy 'SnapKV'"});
}

TEST_CASE("budgets larger than seq_len or below the protected set are clear errors", "[llama][cli][errors]") {
  require_error(run("eval --budgets 36,600"), {"budget 600", "larger than the model's context", "seq_len 512"});
  require_error(run("generate --budget 513"), {"budget 513", "seq_len 512"});
  require_error(run("eval --policies snapkv --budgets 8"),
                {"budget 8 for snapkv", "below the protected set", "at least 9", "budget below the protected set"});
  require_error(run("eval --policies streaming_llm --protocol prefill --budgets 3"),
                {"budget 3 for streaming_llm", "below the protected set"});
  require_error(run("generate --policy kv_compress --budget 10"), {"budget 10 for kv_compress", "below the protected set"});
  require_error(run("eval --policies ada_kv --protocol streaming --budgets 9"),
                {"budget 9 for ada_kv", "safeguard's rounding", "at least 10"});
  require_error(run("eval --budgets 0"), {"budgets"});
}

TEST_CASE("unreadable or too-short text is a clear error", "[llama][cli][errors]") {
  const temp_dir dir;
  require_error(run("eval --text " + quote(dir.path / "absent.txt")), {"error", "text", "absent.txt", "cannot open"});
  require_error(run("eval --text " + quote(dir.path)), {"error", "directory"});
  require_error(run("eval --text " + quote(dir.write("short.txt", "Once upon a time.\n\nThe end.\n"))),
                {"error", "short.txt", "holds 0 windows", "--windows 4"});
}

#if KVTRIM_LLAMA_CUDA
TEST_CASE("device cuda runs on a GPU, or says clearly that there is none", "[llama][cli][errors]") {
  const run_result r = run("eval --device cuda --csv --windows 1 --protocol prefill --policies snapkv --budgets 36");
  if (r.status == 0) {
    CHECK_THAT(r.output, Contains("prefill,snapkv,36,"));
  } else {
    require_error(r, {"--device cuda", "no usable CUDA device", "cudaGetDeviceCount"});
  }
  require_error(run("eval --device tpu"), {"--device"});
}
#else
TEST_CASE("device cuda fails clearly without the CUDA backend", "[llama][cli][errors]") {
  require_error(run("eval --device cuda"), {"--device cuda", "CUDA backend is not built"});
  require_error(run("generate --device cuda"), {"CUDA backend is not built"});
  require_error(run("eval --device tpu"), {"--device"});
}
#endif

TEST_CASE("a heatmap budget that is not evaluated is a clear error", "[llama][cli][errors]") {
  require_error(run("eval --budgets 36,68 --svg-budget 40 --svg /dev/null"),
                {"--svg-budget 40", "not one of the evaluated --budgets"});
}

TEST_CASE("bad option values are rejected by the parser", "[llama][cli][errors]") {
  require_error(run("eval --protocol sometimes"), {"--protocol"});
  require_error(run("eval --windows 0"), {"--windows"});
  require_error(run(""), {"subcommand"});
}
