// What the kernel drivers (grouped.cpp, range.cpp, trie.cpp, topk.cpp, sparse_rows.cpp) share: the
// numeric constants of the shifted softmax, row addressing, queries grouped by row, and the log of
// a list of masses.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/checks.h"
#include "kernels/row_kernels.h"
#include "projection_kernels.h"

namespace ctalign::kernels::detail {

// The grouped forward and top-k run in one pass with shift = the first chunk's max + kLead, moved to
// (chunk max + kLead) only when a chunk's max exceeds the shift by more than kSlack (the range and
// trie kernels use shift = row max). So the row's top tokens have |x/T - shift| <= 24 (float rounding
// of that difference: < 1e-6 relative) and tokens down to e^-140 of the top count.
constexpr double kLead = 8.0;
constexpr double kSlack = 24.0;
constexpr std::int64_t kRowsWork = 1 << 16;  // elements per work item (rows are batched below it)
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kLn2 = 0.693147180559945309417;

// Compute type of an output type: float for fp32/bf16/fp16 logits, double for fp64.
template <class Out>
using Compute = std::conditional_t<std::is_same_v<Out, double>, double, float>;

// The shift of a row's softmax exponents, d = (x - offset) * scale - shift (row_kernels.h), and
// total = offset * scale + shift in double: the value subtracted from x * scale. Rows whose scaled
// logits stay below kExactShift<C> use offset 0 (x * scale - shift in one fused multiply-subtract,
// the shift rounded to C: off by at most half an ulp, <= 0.25 for float). Above it a shift in C
// would be off by more than the spread a row's top tokens need (at |x/T| = 1e9 float's ulp is 64,
// and e^(x/T - shift) overflowed or vanished for the top token: #21), so the shift is split: offset
// = a raw logit (the max), shift = the lead. x - offset is exact (Sterbenz) for every token within a
// factor 2 of the offset, and the others lie more than |offset * scale| / 2 >= 2^21 below the top:
// zero mass, as e^d gives them (-inf differences included).
template <class C>
constexpr double kExactShift = std::is_same_v<C, float> ? 0x1p22 : 0x1p50;

template <class C>
struct Shift {
  C offset = 0, shift = 0;
  double total = -kInf;  // -inf: no shift yet
  bool split = false;    // offset in use (then moves compare raw maxima, exactly)
};

// Moves s for a run of columns whose max of x * scale, as stats gave it (rounded to C), is `top`,
// when that exceeds s.total by more than `slack` (always, for the first run): the new total is top +
// lead. raw_max() gives the run's max of x (called only for split shifts). Returns true when the
// masses so far must be rescaled, by *factor = e^(old total - new total) (which may underflow to 0):
// s moved and had a total before.
template <class C, class RawMax>
bool move_shift(Shift<C>& s, C top, C scale, double lead, double slack, RawMax&& raw_max, double* factor) {
  C raw = 0;
  double t = static_cast<double>(top);
  if (s.split) {  // a rounded top could be off by far more than the slack here
    raw = raw_max();
    t = static_cast<double>(raw) * static_cast<double>(scale);  // exact: a product of two floats
  }
  if (!(t > s.total + slack)) return false;
  const double old = s.total;
  const double next = static_cast<double>(static_cast<C>(t + lead));
  if (std::fabs(next) < kExactShift<C>) {
    s = {C(0), static_cast<C>(next), next, false};
  } else {
    if (!s.split) raw = raw_max();
    const C l = static_cast<C>(lead);
    s = {raw, l, static_cast<double>(raw) * static_cast<double>(scale) + static_cast<double>(l), true};
  }
  if (!(old > -kInf)) return false;
  *factor = std::exp(old - s.total);
  return true;
}

inline const char* row_ptr(const Logits& x, std::int64_t r) {
  return static_cast<const char*>(x.data) + r * x.row_stride * static_cast<std::int64_t>(elem_size(x.type));
}

// A row is refused when it holds NaN or +inf, or has no finite entry (its max is then +inf or -inf);
// -inf entries are zero mass (masked tokens), like any token far below the row's top.
inline bool row_is_bad(double mx, double /*mn*/, bool nan) { return nan || !std::isfinite(mx); }

// One shift for a whole row of n columns (the range and trie kernels): total = the row's max of
// x * scale (scaled_max, from stats), no lead.
template <class C>
Shift<C> row_shift(const RowKernels<C>& k, const void* row, std::int64_t n, C scale, C scaled_max) {
  Shift<C> s;
  double factor = 0;
  move_shift(s, scaled_max, scale, 0.0, 0.0, [&] {
    RowStats<C> raw;
    k.stats(row, n, C(1), &raw);
    return raw.max;
  }, &factor);
  return s;
}

// The gradient's reference point of row r: (offset, lse - offset * scale), the exponents being
// (x - offset) * scale - a with a = that lse + out (grouped, top-k gradients). The forward's lse, rounded to C, is used as it is
// unless its magnitude reaches kGradExact (ulp 2^-12 for float): such rows (the split shifts among
// them, whose float lse is off by far more than the spread of the top tokens) recompute their
// normaliser relative to their raw max, one more pass (stats and e^x) over the row.
template <class C>
constexpr double kGradExact = std::is_same_v<C, float> ? 0x1p12 : 0x1p40;

template <class C>
std::pair<C, double> grad_reference(const RowKernels<C>& k, const Logits& x, std::int64_t r, C scale, double lse,
                                    std::vector<C>& buf) {
  if (!(std::fabs(lse) >= kGradExact<C>) || !std::isfinite(lse)) return {C(0), lse};
  const std::int64_t v = x.vocab_size;
  const std::int64_t esize = static_cast<std::int64_t>(elem_size(x.type));
  const char* row = row_ptr(x, r);
  RowStats<C> raw;
  k.stats(row, v, C(1), &raw);
  buf.resize(kChunk);
  double z = 0;
  for (std::int64_t c0 = 0; c0 < v; c0 += kChunk) {
    z += k.exp_store(row + c0 * esize, std::min(kChunk, v - c0), scale, raw.max, C(0), buf.data());
  }
  return {raw.max, std::log(z) - kBias<C> * kLn2};
}

// Rows grouped by the queries that read them: queries of row r are ids[start[r] : start[r + 1]].
struct QueriesByRow {
  std::vector<std::int64_t> start, ids, active_rows;
};

// rows: [n_queries] row of each query, or nullptr (query q reads row q).
inline QueriesByRow group_queries(std::int64_t n_rows, const std::int64_t* rows, std::int64_t n_queries) {
  QueriesByRow g;
  g.start.assign(n_rows + 1, 0);
  for (std::int64_t i = 0; i < n_queries; ++i) ++g.start[(rows ? rows[i] : i) + 1];
  for (std::int64_t r = 0; r < n_rows; ++r) g.start[r + 1] += g.start[r];
  g.ids.resize(n_queries);
  std::vector<std::int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (std::int64_t i = 0; i < n_queries; ++i) g.ids[fill[rows ? rows[i] : i]++] = i;
  for (std::int64_t r = 0; r < n_rows; ++r) {
    if (g.start[r + 1] > g.start[r]) g.active_rows.push_back(r);
  }
  return g;
}

// A thread's buffers for the range and trie kernels, reused from row to row.
template <class C>
struct RangeScratch {
  std::vector<C> e, sorted;
  std::vector<double> s, mass;
};

// o[i] = log(mass[i]) - log z (RowKernels::log_ratio). Float outputs: the vector log of the float
// mass[i] 2^-e (z in [2^(e-1), 2^e), so the argument is about a probability) plus e ln2 - log z;
// masses whose scaled value is below 2^-120 are redone in double. Double outputs: libm. Outputs are
// in the compute type C on every path.
template <class C, class Out>
void log_masses(const RowKernels<C>& k, const double* mass, std::int64_t n, double z, Out* o) {
  static_assert(std::is_same_v<Out, C>, "outputs are in the compute type");
  const double log_z = std::log(z);
  int e = 0;
  std::frexp(z, &e);  // z in [2^(e-1), 2^e)
  const double pz = std::ldexp(1.0, -e);
  k.log_ratio(mass, n, pz, static_cast<C>(e * kLn2 - log_z), log_z, o);
}

}  // namespace ctalign::kernels::detail
