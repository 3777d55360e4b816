#include "merge_table.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "errors.h"

namespace ctalign {
namespace {

constexpr std::uint64_t kEmptyKey = ~std::uint64_t(0);
constexpr std::size_t kSmallPieces = 128;  // above this, the heap encoder

inline std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
  return (std::uint64_t(std::uint32_t(a)) << 32) | std::uint32_t(b);
}
inline std::size_t pair_slot(std::uint64_t key) {
  key ^= key >> 33;
  key *= 0xff51afd7ed558ccdull;
  key ^= key >> 33;
  key *= 0xc4ceb9fe1a85ec53ull;
  key ^= key >> 33;
  return static_cast<std::size_t>(key);
}

// Length of the UTF-8 character starting at s[i], or 0 when the bytes there are no valid character.
inline std::size_t utf8_length(std::string_view s, std::size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  std::size_t n;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) n = 2;
  else if (c >= 0xE0 && c <= 0xEF) n = 3;
  else if (c >= 0xF0 && c <= 0xF4) n = 4;
  else return 0;
  if (i + n > s.size()) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  }
  const unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
  if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F) || (c == 0xF0 && c1 < 0x90) ||
      (c == 0xF4 && c1 > 0x8F)) {
    return 0;  // overlong, surrogate or beyond U+10FFFF
  }
  return n;
}

std::string hex_byte(unsigned char c) {
  static const char digits[] = "0123456789abcdef";
  return std::string("0x") + digits[c >> 4] + digits[c & 15];
}

}  // namespace

struct MergeTable::Scratch {
  std::vector<std::int32_t> start, end, id, pair_rank, pair_result;
  std::vector<std::int32_t> prev, next;
  struct HeapEntry {
    std::int32_t rank, left, right, right_end, result;
  };
  std::vector<HeapEntry> heap;
  std::vector<std::int32_t> pieces;
};

MergeTable::MergeTable(std::shared_ptr<const TokenTable> table, Options options, bool ranks_mode)
    : table_(std::move(table)), options_(options), ranks_mode_(ranks_mode) {
  if (!table_) throw InputError("MergeTable: table is None");
}

std::int32_t MergeTable::preferred_id(std::string_view bytes) const {
  const TokenTable& T = *table_;
  std::int32_t first = T.lookup_first(bytes);
  if (first < 0) return -1;
  std::int32_t best = -1;
  for (std::int32_t i = first; i >= 0; i = T.next_same_bytes(i)) {
    if (ranks_mode_) {
      if (priority_[i] >= 0 && (best < 0 || priority_[i] < priority_[best])) best = i;
    } else if (preferred_use_[i]) {
      return i;
    }
  }
  return best >= 0 ? best : first;
}

void MergeTable::choose_base_tokens() {
  base_token_.assign(256, -1);
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    base_token_[b] = preferred_id(std::string_view(&c, 1));
  }
}

MergeTable MergeTable::from_merges(std::shared_ptr<const TokenTable> table, const std::int32_t* merges,
                                   std::int64_t k, Options options) {
  MergeTable m(std::move(table), options, /*ranks_mode=*/false);
  const TokenTable& T = *m.table_;
  const std::int32_t V = T.size();
  if (k < 0 || k >= MergeTable::kNoRank) throw InputError("MergeTable.from_merges: too many merges");
  m.n_merges_ = k;
  m.preferred_use_.assign(V, 0);
  for (std::int64_t i = 0; i < k; ++i) {
    for (int side = 0; side < 2; ++side) {
      const std::int32_t id = merges[2 * i + side];
      if (id < 0 || id >= V) {
        throw InputError("MergeTable.from_merges: merge " + std::to_string(i) + " (" +
                         std::to_string(merges[2 * i]) + ", " + std::to_string(merges[2 * i + 1]) +
                         "): id " + std::to_string(id) + " out of range [0, " + std::to_string(V) + ")");
      }
      if (!T.has_bytes(id)) {
        throw InputError("MergeTable.from_merges: merge " + std::to_string(i) + " (" +
                         std::to_string(merges[2 * i]) + ", " + std::to_string(merges[2 * i + 1]) +
                         "): id " + std::to_string(id) + " is a special token (no bytes)");
      }
      m.preferred_use_[id] = 1;
    }
  }
  std::size_t slots = 16;
  while (slots < 2 * static_cast<std::size_t>(k)) slots *= 2;
  m.pair_keys_.assign(slots, kEmptyKey);
  m.pair_rank_.assign(slots, 0);
  m.pair_result_.assign(slots, -1);
  m.pair_mask_ = slots - 1;
  std::string joined;
  for (std::int64_t i = 0; i < k; ++i) {
    const std::int32_t a = merges[2 * i], b = merges[2 * i + 1];
    joined.assign(T.token_bytes(a));
    joined.append(T.token_bytes(b));
    const std::int32_t result = m.preferred_id(joined);
    if (result < 0) {
      throw InputError("MergeTable.from_merges: merge " + std::to_string(i) + " (" + std::to_string(a) +
                       ", " + std::to_string(b) + ") = " + bytes_repr(T.token_bytes(a)) + " + " +
                       bytes_repr(T.token_bytes(b)) + " gives " + bytes_repr(joined) +
                       ", which is no token of the table");
    }
    const std::uint64_t key = pair_key(a, b);
    for (std::size_t s = pair_slot(key) & m.pair_mask_;; s = (s + 1) & m.pair_mask_) {
      if (m.pair_keys_[s] == key) break;  // a repeated merge: the first rank stands
      if (m.pair_keys_[s] == kEmptyKey) {
        m.pair_keys_[s] = key;
        m.pair_rank_[s] = static_cast<std::int32_t>(i);
        m.pair_result_[s] = result;
        break;
      }
    }
  }
  m.choose_base_tokens();
  m.compute_recursion();
  return m;
}

MergeTable MergeTable::from_ranks(std::shared_ptr<const TokenTable> table, const std::int32_t* priority,
                                  Options options) {
  MergeTable m(std::move(table), options, /*ranks_mode=*/true);
  const TokenTable& T = *m.table_;
  const std::int32_t V = T.size();
  m.priority_.assign(priority, priority + V);
  std::vector<std::int32_t> mergeable;
  for (std::int32_t i = 0; i < V; ++i) {
    if (m.priority_[i] < -1 || m.priority_[i] == MergeTable::kNoRank) {
      throw InputError("MergeTable.from_ranks: priority[" + std::to_string(i) + "] = " +
                       std::to_string(m.priority_[i]) + ", expected -1 or a rank in [0, 2^31 - 1)");
    }
    if (!T.has_bytes(i)) m.priority_[i] = -1;
    if (m.priority_[i] >= 0) mergeable.push_back(i);
  }
  // The index keeps, per byte string, the first id inserted: insert by increasing priority.
  std::sort(mergeable.begin(), mergeable.end(), [&](std::int32_t a, std::int32_t b) {
    return m.priority_[a] != m.priority_[b] ? m.priority_[a] < m.priority_[b] : a < b;
  });
  m.rank_index_ = BytesIndex(mergeable.size());
  auto bytes_of = [&T](std::int32_t id) { return T.token_bytes(id); };
  for (std::int32_t id : mergeable) m.rank_index_.insert(id, T.token_bytes(id), bytes_of);
  m.choose_base_tokens();
  m.compute_recursion();
  return m;
}

inline std::int32_t MergeTable::pair_rank(std::string_view s, std::int32_t a0, std::int32_t, std::int32_t b1,
                                          std::int32_t a, std::int32_t b, std::int32_t max_rank,
                                          std::int32_t* result) const {
  if (ranks_mode_) {
    const TokenTable& T = *table_;
    const std::int32_t x = rank_index_.find(s.substr(a0, b1 - a0), [&T](std::int32_t id) { return T.token_bytes(id); });
    if (x < 0 || priority_[x] >= max_rank) return kNoRank;
    *result = x;
    return priority_[x];
  }
  const std::uint64_t key = pair_key(a, b);
  for (std::size_t slot = pair_slot(key) & pair_mask_;; slot = (slot + 1) & pair_mask_) {
    const std::uint64_t k = pair_keys_[slot];
    if (k == key) {
      if (pair_rank_[slot] >= max_rank) return kNoRank;
      *result = pair_result_[slot];
      return pair_rank_[slot];
    }
    if (k == kEmptyKey) return kNoRank;
  }
}

bool MergeTable::bpe(std::string_view s, std::int32_t max_rank, std::vector<std::int32_t>& out,
                     Scratch& w, LastMerge* last, std::size_t* bad_position) const {
  // Initial pieces.
  w.start.clear();
  w.end.clear();
  w.id.clear();
  const std::size_t n_bytes = s.size();
  for (std::size_t i = 0; i < n_bytes;) {
    std::size_t len = 1;
    std::int32_t id = -1;
    if (options_.initial == Initial::Chars) {
      const std::size_t c = utf8_length(s, i);
      if (c > 1) {
        id = preferred_id(s.substr(i, c));
        if (id >= 0) len = c;
      }
    }
    if (id < 0) {
      id = base_token_[static_cast<unsigned char>(s[i])];
      if (id < 0) {
        if (bad_position) *bad_position = i;
        return false;
      }
    }
    w.start.push_back(static_cast<std::int32_t>(i));
    w.end.push_back(static_cast<std::int32_t>(i + len));
    w.id.push_back(id);
    i += len;
  }
  const std::size_t n = w.id.size();

  if (n <= kSmallPieces) {
    // Cached pair ranks; each merge rescans for the leftmost minimum and refreshes two pairs.
    w.pair_rank.assign(n > 0 ? n - 1 : 0, kNoRank);
    w.pair_result.assign(n > 0 ? n - 1 : 0, -1);
    for (std::size_t i = 0; i + 1 < n; ++i) {
      w.pair_rank[i] = pair_rank(s, w.start[i], w.end[i], w.end[i + 1], w.id[i], w.id[i + 1], max_rank, &w.pair_result[i]);
    }
    std::size_t m = n;
    while (m > 1) {
      std::int32_t best = kNoRank;
      std::size_t bi = 0;
      for (std::size_t i = 0; i + 1 < m; ++i) {
        if (w.pair_rank[i] < best) {
          best = w.pair_rank[i];
          bi = i;
        }
      }
      if (best == kNoRank) break;
      if (last) *last = {w.id[bi], w.id[bi + 1], best};
      w.id[bi] = w.pair_result[bi];
      w.end[bi] = w.end[bi + 1];
      w.start.erase(w.start.begin() + bi + 1);
      w.end.erase(w.end.begin() + bi + 1);
      w.id.erase(w.id.begin() + bi + 1);
      w.pair_rank.erase(w.pair_rank.begin() + bi);
      w.pair_result.erase(w.pair_result.begin() + bi);
      --m;
      if (bi > 0) {
        w.pair_rank[bi - 1] = pair_rank(s, w.start[bi - 1], w.end[bi - 1], w.end[bi], w.id[bi - 1], w.id[bi],
                                        max_rank, &w.pair_result[bi - 1]);
      }
      if (bi + 1 < m) {
        w.pair_rank[bi] = pair_rank(s, w.start[bi], w.end[bi], w.end[bi + 1], w.id[bi], w.id[bi + 1],
                                    max_rank, &w.pair_result[bi]);
      }
    }
    out.insert(out.end(), w.id.begin(), w.id.begin() + m);
    return true;
  }

  // Long pre-tokens: doubly linked pieces and a min-heap of candidate pairs (rank, left position),
  // stale entries skipped when popped.
  const auto worse = [](const Scratch::HeapEntry& x, const Scratch::HeapEntry& y) {
    return x.rank != y.rank ? x.rank > y.rank : x.left > y.left;
  };
  w.prev.resize(n);
  w.next.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    w.prev[i] = static_cast<std::int32_t>(i) - 1;
    w.next[i] = i + 1 < n ? static_cast<std::int32_t>(i + 1) : -1;
  }
  w.heap.clear();
  auto push_pair = [&](std::int32_t l, std::int32_t r) {
    std::int32_t result = -1;
    const std::int32_t rk = pair_rank(s, w.start[l], w.end[l], w.end[r], w.id[l], w.id[r], max_rank, &result);
    if (rk == kNoRank) return;
    w.heap.push_back({rk, l, r, w.end[r], result});
    std::push_heap(w.heap.begin(), w.heap.end(), worse);
  };
  for (std::size_t i = 0; i + 1 < n; ++i) push_pair(static_cast<std::int32_t>(i), static_cast<std::int32_t>(i + 1));
  std::vector<std::uint8_t> alive(n, 1);
  while (!w.heap.empty()) {
    std::pop_heap(w.heap.begin(), w.heap.end(), worse);
    const Scratch::HeapEntry e = w.heap.back();
    w.heap.pop_back();
    if (!alive[e.left] || w.next[e.left] != e.right || w.end[e.right] != e.right_end) continue;
    if (last) *last = {w.id[e.left], w.id[e.right], e.rank};
    w.id[e.left] = e.result;
    w.end[e.left] = w.end[e.right];
    w.next[e.left] = w.next[e.right];
    if (w.next[e.right] >= 0) w.prev[w.next[e.right]] = e.left;
    alive[e.right] = 0;
    if (w.prev[e.left] >= 0) push_pair(w.prev[e.left], e.left);
    if (w.next[e.left] >= 0) push_pair(e.left, w.next[e.left]);
  }
  for (std::int32_t i = 0; i >= 0; i = w.next[i]) out.push_back(w.id[i]);
  return true;
}

void MergeTable::encode_into(std::string_view s, std::vector<std::int32_t>& out, Scratch& scratch) const {
  if (options_.ignore_merges) {
    const std::int32_t whole = preferred_id(s);
    if (whole >= 0) {
      out.push_back(whole);
      return;
    }
  }
  std::size_t bad = 0;
  if (!bpe(s, kNoRank, out, scratch, nullptr, &bad)) {
    throw InputError("MergeTable.encode: byte " + hex_byte(static_cast<unsigned char>(s[bad])) +
                     " at position " + std::to_string(bad) + " of " + bytes_repr(s) +
                     " has no base token in this vocabulary");
  }
}

std::vector<std::int32_t> MergeTable::encode(std::string_view bytes) const {
  Scratch scratch;
  std::vector<std::int32_t> out;
  encode_into(bytes, out, scratch);
  return out;
}

Csr MergeTable::encode_many(const std::int64_t* offsets, const std::uint8_t* data, std::int64_t q) const {
  for (std::int64_t i = 0; i < q; ++i) {
    if (offsets[i + 1] < offsets[i] || offsets[i] < 0) {
      throw InputError("MergeTable.encode_many: offsets decrease at row " + std::to_string(i));
    }
  }
  Scratch scratch;
  Csr csr;
  csr.offsets.reserve(q + 1);
  csr.offsets.push_back(0);
  csr.ids.reserve(static_cast<std::size_t>(q > 0 ? offsets[q] - offsets[0] : 0) / 2 + 16);
  for (std::int64_t i = 0; i < q; ++i) {
    encode_into(std::string_view(reinterpret_cast<const char*>(data) + offsets[i],
                                 static_cast<std::size_t>(offsets[i + 1] - offsets[i])),
                csr.ids, scratch);
    csr.offsets.push_back(static_cast<std::int64_t>(csr.ids.size()));
  }
  return csr;
}

Csr MergeTable::encode_many(const std::vector<std::string_view>& pieces) const {
  Scratch scratch;
  Csr csr;
  csr.offsets.reserve(pieces.size() + 1);
  csr.offsets.push_back(0);
  for (std::string_view p : pieces) {
    encode_into(p, csr.ids, scratch);
    csr.offsets.push_back(static_cast<std::int64_t>(csr.ids.size()));
  }
  return csr;
}

void MergeTable::compute_recursion() {
  const TokenTable& T = *table_;
  const std::int32_t V = T.size();
  left_.assign(V, -1);
  right_.assign(V, -1);
  rank_.assign(V, -1);
  reachable_.assign(V, 0);
  split_offsets_.assign(static_cast<std::size_t>(V) + 1, 0);
  split_ids_.clear();
  Scratch scratch;
  std::vector<std::int32_t> pieces;
  std::int64_t reachable_merges = 0;
  for (std::int32_t t = 0; t < V; ++t) {
    split_offsets_[t] = static_cast<std::int64_t>(split_ids_.size());
    if (!T.has_bytes(t)) continue;
    const std::string_view b = T.token_bytes(t);
    // Base: t is the single initial piece of its own bytes.
    if (b.size() == 1 && base_token_[static_cast<unsigned char>(b[0])] == t) {
      reachable_[t] = 1;
      continue;
    }
    if (options_.initial == Initial::Chars && b.size() > 1 && utf8_length(b, 0) == b.size() && preferred_id(b) == t) {
      reachable_[t] = 1;
      continue;
    }
    pieces.clear();
    LastMerge last;
    bool ok;
    if (ranks_mode_) {
      if (priority_[t] >= 0) {
        ok = bpe(b, priority_[t], pieces, scratch, nullptr, nullptr);
        std::int32_t result = -1;
        if (ok && pieces.size() == 2 &&
            pair_rank(b, 0, 0, static_cast<std::int32_t>(b.size()), pieces[0], pieces[1], kNoRank, &result) != kNoRank &&
            result == t) {
          left_[t] = pieces[0];
          right_[t] = pieces[1];
          rank_[t] = priority_[t];
          reachable_[t] = 1;
          ++reachable_merges;
          continue;
        }
      }
      pieces.clear();
    }
    // Pure BPE over the bytes. from_merges: this is the definition. from_ranks: it reaches t only when
    // merges of rank >= priority[t] are needed first (equal priorities, as in SentencePiece ties, or
    // non-monotone ranks); t is then reachable all the same, through that run's last merge.
    ok = bpe(b, kNoRank, pieces, scratch, &last, nullptr);
    if (ok && pieces.size() == 1 && pieces[0] == t && last.rank >= 0) {
      left_[t] = last.left;
      right_[t] = last.right;
      rank_[t] = last.rank;
      reachable_[t] = 1;
      ++reachable_merges;
      continue;
    }
    // Unreachable: it unrolls through these pieces (never [t] itself, so unrolling terminates).
    if (ok) split_ids_.insert(split_ids_.end(), pieces.begin(), pieces.end());
  }
  split_offsets_[V] = static_cast<std::int64_t>(split_ids_.size());
  if (ranks_mode_) n_merges_ = reachable_merges;
}

void MergeTable::unroll_into(std::int32_t t, const std::uint8_t* keep, std::vector<std::int32_t>& out,
                             std::vector<std::int32_t>& stack) const {
  const TokenTable& T = *table_;
  stack.clear();
  stack.push_back(t);
  while (!stack.empty()) {
    const std::int32_t x = stack.back();
    stack.pop_back();
    if (!T.has_bytes(x)) continue;
    if (keep[x]) {
      out.push_back(x);
    } else if (left_[x] >= 0) {
      stack.push_back(right_[x]);
      stack.push_back(left_[x]);
    } else if (split_offsets_[x + 1] > split_offsets_[x]) {
      for (std::int64_t k = split_offsets_[x + 1]; k-- > split_offsets_[x];) stack.push_back(split_ids_[k]);
    } else {
      throw InputError("MergeTable.unroll: token " + std::to_string(x) + " " + bytes_repr(T.token_bytes(x)) +
                       (x == t ? "" : " (in the merge tree of token " + std::to_string(t) + ")") +
                       " is not kept and cannot be split: it is a base piece, or BPE cannot reach its bytes");
    }
  }
}

std::vector<std::int32_t> MergeTable::unroll(std::int32_t t, const std::uint8_t* keep) const {
  table_->check_id(t, "MergeTable.unroll");
  std::vector<std::int32_t> out, stack;
  unroll_into(t, keep, out, stack);
  return out;
}

Csr MergeTable::unroll_all(const std::uint8_t* keep) const {
  const std::int32_t V = table_->size();
  Csr csr;
  csr.offsets.reserve(static_cast<std::size_t>(V) + 1);
  csr.offsets.push_back(0);
  csr.ids.reserve(static_cast<std::size_t>(V) * 2);
  std::vector<std::int32_t> stack;
  for (std::int32_t t = 0; t < V; ++t) {
    unroll_into(t, keep, csr.ids, stack);
    csr.offsets.push_back(static_cast<std::int64_t>(csr.ids.size()));
  }
  return csr;
}

}  // namespace ctalign
