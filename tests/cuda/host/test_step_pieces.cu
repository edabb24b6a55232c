// The pieces of a compression step (compress.cuh): compress_on_device scores the window and
// compacts piece by piece, so that its workspace follows one piece instead of every layer of
// every sequence. Host arithmetic only: the pieces must cover the batch once, each piece's
// arguments must address the step's own rows, queries and scores, and the workspace must stop
// growing with the window scores of every layer.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "kvtrim/cuda.cuh"

namespace {

namespace kv = kvtrim;
namespace cu = kvtrim::cuda;
using cu::detail::step_piece;

std::vector<step_piece> pieces_of(int32_t batch, int32_t layers, int64_t pairs) {
  std::vector<step_piece> out;
  cu::detail::for_each_step_piece(batch, layers, pairs, [&](const step_piece& c) { out.push_back(c); });
  return out;
}

}  // namespace

TEST_CASE("step pieces cover every (sequence, layer) once, in the step's order, within the piece size", "[cuda]") {
  for (const int32_t batch : {1, 2, 3, 7, 8})
    for (const int32_t layers : {1, 2, 5, 32})
      for (const int64_t pairs : {1, 2, 3, 4, 5, 8, 31, 32, 33, 64, 1000}) {
        CAPTURE(batch, layers, pairs);
        const std::vector<step_piece> pieces = pieces_of(batch, layers, pairs);
        int64_t next = 0;  // the next pair in [batch][layers] order
        std::set<std::pair<int32_t, int32_t>> shapes;
        for (const step_piece& c : pieces) {
          CHECK(c.sequences >= 1);
          CHECK(c.layers >= 1);
          CHECK(static_cast<int64_t>(c.sequences) * c.layers <= pairs);
          // whole sequences, or a run of one sequence's layers: one contiguous run of pairs
          CHECK((c.sequences == 1 || (c.first_layer == 0 && c.layers == layers)));
          CHECK(c.first_layer + c.layers <= layers);
          CHECK(static_cast<int64_t>(c.first_sequence) * layers + c.first_layer == next);
          next += static_cast<int64_t>(c.sequences) * c.layers;
          shapes.insert({c.sequences, c.layers});
        }
        CHECK(next == static_cast<int64_t>(batch) * layers);
        // The fewest pieces the size allows: one per whole sequence group, or per layer run.
        const int64_t expected = pairs >= layers ? (batch + std::min<int64_t>(batch, pairs / layers) - 1) /
                                                       std::min<int64_t>(batch, pairs / layers)
                                                 : batch * ((layers + pairs - 1) / pairs);
        CHECK(static_cast<int64_t>(pieces.size()) == expected);
        // Evenly sized: no sliver of a piece paying a launch for little work.
        const auto pairs_of = [](const step_piece& c) { return static_cast<int64_t>(c.sequences) * c.layers; };
        const auto [smallest, largest] = std::minmax_element(
            pieces.begin(), pieces.end(), [&](const step_piece& x, const step_piece& y) { return pairs_of(x) < pairs_of(y); });
        CHECK(pairs_of(*largest) - pairs_of(*smallest) <= (pairs >= layers ? layers : 1));
        // step_piece_shapes names exactly the shapes the enumeration gives (workspace sizes).
        const auto named_shapes = cu::detail::step_piece_shapes(batch, layers, pairs);
        std::set<std::pair<int32_t, int32_t>> named;
        for (const step_piece& s : named_shapes)
          if (s.sequences > 0) named.insert({s.sequences, s.layers});
        CHECK(named == shapes);
        CHECK(pieces.front().sequences == named_shapes[0].sequences);
        CHECK(pieces.front().layers == named_shapes[0].layers);
      }
  CHECK(pieces_of(0, 4, 8).empty());
}

TEST_CASE("a step piece's window arguments address the step's rows, queries, positions and scores", "[cuda]") {
  // The step: layers 1..3 of a 4-layer pool, 5 sequences, 3 window rows, Hq 4, Hkv 2, d 8.
  const int32_t batch = 5, window = 3, q_heads = 4, heads = 2, d = 8, stride = 16;
  cu::window_score_arguments<float> a;
  a.pool.layers = 4;
  a.pool.heads = heads;
  a.pool.head_dim = d;
  a.first_layer = 1;
  a.layer_count = 3;
  a.batch = batch;
  a.window = window;
  a.q_heads = q_heads;
  a.stride = stride;
  std::vector<int32_t> rows(batch), positions(static_cast<size_t>(batch) * window);
  std::vector<float> queries(static_cast<size_t>(batch) * a.layer_count * window * q_heads * d);
  std::vector<float> scores(static_cast<size_t>(batch) * a.layer_count * heads * stride);
  a.rows = rows.data();
  a.query_positions = positions.data();
  a.queries = queries.data();
  a.scores = scores.data();
  for (const int64_t pairs : {1, 2, 3, 6, 7, 15}) {
    for (const step_piece& c : pieces_of(batch, a.layer_count, pairs)) {
      CAPTURE(pairs, c.first_sequence, c.sequences, c.first_layer, c.layers);
      const cu::window_score_arguments<float> w = cu::detail::window_piece(a, c);
      CHECK(w.batch == c.sequences);
      CHECK(w.first_layer == a.first_layer + c.first_layer);
      CHECK(w.layer_count == c.layers);
      for (int32_t b = 0; b < w.batch; ++b) {
        const int32_t sb = c.first_sequence + b;  // the sequence in the step
        CHECK(&w.rows[b] == &a.rows[sb]);
        CHECK(&w.query_positions[static_cast<int64_t>(b) * window] == &a.query_positions[static_cast<int64_t>(sb) * window]);
        for (int32_t layer = w.first_layer; layer < w.first_layer + w.layer_count; ++layer) {
          // The kernels address query rows and scores by batch_layer (window_scores.cuh).
          const int64_t piece_at = cu::detail::batch_layer(w, b, layer), step_at = cu::detail::batch_layer(a, sb, layer);
          CHECK(&w.queries[piece_at * window * q_heads * d] == &a.queries[step_at * window * q_heads * d]);
          CHECK(&w.scores[piece_at * heads * stride] == &a.scores[step_at * heads * stride]);
        }
      }
    }
  }
}

TEST_CASE("compaction pieces cover the step's heads evenly, within the grid and the piece size", "[cuda]") {
  const int32_t least = cu::default_tuning.step.min_compaction_heads;
  for (const int64_t piece_slots : {int64_t{1} << 16, int64_t{1} << 21, cu::default_tuning.step.piece_slots})
    for (const int32_t stride : {1, 16, 4096, 131072, 1 << 22})
      for (const int32_t heads : {1, 7, 64, 100, 2048, 65535, 100000}) {
        CAPTURE(piece_slots, stride, heads);
        const cu::detail::even_split pieces = cu::detail::compaction_pieces(heads, stride, piece_slots);
        int64_t covered = 0;
        for (int64_t i = 0; i < pieces.count; ++i) {
          CHECK(pieces.begin(i) == covered);
          CHECK(pieces.size(i) >= 1);
          CHECK(pieces.size(i) <= pieces.largest());
          CHECK(pieces.largest() - pieces.size(i) <= 1);
          covered += pieces.size(i);
        }
        CHECK(covered == heads);
        CHECK(pieces.largest() <= 65535);
        // The fewest pieces of at most a piece's slots, or of min_compaction_heads: pieces of
        // at least half that many heads keep the GPU busy.
        const int64_t per = std::min<int64_t>(std::max<int64_t>(piece_slots / stride, least), 65535);
        CHECK(pieces.count == (heads + per - 1) / per);
        CHECK(pieces.largest() <= per);
        CHECK(2 * pieces.base >= std::min<int64_t>(heads, per));
      }
  CHECK(cu::detail::compaction_pieces(0, 16, 1 << 21).count == 0);
  cu::compaction_arguments<float> a;
  a.stride = 16;
  a.heads = 10;
  std::vector<int64_t> index(10);
  std::vector<uint8_t> kept(160);
  std::vector<int32_t> keep(10);
  a.head_index = index.data();
  a.kept = kept.data();
  a.keep = keep.data();
  const cu::compaction_arguments<float> c = cu::detail::compaction_piece(a, 4, 3);
  CHECK(c.heads == 3);
  CHECK(c.head_index == &index[4]);
  CHECK(c.kept == &kept[64]);
  CHECK(c.keep == &keep[4]);
}

TEST_CASE("a compression step's workspace does not grow with every layer's window scores", "[cuda]") {
  // Llama-3-8B's heads, 32k tokens a head, one sequence: each layer adds its scores, kept
  // flags and ranking to the workspace, but the window scores run a piece at a time.
  const int32_t n = 32768;
  const auto workspace = [&](int32_t layers) {
    cu::compress_arguments<kv::snapkv_policy, kv::bfloat16> a;
    a.policy = kv::snapkv({.budget = kv::token_budget::of_tokens(n / 16), .window = 32});
    a.model = {layers, 32, 8, 128};
    a.pool.layers = layers;
    a.pool.heads = 8;
    a.pool.head_dim = 128;
    a.pool.block_size = 16;
    a.pool.max_blocks_per_head = n / 16;
    a.batch = 1;
    a.obs.rows = 32;
    a.stride = n;
    a.piece_slots = int64_t{1} << 21;  // 8 layers a piece
    return cu::workspace_size(a);
  };
  cu::window_score_arguments<kv::bfloat16> one_layer;  // one sequence's window scores of one layer
  one_layer.pool.layers = 1;
  one_layer.pool.heads = 8;
  one_layer.pool.head_dim = 128;
  one_layer.batch = 1;
  one_layer.q_heads = 32;
  one_layer.window = 32;
  one_layer.stride = n;
  one_layer.metric = kv::snapkv({.budget = kv::token_budget::of_tokens(n / 16), .window = 32}).metric;
  const size_t window_per_layer = cu::workspace_size(one_layer);
  REQUIRE(window_per_layer > 0);
  REQUIRE(workspace(16) > 0);
  // 16 more layers add less than 16 layers of window scores would.
  CHECK(workspace(32) - workspace(16) < 16 * window_per_layer);
  CHECK(workspace(32) > workspace(16));
}
