// What the kernel drivers (grouped.cpp, range.cpp, trie.cpp, topk.cpp, sparse_rows.cpp) share: the
// numeric constants of the shifted softmax, row addressing, queries grouped by row, and the log of
// a list of masses.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
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

inline const char* row_ptr(const Logits& x, std::int64_t r) {
  return static_cast<const char*>(x.data) + r * x.row_stride * static_cast<std::int64_t>(elem_size(x.type));
}

// A row is refused when it holds NaN or +inf, or has no finite entry (its max is then +inf or -inf);
// -inf entries are zero mass (masked tokens), like any token far below the row's top.
inline bool row_is_bad(double mx, double /*mn*/, bool nan) { return nan || !std::isfinite(mx); }

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
