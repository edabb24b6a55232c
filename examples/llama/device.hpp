#pragma once
//! \file device.hpp
//! `--device`: the demo's two commands for one kvtrim store. `cpu`: `kvtrim::paged_cache<float>`
//! on the CPU backend (kvtrim_cache.hpp); `cuda`: the device paged cache on the CUDA backend
//! (kvtrim_cache_cuda.cuh), compiled by nvcc in cuda_device.cu where CMake builds CUDA (it then
//! defines KVTRIM_LLAMA_CUDA=1).

#include <vector>

#include "eval.hpp"
#include "generate.hpp"

namespace llama {

struct device_runs {
  eval_result (*evaluate)(const checkpoint&, const std::vector<std::vector<int>>&, const eval_options&);
  generation (*generate)(const checkpoint&, const generate_options&);
};

template <kvtrim::kv_store Store>
device_runs runs_on() {
  return {&evaluate<Store>, &generate<Store>};
}

//! The runs with kvtrim's cache on the GPU (cuda_device.cu); throws a clear error when the CUDA
//! runtime finds no device.
device_runs cuda_runs();

}  // namespace llama
