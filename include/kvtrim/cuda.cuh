#pragma once
//! \file cuda.cuh
//! Everything: the host-safe library (kvtrim.hpp) plus the CUDA backend. Needs nvcc (or
//! another CUDA compiler) and links kvtrim::cuda.

#include "kvtrim/backend/cuda/compress.cuh"
#include "kvtrim/backend/cuda/dispatch.cuh"
#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/kernels/append.cuh"
#include "kvtrim/backend/cuda/kernels/compaction.cuh"
#include "kvtrim/backend/cuda/kernels/metadata.cuh"
#include "kvtrim/backend/cuda/kernels/paged_attention.cuh"
#include "kvtrim/backend/cuda/kernels/radix_sort.cuh"
#include "kvtrim/backend/cuda/kernels/ranking.cuh"
#include "kvtrim/backend/cuda/kernels/window_scores.cuh"
#include "kvtrim/backend/cuda/mover.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/session.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/kvtrim.hpp"
