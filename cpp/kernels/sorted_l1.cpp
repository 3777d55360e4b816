// ULD's exact distance (kernel contract 8, sorted_l1_distance): per row, the L1 distance between the
// student's and the teacher's probability vectors each sorted in decreasing order, the shorter one
// padded with zeros, and its gradient's sign per student entry.
//
// Layout and cost: probabilities are non-negative floats, whose IEEE bit patterns order as unsigned
// integers do, so each row is sorted by an LSD radix sort of ~bits (three passes of 11 bits; O(V) per
// pass, stable): the teacher's values alone, the student's with their column ids. Only the
// m = min(V_s, V_t) largest of the wider side pair with the other side's values (the rest pair with
// the padding zeros), so that side is first cut to the buckets of its top key digit that hold its m
// largest (one histogram pass). Per thread: two uint32 key buffers and a float buffer of
// max(V_s, V_t), two id buffers of V_s (reused from row to row). The sum is accumulated in double.
// The logits form (sorted_l1_logits) first writes each row's exp((x - max) / T) (the row primitives'
// vector exp) and sorts those, with the rows' sums as normalisers. A pure-torch reference:
// ctalign.ops.reference.sorted_l1_distance.
#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "errors.h"
#include "kernels/common.h"
#include "kernels/row_kernels.h"
#include "kernels/threads.h"
#include "projection_kernels.h"

namespace ctalign::kernels {
namespace detail {
namespace {

constexpr int kRadixBits = 11;
constexpr std::uint32_t kBuckets = 1u << kRadixBits;

// Decreasing float order as increasing keys: ~bits (negative zero and any sign bit are refused before).
inline std::uint32_t descending_key(float v) {
  std::uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return ~b;
}

inline float value_of_key(std::uint32_t key) {
  const std::uint32_t b = ~key;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

struct SortScratch {
  std::vector<std::uint32_t> keys, keys_tmp;
  std::vector<std::int32_t> ids, ids_tmp;
  std::vector<float> teacher_sorted;
  std::vector<float> e_student, e_teacher;  // the logits form: each row's exp(x/T - max/T)
};

// Stable LSD radix sort of keys[0, n) (with ids when `with_ids`), in place via the scratch buffers.
void radix_sort(SortScratch& s, std::int64_t n, bool with_ids) {
  std::uint32_t* a = s.keys.data();
  std::uint32_t* b = s.keys_tmp.data();
  std::int32_t* ia = s.ids.data();
  std::int32_t* ib = s.ids_tmp.data();
  for (int shift = 0; shift < 32; shift += kRadixBits) {
    std::array<std::int64_t, kBuckets> count{};
    for (std::int64_t i = 0; i < n; ++i) ++count[(a[i] >> shift) & (kBuckets - 1)];
    if (count[(a[0] >> shift) & (kBuckets - 1)] == n) continue;  // every key has this digit: nothing moves
    std::int64_t sum = 0;
    for (auto& c : count) {
      const std::int64_t here = c;
      c = sum;
      sum += here;
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t to = count[(a[i] >> shift) & (kBuckets - 1)]++;
      b[to] = a[i];
      if (with_ids) ib[to] = ia[i];
    }
    std::swap(a, b);
    std::swap(ia, ib);
  }
  if (a != s.keys.data()) {
    std::memcpy(s.keys.data(), a, sizeof(std::uint32_t) * n);
    if (with_ids) std::memcpy(s.ids.data(), ia, sizeof(std::int32_t) * n);
  }
}

// Leaves the m largest values of x[0, n), sorted decreasingly as keys, in s.keys[0, m) (with their column
// ids in s.ids when with_ids; ties by id) and returns the sum of the values left out. m < n: a histogram
// of the top key digit finds the buckets that hold the m largest, and only those are sorted.
double top_sorted(SortScratch& s, const float* x, std::int64_t n, std::int64_t m, bool with_ids) {
  constexpr int kTopShift = 32 - kRadixBits;
  if (m >= n) {
    for (std::int64_t i = 0; i < n; ++i) {
      s.keys[i] = descending_key(x[i] + 0.0f);  // + 0.0f: -0 -> +0
      if (with_ids) s.ids[i] = static_cast<std::int32_t>(i);
    }
    radix_sort(s, n, with_ids);
    return 0.0;
  }
  std::array<std::int64_t, kBuckets> count{};
  for (std::int64_t i = 0; i < n; ++i) ++count[descending_key(x[i] + 0.0f) >> kTopShift];
  std::uint32_t boundary = 0;
  for (std::int64_t above = 0; boundary < kBuckets - 1 && above + count[boundary] < m; ++boundary) {
    above += count[boundary];
  }
  std::int64_t c = 0;
  double rest = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::uint32_t key = descending_key(x[i] + 0.0f);
    if ((key >> kTopShift) <= boundary) {
      s.keys[c] = key;
      if (with_ids) s.ids[c] = static_cast<std::int32_t>(i);
      ++c;
    } else {
      rest += x[i];
    }
  }
  radix_sort(s, c, with_ids);
  for (std::int64_t i = m; i < c; ++i) rest += value_of_key(s.keys[i]);
  return rest;
}

}  // namespace
}  // namespace detail

namespace detail {
namespace {

void size_scratch(SortScratch& s, std::int64_t vs, std::int64_t vt) {
  const std::int64_t width = std::max(vs, vt);
  if (static_cast<std::int64_t>(s.keys.size()) < width) {
    s.keys.resize(width);
    s.keys_tmp.resize(width);
    s.teacher_sorted.resize(width);
  }
  if (static_cast<std::int64_t>(s.ids.size()) < vs) {
    s.ids.resize(vs);
    s.ids_tmp.resize(vs);
  }
}

// One pair: student values p[0, vs) x ps and teacher values t[0, vt) x pt (ps, pt: the rows'
// normalisers, 1 for probabilities); returns the distance and writes the sign of each student entry.
double pair_distance(SortScratch& s, const float* p, double ps, std::int64_t vs, const float* t, double pt,
                     std::int64_t vt, float* g) {
  // Only the m = min(V_s, V_t) largest of each side pair with each other; the wider side's other
  // entries pair with the padding zeros (their sum, and for the student a sign of +1 where > 0).
  const std::int64_t m = std::min(vs, vt);
  double d = top_sorted(s, t, vt, m, false) * pt;
  float* t_sorted = s.teacher_sorted.data();
  for (std::int64_t i = 0; i < m; ++i) t_sorted[i] = value_of_key(s.keys[i]);
  if (vs > m) {
    for (std::int64_t j = 0; j < vs; ++j) g[j] = p[j] > 0.0f ? 1.0f : 0.0f;
  }
  d += top_sorted(s, p, vs, m, true) * ps;
  for (std::int64_t i = 0; i < m; ++i) {
    const double a = static_cast<double>(value_of_key(s.keys[i])) * ps;
    const double b = static_cast<double>(t_sorted[i]) * pt;
    d += std::fabs(a - b);
    g[s.ids[i]] = a > b ? 1.0f : (a < b ? -1.0f : 0.0f);
  }
  return d;
}

// e[i] = exp((x[i] - max) / T) of logits row r (its first V columns), by the row primitives; returns
// the sum in double, or NaN when the row holds NaN or +inf or only -inf.
double exp_row(const RowKernels<float>& k, const Logits& x, std::int64_t r, float* e) {
  const char* row = row_ptr(x, r);
  RowStats<float> st;
  k.stats(row, x.vocab_size, 1.0f, &st);
  if (st.nan || !std::isfinite(st.max)) return std::nan("");
  const float scale = static_cast<float>(1.0 / x.temperature);
  return k.exp_store(row, x.vocab_size, scale, st.max, 0.0f, e);
}

}  // namespace
}  // namespace detail

void sorted_l1_distance(const float* student, std::int64_t n_rows, std::int64_t vs, const float* teacher,
                        std::int64_t vt, double* distance, float* sign, int n_threads) {
  using namespace detail;
  if (vs < 1 || vt < 1) throw InputError("sorted_l1_distance: both rows need at least one entry");
  if (vs > INT32_MAX) throw InputError("sorted_l1_distance: the student rows are wider than 2^31 - 1");
  for (std::int64_t i = 0; i < n_rows * vs; ++i) {
    if (!(student[i] >= 0.0f) || std::isinf(student[i])) {
      throw InputError("sorted_l1_distance: student probabilities must be finite and >= 0 (row " +
                       std::to_string(i / vs) + ")");
    }
  }
  for (std::int64_t i = 0; i < n_rows * vt; ++i) {
    if (!(teacher[i] >= 0.0f) || std::isinf(teacher[i])) {
      throw InputError("sorted_l1_distance: teacher probabilities must be finite and >= 0 (row " +
                       std::to_string(i / vt) + ")");
    }
  }
  const int threads = static_cast<int>(std::max<std::int64_t>(
      1, std::min<std::int64_t>(n_threads, n_rows * (vs + vt) / kMinParallelWork)));
  std::vector<SortScratch> scratch(static_cast<std::size_t>(std::max(threads, 1)));
  parallel_for(n_rows, threads, [&](std::int64_t r, int tid) {
    SortScratch& s = scratch[static_cast<std::size_t>(tid)];
    size_scratch(s, vs, vt);
    distance[r] = pair_distance(s, student + r * vs, 1.0, vs, teacher + r * vt, 1.0, vt, sign + r * vs);
  });
}

void sorted_l1_logits(const Logits& student, const std::int64_t* s_rows, const Logits& teacher,
                      const std::int64_t* t_rows, std::int64_t n_pairs, double* distance, float* grad,
                      std::uint8_t* bad, int n_threads) {
  using namespace detail;
  const std::int64_t vs = student.vocab_size, vt = teacher.vocab_size;
  if (vs < 1 || vt < 1) throw InputError("sorted_l1_logits: both vocabularies need at least one token");
  if (vs > INT32_MAX) throw InputError("sorted_l1_logits: the student vocabulary is wider than 2^31 - 1");
  for (std::int64_t i = 0; i < n_pairs; ++i) {
    if (s_rows[i] < 0 || s_rows[i] >= student.n_rows || t_rows[i] < 0 || t_rows[i] >= teacher.n_rows) {
      throw InputError("sorted_l1_logits: pair " + std::to_string(i) + " names a row outside the logits");
    }
  }
  const RowKernels<float> ks = row_kernels<float>(student.type);
  const RowKernels<float> kt = row_kernels<float>(teacher.type);
  const int threads = static_cast<int>(std::max<std::int64_t>(
      1, std::min<std::int64_t>(n_threads, n_pairs * (vs + vt) / kMinParallelWork)));
  std::vector<SortScratch> scratch(static_cast<std::size_t>(std::max(threads, 1)));
  parallel_for(n_pairs, threads, [&](std::int64_t q, int tid) {
    SortScratch& s = scratch[static_cast<std::size_t>(tid)];
    size_scratch(s, vs, vt);
    s.e_student.resize(static_cast<std::size_t>(vs));
    s.e_teacher.resize(static_cast<std::size_t>(vt));
    const double zs = exp_row(ks, student, s_rows[q], s.e_student.data());
    const double zt = exp_row(kt, teacher, t_rows[q], s.e_teacher.data());
    bad[q] = std::isnan(zs) ? 1 : (std::isnan(zt) ? 2 : 0);
    float* g = grad + q * vs;
    if (bad[q]) {
      distance[q] = std::nan("");
      std::fill(g, g + vs, 0.0f);
      return;
    }
    const float* e = s.e_student.data();
    distance[q] = pair_distance(s, e, 1.0 / zs, vs, s.e_teacher.data(), 1.0 / zt, vt, g);
    // g holds the signs; the gradient in the logits at T = 1 is p_j (sign_j - sum_i p_i sign_i)
    const float inv = static_cast<float>(1.0 / zs);
    double dot = 0.0;
    for (std::int64_t j = 0; j < vs; ++j) dot += static_cast<double>(e[j] * inv) * g[j];
    const float dotf = static_cast<float>(dot);
    for (std::int64_t j = 0; j < vs; ++j) g[j] = e[j] * inv * (g[j] - dotf);
  });
}

}  // namespace ctalign::kernels
