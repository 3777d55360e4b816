// AlignmentMap: the teacher -> student map (docs/ARCHITECTURE.md, "Alignment map"; definitions in
// docs/design.md, "Decomposition", "Cover" and "Regimes").
//
// Inputs: the teacher's TokenTable and byte trie, the student's TokenTable, and dec_S for every
// teacher token (the student's own tokenization of the token's bytes, computed by the student's
// tokenizer in Python and handed over as CSR), plus the student column of every teacher special.
//
// Layout (owned, immutable; V_t teacher ids, V_s student ids):
//   identical      int32[K, 2]   (teacher id, student id) pairs with equal bytes, sorted by teacher
//                                id then student id (every pair when several ids share bytes)
//   cover_lo/hi    int32[V_s]    range in the teacher byte trie's `order` of the teacher tokens whose
//                                bytes start with bytes(s); [0, 0) when none (specials included)
//   dec_offsets    int64[V_t+1], dec_ids int32[]: dec_S(t), empty for teacher specials
//   first_student  int32[V_t]    dec_S(t)[0]; for a teacher special (or an empty dec_S) the given
//                                special target, V_s (the `end` column) when none
//   dec_trie       SequenceTrie over the dec_S sequences, n_symbols = V_s
//   regime         Identical (same fingerprint), Subset (every student token with bytes is a teacher
//                  token with those bytes, and dec_S(t) has the pieces of t's merge tree unrolled down
//                  to student tokens, compared by bytes, for every teacher token but the exempt ones),
//                  else General. The counts behind it are in stats().
// No V_t x V_s structure anywhere: memory O(V_t + V_s + sum |dec_S| + teacher trie nodes).
//
// Costs: cover/identical one trie lookup per student token, O(sum |bytes(s)| log branching);
// dec checks O(sum |dec_S| + total bytes); dec trie one sort of V_t sequences; the subset check one
// unroll per teacher token. Single-threaded; the binding releases the GIL.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "merge_table.h"
#include "sequence_trie.h"
#include "token_table.h"

namespace ctalign {

enum class Regime : std::int32_t { Identical = 0, Subset = 1, General = 2 };
const char* regime_name(Regime r);

// Counts for reports and warnings. "with bytes" = not a special/control token.
struct AlignmentStats {
  std::int64_t identical_pairs = 0;
  std::int32_t teacher_with_bytes = 0, student_with_bytes = 0;
  std::int32_t teacher_with_identical = 0;  // teacher tokens with >= 1 student token of equal bytes
  std::int32_t student_with_identical = 0;  // student tokens with >= 1 teacher token of equal bytes
  std::int32_t uncovered_student = 0;       // student tokens with bytes that prefix no teacher token
  std::int32_t dec_empty = 0;               // teacher tokens with bytes whose dec_S is empty
  std::int32_t dec_bytes_mismatch = 0;      // teacher tokens whose dec_S bytes differ from their own
  std::int32_t dec_single = 0;              // teacher tokens with |dec_S| = 1
  std::int32_t dec_max_length = 0;
  std::int64_t dec_total = 0;               // sum |dec_S|
  // Subset check (only when the teacher has a merge table and the fingerprints differ; else -1):
  // teacher tokens whose dec_S does not spell their merge tree unrolled to student tokens (a base
  // token that is no student token counts too).
  std::int32_t unroll_mismatch = -1;
  std::int32_t first_unroll_mismatch = -1;  // smallest such teacher id, -1 when none
  std::int32_t subset_exempt = 0;           // teacher tokens left out of the subset check
};

class AlignmentMap {
 public:
  // dec_offsets int64[V_t+1], dec_ids int32[]: taken over. special_target int32[V_t]: -1 for a token
  // that is not a teacher special, else its student column in [0, V_s] (V_s = the end column).
  // teacher_merges: the teacher's merge table (BPE families) or nullptr. subset_exempt: empty, or
  // uint8[V_t] with 1 for teacher tokens the subset check leaves out (tokens the teacher never emits,
  // e.g. bytes its normalizer rewrites). Throws InputError naming the inconsistent argument (sizes,
  // ids out of range, dec_S given for a special).
  static AlignmentMap build(const TokenTable& teacher, const SequenceTrie& teacher_trie,
                            const TokenTable& student, std::vector<std::int64_t> dec_offsets,
                            std::vector<std::int32_t> dec_ids, const std::vector<std::int32_t>& special_target,
                            const MergeTable* teacher_merges, const std::vector<std::uint8_t>& subset_exempt = {});

  std::int32_t n_teacher() const { return n_teacher_; }
  std::int32_t n_student() const { return n_student_; }
  Regime regime() const { return regime_; }
  const AlignmentStats& stats() const { return stats_; }

  const std::vector<std::int32_t>& identical() const { return identical_; }
  const std::vector<std::int32_t>& cover_lo() const { return cover_lo_; }
  const std::vector<std::int32_t>& cover_hi() const { return cover_hi_; }
  const std::vector<std::int64_t>& dec_offsets() const { return dec_offsets_; }
  const std::vector<std::int32_t>& dec_ids() const { return dec_ids_; }
  const std::vector<std::int32_t>& first_student() const { return first_student_; }
  const SequenceTrie& dec_trie() const { return dec_trie_; }

  // Moves the tables out (the bindings hand them to numpy without copying).
  std::vector<std::int32_t> take_identical() { return std::move(identical_); }
  std::vector<std::int32_t> take_cover_lo() { return std::move(cover_lo_); }
  std::vector<std::int32_t> take_cover_hi() { return std::move(cover_hi_); }
  std::vector<std::int64_t> take_dec_offsets() { return std::move(dec_offsets_); }
  std::vector<std::int32_t> take_dec_ids() { return std::move(dec_ids_); }
  std::vector<std::int32_t> take_first_student() { return std::move(first_student_); }
  SequenceTrie take_dec_trie() { return std::move(dec_trie_); }

 private:
  AlignmentMap() = default;
  void compute_cover(const TokenTable& student, const SequenceTrie& teacher_trie);
  void compute_dec_tables(const TokenTable& teacher, const TokenTable& student,
                          const std::vector<std::int32_t>& special_target);
  void check_subset(const TokenTable& teacher, const TokenTable& student, const MergeTable& merges,
                    const std::vector<std::uint8_t>& exempt);

  std::int32_t n_teacher_ = 0, n_student_ = 0;
  Regime regime_ = Regime::General;
  AlignmentStats stats_;
  std::vector<std::int32_t> identical_, cover_lo_, cover_hi_;
  std::vector<std::int64_t> dec_offsets_;
  std::vector<std::int32_t> dec_ids_, first_student_;
  SequenceTrie dec_trie_;
};

}  // namespace ctalign
