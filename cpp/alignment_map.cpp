#include "alignment_map.h"

#include <algorithm>
#include <string>
#include <string_view>
#include <utility>

#include "errors.h"

namespace ctalign {

const char* regime_name(Regime r) {
  switch (r) {
    case Regime::Identical: return "identical";
    case Regime::Subset: return "subset";
    case Regime::General: return "general";
  }
  return "general";
}

namespace {

// True when the concatenated bytes of student tokens ids[0:n] equal `expected`.
bool spells(const TokenTable& student, const std::int32_t* ids, std::int64_t n, std::string_view expected) {
  std::size_t pos = 0;
  for (std::int64_t k = 0; k < n; ++k) {
    std::string_view piece = student.token_bytes(ids[k]);
    if (piece.size() > expected.size() - pos || expected.compare(pos, piece.size(), piece) != 0) return false;
    pos += piece.size();
  }
  return pos == expected.size();
}

// True when student tokens dec[0:n] and teacher tokens unrolled[0:m] have the same bytes piece by piece.
bool same_pieces(const TokenTable& student, const std::int32_t* dec, std::int64_t n, const TokenTable& teacher,
                 const std::int32_t* unrolled, std::int64_t m) {
  if (n != m) return false;
  for (std::int64_t k = 0; k < n; ++k) {
    if (student.token_bytes(dec[k]) != teacher.token_bytes(unrolled[k])) return false;
  }
  return true;
}

}  // namespace

AlignmentMap AlignmentMap::build(const TokenTable& teacher, const SequenceTrie& teacher_trie,
                                 const TokenTable& student, std::vector<std::int64_t> dec_offsets,
                                 std::vector<std::int32_t> dec_ids,
                                 const std::vector<std::int32_t>& special_target, const MergeTable* teacher_merges,
                                 const std::vector<std::uint8_t>& subset_exempt) {
  const std::int32_t Vt = teacher.size(), Vs = student.size();
  if (teacher_trie.n() != Vt || teacher_trie.n_symbols() != 256) {
    throw InputError("AlignmentMap: teacher_trie must be the byte trie of the teacher table (" + std::to_string(Vt) +
                     " ids, 256 symbols), got " + std::to_string(teacher_trie.n()) + " ids, " +
                     std::to_string(teacher_trie.n_symbols()) + " symbols");
  }
  if (dec_offsets.size() != static_cast<std::size_t>(Vt) + 1) {
    throw InputError("AlignmentMap: dec_offsets has " + std::to_string(dec_offsets.size()) + " entries, expected V_t + 1 = " +
                     std::to_string(Vt + 1));
  }
  if (dec_offsets[0] != 0 || dec_offsets[Vt] != static_cast<std::int64_t>(dec_ids.size())) {
    throw InputError("AlignmentMap: dec_offsets must run from 0 to len(dec_ids) = " + std::to_string(dec_ids.size()));
  }
  if (special_target.size() != static_cast<std::size_t>(Vt)) {
    throw InputError("AlignmentMap: special_target has " + std::to_string(special_target.size()) +
                     " entries, expected V_t = " + std::to_string(Vt));
  }
  if (!subset_exempt.empty() && subset_exempt.size() != static_cast<std::size_t>(Vt)) {
    throw InputError("AlignmentMap: subset_exempt has " + std::to_string(subset_exempt.size()) +
                     " entries, expected V_t = " + std::to_string(Vt) + " (or none)");
  }
  for (std::int32_t t = 0; t < Vt; ++t) {
    if (dec_offsets[t + 1] < dec_offsets[t]) throw InputError("AlignmentMap: dec_offsets decrease at teacher id " + std::to_string(t));
    if (!teacher.has_bytes(t) && dec_offsets[t + 1] != dec_offsets[t]) {
      throw InputError("AlignmentMap: dec_S of teacher special " + std::to_string(t) + " must be empty");
    }
    const std::int32_t target = special_target[t];
    if (target < -1 || target > Vs) {
      throw InputError("AlignmentMap: special_target[" + std::to_string(t) + "] = " + std::to_string(target) +
                       " outside [-1, V_s = " + std::to_string(Vs) + "]");
    }
  }
  for (std::size_t k = 0; k < dec_ids.size(); ++k) {
    if (dec_ids[k] < 0 || dec_ids[k] >= Vs) {
      auto t = std::upper_bound(dec_offsets.begin(), dec_offsets.end(), static_cast<std::int64_t>(k)) - dec_offsets.begin() - 1;
      throw InputError("AlignmentMap: dec_S of teacher id " + std::to_string(t) + " holds student id " +
                       std::to_string(dec_ids[k]) + " outside [0, " + std::to_string(Vs) + ")");
    }
  }

  AlignmentMap m;
  m.n_teacher_ = Vt;
  m.n_student_ = Vs;
  m.dec_offsets_ = std::move(dec_offsets);
  m.dec_ids_ = std::move(dec_ids);
  m.compute_cover(student, teacher_trie);
  m.compute_dec_tables(teacher, student, special_target);

  std::vector<std::uint8_t> member(static_cast<std::size_t>(Vt));
  for (std::int32_t t = 0; t < Vt; ++t) member[t] = teacher.has_bytes(t) ? 1 : 0;
  m.dec_trie_ = SequenceTrie::build(m.dec_offsets_.data(), m.dec_ids_.data(),
                                    static_cast<std::int64_t>(m.dec_ids_.size()), member.data(), Vt,
                                    std::max<std::int32_t>(Vs, 1));

  if (teacher.fingerprint() == student.fingerprint()) {
    m.regime_ = Regime::Identical;
  } else {
    if (teacher_merges != nullptr) {
      if (teacher_merges->table().size() != Vt || teacher_merges->table().fingerprint() != teacher.fingerprint()) {
        throw InputError("AlignmentMap: teacher_merges was built for another token table");
      }
      m.check_subset(teacher, student, *teacher_merges, subset_exempt);
    }
    const bool every_student_token_in_teacher = m.stats_.student_with_identical == m.stats_.student_with_bytes;
    m.regime_ = (teacher_merges != nullptr && every_student_token_in_teacher && m.stats_.unroll_mismatch == 0)
                    ? Regime::Subset
                    : Regime::General;
  }
  return m;
}

void AlignmentMap::compute_cover(const TokenTable& student, const SequenceTrie& teacher_trie) {
  const std::int32_t Vs = n_student_;
  cover_lo_.assign(static_cast<std::size_t>(Vs), 0);
  cover_hi_.assign(static_cast<std::size_t>(Vs), 0);
  const auto& order = teacher_trie.order();
  const auto& node_lo = teacher_trie.node_lo();
  const auto& node_hi = teacher_trie.node_hi();
  const auto& node_end = teacher_trie.node_end();
  std::vector<std::uint8_t> teacher_has_identical(static_cast<std::size_t>(n_teacher_), 0);
  identical_.clear();
  for (std::int32_t s = 0; s < Vs; ++s) {
    if (!student.has_bytes(s)) continue;
    ++stats_.student_with_bytes;
    std::string_view b = student.token_bytes(s);
    const std::int32_t node = teacher_trie.lookup(reinterpret_cast<const std::uint8_t*>(b.data()), b.size());
    if (node < 0) {
      ++stats_.uncovered_student;
      continue;
    }
    cover_lo_[s] = node_lo[node];
    cover_hi_[s] = node_hi[node];
    if (node_end[node] > node_lo[node]) ++stats_.student_with_identical;
    for (std::int32_t i = node_lo[node]; i < node_end[node]; ++i) {
      identical_.push_back(order[i]);
      identical_.push_back(s);
      teacher_has_identical[order[i]] = 1;
    }
  }
  // Sort the (teacher, student) pairs by teacher id, then student id.
  const std::size_t K = identical_.size() / 2;
  std::vector<std::uint64_t> keys(K);
  for (std::size_t k = 0; k < K; ++k) {
    keys[k] = (static_cast<std::uint64_t>(identical_[2 * k]) << 32) | static_cast<std::uint32_t>(identical_[2 * k + 1]);
  }
  std::sort(keys.begin(), keys.end());
  for (std::size_t k = 0; k < K; ++k) {
    identical_[2 * k] = static_cast<std::int32_t>(keys[k] >> 32);
    identical_[2 * k + 1] = static_cast<std::int32_t>(keys[k] & 0xffffffffu);
  }
  stats_.identical_pairs = static_cast<std::int64_t>(K);
  for (std::uint8_t f : teacher_has_identical) stats_.teacher_with_identical += f;
}

void AlignmentMap::compute_dec_tables(const TokenTable& teacher, const TokenTable& student,
                                      const std::vector<std::int32_t>& special_target) {
  const std::int32_t Vt = n_teacher_, Vs = n_student_;
  first_student_.assign(static_cast<std::size_t>(Vt), Vs);
  for (std::int32_t t = 0; t < Vt; ++t) {
    const std::int64_t a = dec_offsets_[t], b = dec_offsets_[t + 1];
    const std::int64_t n = b - a;
    stats_.dec_total += n;
    stats_.dec_max_length = std::max<std::int32_t>(stats_.dec_max_length, static_cast<std::int32_t>(n));
    if (!teacher.has_bytes(t)) {
      const std::int32_t target = special_target[t];
      first_student_[t] = target >= 0 ? target : Vs;
      continue;
    }
    ++stats_.teacher_with_bytes;
    if (n == 0) {
      ++stats_.dec_empty;
      ++stats_.dec_bytes_mismatch;
      continue;
    }
    first_student_[t] = dec_ids_[a];
    if (n == 1) ++stats_.dec_single;
    if (!spells(student, dec_ids_.data() + a, n, teacher.token_bytes(t))) ++stats_.dec_bytes_mismatch;
  }
}

void AlignmentMap::check_subset(const TokenTable& teacher, const TokenTable& student, const MergeTable& merges,
                                const std::vector<std::uint8_t>& exempt) {
  const std::int32_t Vt = n_teacher_;
  // keep = teacher tokens whose bytes are a student token's bytes.
  std::vector<std::uint8_t> keep(static_cast<std::size_t>(Vt), 0);
  for (std::size_t k = 0; k < identical_.size(); k += 2) keep[identical_[k]] = 1;
  stats_.unroll_mismatch = 0;
  stats_.first_unroll_mismatch = -1;
  auto count = [&](std::int32_t t) {
    if (stats_.unroll_mismatch++ == 0) stats_.first_unroll_mismatch = t;
  };
  // Base pieces that are no student token stop the unrolling too, so that unroll_all does not throw:
  // such a piece has bytes no student token has, so it never equals a dec_S piece (a mismatch).
  std::vector<std::uint8_t> stop(keep);
  const auto& left = merges.left();
  const auto& reachable = merges.reachable();
  for (std::int32_t t = 0; t < Vt; ++t) {
    if (left[t] < 0 && reachable[t]) stop[t] = 1;
  }
  Csr unrolled;
  bool whole = true;
  try {
    unrolled = merges.unroll_all(stop.data());
  } catch (const InputError&) {
    whole = false;  // a token that cannot be split at all: go token by token
  }
  for (std::int32_t t = 0; t < Vt; ++t) {
    if (!teacher.has_bytes(t)) continue;
    if (!exempt.empty() && exempt[t]) {
      ++stats_.subset_exempt;
      continue;
    }
    const std::int32_t* dec = dec_ids_.data() + dec_offsets_[t];
    const std::int64_t n = dec_offsets_[t + 1] - dec_offsets_[t];
    if (whole) {
      const std::int64_t a = unrolled.offsets[t], b = unrolled.offsets[t + 1];
      if (!same_pieces(student, dec, n, teacher, unrolled.ids.data() + a, b - a)) count(t);
      continue;
    }
    try {
      std::vector<std::int32_t> u = merges.unroll(t, stop.data());
      if (!same_pieces(student, dec, n, teacher, u.data(), static_cast<std::int64_t>(u.size()))) count(t);
    } catch (const InputError&) {
      count(t);
    }
  }
}

}  // namespace ctalign
