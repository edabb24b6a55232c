// The llama example's model side against the real stories260K checkpoint and the reference
// values of shared/models/stories260K/README.md, plus each bad-input error.

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint.hpp"
#include "forward.hpp"
#include "full_cache.hpp"
#include "text_stream.hpp"
#include "tokenizer.hpp"

#ifndef KVTRIM_SHARED_DIR
#error "KVTRIM_SHARED_DIR must name the shared folder (set by tests/llama/CMakeLists.txt)"
#endif

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

const fs::path shared_dir = KVTRIM_SHARED_DIR;
const fs::path model_path = shared_dir / "models/stories260K/stories260K.bin";
const fs::path tokenizer_path = shared_dir / "models/stories260K/tok512.bin";
const fs::path text_path = shared_dir / "data/tinystories/tinystories_valid_subset.txt";

//! Fails the running test, rather than skipping it, when a shared input is absent: a missing
//! model must never read as a pass.
void require_input(const fs::path& path) {
  if (!fs::is_regular_file(path))
    FAIL("required input " << path.string()
                           << " is missing; point the KVTRIM_SHARED_DIR CMake cache variable at "
                              "the shared folder");
}

//! The model and tokenizer, loaded once for the whole run.
const llama::checkpoint& model() {
  require_input(model_path);
  static const llama::checkpoint loaded(model_path);
  return loaded;
}

const llama::tokenizer& tok() {
  require_input(tokenizer_path);
  static const llama::tokenizer loaded(tokenizer_path, model().cfg().vocab_size);
  return loaded;
}

//! A private temporary folder for bad-input fixtures, removed when the test ends.
struct temp_dir {
  temp_dir()
      : path(fs::temp_directory_path() /
             ("kvtrim_llama_test_" + std::to_string(std::random_device{}()))) {
    fs::create_directories(path);
  }
  ~temp_dir() { fs::remove_all(path); }

  fs::path write(const std::string& name, const std::string& bytes) const {
    const fs::path file = path / name;
    std::ofstream(file, std::ios::binary)
        .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return file;
  }

  fs::path path;
};

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

//! A checkpoint header followed by `floats` zero parameters.
std::string checkpoint_bytes(const std::vector<std::int32_t>& header, std::size_t floats) {
  std::string bytes(reinterpret_cast<const char*>(header.data()), header.size() * 4);
  bytes.append(floats * 4, '\0');
  return bytes;
}

//! Mean teacher-forced NLL of a window: its 511 next-token predictions.
double window_nll(const std::vector<int>& window) {
  const llama::checkpoint& m = model();
  llama::run_state state(m.cfg());
  llama::dense_full_cache cache(m.cfg());
  double total = 0.0;
  for (std::size_t pos = 0; pos + 1 < window.size(); ++pos) {
    const auto logits = llama::forward(m, state, cache, window[pos], static_cast<int>(pos));
    total += llama::token_nll(logits, window[pos + 1]);
  }
  return total / static_cast<double>(window.size() - 1);
}

}  // namespace

TEST_CASE("checkpoint header matches the published stories260K configuration",
          "[llama][checkpoint]") {
  const llama::config& c = model().cfg();
  CHECK(c.dim == 64);
  CHECK(c.hidden_dim == 172);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.vocab_size == 512);
  CHECK(c.seq_len == 512);
  CHECK(c.head_dim() == 8);
  CHECK(model().wk(4).size() == 32 * 64);
  CHECK(model().rms_final().size() == 64);
}

TEST_CASE("tokenizer reproduces llama2.c encoding and decoding", "[llama][tokenizer]") {
  CHECK(tok().encode("Once upon a time", true) == std::vector<int>{1, 403, 407, 261, 378});
  CHECK(tok().encode("", true) == std::vector<int>{1});
  // A character outside the vocabulary falls back to one byte token per UTF-8 byte.
  const std::vector<int> snowman = tok().encode("\xE2\x98\x83", false);
  CHECK(snowman == std::vector<int>{410, 0xE2 + 3, 0x98 + 3, 0x83 + 3});

  CHECK(tok().decode(1, 403) == "Once");  // the dummy-prefix space is dropped after BOS
  CHECK(tok().decode(378, 403) == " Once");
  CHECK(tok().decode(378, llama::tokenizer::newline_id) == "\n");  // <0x0A> is the raw byte
}

TEST_CASE("evaluation stream splits paragraphs on blank lines and story breaks", "[llama][text]") {
  const std::string text =
      "  First story.\nSecond line.\n \t\nNext one.\n<|endoftext|>\nLast\n\n\n";
  CHECK(llama::split_paragraphs(text) ==
        std::vector<std::string_view>{"First story.\nSecond line.", "Next one.", "Last"});

  std::vector<int> expected;
  for (const char* paragraph : {"First story.\nSecond line.", "Next one.", "Last"}) {
    const std::vector<int> ids = tok().encode(paragraph, false);
    expected.insert(expected.end(), ids.begin(), ids.end());
    expected.push_back(13);
  }
  CHECK(llama::encode_paragraphs(text, tok()) == expected);
}

TEST_CASE("first next-token logits match the reference", "[llama][forward]") {
  const llama::checkpoint& m = model();
  llama::run_state state(m.cfg());
  llama::dense_full_cache cache(m.cfg());
  const std::vector<int> prompt = tok().encode("Once upon a time", true);
  std::span<const float> logits;
  for (std::size_t pos = 0; pos < prompt.size(); ++pos)
    logits = llama::forward(m, state, cache, prompt[pos], static_cast<int>(pos));

  const int first = llama::argmax(logits);
  std::vector<float> rest(logits.begin(), logits.end());
  rest[static_cast<std::size_t>(first)] = -INFINITY;
  const int second = llama::argmax(rest);
  CHECK(first == 432);
  CHECK(logits[432] == Approx(17.7994).margin(1e-3));
  CHECK(second == 383);
  CHECK(logits[383] == Approx(14.2813).margin(1e-3));
}

TEST_CASE("greedy continuation reproduces the reference ids and text", "[llama][forward]") {
  const std::vector<int> expected = {1,   403, 407, 261, 378, 432, 383, 286, 261, 376,
                                     298, 315, 421, 395, 317, 426, 338, 401, 396, 267,
                                     337, 410, 408, 419, 292, 411, 322, 265, 282};
  const llama::checkpoint& m = model();
  llama::run_state state(m.cfg());
  llama::dense_full_cache cache(m.cfg());
  std::vector<int> ids = tok().encode("Once upon a time", true);
  for (int pos = 0; ids.size() < expected.size(); ++pos) {
    const auto logits = llama::forward(m, state, cache, ids[static_cast<std::size_t>(pos)], pos);
    if (static_cast<std::size_t>(pos) + 1 == ids.size()) ids.push_back(llama::argmax(logits));
  }
  CHECK(ids == expected);

  std::string text;
  for (std::size_t i = 1; i < ids.size(); ++i) text += tok().decode(ids[i - 1], ids[i]);
  CHECK(text ==
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the p");
}

TEST_CASE("query hook sees each layer's post-RoPE query, and the cache holds every token",
          "[llama][forward]") {
  const llama::checkpoint& m = model();
  const llama::config& c = m.cfg();
  llama::run_state state(c);
  llama::dense_full_cache cache(c);
  std::vector<int> layers_seen;
  std::vector<float> last_query;
  const auto hook = [&](int layer, int pos, std::span<const float> q) {
    CHECK(pos == 2);
    CHECK(q.size() == static_cast<std::size_t>(c.n_heads * c.head_dim()));
    layers_seen.push_back(layer);
    last_query.assign(q.begin(), q.end());
  };
  llama::forward(m, state, cache, 1, 0);
  llama::forward(m, state, cache, 403, 1);
  llama::forward(m, state, cache, 407, 2, hook);
  CHECK(layers_seen == std::vector<int>{0, 1, 2, 3, 4});
  CHECK(last_query == state.q);  // the last layer's query is also left in the state
  for (int layer = 0; layer < c.n_layers; ++layer) CHECK(cache.length(layer) == 3);

  const std::vector<float> kv(static_cast<std::size_t>(c.kv_dim()));
  REQUIRE_THROWS_WITH(cache.append(0, 5, kv, kv), Contains("expected position 3"));
  cache.clear();
  CHECK(cache.length(0) == 0);
}

TEST_CASE("full-cache perplexity on TinyStories windows 0..3 matches the reference",
          "[llama][forward][slow]") {
  require_input(text_path);
  const llama::text_stream stream(text_path, tok());
  REQUIRE(stream.window_count() >= 4);
  double total = 0.0;
  for (std::size_t w = 0; w < 4; ++w) {
    const std::vector<int> window = stream.window(w);
    REQUIRE(window.size() == 512);
    CHECK(window.front() == 1);
    total += window_nll(window);
  }
  const double mean_nll = total / 4.0;
  INFO("mean NLL " << mean_nll << ", ppl " << std::exp(mean_nll));
  CHECK(mean_nll == Approx(1.358).margin(0.003));
  CHECK(std::exp(mean_nll) == Approx(3.889).epsilon(0.003));
}

TEST_CASE("bad checkpoints are rejected with a message naming the problem", "[llama][errors]") {
  require_input(model_path);
  const temp_dir dir;
  const std::vector<std::int32_t> good = {64, 172, 5, 8, 4, 512, 512};

  REQUIRE_THROWS_WITH(llama::checkpoint(dir.path / "absent.bin"),
                      Contains("absent.bin") && Contains("cannot open"));
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.path), Contains("directory"));

  const std::string real = read_bytes(model_path);
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("cut.bin", real.substr(0, real.size() - 4))),
                      Contains("cut.bin") && Contains("truncated"));
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("stub.bin", real.substr(0, 10))),
                      Contains("truncated"));
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("long.bin", real + "tail")),
                      Contains("size mismatch"));

  auto header = good;
  header[0] = 0;
  REQUIRE_THROWS_WITH(
      llama::checkpoint(dir.write("dim.bin", checkpoint_bytes(header, 8))),
      Contains("dim.bin") && Contains("bad header") && Contains("dim must be positive"));
  header = good;
  header[5] = -512;
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("vocab.bin", checkpoint_bytes(header, 8))),
                      Contains("vocab_size must be positive"));
  header = good;
  header[4] = 3;
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("gqa.bin", checkpoint_bytes(header, 8))),
                      Contains("not a multiple of n_kv_heads"));
  header = good;
  header[3] = 6;
  header[4] = 6;
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("heads.bin", checkpoint_bytes(header, 8))),
                      Contains("not divisible by n_heads"));
  header = good;
  header[0] = 56;  // head size 7
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("odd.bin", checkpoint_bytes(header, 8))),
                      Contains("odd"));
  header = good;
  header[0] = header[1] = header[2] = 1 << 30;
  header[3] = header[4] = 1 << 28;
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("huge.bin", checkpoint_bytes(header, 8))),
                      Contains("implausibly large"));
  // A plausible header whose tensors need more bytes than the file has.
  std::string more_layers = real;
  const std::int32_t six_layers = 6;
  std::memcpy(more_layers.data() + 8, &six_layers, 4);
  REQUIRE_THROWS_WITH(llama::checkpoint(dir.write("layers.bin", more_layers)),
                      Contains("truncated"));
}

TEST_CASE("bad tokenizers are rejected with a message naming the problem", "[llama][errors]") {
  require_input(tokenizer_path);
  const temp_dir dir;
  const std::string real = read_bytes(tokenizer_path);

  REQUIRE_THROWS_WITH(llama::tokenizer(dir.path / "absent.bin", 512),
                      Contains("absent.bin") && Contains("cannot open"));
  REQUIRE_THROWS_WITH(llama::tokenizer(dir.write("cut.bin", real.substr(0, real.size() - 1)), 512),
                      Contains("cut.bin") && Contains("truncated"));
  REQUIRE_THROWS_WITH(llama::tokenizer(dir.write("empty.bin", ""), 512), Contains("truncated"));
  REQUIRE_THROWS_WITH(llama::tokenizer(tokenizer_path, 600),
                      Contains("tokenizer mismatch") && Contains("512 tokens") && Contains("600"));
  // Three complete records: well-formed, but not this model's vocabulary.
  std::string small = real.substr(0, 4);
  for (const std::string piece : {"<unk>", "a", "b"}) {
    const float score = 0.0f;
    const auto len = static_cast<std::int32_t>(piece.size());
    small.append(reinterpret_cast<const char*>(&score), 4)
        .append(reinterpret_cast<const char*>(&len), 4) += piece;
  }
  REQUIRE_THROWS_WITH(llama::tokenizer(dir.write("small.bin", small), 512),
                      Contains("tokenizer mismatch"));
}

TEST_CASE("unreadable or too-short text is rejected with a message naming the problem",
          "[llama][errors]") {
  const temp_dir dir;
  REQUIRE_THROWS_WITH(llama::text_stream(dir.path / "absent.txt", tok()),
                      Contains("absent.txt") && Contains("cannot open"));
  REQUIRE_THROWS_WITH(llama::text_stream(dir.path, tok()), Contains("cannot open"));

  const llama::text_stream short_stream(dir.write("short.txt", "Once upon a time.\n\nThe end.\n"),
                                        tok());
  CHECK(short_stream.window_count() == 0);
  REQUIRE_THROWS_WITH(short_stream.window(0), Contains("short.txt") && Contains("too short"));
}
