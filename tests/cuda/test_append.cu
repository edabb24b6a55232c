// Append on the device writes what the CPU backend writes, on both of its paths: 16-byte
// chunks (rows a multiple of 16 bytes, 16-byte aligned pointers) and element by element
// (narrow rows, or a source that is not 16-byte aligned).
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "parity_support.cuh"

using namespace kvtrim_test;
namespace kv = kvtrim;

namespace {

//! Every head of `seqs` holds the same positions, K, V and metrics in both caches, and the
//! device's table mirror equals the host tables of its own cache.
template <class T>
void expect_same_heads(const twin_caches<T>& c, const std::vector<int64_t>& seqs) {
  const kv::attention_shape& shape = c.config.shape;
  const auto d = static_cast<size_t>(shape.head_dim);
  for (const int64_t s : seqs)
    for (int32_t l = 0; l < shape.layers; ++l)
      for (int32_t h = 0; h < shape.kv_heads; ++h) {
        CAPTURE(s, l, h);
        const int32_t n = c.host.head_length(s, l, h);
        REQUIRE(c.device.head_length(s, l, h) == n);
        std::vector<int32_t> p1(n), p2(n);
        std::vector<float> k1(static_cast<size_t>(n) * d), k2(k1.size()), v1(k1.size()), v2(k1.size()), m1(n), m2(n);
        require_ok(c.host.read_head(s, l, h, p1, k1, m1));
        require_ok(c.device.read_head(s, l, h, p2, k2, m2));
        require_ok(c.host.read_values(s, l, h, v1));
        require_ok(c.device.read_values(s, l, h, v2));
        CHECK(p1 == p2);
        CHECK(k1 == k2);
        CHECK(v1 == v2);
        CHECK(m1 == m2);
      }
  CHECK(c.host.pool() == c.device.pool());
  const std::span<const int32_t> tables = c.device.tables().table_data(), lengths = c.device.tables().length_data();
  CHECK(download(c.tables.template as<int32_t>(), tables.size()) == std::vector<int32_t>(tables.begin(), tables.end()));
  CHECK(download(c.lengths.template as<int32_t>(), lengths.size()) == std::vector<int32_t>(lengths.begin(), lengths.end()));
}

}  // namespace

TEMPLATE_TEST_CASE("device append writes the CPU backend's slots, whatever the row width", "[cuda]", float, kv::bfloat16) {
  // d 3 and 12 (bf16: 24-byte rows) take the element path, 8 and 12 (fp32) the 16-byte one.
  const int32_t d = GENERATE(3, 8, 12);
  const bool offset_source = GENERATE(false, true);  // source rows one element past 16-byte alignment
  CAPTURE(d, offset_source);
  const kv::paged_cache_config config{{2, 4, 2, d}, 16, 64, 2, 128};
  twin_caches<TestType> c(config);
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.f, 1.f);
  const std::vector<int64_t> seqs{1, 2};
  for (const int64_t s : seqs) {
    require_ok(c.host.add_sequence(s));
    require_ok(c.device.add_sequence(s));
  }
  int32_t next = 0;
  for (const int32_t tokens : {37, 1, 16}) {
    for (const int64_t s : seqs) {
      const size_t count = static_cast<size_t>(config.shape.layers) * tokens * config.shape.kv_heads * d;
      std::vector<float> k(count), v(count);
      for (auto& x : k) x = dist(rng);
      for (auto& x : v) x = dist(rng);
      std::vector<int32_t> pos(static_cast<size_t>(tokens));
      for (int32_t t = 0; t < tokens; ++t) pos[static_cast<size_t>(t)] = next + t;
      require_ok(c.host.append(s, pos, k, v));
      const size_t shift = offset_source ? 1 : 0;
      std::vector<TestType> kt(count + shift), vt(count + shift);
      for (size_t i = 0; i < count; ++i) {
        kt[i + shift] = kv::from_float<TestType>(k[i]);
        vt[i + shift] = kv::from_float<TestType>(v[i]);
      }
      device_memory dk(kt.size() * sizeof(TestType)), dv(vt.size() * sizeof(TestType));
      upload(dk, kt);
      upload(dv, vt);
      require_ok(c.device.append(s, pos, std::span<const TestType>(dk.as<TestType>() + shift, count),
                                 std::span<const TestType>(dv.as<TestType>() + shift, count)));
    }
    next += tokens;
  }
  expect_same_heads(c, seqs);
  CHECK(c.host.pool() == c.device.pool());
}

TEMPLATE_TEST_CASE("a batch decode step appended to a layer in one call writes what per-sequence appends write",
                   "[cuda]", float, kv::bfloat16) {
  const kv::paged_cache_config config{{2, 8, 4, 8}, 4, 96, 3, 32};
  twin_caches<TestType> c(config);
  std::mt19937 rng(9);
  std::normal_distribution<float> dist(0.f, 1.f);
  const std::vector<int64_t> seqs{7, 3, 11};
  std::vector<int32_t> next{5, 8, 2};  // prompts of different lengths: blocks fill at different steps
  for (size_t b = 0; b < seqs.size(); ++b) {
    require_ok(c.host.add_sequence(seqs[b]));
    require_ok(c.device.add_sequence(seqs[b]));
    c.append(seqs[b], 0, next[b], rng);
  }
  const size_t row = static_cast<size_t>(config.shape.kv_heads) * config.shape.head_dim;  // one token of a layer
  for (int32_t step = 0; step < 6; ++step) {
    for (int32_t l = 0; l < config.shape.layers; ++l) {
      std::vector<float> k(seqs.size() * row), v(k.size());
      for (auto& x : k) x = dist(rng);
      for (auto& x : v) x = dist(rng);
      for (size_t b = 0; b < seqs.size(); ++b)
        require_ok(c.host.append_layer(seqs[b], l, std::vector<int32_t>{next[b]},
                                       std::span<const float>(k).subspan(b * row, row),
                                       std::span<const float>(v).subspan(b * row, row)));
      std::vector<TestType> kt(k.size()), vt(v.size());
      for (size_t i = 0; i < k.size(); ++i) {
        kt[i] = kv::from_float<TestType>(k[i]);
        vt[i] = kv::from_float<TestType>(v[i]);
      }
      device_memory dk(kt.size() * sizeof(TestType)), dv(vt.size() * sizeof(TestType));
      upload(dk, kt);
      upload(dv, vt);
      require_ok(c.device.append_layer(seqs, l, next, std::span<const TestType>(dk.as<TestType>(), kt.size()),
                                       std::span<const TestType>(dv.as<TestType>(), vt.size())));
    }
    for (int32_t& n : next) ++n;
  }
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  expect_same_heads(c, seqs);
}
