#pragma once
//! \file checkpoint.hpp
//! Loader for llama2.c "version 0" checkpoints: a 28-byte header of seven little-endian int32
//! followed by every float32 tensor, row-major [out][in], in a fixed order.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <ios>
#include <span>
#include <string>
#include <vector>

#include "file_io.hpp"

namespace llama {

static_assert(std::endian::native == std::endian::little,
              "checkpoints are little-endian and are read without byte swapping");

//! Model hyper-parameters, exactly the seven header fields.
struct config {
  int dim = 0;         //!< residual stream width
  int hidden_dim = 0;  //!< FFN inner width
  int n_layers = 0;
  int n_heads = 0;     //!< query heads
  int n_kv_heads = 0;  //!< key/value heads (grouped-query attention when < n_heads)
  int vocab_size = 0;  //!< also the classifier size: it shares the token embedding
  int seq_len = 0;     //!< context length the model was trained for

  int head_dim() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_dim(); }
  //! Query heads per KV head: query head h reads KV head h / kv_group().
  int kv_group() const { return n_heads / n_kv_heads; }
};

//! Throws std::runtime_error naming `origin` when the header cannot describe a usable model,
//! so a wrong file fails here instead of as garbage logits or an out-of-bounds read later.
inline void validate_config(const config& c, const std::filesystem::path& origin) {
  const auto fail = [&](const std::string& problem) {
    fail_file("checkpoint", origin, "bad header: " + problem);
  };
  const auto require_positive = [&](const char* name, int value) {
    if (value <= 0)
      fail(std::string(name) + " must be positive (got " + std::to_string(value) + ")");
  };
  require_positive("dim", c.dim);
  require_positive("hidden_dim", c.hidden_dim);
  require_positive("n_layers", c.n_layers);
  require_positive("n_heads", c.n_heads);
  require_positive("n_kv_heads", c.n_kv_heads);
  if (c.vocab_size <= 0)
    fail("vocab_size must be positive (got " + std::to_string(c.vocab_size) +
         "; a negative value means an unshared classifier, which is not supported)");
  require_positive("seq_len", c.seq_len);
  if (c.n_heads % c.n_kv_heads != 0)
    fail("n_heads (" + std::to_string(c.n_heads) + ") is not a multiple of n_kv_heads (" +
         std::to_string(c.n_kv_heads) + ")");
  if (c.dim % c.n_heads != 0)
    fail("dim (" + std::to_string(c.dim) + ") is not divisible by n_heads (" +
         std::to_string(c.n_heads) + ")");
  if (c.head_dim() % 2 != 0)
    fail("head size " + std::to_string(c.head_dim()) + " is odd, but RoPE rotates pairs");
}

//! All weights of a model, held in one buffer in file order, with typed per-tensor views.
class checkpoint {
 public:
  //! Reads and validates `path`; throws std::runtime_error naming the file and the problem.
  explicit checkpoint(const std::filesystem::path& path) {
    const auto fail = [&](const std::string& problem) { fail_file("checkpoint", path, problem); };
    std::ifstream in = open_input(path, "checkpoint");
    in.seekg(0, std::ios::end);
    const std::streamoff end = in.tellg();
    in.seekg(0);
    if (end < 0) fail("cannot determine file size");
    const auto file_bytes = static_cast<std::uint64_t>(end);

    std::int32_t header[7] = {};
    if (file_bytes < sizeof header)
      fail("truncated: " + std::to_string(file_bytes) +
           " bytes is shorter than the 28-byte header");
    in.read(reinterpret_cast<char*>(header), sizeof header);
    config_ = {header[0], header[1], header[2], header[3], header[4], header[5], header[6]};
    validate_config(config_, path);

    const std::uint64_t total_params = lay_out(path);
    const std::uint64_t expected_bytes = sizeof header + 4 * total_params;
    if (file_bytes < expected_bytes)
      fail("truncated: the header implies " + std::to_string(expected_bytes) +
           " bytes but the file has " + std::to_string(file_bytes));
    if (file_bytes > expected_bytes)
      fail("size mismatch: the header implies " + std::to_string(expected_bytes) +
           " bytes but the file has " + std::to_string(file_bytes) +
           " (trailing data or wrong header)");

    // The legacy freq_cis tables at the end are never read: RoPE is recomputed exactly.
    weights_.resize(used_params_);
    in.read(reinterpret_cast<char*>(weights_.data()),
            static_cast<std::streamsize>(used_params_ * sizeof(float)));
    if (!in) fail("read failed");
  }

  const config& cfg() const { return config_; }

  // [vocab_size][dim]: input embedding and (shared) classifier.
  std::span<const float> token_embedding() const { return view(token_embedding_, vocab_dim()); }
  // [dim]
  std::span<const float> rms_att(int layer) const { return layer_view(rms_att_, layer, dim()); }
  // [n_heads * head_dim][dim]
  std::span<const float> wq(int layer) const { return layer_view(wq_, layer, dim() * dim()); }
  // [n_kv_heads * head_dim][dim]
  std::span<const float> wk(int layer) const { return layer_view(wk_, layer, kv_dim() * dim()); }
  // [n_kv_heads * head_dim][dim]
  std::span<const float> wv(int layer) const { return layer_view(wv_, layer, kv_dim() * dim()); }
  // [dim][n_heads * head_dim]
  std::span<const float> wo(int layer) const { return layer_view(wo_, layer, dim() * dim()); }
  // [dim]
  std::span<const float> rms_ffn(int layer) const { return layer_view(rms_ffn_, layer, dim()); }
  // [hidden_dim][dim]
  std::span<const float> w1(int layer) const {
    return layer_view(w1_, layer, hidden_dim() * dim());
  }
  // [dim][hidden_dim]
  std::span<const float> w2(int layer) const {
    return layer_view(w2_, layer, dim() * hidden_dim());
  }
  // [hidden_dim][dim]
  std::span<const float> w3(int layer) const {
    return layer_view(w3_, layer, hidden_dim() * dim());
  }
  // [dim]
  std::span<const float> rms_final() const { return view(rms_final_, dim()); }

 private:
  std::size_t dim() const { return static_cast<std::size_t>(config_.dim); }
  std::size_t kv_dim() const { return static_cast<std::size_t>(config_.kv_dim()); }
  std::size_t hidden_dim() const { return static_cast<std::size_t>(config_.hidden_dim); }
  std::size_t vocab_dim() const { return static_cast<std::size_t>(config_.vocab_size) * dim(); }

  std::span<const float> view(std::size_t offset, std::size_t count) const {
    return {weights_.data() + offset, count};
  }
  std::span<const float> layer_view(std::size_t offset, int layer, std::size_t per_layer) const {
    return view(offset + static_cast<std::size_t>(layer) * per_layer, per_layer);
  }

  //! Assigns every tensor's offset in file order and returns the file's total float count
  //! (freq_cis included). Every count is capped at 2^56 floats, far beyond any real file, so
  //! a hostile header reports as implausible instead of wrapping around to a matching size.
  std::uint64_t lay_out(const std::filesystem::path& path) {
    constexpr std::uint64_t max_params = std::uint64_t{1} << 56;
    const auto implausible = [&] {
      fail_file("checkpoint", path, "bad header: implausibly large dimensions");
    };
    const auto mul = [&](std::uint64_t a, std::uint64_t b) {
      if (b != 0 && a > max_params / b) implausible();
      return a * b;
    };
    const std::uint64_t d = static_cast<std::uint64_t>(config_.dim);
    const std::uint64_t layers = static_cast<std::uint64_t>(config_.n_layers);
    const std::uint64_t hidden = static_cast<std::uint64_t>(config_.hidden_dim);
    const std::uint64_t kv = static_cast<std::uint64_t>(config_.kv_dim());
    std::uint64_t offset = 0;
    const auto take = [&](std::size_t& field, std::uint64_t count) {
      field = static_cast<std::size_t>(offset);
      offset += count;
      if (offset > max_params) implausible();
    };
    take(token_embedding_, mul(static_cast<std::uint64_t>(config_.vocab_size), d));
    take(rms_att_, mul(layers, d));
    take(wq_, mul(layers, mul(d, d)));
    take(wk_, mul(layers, mul(kv, d)));
    take(wv_, mul(layers, mul(kv, d)));
    take(wo_, mul(layers, mul(d, d)));
    take(rms_ffn_, mul(layers, d));
    take(w1_, mul(layers, mul(hidden, d)));
    take(w2_, mul(layers, mul(d, hidden)));
    take(w3_, mul(layers, mul(hidden, d)));
    take(rms_final_, d);
    used_params_ = static_cast<std::size_t>(offset);
    const std::uint64_t freq_cis = mul(static_cast<std::uint64_t>(config_.seq_len),
                                       static_cast<std::uint64_t>(config_.head_dim()));
    return offset + freq_cis;  // real and imaginary halves, each [seq_len][head_dim / 2]
  }

  config config_;
  std::vector<float> weights_;  // every tensor before freq_cis, in file order
  std::size_t used_params_ = 0;
  std::size_t token_embedding_ = 0, rms_att_ = 0, wq_ = 0, wk_ = 0, wv_ = 0, wo_ = 0, rms_ffn_ = 0,
              w1_ = 0, w2_ = 0, w3_ = 0, rms_final_ = 0;  // float offsets
};

}  // namespace llama
