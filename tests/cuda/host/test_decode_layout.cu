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
              // Fewer resident CTAs never give more splits: the max_ctas workspace holds it.
              CHECK(l.splits <= most.splits);
              CHECK(carved_bytes(l) <= workspace);
            }
          }
}
