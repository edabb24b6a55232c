#pragma once
//! \file cuda.cuh
//! Everything: the host-safe library (kvtrim.hpp) plus the CUDA backend. Needs nvcc (or
//! another CUDA compiler) and links kvtrim::cuda.

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/kvtrim.hpp"
