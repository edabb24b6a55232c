// Rule C3: the CPU backend reads host memory; a device store needs the CUDA backend.
// expected-diagnostic: static assertion failed.*kvtrim::cpu::compress rule C3
#include "fake_store.hpp"
#include "kvtrim/kvtrim.hpp"

kvtrim::status compress_device(fake_store<kvtrim::memory_space::device>& store,
                               const kvtrim::attention_shape& model) {
  return kvtrim::cpu::compress(kvtrim::snapkv(), store, 0, model, kvtrim::cpu::observation{});
}
