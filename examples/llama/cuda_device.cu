// `--device cuda`: the demo's commands with kvtrim's cache on the GPU (device.hpp).

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "device.hpp"
#include "kvtrim_cache_cuda.cuh"

namespace llama {

device_runs cuda_runs() {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0)
    throw std::runtime_error(std::string("--device cuda: no usable CUDA device (cudaGetDeviceCount: ") +
                             (e != cudaSuccess ? std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e)
                                               : std::string("0 devices")) +
                             "); use --device cpu");
  return runs_on<cuda_paged_cache>();
}

}  // namespace llama
