#pragma once
// Invariant checks of the paged per-head cache, usable from any test or fuzzer (no Catch2):
// every check returns "" when all holds, else a description of the first violation.
//  - check_tables: the metadata alone (no block owned twice, none leaked or freed twice,
//    lengths and tables consistent, free list consistent with the pool's flags).
//  - check_mirror: a device mirror of the tables equals the host tables.
//  - reference_model + check_contents: what every head must hold, slot by slot (positions,
//    metrics, K and V carried through compaction), from a model that implements the
//    semantics independently of the cache (its own MoveCache walk, no compaction_moves).
#include <algorithm>
#include <cstdint>
#include <map>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "kvtrim/kvtrim.hpp"

namespace cache_invariants {

inline std::string check_tables(const kvtrim::block_tables& t) {
  const kvtrim::paged_cache_config& c = t.config();
  const kvtrim::block_pool& pool = t.pool();
  std::ostringstream err;
  const int32_t blocks = c.num_blocks;
  if (pool.capacity() != blocks) return "pool capacity differs from the config";
  std::vector<int32_t> owners(static_cast<size_t>(blocks), 0), frees(static_cast<size_t>(blocks), 0);
  for (const int32_t b : pool.free_list()) {
    if (b < 0 || b >= blocks) return (err << "free list names block " << b << " outside the pool", err.str());
    if (pool.in_use(b)) return (err << "block " << b << " is in the free list and marked in use", err.str());
    if (++frees[static_cast<size_t>(b)] > 1) return (err << "block " << b << " is free twice (double free)", err.str());
  }
  const auto mb = static_cast<size_t>(c.max_blocks_per_head());
  const auto heads = static_cast<size_t>(c.heads_per_sequence());
  const auto tables = t.table_data();
  const auto lengths = t.length_data();
  if (tables.size() != static_cast<size_t>(c.max_sequences) * heads * mb ||
      lengths.size() != static_cast<size_t>(c.max_sequences) * heads)
    return "table or length array has the wrong size";
  std::vector<int64_t> ids;
  int64_t owned = 0;
  for (int32_t row = 0; row < c.max_sequences; ++row) {
    const int64_t id = t.sequence_id(row);
    if (id != kvtrim::block_tables::no_sequence) {
      if (id < 0) return (err << "row " << row << " holds negative id " << id, err.str());
      if (std::count(ids.begin(), ids.end(), id) != 0) return (err << "sequence " << id << " is in two rows", err.str());
      if (t.sequence_slot(id) != row) return (err << "sequence " << id << " is not found in its row", err.str());
      ids.push_back(id);
    }
    for (size_t head = 0; head < heads; ++head) {
      const size_t index = static_cast<size_t>(row) * heads + head;
      const int32_t n = lengths[index];
      if (n < 0 || n > c.max_tokens_per_head)
        return (err << "row " << row << " head " << head << " has length " << n, err.str());
      if (id == kvtrim::block_tables::no_sequence && n != 0)
        return (err << "free row " << row << " head " << head << " has length " << n, err.str());
      const auto nb = static_cast<size_t>(kvtrim::blocks_for(n, c.block_size));
      for (size_t j = 0; j < mb; ++j) {
        const int32_t b = tables[index * mb + j];
        if (j >= nb) {
          if (b != kvtrim::block_tables::no_block)
            return (err << "row " << row << " head " << head << " names block " << b << " past its length", err.str());
          continue;
        }
        if (b < 0 || b >= blocks) return (err << "row " << row << " head " << head << " names block " << b, err.str());
        if (++owners[static_cast<size_t>(b)] > 1) return (err << "block " << b << " is owned twice", err.str());
        ++owned;
      }
    }
  }
  for (int32_t b = 0; b < blocks; ++b) {
    const int32_t o = owners[static_cast<size_t>(b)], f = frees[static_cast<size_t>(b)];
    if (o + f == 0) return (err << "block " << b << " leaked: neither owned nor free", err.str());
    if (o + f > 1) return (err << "block " << b << " is owned and free", err.str());
    if (pool.in_use(b) != (o == 1)) return (err << "block " << b << "'s in-use flag disagrees with the tables", err.str());
  }
  if (owned != pool.used_count()) return "the pool's used count differs from the blocks the tables own";
  return {};
}

//! The device mirror (tables [S][L][H][max_blocks], lengths [S][L][H]) equals the host tables.
inline std::string check_mirror(const kvtrim::block_tables& t, std::span<const int32_t> tables,
                                std::span<const int32_t> lengths) {
  const auto ht = t.table_data();
  const auto hl = t.length_data();
  if (!std::equal(ht.begin(), ht.end(), tables.begin(), tables.end())) return "device block tables differ from the host";
  if (!std::equal(hl.begin(), hl.end(), lengths.begin(), lengths.end())) return "device lengths differ from the host";
  return {};
}

//! One head as the model expects it, in slot order (K/V already rounded to the store's type).
struct head_state {
  std::vector<int32_t> positions;  // [n]
  std::vector<float> metrics;      // [n]
  std::vector<float> keys, values; // [n][d]
  [[nodiscard]] size_t size() const { return positions.size(); }
};

//! What every head of every sequence holds, computed without the cache.
class reference_model {
 public:
  explicit reference_model(kvtrim::attention_shape shape) : shape_(shape) {}

  [[nodiscard]] const std::map<int64_t, std::vector<head_state>>& sequences() const { return seqs_; }
  [[nodiscard]] bool contains(int64_t seq) const { return seqs_.count(seq) != 0; }
  [[nodiscard]] head_state& head(int64_t seq, int32_t l, int32_t h) {
    return seqs_.at(seq)[static_cast<size_t>(l) * shape_.kv_heads + h];
  }
  [[nodiscard]] const head_state& head(int64_t seq, int32_t l, int32_t h) const {
    return seqs_.at(seq)[static_cast<size_t>(l) * shape_.kv_heads + h];
  }

  void add(int64_t seq) { seqs_[seq].assign(static_cast<size_t>(shape_.layers) * shape_.kv_heads, {}); }
  void free(int64_t seq) { seqs_.erase(seq); }

  //! Layers [first, first + layers): positions [t]; k, v [layers][t][H][d], as stored.
  void append(int64_t seq, int32_t first, int32_t layers, std::span<const int32_t> positions,
              std::span<const float> k, std::span<const float> v) {
    const auto d = static_cast<size_t>(shape_.head_dim);
    const size_t t = positions.size(), heads = static_cast<size_t>(shape_.kv_heads);
    for (int32_t l = 0; l < layers; ++l)
      for (size_t i = 0; i < t; ++i)
        for (size_t h = 0; h < heads; ++h) {
          const auto row = static_cast<std::ptrdiff_t>(((static_cast<size_t>(l) * t + i) * heads + h) * d);
          head_state& s = head(seq, first + l, static_cast<int32_t>(h));
          s.positions.push_back(positions[i]);
          s.metrics.push_back(0.f);
          s.keys.insert(s.keys.end(), k.begin() + row, k.begin() + row + static_cast<std::ptrdiff_t>(d));
          s.values.insert(s.values.end(), v.begin() + row, v.begin() + row + static_cast<std::ptrdiff_t>(d));
        }
  }

  //! The plan's metrics, then KV-Compress's MoveCache: kept slots below the new length stay;
  //! the holes among them, lowest first, take the kept slots at or past it, highest first.
  void apply(int64_t seq, const kvtrim::eviction_plan& plan) {
    const auto d = static_cast<size_t>(shape_.head_dim);
    for (int32_t l = 0; l < shape_.layers; ++l)
      for (int32_t h = 0; h < shape_.kv_heads; ++h) {
        head_state& s = head(seq, l, h);
        if (!plan.metrics.empty()) {
          const auto m = plan.metrics.row(l, h);
          s.metrics.assign(m.begin(), m.end());
        }
        const auto kept = plan.kept(l, h);
        const size_t new_length = kept.size();
        std::vector<bool> keep(s.size(), false);
        for (const int32_t slot : kept) keep[static_cast<size_t>(slot)] = true;
        std::vector<size_t> source(new_length);  // slot each new slot takes its token from
        for (size_t j = 0; j < new_length; ++j) source[j] = j;
        size_t tail = s.size();
        for (size_t j = 0; j < new_length; ++j) {
          if (keep[j]) continue;
          do --tail; while (!keep[tail]);
          source[j] = tail;
        }
        head_state r;
        for (const size_t j : source) {
          r.positions.push_back(s.positions[j]);
          r.metrics.push_back(s.metrics[j]);
          r.keys.insert(r.keys.end(), s.keys.begin() + static_cast<std::ptrdiff_t>(j * d), s.keys.begin() + static_cast<std::ptrdiff_t>((j + 1) * d));
          r.values.insert(r.values.end(), s.values.begin() + static_cast<std::ptrdiff_t>(j * d), s.values.begin() + static_cast<std::ptrdiff_t>((j + 1) * d));
        }
        s = std::move(r);
      }
  }

  //! Metrics [n] of one head (what decode attention accumulated).
  void set_metrics(int64_t seq, int32_t l, int32_t h, std::span<const float> metrics) {
    head(seq, l, h).metrics.assign(metrics.begin(), metrics.end());
  }

  //! Positions [n] and keys [n][d] (as stored) of one head.
  void rewrite(int64_t seq, int32_t l, int32_t h, std::span<const int32_t> positions, std::span<const float> keys) {
    head_state& s = head(seq, l, h);
    s.positions.assign(positions.begin(), positions.end());
    s.keys.assign(keys.begin(), keys.end());
  }

 private:
  kvtrim::attention_shape shape_;
  std::map<int64_t, std::vector<head_state>> seqs_;  // id -> [L*H] heads
};

//! Every head of every sequence of `model` holds exactly the expected tokens in slot order,
//! and the store holds no other sequence (a store with `tables()`).
template <class Store>
std::string check_contents(const Store& store, const reference_model& model) {
  std::ostringstream err;
  const kvtrim::attention_shape shape = store.shape();
  const auto d = static_cast<size_t>(shape.head_dim);
  if constexpr (requires { store.tables(); }) {
    for (int32_t row = 0; row < store.config().max_sequences; ++row) {
      const int64_t id = store.tables().sequence_id(row);
      if (id != kvtrim::block_tables::no_sequence && !model.contains(id))
        return (err << "the store holds sequence " << id << " the model freed", err.str());
    }
  }
  std::vector<int32_t> positions;
  std::vector<float> keys, values, metrics;
  for (const auto& [seq, heads] : model.sequences()) {
    if (!store.contains(seq)) return (err << "sequence " << seq << " is missing", err.str());
    for (int32_t l = 0; l < shape.layers; ++l)
      for (int32_t h = 0; h < shape.kv_heads; ++h) {
        const head_state& expected = model.head(seq, l, h);
        const size_t n = expected.size();
        if (static_cast<size_t>(store.head_length(seq, l, h)) != n)
          return (err << "seq " << seq << " head (" << l << ", " << h << ") has " << store.head_length(seq, l, h)
                      << " tokens, expected " << n, err.str());
        positions.resize(n);
        keys.resize(n * d);
        values.resize(n * d);
        metrics.resize(n);
        if (store.read_head(seq, l, h, positions, keys, metrics) != kvtrim::status::success ||
            store.read_values(seq, l, h, values) != kvtrim::status::success)
          return (err << "reading seq " << seq << " head (" << l << ", " << h << ") failed", err.str());
        for (size_t j = 0; j < n; ++j) {
          const auto row = static_cast<std::ptrdiff_t>(j * d), end = static_cast<std::ptrdiff_t>((j + 1) * d);
          const bool same = positions[j] == expected.positions[j] && metrics[j] == expected.metrics[j] &&
                            std::equal(keys.begin() + row, keys.begin() + end, expected.keys.begin() + row) &&
                            std::equal(values.begin() + row, values.begin() + end, expected.values.begin() + row);
          if (!same)
            return (err << "seq " << seq << " head (" << l << ", " << h << ") slot " << j << ": position "
                        << positions[j] << " metric " << metrics[j] << ", expected position " << expected.positions[j]
                        << " metric " << expected.metrics[j] << " (or K/V differ)", err.str());
        }
      }
  }
  return {};
}

}  // namespace cache_invariants
