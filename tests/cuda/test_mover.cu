// The CUDA mover's mirror updates: a batch commit (truncate) journals every head of every
// sequence at once, more than a staging buffer sized for one operation of one sequence may
// hold; the mover replays each part of the journal (new blocks, freed runs, lengths) in
// chunks, and the mirror must still equal the host tables.
#include "parity_support.cuh"

#include <vector>

namespace {

using namespace kvtrim_test;
namespace kv = kvtrim;

}  // namespace

TEST_CASE("the CUDA mover replays a journal larger than its staging in chunks", "[cuda]") {
  const kv::attention_shape model{2, 32, 16, 8};                      // 32 heads a sequence
  const kv::paged_cache_config config{model, 1, 3 * 32 * 40, 3, 40};  // block size 1: a block a token
  const kv::paged_buffer_sizes sizes = kv::buffer_sizes<float>(config);
  device_memory keys(sizes.keys), values(sizes.values), positions(sizes.positions), metrics(sizes.metrics),
      tables(sizes.block_tables), lengths(sizes.lengths);
  // 1 KiB: 64 journal entries a chunk, and just what a 3-token append's slots take.
  device_memory staging(1024);
  using cache_t = kv::device_paged_cache<float, kv::dynamic_head_dim, kv::cuda::cuda_mover>;
  cache_t cache;
  const kv::device_buffers<float> buffers{{keys.as<float>(), values.as<float>(), positions.as<int32_t>(),
                                           metrics.as<float>(), tables.as<int32_t>(), lengths.as<int32_t>()},
                                          sizes};
  require_ok(cache_t::create(config, kv::device_storage<float, kv::cuda::cuda_mover>{
                                         buffers, kv::cuda::cuda_mover{nullptr, staging.as<void>(), staging.bytes()}},
                             cache));
  const std::vector<int64_t> seqs{0, 1, 2};
  const size_t row = static_cast<size_t>(model.layers) * model.kv_heads * model.head_dim;  // one token, every head
  const std::vector<float> kv_rows(3 * row, 0.5f);
  device_memory k(kv_rows.size() * sizeof(float));
  upload(k, kv_rows);
  const std::span<const float> three(k.as<const float>(), 3 * row), one(k.as<const float>(), row);
  for (const int64_t s : seqs) {
    require_ok(cache.add_sequence(s));
    // 96 new blocks in one append: 2 chunks of table writes.
    require_ok(cache.append(s, std::vector<int32_t>{0, 1, 2}, three, three));
    for (int32_t t = 3; t < 40; ++t) {
      const int32_t position = t;
      require_ok(cache.append(s, std::span<const int32_t>(&position, 1), one, one));
    }
  }
  // Every head down to 1 token: 96 freed runs of 39 blocks and 96 lengths, 2 chunks each.
  const std::vector<int32_t> kept(seqs.size() * 32, 1);
  require_ok(cache.truncate(seqs, kept));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);

  const auto mirror_tables = download(tables.as<int32_t>(), sizes.block_tables / sizeof(int32_t));
  const auto mirror_lengths = download(lengths.as<int32_t>(), sizes.lengths / sizeof(int32_t));
  const std::span<const int32_t> host_tables = cache.tables().table_data(), host_lengths = cache.tables().length_data();
  CHECK(std::vector<int32_t>(host_tables.begin(), host_tables.end()) == mirror_tables);
  CHECK(std::vector<int32_t>(host_lengths.begin(), host_lengths.end()) == mirror_lengths);
  CHECK(cache.pool().used_blocks == 96);

  // An append whose index lists the staging cannot hold is refused before any copy: 4 tokens
  // of every head need 256 + 1024 bytes.
  const kv::block_tables before = cache.tables();
  const std::vector<float> four_rows(4 * row, 0.5f);
  device_memory k4(four_rows.size() * sizeof(float));
  upload(k4, four_rows);
  const std::span<const float> four(k4.as<const float>(), 4 * row);
  CHECK(cache.append(0, std::vector<int32_t>{1, 2, 3, 4}, four, four) == kv::status::invalid_argument);
  CHECK(cache.tables() == before);
}
