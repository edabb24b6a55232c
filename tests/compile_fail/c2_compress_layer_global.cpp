// Rule C2: KV-Compress spends one budget across all layers, so it cannot run layer by layer.
// expected-diagnostic: static assertion failed.*kvtrim::cpu::compress_layer rule C2
#include <cstdint>
#include <vector>

#include "kvtrim/kvtrim.hpp"

kvtrim::status compress_first_layer(kvtrim::dense_cache& cache, const kvtrim::attention_shape& model) {
  const std::vector<float> queries;
  const std::vector<int32_t> positions;
  return kvtrim::cpu::compress_layer(kvtrim::kv_compress(), cache, 0, model, 0, queries, positions);
}
