// The device session (cuda::compression_session) against the CPU session over twin caches:
// sequences that joined at different steps, so a scheduled compression fires for some of a
// batch and the session gathers their window rows; the kept tokens must stay the CPU's.
#include "parity_support.cuh"

#include <vector>

namespace {

using namespace kvtrim_test;
namespace kv = kvtrim;
namespace cu = kvtrim::cuda;

constexpr int32_t rows = 4;

//! Window queries of every sequence of a batch: host [L][rows][Hq][d] per sequence for the CPU
//! session, and the same concatenated [batch][L][rows][Hq][d] on the device.
struct batch_observation {
  std::vector<std::vector<float>> queries;
  std::vector<std::vector<int32_t>> positions;
  device_memory device_queries, device_positions;

  batch_observation(const kv::attention_shape& model, const std::vector<int32_t>& next_positions, std::mt19937& rng)
      : device_queries(next_positions.size() * per_sequence(model) * sizeof(float)),
        device_positions(next_positions.size() * rows * sizeof(int32_t)) {
    std::normal_distribution<float> dist(0.f, 1.f);
    std::vector<float> all_queries;
    std::vector<int32_t> all_positions;
    for (const int32_t next : next_positions) {
      std::vector<float> q(per_sequence(model));
      for (auto& x : q) x = dist(rng);
      std::vector<int32_t> p;
      for (int32_t r = 0; r < rows; ++r) p.push_back(next - rows + r);
      all_queries.insert(all_queries.end(), q.begin(), q.end());
      all_positions.insert(all_positions.end(), p.begin(), p.end());
      queries.push_back(std::move(q));
      positions.push_back(std::move(p));
    }
    upload(device_queries, all_queries);
    upload(device_positions, all_positions);
  }
  static size_t per_sequence(const kv::attention_shape& m) {
    return static_cast<size_t>(m.layers) * rows * m.q_heads * m.head_dim;
  }
  [[nodiscard]] kv::cpu::observation host(size_t b) const { return {queries[b], positions[b]}; }
  [[nodiscard]] cu::device_observation device() const {
    return {device_queries.as<float>(), device_positions.as<int32_t>(), rows};
  }
};

//! `piece_slots`: the device session's compression pieces (0: the library's).
template <class Policy, kv::kv_element T>
void run_sessions(const Policy& policy, int32_t d, bool observed, int64_t piece_slots = 0) {
  const kv::attention_shape model{2, 4, 2, d};
  const kv::paged_cache_config config{model, 16, 3 * 2 * 2 * 12, 3, 160};
  twin_caches<T> c(config);
  std::mt19937 rng(5);
  kv::compression_session host(c.host, model, policy);
  const int32_t max_batch = 3;
  device_memory workspace(
      cu::compression_session<Policy, T>::workspace_size(policy, c.device, model, max_batch, rows, piece_slots));
  cu::compression_session<Policy, T> device;
  require_ok(cu::compression_session<Policy, T>::create(c.device, model, policy, max_batch, rows, workspace.as<void>(),
                                                        workspace.bytes(), nullptr, device, piece_slots));

  std::vector<int64_t> seqs;
  std::vector<int32_t> next;  // each sequence's next position
  const auto compare = [&] {
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    for (const int64_t s : seqs)
      for (int32_t l = 0; l < model.layers; ++l)
        for (int32_t h = 0; h < model.kv_heads; ++h) {
          CAPTURE(s, l, h);
          CHECK(twin_caches<T>::kept_tokens(c.device, s, l, h) == twin_caches<T>::kept_tokens(c.host, s, l, h));
        }
    CHECK(c.device.tables() == c.host.tables());
  };
  // A prompt of 60 + 9 s tokens for sequence s, compressed; sequence 3 joins at step 2, so
  // with a schedule of every 2 steps sequences 1 and 2 fire without it at steps 2 and 4, and
  // it fires alone at step 3 and 5.
  const auto join = [&](int64_t s) {
    require_ok(host.add_sequence(s));
    require_ok(device.add_sequence(s));
    const int32_t n = 60 + 9 * static_cast<int32_t>(s);
    c.append(s, 0, n, rng);
    const batch_observation obs(model, {n}, rng);
    require_ok(host.finish_prefill(s, observed ? obs.host(0) : kv::cpu::observation{}));
    const cu::device_observation none{};
    const std::vector<int64_t> one{s};
    require_ok(device.finish_prefill(one, observed ? obs.device() : none));
    seqs.push_back(s);
    next.push_back(n);
  };
  join(1);
  join(2);
  compare();
  for (int32_t step = 1; step <= 6; ++step) {
    CAPTURE(step);
    if (step == 2) join(3);
    for (size_t b = 0; b < seqs.size(); ++b) c.append(seqs[b], next[b]++, 1, rng);
    const batch_observation obs(model, next, rng);
    std::vector<int64_t> host_compressed;
    for (size_t b = 0; b < seqs.size(); ++b) {
      bool compressed = false;
      require_ok(host.end_decode_step(seqs[b], compressed, observed ? obs.host(b) : kv::cpu::observation{}));
      if (compressed) host_compressed.push_back(seqs[b]);
    }
    std::vector<int64_t> device_compressed;
    const cu::device_observation none{};
    require_ok(device.end_decode_step(seqs, observed ? obs.device() : none, device_compressed));
    CHECK(device_compressed == host_compressed);
    for (const int64_t s : seqs) CHECK(device.decode_steps(s) == host.decode_steps(s));
    compare();
  }
  for (const int64_t s : seqs) {
    require_ok(host.free_sequence(s));
    require_ok(device.free_sequence(s));
  }
  CHECK(c.device.pool() == c.host.pool());
}

}  // namespace

TEMPLATE_TEST_CASE("the device session compresses what the CPU session does, step by step", "[cuda]", float,
                   kv::bfloat16) {
  const int32_t d = GENERATE(8, 128);
  CAPTURE(d);
  SECTION("SnapKV every 2 steps: the sequences that joined later fire alone, with their own window rows") {
    auto p = kv::snapkv({.budget = kv::token_budget::of_tokens(40), .window = rows});
    p.schedule = {kv::compression_schedule::kind::every_n_steps, 2};
    run_sessions<kv::snapkv_policy, TestType>(p, d, true);
  }
  SECTION("SnapKV every 2 steps, its window scores a (sequence, layer) at a time") {
    auto p = kv::snapkv({.budget = kv::token_budget::of_tokens(40), .window = rows});
    p.schedule = {kv::compression_schedule::kind::every_n_steps, 2};
    run_sessions<kv::snapkv_policy, TestType>(p, d, true, 1);
  }
  SECTION("StreamingLLM every step: no window rows") {
    const auto p = kv::streaming_llm({.budget = kv::token_budget::of_tokens(40), .sinks = 2});
    run_sessions<kv::streaming_llm_policy, TestType>(p, d, false);
  }
}
