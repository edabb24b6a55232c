#pragma once
//! \file config.hpp
//! Version, the versioned namespace and the host/device function qualifier.

#define KVTRIM_VERSION_MAJOR 0
#define KVTRIM_VERSION_MINOR 1
#define KVTRIM_VERSION_PATCH 0

//! Functions marked KVTRIM_HOST_DEVICE compile for both sides under nvcc and are plain
//! functions under a host compiler, so pure policy math is shared by both backends.
#if defined(__CUDACC__)
#define KVTRIM_HOST_DEVICE __host__ __device__
#else
#define KVTRIM_HOST_DEVICE
#endif

//! Every symbol lives in `kvtrim::v0`, inlined into `kvtrim`, so two versions linked into one
//! engine do not violate the one-definition rule.
#define KVTRIM_NAMESPACE_BEGIN \
  namespace kvtrim {           \
  inline namespace v0 {
#define KVTRIM_NAMESPACE_END \
  }                          \
  }
