// Decode attention's split sizing (paged_attention.cuh), host arithmetic only, so it needs no
// GPU. The workspace is sized once, for attention_tuning::max_ctas resident CTAs, while each
// launch sizes its splits for the CTAs its own kernel instance holds at once (from 2 per SM at
// G = 8 to 4): every such layout must fit that workspace, read every key, and leave no split
// empty.
#include <catch2/catch.hpp>

#include <cstdint>

#include "kvtrim/cuda.cuh"

namespace {

namespace cu = kvtrim::cuda;

//! Bytes the launch carves for `l`, in the order decode_attention takes them.
size_t carved_bytes(const cu::detail::decode_layout& l) {
  cu::detail::workspace_carver w(nullptr);
  w.take<float>(l.partial_acc);
  w.take<float>(l.partial_stats);
  w.take<float>(l.logits);
  w.take<float>(l.stats);
  return w.used();
}

}  // namespace

TEST_CASE("decode splits: any resident-CTA count gives a layout that fits the workspace and covers every key", "[cuda]") {
  constexpr cu::attention_tuning t = cu::default_tuning.attention;
  for (const int32_t batch : {1, 2, 8, 32, 200})
    for (const int32_t heads : {1, 8, 16})
      for (const int32_t group : {1, 4, 8})
        for (const int32_t length : {1, 31, 64, 512, 4096, 32768, 131072, 1000003})
          for (const auto acc : {kvtrim::decode_accumulation::none, kvtrim::decode_accumulation::sum}) {
            cu::decode_arguments<kvtrim::bfloat16> a;
            a.pool.heads = heads;
            a.pool.head_dim = 128;
            a.batch = batch;
            a.q_heads = heads * group;
            a.max_length = length;
            a.accumulate = acc;
            const size_t workspace = cu::workspace_size(a);
            const cu::detail::decode_layout most = cu::detail::decode_layout_of(a, t.max_ctas);
            // 132 SMs (H100 SXM) at 2, 3 and 4 CTAs each, and the extremes.
            for (const int64_t slots : {int64_t{1}, int64_t{7}, int64_t{264}, int64_t{396}, int64_t{528}, t.max_ctas}) {
              CAPTURE(batch, heads, group, length, static_cast<int>(acc), slots);
              const cu::detail::decode_layout l = cu::detail::decode_layout_of(a, slots);
              CHECK(l.group == group);
              CHECK(l.split_tokens % 32 == 0);
              CHECK(l.split_tokens >= t.min_split_tokens);
              CHECK(l.split_tokens <= t.max_split_tokens);
              // Every key is read, and the last split is not empty.
              CHECK(static_cast<int64_t>(l.splits) * l.split_tokens >= length);
              CHECK(static_cast<int64_t>(l.splits - 1) * l.split_tokens < length);
              // Short splits are coarsened to at most max_short_splits a head.
              CHECK((l.splits <= t.max_short_splits || l.split_tokens >= t.short_split_tokens));
              // Fewer resident CTAs never give more splits: the max_ctas workspace holds it.
              CHECK(l.splits <= most.splits);
              CHECK(carved_bytes(l) <= workspace);
            }
          }
}

TEST_CASE("decode splits: the measured small-cache shapes get 32 splits a head, longer heads keep theirs", "[cuda]") {
  // An H100 SXM holds 132 x 4 split CTAs at G = 4 (528 slots); 8 KV heads of head dim 128.
  const auto splits = [](int32_t batch, int32_t length) {
    cu::decode_arguments<kvtrim::bfloat16> a;
    a.pool.heads = 8;
    a.pool.head_dim = 128;
    a.batch = batch;
    a.q_heads = 32;
    a.max_length = length;
    return cu::detail::decode_layout_of(a, 528).splits;
  };
  CHECK(splits(1, 4096) == 32);   // 64 before: 17.3-17.5 µs in 32 against 20.1-21.0
  CHECK(splits(1, 8192) == 32);   // 64 before: 26.5-26.9 µs against 28.5-30.0 (eager)
  CHECK(splits(1, 512) == 8);     // 64-key splits, as before: 8 beat 4
  CHECK(splits(1, 16384) == 64);  // 256-key splits already: unchanged
  CHECK(splits(1, 32768) == 64);  // long heads keep every resident CTA busy
  CHECK(splits(8, 4096) == 8);    // the 8x decode target shape: unchanged
  CHECK(splits(8, 32768) == 8);
}

TEST_CASE("decode splits: a caller's split size is used as given, and the workspace follows it", "[cuda]") {
  for (const int32_t length : {1, 31, 64, 4096, 131072})
    for (const int32_t split : {32, 96, 1024, 8192}) {
      cu::decode_arguments<kvtrim::bfloat16> a;
      a.pool.heads = 8;
      a.pool.head_dim = 128;
      a.batch = 8;
      a.q_heads = 32;
      a.max_length = length;
      a.accumulate = kvtrim::decode_accumulation::sum;
      a.split_tokens = split;
      const size_t workspace = cu::workspace_size(a);
      // Whatever the device holds: the split is the caller's.
      for (const int64_t slots : {int64_t{1}, int64_t{528}, cu::default_tuning.attention.max_ctas}) {
        CAPTURE(length, split, slots);
        const cu::detail::decode_layout l = cu::detail::decode_layout_of(a, slots);
        CHECK(l.split_tokens == split);
        CHECK(l.splits == (length + split - 1) / split);
        CHECK(carved_bytes(l) <= workspace);
      }
    }
}
