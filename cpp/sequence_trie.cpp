#include "sequence_trie.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "errors.h"
#include "token_table.h"

namespace ctalign {
namespace {

constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();

// Sort key of the leading symbols: any two sequences whose keys differ compare like their keys
// (missing symbols pad with 0, which sorts a prefix first; equal keys fall back to a full compare).
inline std::uint64_t leading_key(const std::uint8_t* s, std::int64_t len) {
  std::uint64_t k = 0;
  for (int i = 0; i < 8; ++i) k = (k << 8) | (i < len ? s[i] : 0u);
  return k;
}
constexpr int kKeySymbols8 = 8;
inline std::uint64_t leading_key(const std::int32_t* s, std::int64_t len) {
  // symbol + 1 so that 0 means "absent"; symbols are < 2^31.
  std::uint64_t a = len > 0 ? std::uint64_t(s[0]) + 1 : 0;
  std::uint64_t b = len > 1 ? std::uint64_t(s[1]) + 1 : 0;
  return (a << 32) | b;
}
template <class Sym>
constexpr int key_symbols() { return sizeof(Sym) == 1 ? kKeySymbols8 : 2; }

// Three-way comparison of a[from:] and b[from:], shorter first when one is a prefix of the other.
inline int compare_tail(const std::uint8_t* a, std::int64_t la, const std::uint8_t* b, std::int64_t lb,
                        std::int64_t from) {
  std::int64_t m = std::min(la, lb);
  if (m > from) {
    int c = std::memcmp(a + from, b + from, static_cast<std::size_t>(m - from));
    if (c != 0) return c;
  }
  return (la > lb) - (la < lb);
}
inline int compare_tail(const std::int32_t* a, std::int64_t la, const std::int32_t* b, std::int64_t lb,
                        std::int64_t from) {
  std::int64_t m = std::min(la, lb);
  for (std::int64_t i = from; i < m; ++i) {
    if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
  }
  return (la > lb) - (la < lb);
}

template <class Sym>
std::string symbol_str(Sym s) { return std::to_string(static_cast<std::int64_t>(s)); }

}  // namespace

template <class Sym>
SequenceTrie SequenceTrie::build_impl(const std::int64_t* offsets, const Sym* symbols,
                                      std::int64_t n_symbols_total, const std::uint8_t* member,
                                      std::int64_t n, std::int64_t n_symbols) {
  if (n < 0 || n >= kInt32Max) throw InputError("SequenceTrie: member has " + std::to_string(n) + " entries, more than int32 allows");
  if (n_symbols < 1 || n_symbols >= kInt32Max) {
    throw InputError("SequenceTrie: n_symbols = " + std::to_string(n_symbols) + " must be in [1, 2^31 - 1)");
  }
  if (offsets[0] != 0) throw InputError("SequenceTrie: offsets[0] must be 0, got " + std::to_string(offsets[0]));
  if (offsets[n] != n_symbols_total) {
    throw InputError("SequenceTrie: offsets[n] = " + std::to_string(offsets[n]) + " but symbols has " +
                     std::to_string(n_symbols_total) + " entries");
  }
  std::int64_t total_member_length = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (offsets[i + 1] < offsets[i]) {
      throw InputError("SequenceTrie: offsets decrease at id " + std::to_string(i));
    }
    if (member[i] > 1) {
      throw InputError("SequenceTrie: member[" + std::to_string(i) + "] = " + std::to_string(member[i]) +
                       ", expected 0 or 1");
    }
    if (member[i]) total_member_length += offsets[i + 1] - offsets[i];
  }
  if (total_member_length >= kInt32Max) {
    throw InputError("SequenceTrie: members have " + std::to_string(total_member_length) +
                     " symbols in all, more than int32 node ids allow");
  }
  if (sizeof(Sym) > 1 || n_symbols < 256) {
    for (std::int64_t j = 0; j < n_symbols_total; ++j) {
      if (static_cast<std::int64_t>(symbols[j]) < 0 || static_cast<std::int64_t>(symbols[j]) >= n_symbols) {
        std::int64_t id = std::upper_bound(offsets, offsets + n + 1, j) - offsets - 1;
        throw InputError("SequenceTrie: symbol " + symbol_str(symbols[j]) + " of id " + std::to_string(id) +
                         " outside [0, n_symbols = " + std::to_string(n_symbols) + ")");
      }
    }
  }

  SequenceTrie t;
  t.n_symbols_ = static_cast<std::int32_t>(n_symbols);
  t.rank_.assign(n, -1);
  t.member_node_.assign(n, -1);
  t.first_symbol_.assign(n, t.n_symbols_);

  // 1. Sort the members.
  struct Entry {
    std::uint64_t key;
    std::int32_t id;
  };
  std::vector<Entry> entries;
  entries.reserve(n);
  for (std::int64_t i = 0; i < n; ++i) {
    std::int64_t len = offsets[i + 1] - offsets[i];
    if (member[i] && len > 0) entries.push_back({leading_key(symbols + offsets[i], len), static_cast<std::int32_t>(i)});
  }
  constexpr int kKeyLen = key_symbols<Sym>();
  std::sort(entries.begin(), entries.end(), [&](const Entry& a, const Entry& b) {
    if (a.key != b.key) return a.key < b.key;
    std::int64_t la = offsets[a.id + 1] - offsets[a.id], lb = offsets[b.id + 1] - offsets[b.id];
    if (la > kKeyLen || lb > kKeyLen || la != lb) {
      // Equal keys: the first kKeyLen symbols agree up to zero padding, so compare from the
      // shorter of (kKeyLen, both lengths) on. (For bytes, a real 0x00 and padding look alike.)
      std::int64_t from = std::min<std::int64_t>({kKeyLen, la, lb});
      int c = compare_tail(symbols + offsets[a.id], la, symbols + offsets[b.id], lb, from);
      if (c != 0) return c < 0;
    }
    return a.id < b.id;
  });
  const std::int32_t M = static_cast<std::int32_t>(entries.size());
  t.order_.resize(M);
  for (std::int32_t i = 0; i < M; ++i) {
    t.order_[i] = entries[i].id;
    t.rank_[entries[i].id] = i;
  }
  std::vector<Entry>().swap(entries);

  // 2. One pass: nodes in DFS preorder.
  const std::size_t node_guess = static_cast<std::size_t>(total_member_length) + 1;
  for (auto* v : {&t.node_lo_, &t.node_hi_, &t.node_end_, &t.node_depth_, &t.node_parent_, &t.node_symbol_}) {
    v->reserve(node_guess);
  }
  auto open_node = [&t](std::int32_t parent, std::int32_t symbol, std::int32_t depth, std::int32_t lo) {
    t.node_lo_.push_back(lo);
    t.node_hi_.push_back(lo);
    t.node_end_.push_back(lo);
    t.node_depth_.push_back(depth);
    t.node_parent_.push_back(parent);
    t.node_symbol_.push_back(symbol);
    return static_cast<std::int32_t>(t.node_lo_.size() - 1);
  };
  std::vector<std::int32_t> path{open_node(-1, -1, 0, 0)};
  const Sym* prev = nullptr;
  std::int64_t prev_len = 0;
  for (std::int32_t i = 0; i < M; ++i) {
    const std::int32_t id = t.order_[i];
    const Sym* s = symbols + offsets[id];
    const std::int64_t len = offsets[id + 1] - offsets[id];
    std::int64_t common = 0;
    const std::int64_t m = std::min(len, prev_len);
    while (common < m && prev[common] == s[common]) ++common;
    while (static_cast<std::int64_t>(path.size()) - 1 > common) {
      t.node_hi_[path.back()] = i;
      path.pop_back();
    }
    for (std::int64_t d = common; d < len; ++d) {
      path.push_back(open_node(path.back(), static_cast<std::int32_t>(s[d]), static_cast<std::int32_t>(d + 1), i));
    }
    t.node_end_[path.back()] = i + 1;
    t.member_node_[id] = path.back();
    t.first_symbol_[id] = static_cast<std::int32_t>(s[0]);
    prev = s;
    prev_len = len;
  }
  for (std::int32_t v : path) t.node_hi_[v] = M;

  // 3. Children CSR: preorder lists each node's children in symbol order.
  const std::int32_t N = t.n_nodes();
  t.child_start_.assign(static_cast<std::size_t>(N) + 1, 0);
  for (std::int32_t v = 1; v < N; ++v) ++t.child_start_[t.node_parent_[v] + 1];
  for (std::int32_t v = 0; v < N; ++v) t.child_start_[v + 1] += t.child_start_[v];
  t.child_node_.resize(N > 0 ? N - 1 : 0);
  std::vector<std::int32_t> fill(t.child_start_.begin(), t.child_start_.end() - 1);
  for (std::int32_t v = 1; v < N; ++v) t.child_node_[fill[t.node_parent_[v]]++] = v;
  return t;
}

SequenceTrie SequenceTrie::build(const std::int64_t* offsets, const std::int32_t* symbols,
                                 std::int64_t n_symbols_total, const std::uint8_t* member, std::int64_t n,
                                 std::int64_t n_symbols) {
  return build_impl(offsets, symbols, n_symbols_total, member, n, n_symbols);
}

SequenceTrie SequenceTrie::build(const std::int64_t* offsets, const std::uint8_t* symbols,
                                 std::int64_t n_symbols_total, const std::uint8_t* member, std::int64_t n,
                                 std::int64_t n_symbols) {
  return build_impl(offsets, symbols, n_symbols_total, member, n, n_symbols);
}

SequenceTrie SequenceTrie::from_token_table(const TokenTable& table) {
  return build_impl(table.offsets().data(), table.data().data(),
                    static_cast<std::int64_t>(table.data().size()), table.has_bytes_flags().data(),
                    table.size(), 256);
}

std::int32_t SequenceTrie::child(std::int32_t node, std::int32_t symbol) const {
  const std::int32_t* first = child_node_.data() + child_start_[node];
  const std::int32_t* last = child_node_.data() + child_start_[node + 1];
  const std::int32_t* it = std::lower_bound(first, last, symbol, [this](std::int32_t c, std::int32_t s) {
    return node_symbol_[c] < s;
  });
  return (it != last && node_symbol_[*it] == symbol) ? *it : -1;
}

template <class Sym>
std::int32_t SequenceTrie::lookup_impl(const Sym* seq, std::size_t len) const {
  for (std::size_t i = 0; i < len; ++i) {
    if (static_cast<std::int64_t>(seq[i]) < 0 || static_cast<std::int64_t>(seq[i]) >= n_symbols_) {
      throw InputError("SequenceTrie.lookup: symbol " + symbol_str(seq[i]) + " at position " +
                       std::to_string(i) + " outside [0, n_symbols = " + std::to_string(n_symbols_) + ")");
    }
  }
  std::int32_t node = 0;
  for (std::size_t i = 0; i < len && node >= 0; ++i) node = child(node, static_cast<std::int32_t>(seq[i]));
  return node;
}

std::int32_t SequenceTrie::lookup(const std::int32_t* seq, std::size_t len) const { return lookup_impl(seq, len); }
std::int32_t SequenceTrie::lookup(const std::uint8_t* seq, std::size_t len) const { return lookup_impl(seq, len); }

void SequenceTrie::child_ranges(const std::int32_t* nodes, std::int64_t q, std::int32_t* lo,
                                std::int32_t* hi) const {
  const std::int32_t N = n_nodes();
  for (std::int64_t r = 0; r < q; ++r) {
    if (nodes[r] < 0 || nodes[r] >= N) {
      throw InputError("SequenceTrie.child_ranges: nodes[" + std::to_string(r) + "] = " +
                       std::to_string(nodes[r]) + " outside [0, n_nodes = " + std::to_string(N) + ")");
    }
  }
  const std::int64_t width = static_cast<std::int64_t>(n_symbols_) + 2;
  for (std::int64_t r = 0; r < q; ++r) {
    const std::int32_t v = nodes[r];
    std::int32_t* row_lo = lo + r * width;
    std::int32_t* row_hi = hi + r * width;
    std::int32_t x = node_end_[v];
    std::int32_t s = 0;
    for (std::int32_t k = child_start_[v]; k < child_start_[v + 1]; ++k) {
      const std::int32_t c = child_node_[k];
      for (; s < node_symbol_[c]; ++s) row_lo[s] = row_hi[s] = x;
      row_lo[s] = node_lo_[c];
      row_hi[s] = x = node_hi_[c];
      ++s;
    }
    for (; s < n_symbols_; ++s) row_lo[s] = row_hi[s] = x;
    row_lo[n_symbols_] = node_lo_[v];
    row_hi[n_symbols_] = node_end_[v];
    row_lo[n_symbols_ + 1] = node_lo_[v];
    row_hi[n_symbols_ + 1] = node_hi_[v];
  }
}

}  // namespace ctalign
