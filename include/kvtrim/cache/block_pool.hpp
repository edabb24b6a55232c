#pragma once
//! \file block_pool.hpp
//! The free list of a paged cache's blocks. Host state: the pool only hands out block ids;
//! the blocks' K/V live wherever the cache keeps them (docs/cache.md, "Where the allocator
//! lives"). Allocation is all or nothing, so a cache can promise that a failed append changed
//! nothing.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/config.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

class block_pool {
 public:
  block_pool() = default;
  //! All `num_blocks` blocks free; block 0 is handed out first.
  explicit block_pool(int32_t num_blocks)
      : free_(static_cast<size_t>(std::max(num_blocks, 0))), in_use_(free_.size(), 0) {
    for (size_t i = 0; i < free_.size(); ++i) free_[i] = static_cast<int32_t>(free_.size() - 1 - i);
  }

  [[nodiscard]] int32_t capacity() const noexcept { return static_cast<int32_t>(in_use_.size()); }
  [[nodiscard]] int32_t free_count() const noexcept { return static_cast<int32_t>(free_.size()); }
  [[nodiscard]] int32_t used_count() const noexcept { return capacity() - free_count(); }
  [[nodiscard]] bool in_use(int32_t block) const noexcept {
    return block >= 0 && block < capacity() && in_use_[static_cast<size_t>(block)] != 0;
  }
  //! The free blocks; `allocate` hands them out from the back, so a cache can compute where
  //! new tokens go, write them, and only then commit the allocation.
  [[nodiscard]] std::span<const int32_t> free_list() const noexcept { return free_; }

  //! Takes `out.size()` blocks, or none: pool_exhausted if fewer are free.
  [[nodiscard]] status allocate(std::span<int32_t> out) noexcept {
    if (out.size() > free_.size()) return status::pool_exhausted;
    for (int32_t& block : out) {
      block = free_.back();
      free_.pop_back();
      in_use_[static_cast<size_t>(block)] = 1;
    }
    return status::success;
  }

  //! Room for every block in the free list, so that release() allocates nothing (a pool as
  //! constructed has it; a copy holds only its free blocks).
  void reserve() { free_.reserve(in_use_.size()); }

  //! Returns blocks to the pool, or none: invalid_argument if any is unknown, already free,
  //! or named twice (a double free).
  [[nodiscard]] status release(std::span<const int32_t> blocks) noexcept {
    size_t checked = 0;
    for (; checked < blocks.size(); ++checked) {
      const int32_t b = blocks[checked];
      if (!in_use(b)) break;
      in_use_[static_cast<size_t>(b)] = 0;  // marks it, so a repeat below fails
    }
    if (checked < blocks.size()) {
      for (size_t i = 0; i < checked; ++i) in_use_[static_cast<size_t>(blocks[i])] = 1;
      return status::invalid_argument;
    }
    free_.insert(free_.end(), blocks.begin(), blocks.end());
    return status::success;
  }

  friend bool operator==(const block_pool&, const block_pool&) = default;

 private:
  std::vector<int32_t> free_;   // [free_count] stack of free block ids, top at the back
  std::vector<uint8_t> in_use_; // [capacity] 1 while a table owns the block
};

KVTRIM_NAMESPACE_END
