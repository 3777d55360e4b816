// MergeTable: the BPE merge recursion of a vocabulary and a compiled BPE encoder over raw bytes
// (docs/ARCHITECTURE.md, "Modules"; docs/design.md, "Regimes" (merge trees)).
//
// Two ways to know which adjacent pair of pieces merges, and with what priority ("rank", lower first):
//   from_merges: an HF merge list (left id, right id) in rank order; pair (a, b) merges iff it is in
//                the list, rank = its position, result = the token whose bytes are bytes(a)+bytes(b).
//   from_ranks:  tiktoken / Tekken / SentencePiece-BPE priorities, priority[t] >= 0 for tokens that
//                can be merge results (-1: never); pair (a, b) merges iff some token has the bytes
//                bytes(a)+bytes(b) and priority >= 0, rank = that priority.
// Encoding (one pre-token, raw bytes): start from the initial pieces, then repeatedly merge the
// adjacent pair of lowest rank, the leftmost among equals, until no pair merges.
//   Initial::Bytes  every byte is a piece: base_token[byte] (byte-level BPE, tiktoken, Tekken).
//   Initial::Chars  every UTF-8 character is a piece when a token has exactly its bytes, else its bytes
//                   are (SentencePiece BPE with byte fallback; invalid UTF-8 goes byte by byte).
//   ignore_merges   HF option: a pre-token that is itself a token is returned whole, without BPE.
//
// The merge recursion. For every token t:
//   base        t is an initial piece of its own bytes (a single byte / character): left = right =
//               rank = -1, reachable = 1.
//   reachable   pure BPE over bytes(t) yields [t]; (left[t], right[t]) = the last merge of that run, with
//               rank[t] its rank. from_ranks follows tiktoken's rule first: the merge is what BPE over
//               bytes(t) with ranks < priority[t] only leaves, when that is two pieces that make t
//               (the same merge whenever ranks grow along merges, as in tiktoken files).
//   unreachable any other token with bytes (a few in Llama-3 / Qwen; duplicates of a preferred id):
//               left = right = rank = -1, reachable = 0; it unrolls through the pure BPE pieces of its
//               bytes. Specials (no bytes): -1, reachable = 0, unroll to nothing.
// Preferred ids among several with the same bytes (SentencePiece `▁` vs `<0x20>`): from_merges,
// the lowest id used by some merge, else the lowest id; from_ranks, the lowest priority >= 0, else
// the lowest id. base_token and merge results use the preferred id.
//
// Costs (V tokens, K merges, B = total token bytes): from_merges O(K + V) hash work + BPE over every
// token; from_ranks one restricted BPE per token. encode(n bytes): O(n^2) scans for n <= 128 pieces
// (cached pair ranks, like tiktoken), a heap O(n log n) above. Memory O(V + K + B).
// Measured (this 2-core machine, shared, so ranges idle..loaded): qwen from_ranks 80-150 ms and
// encode_many over all 151k tokens 70-140 ms; llama3 from_merges (280k merges) 200 ms; cl100k
// from_ranks 55-100 ms. unroll_all: a few ms for 150k tokens.
#pragma once
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "token_table.h"

namespace ctalign {

struct Csr {
  std::vector<std::int64_t> offsets;  // [rows + 1]
  std::vector<std::int32_t> ids;
};

class MergeTable {
 public:
  enum class Initial { Bytes, Chars };
  struct Options {
    Initial initial = Initial::Bytes;
    bool ignore_merges = false;
  };
  static constexpr std::int32_t kNoRank = 0x7fffffff;

  // merges: int32[k, 2] row-major. Throws InputError naming the merge when an id is out of range,
  // has no bytes, or the concatenation is no token of the table.
  static MergeTable from_merges(std::shared_ptr<const TokenTable> table, const std::int32_t* merges,
                                std::int64_t k, Options options);
  // priority: int32[V], -1 or a rank in [0, 2^31 - 1). Priorities of specials are ignored.
  static MergeTable from_ranks(std::shared_ptr<const TokenTable> table, const std::int32_t* priority,
                               Options options);

  const TokenTable& table() const { return *table_; }
  std::shared_ptr<const TokenTable> table_ptr() const { return table_; }
  const Options& options() const { return options_; }
  bool from_rank_list() const { return ranks_mode_; }

  const std::vector<std::int32_t>& left() const { return left_; }
  const std::vector<std::int32_t>& right() const { return right_; }
  const std::vector<std::int32_t>& rank() const { return rank_; }
  const std::vector<std::int32_t>& base_token() const { return base_token_; }
  const std::vector<std::uint8_t>& reachable() const { return reachable_; }
  std::int64_t n_merges() const { return n_merges_; }

  // BPE of one pre-token. Throws InputError naming the first byte without an initial piece.
  std::vector<std::int32_t> encode(std::string_view bytes) const;
  // Many pre-tokens: CSR input (offsets int64[q+1] into data) -> CSR of ids.
  Csr encode_many(const std::int64_t* offsets, const std::uint8_t* data, std::int64_t q) const;
  Csr encode_many(const std::vector<std::string_view>& pieces) const;

  // Expands t down its merge tree until every piece has keep = 1 (keep: uint8[V]). Specials give
  // nothing. Throws InputError when a base token on the way is not kept.
  std::vector<std::int32_t> unroll(std::int32_t t, const std::uint8_t* keep) const;
  Csr unroll_all(const std::uint8_t* keep) const;

  struct Scratch;  // buffers reused across calls (defined in merge_table.cpp)

 private:
  struct LastMerge {
    std::int32_t left = -1, right = -1, rank = -1;
  };
  explicit MergeTable(std::shared_ptr<const TokenTable> table, Options options, bool ranks_mode);
  void choose_base_tokens();
  std::int32_t preferred_id(std::string_view bytes) const;
  void compute_recursion();
  // Pure BPE (ranks < max_rank only). Appends ids to out; returns false (out unchanged) and sets
  // *bad_position when a byte has no initial piece.
  bool bpe(std::string_view s, std::int32_t max_rank, std::vector<std::int32_t>& out, Scratch& scratch,
           LastMerge* last, std::size_t* bad_position) const;
  void encode_into(std::string_view s, std::vector<std::int32_t>& out, Scratch& scratch) const;
  // Rank and result of merging the adjacent spans s[a0:a1] (id a) and s[a1:b1] (id b).
  inline std::int32_t pair_rank(std::string_view s, std::int32_t a0, std::int32_t a1, std::int32_t b1,
                                std::int32_t a, std::int32_t b, std::int32_t max_rank,
                                std::int32_t* result) const;
  void unroll_into(std::int32_t t, const std::uint8_t* keep, std::vector<std::int32_t>& out,
                   std::vector<std::int32_t>& stack) const;

  std::shared_ptr<const TokenTable> table_;
  Options options_;
  bool ranks_mode_ = false;
  std::int64_t n_merges_ = 0;

  // from_merges: open-addressing map (left << 32 | right) -> (rank, result).
  std::vector<std::uint64_t> pair_keys_;  // kEmptyKey = empty
  std::vector<std::int32_t> pair_rank_, pair_result_;
  std::size_t pair_mask_ = 0;
  // from_ranks: the preferred mergeable id of each byte string, with its priority.
  BytesIndex rank_index_;
  std::vector<std::int32_t> priority_;
  // Initial pieces.
  std::vector<std::int32_t> base_token_;    // [256]
  std::vector<std::uint8_t> preferred_use_;  // from_merges: id appears in some merge

  // The recursion.
  std::vector<std::int32_t> left_, right_, rank_;
  std::vector<std::uint8_t> reachable_;
  std::vector<std::int64_t> split_offsets_;  // [V+1]: unreachable tokens' pure BPE pieces
  std::vector<std::int32_t> split_ids_;
};

}  // namespace ctalign
