// SequenceTrie: a trie over symbol sequences stored as ranges of one sorted order
// (docs/ARCHITECTURE.md, "SequenceTrie"; definitions in docs/design.md, "Tries as ranges").
//
// Input: n sequences in CSR (offsets int64[n+1], symbols uint8[] or int32[], each symbol in
// [0, n_symbols)) and member uint8[n]. Members are the ids with member = 1 and a non-empty sequence.
// Bytes: n_symbols = 256 (the byte trie of a vocabulary, see from_token_table); the alignment map uses
// student ids as symbols (n_symbols = V_student).
//
// Layout (all int32, owned, immutable):
//   order[M]          member ids sorted by sequence: lexicographic, a prefix before its extensions,
//                     equal sequences by increasing id
//   rank[n]           position of each id in order, -1 for non-members
//   member_node[n]    node where each member's sequence ends, -1 for non-members
//   first_symbol[n]   first symbol of each member's sequence, n_symbols for non-members
//                     (for bytes this is the first-byte table, 256 for specials)
//   nodes, in DFS preorder (node 0 = root = empty prefix; a child's symbol order = preorder):
//     node_lo, node_hi  range [lo, hi) of order whose sequences start with the node's prefix
//     node_end          [node_lo, node_end) = members whose sequence equals the prefix
//     node_depth        prefix length; node_parent (-1 for root); node_symbol (last symbol, -1 root)
//   child_start[n_nodes+1], child_node[n_nodes-1]: children of node v are
//     child_node[child_start[v] : child_start[v+1]], in increasing symbol order.
// Ranges nest and tile: [node_lo, node_end) followed by the children's ranges in symbol order is
// exactly [node_lo, node_hi). Every node but the root of an empty trie has a member in its range.
//
// Build: one sort of the members (a 64-bit key of the leading symbols, full comparison on ties)
// and one pass over the sorted order that keeps the current path as a stack: the longest common
// prefix with the previous member closes the nodes below it and opens one node per new symbol.
// Cost O(M log M + L) time, O(n + L) memory for L = total member sequence length; nodes <= L + 1.
// Measured (this 2-core machine, shared; best of 5): byte trie of qwen (151,643 tokens, 333k nodes)
// 23 ms idle / 54 ms under load, cl100k 17-32 ms.
// lookup: O(|seq| log(branching)); child_ranges: O(Q * (n_symbols + 2)).
#pragma once
#include <cstdint>
#include <vector>

namespace ctalign {

class TokenTable;

class SequenceTrie {
 public:
  // Validates (offsets monotone from 0 to the number of symbols, symbols in range, member 0/1);
  // throws InputError naming the argument.
  static SequenceTrie build(const std::int64_t* offsets, const std::int32_t* symbols,
                            std::int64_t n_symbols_total, const std::uint8_t* member, std::int64_t n,
                            std::int64_t n_symbols);
  static SequenceTrie build(const std::int64_t* offsets, const std::uint8_t* symbols,
                            std::int64_t n_symbols_total, const std::uint8_t* member, std::int64_t n,
                            std::int64_t n_symbols);
  // The byte trie of a vocabulary: members = ids with bytes, symbols = bytes, n_symbols = 256.
  static SequenceTrie from_token_table(const TokenTable& table);

  std::int32_t n() const { return static_cast<std::int32_t>(rank_.size()); }
  std::int32_t n_members() const { return static_cast<std::int32_t>(order_.size()); }
  std::int32_t n_nodes() const { return static_cast<std::int32_t>(node_lo_.size()); }
  std::int32_t n_symbols() const { return n_symbols_; }

  // Node of the prefix `seq`, or -1 when no member starts with it. Symbols outside [0, n_symbols)
  // throw InputError.
  std::int32_t lookup(const std::int32_t* seq, std::size_t len) const;
  std::int32_t lookup(const std::uint8_t* seq, std::size_t len) const;
  // Child of `node` for `symbol`, or -1.
  std::int32_t child(std::int32_t node, std::int32_t symbol) const;

  // lo, hi: int32[q, n_symbols + 2] row-major. Column s < n_symbols: range of the child for symbol
  // s, or the empty range [x, x) with x = the end of the preceding child's range (node_end if none),
  // so every row's columns 0..n_symbols-1 are monotone and tile [node_end, node_hi). Column
  // n_symbols: [node_lo, node_end). Column n_symbols + 1: [node_lo, node_hi). Throws InputError for
  // a node outside [0, n_nodes).
  void child_ranges(const std::int32_t* nodes, std::int64_t q, std::int32_t* lo, std::int32_t* hi) const;

  const std::vector<std::int32_t>& order() const { return order_; }
  const std::vector<std::int32_t>& rank() const { return rank_; }
  const std::vector<std::int32_t>& member_node() const { return member_node_; }
  const std::vector<std::int32_t>& first_symbol() const { return first_symbol_; }
  const std::vector<std::int32_t>& node_lo() const { return node_lo_; }
  const std::vector<std::int32_t>& node_hi() const { return node_hi_; }
  const std::vector<std::int32_t>& node_end() const { return node_end_; }
  const std::vector<std::int32_t>& node_depth() const { return node_depth_; }
  const std::vector<std::int32_t>& node_parent() const { return node_parent_; }
  const std::vector<std::int32_t>& node_symbol() const { return node_symbol_; }
  const std::vector<std::int32_t>& child_start() const { return child_start_; }
  const std::vector<std::int32_t>& child_node() const { return child_node_; }

 private:
  template <class Sym>
  static SequenceTrie build_impl(const std::int64_t* offsets, const Sym* symbols,
                                 std::int64_t n_symbols_total, const std::uint8_t* member,
                                 std::int64_t n, std::int64_t n_symbols);
  template <class Sym>
  std::int32_t lookup_impl(const Sym* seq, std::size_t len) const;

  std::int32_t n_symbols_ = 0;
  std::vector<std::int32_t> order_, rank_, member_node_, first_symbol_;
  std::vector<std::int32_t> node_lo_, node_hi_, node_end_, node_depth_, node_parent_, node_symbol_;
  std::vector<std::int32_t> child_start_, child_node_;
};

}  // namespace ctalign
