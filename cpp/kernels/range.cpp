// Range log mass (kernel contract 2): out[q, c] = log sum of p_{row q} over positions [lo, hi) of a
// sorted token order, and its gradient; cover_logmass and the range-table conditionals run here.
// Prefix sums in double over the sorted order, with direct sums where a difference would cancel.
// Numerics and costs: projection_kernels.h. Row primitives: row_kernels.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/checks.h"
#include "kernels/common.h"
#include "kernels/row_kernels.h"
#include "kernels/threads.h"
#include "projection_kernels.h"

namespace ctalign::kernels {
namespace detail {
namespace {

constexpr double kDirectSumBelow = 1.0 / 8388608.0;  // 2^-23: sum a range directly below this share

// S[0] = 0, S[i + 1] = S[i] + e[i], in double. The array is cut into 8 segments summed as 8
// independent chains (one running sum is latency-bound; 8 keep the adder busy), then each segment
// gets the total of the segments before it.
template <class C>
void prefix_sums(const C* e, std::int64_t m, double* s) {
  constexpr int kLanes = 8;
  const std::int64_t seg = (m + kLanes - 1) / kLanes;
  std::int64_t len[kLanes];
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t common = seg;
  for (int l = 0; l < kLanes; ++l) {
    len[l] = std::max<std::int64_t>(0, std::min(seg, m - l * seg));
    common = std::min(common, len[l]);
  }
  s[0] = 0;
  for (std::int64_t i = 0; i < common; ++i) {
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += static_cast<double>(e[l * seg + i]);
      s[l * seg + i + 1] = acc[l];
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    for (std::int64_t i = common; i < len[l]; ++i) {
      acc[l] += static_cast<double>(e[l * seg + i]);
      s[l * seg + i + 1] = acc[l];
    }
  }
  double base = 0;
  for (int l = 0; l < kLanes; ++l) {
    if (l > 0) {
      for (std::int64_t i = 0; i < len[l]; ++i) s[l * seg + i + 1] += base;
    }
    base += acc[l];
  }
}

// Mass of sorted positions [lo, hi): the prefix difference, or the direct sum when the difference is
// below kDirectSumBelow of its prefix (it would have lost its relative precision to cancellation).
// Ranges of at most kShortRange positions are summed directly either way and the test picks one of
// the two: the test goes either way from range to range, and a mispredicted branch costs more than
// the sum. `sorted` holds kShortRange zeros after its end (the loads past hi).
constexpr std::int32_t kShortRange = 2;  // 4: 67-71 ms, 8: 74-75 ms, 2: 61-64 ms (cover, 64 rows, 1 thread)
template <class C>
double range_mass(const C* sorted, const double* s, std::int32_t lo, std::int32_t hi) {
  const std::int32_t len = hi - lo;  // >= 0 (checked)
  const double d = s[hi] - s[lo];
  const bool cancelled = !(d >= kDirectSumBelow * s[hi]);
  if (len <= kShortRange) {
    double direct = 0;
    for (std::int32_t i = 0; i < kShortRange; ++i) {
      const double v = static_cast<double>(sorted[lo + i]);
      direct += i < len ? v : 0.0;  // + 0.0 leaves the sum as it is
    }
    return cancelled ? direct : d;
  }
  if (!cancelled) return d;
  double direct = 0;
  for (std::int32_t i = lo; i < hi; ++i) direct += static_cast<double>(sorted[i]);
  return direct;
}

// rank[t] = position of t in order, -1 when absent; an id listed twice throws InputError.
std::vector<std::int32_t> rank_of(const RangeQueries& q, std::int64_t vocab_size) {
  std::vector<std::int32_t> rank(vocab_size, -1);
  for (std::int64_t i = 0; i < q.order_size; ++i) {
    if (rank[q.order[i]] >= 0) {
      throw InputError("range kernels: order lists token " + std::to_string(q.order[i]) + " twice");
    }
    rank[q.order[i]] = static_cast<std::int32_t>(i);
  }
  return rank;
}

// sorted[rank[t]] = e[t] for the ids in the order: a streaming pass with scattered stores (cheaper
// than gathering e through the order, whose loads would wait on the cache).
template <class C>
void to_sorted(const C* e, const std::int32_t* rank, std::int64_t v, C* sorted) {
  for (std::int64_t t = 0; t < v; ++t) {
    const std::int32_t r = rank[t];
    if (r >= 0) sorted[r] = e[t];
  }
}

template <class C, class Out>
void range_forward(const Logits& x, const RangeQueries& q, Out* out, Out* lse, int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  const std::int64_t v = x.vocab_size, m = q.order_size, cols = q.n_cols;
  const C scale = static_cast<C>(1.0 / x.temperature);
  const QueriesByRow byrow = group_queries(x.n_rows, q.rows, q.n_queries);
  const std::vector<std::int32_t> rank = rank_of(q, v);
  for (std::int64_t r = 0; r < x.n_rows; ++r) lse[r] = 0;
  const std::int64_t n_active = static_cast<std::int64_t>(byrow.active_rows.size());
  const int threads = thread_count(n_threads, n_active * (v + m) + q.n_queries * cols);
  std::vector<RangeScratch<C>> scratch(threads);

  parallel_for(n_active, threads, [&](std::int64_t item, int tid) {
    RangeScratch<C>& sc = scratch[tid];
    sc.e.resize(v);
    sc.sorted.resize(m + kShortRange);
    std::fill(sc.sorted.begin() + m, sc.sorted.end(), C(0));  // range_mass reads past the end
    sc.s.resize(m + 1);
    const std::int64_t r = byrow.active_rows[item];
    const char* row = row_ptr(x, r);
    RowStats<C> st;
    k.stats(row, v, scale, &st);
    const bool bad = row_is_bad(st.max, st.min, st.nan);
    double z = 1, shift = 0;
    if (!bad) {
      const Shift<C> sh = row_shift(k, row, v, scale, st.max);
      shift = sh.total;
      z = k.exp_store(row, v, scale, sh.offset, sh.shift, sc.e.data());
      to_sorted(sc.e.data(), rank.data(), v, sc.sorted.data());
      prefix_sums(sc.sorted.data(), m, sc.s.data());
    }
    sc.mass.resize(cols);
    for (std::int64_t j = byrow.start[r]; j < byrow.start[r + 1]; ++j) {
      const std::int64_t qi = byrow.ids[j];
      const std::int32_t* lo = q.shared ? q.lo : q.lo + qi * cols;
      const std::int32_t* hi = q.shared ? q.hi : q.hi + qi * cols;
      Out* o = out + qi * cols;
      if (bad) {
        std::fill(o, o + cols, static_cast<Out>(kNaN));
        continue;
      }
      for (std::int64_t c = 0; c < cols; ++c) sc.mass[c] = range_mass(sc.sorted.data(), sc.s.data(), lo[c], hi[c]);
      log_masses(k, sc.mass.data(), cols, z, o);
    }
    lse[r] = static_cast<Out>(bad ? kNaN : shift + std::log(z) - kBias<C> * kLn2);
  });
}

template <class C, class Out>
void range_backward(const Logits& x, const RangeQueries& q, const Out* out, const Out* grad_out, Out* grad,
                    std::int64_t grad_width, int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  const std::int64_t v = x.vocab_size, m = q.order_size, cols = q.n_cols;
  const double scale_d = 1.0 / x.temperature;
  const C scale = static_cast<C>(scale_d);
  const QueriesByRow byrow = group_queries(x.n_rows, q.rows, q.n_queries);
  const int threads = thread_count(n_threads, x.n_rows * v + q.n_queries * cols);
  std::vector<RangeScratch<C>> scratch(threads);

  // One item per row: rows no query reads get zeros.
  parallel_for(x.n_rows, threads, [&](std::int64_t r, int tid) {
    Out* dx = grad + r * grad_width;
    if (byrow.start[r + 1] == byrow.start[r]) {
      std::fill(dx, dx + grad_width, Out(0));
      return;
    }
    RangeScratch<C>& sc = scratch[tid];
    sc.e.resize(v);
    sc.s.resize(m + 1);
    const char* row = row_ptr(x, r);
    RowStats<C> st;
    k.stats(row, v, scale, &st);
    if (row_is_bad(st.max, st.min, st.nan)) {
      std::fill(dx, dx + grad_width, static_cast<Out>(kNaN));
      return;
    }
    const Shift<C> sh = row_shift(k, row, v, scale, st.max);
    const double z = k.exp_store(row, v, scale, sh.offset, sh.shift, sc.e.data());
    // Difference array over order positions (reusing s): the summed weight of the ranges covering
    // each position, w = g e^{-out} / z for every range with mass and gradient.
    std::vector<double>& d = sc.s;
    std::fill(d.begin(), d.end(), 0.0);
    double gsum = 0;
    for (std::int64_t j = byrow.start[r]; j < byrow.start[r + 1]; ++j) {
      const std::int64_t qi = byrow.ids[j];
      const std::int32_t* lo = q.shared ? q.lo : q.lo + qi * cols;
      const std::int32_t* hi = q.shared ? q.hi : q.hi + qi * cols;
      for (std::int64_t c = 0; c < cols; ++c) {
        const double g = static_cast<double>(grad_out[qi * cols + c]);
        const double o = static_cast<double>(out[qi * cols + c]);
        if (g == 0 || !(o > -kInf) || hi[c] <= lo[c]) continue;
        gsum += g;
        const double w = g * std::exp(-o) / z;
        d[lo[c]] += w;
        d[hi[c]] -= w;
      }
    }
    const double u = gsum / z;
    const C* e = sc.e.data();
    for (std::int64_t t = 0; t < v; ++t) dx[t] = static_cast<Out>(-static_cast<double>(e[t]) * u * scale_d);
    // Running sum of d with Neumaier compensation: weights of very different sizes enter and leave.
    double sum = 0, comp = 0;
    for (std::int64_t i = 0; i < m; ++i) {
      const double dv = d[i];
      const double t = sum + dv;
      comp += std::fabs(sum) >= std::fabs(dv) ? (sum - t) + dv : (dv - t) + sum;
      sum = t;
      const std::int32_t id = q.order[i];
      dx[id] = static_cast<Out>(static_cast<double>(e[id]) * ((sum + comp) - u) * scale_d);
    }
    std::fill(dx + v, dx + grad_width, Out(0));
  });
}


}  // namespace
}  // namespace detail

using namespace detail;

template <class Out>
void range_logmass(const Logits& x, const RangeQueries& q, Out* out, Out* lse, int n_threads) {
  check_logits("range_logmass", x);
  check_out_type<Out>("range_logmass", x.type);
  check_queries("range_logmass", x, q);
  range_forward<Compute<Out>, Out>(x, q, out, lse, n_threads);
}

template <class Out>
void range_logmass_backward(const Logits& x, const RangeQueries& q, const Out* out, const Out* lse,
                            const Out* grad_out, Out* grad, std::int64_t grad_width, int n_threads) {
  (void)lse;
  check_logits("range_logmass_backward", x);
  check_out_type<Out>("range_logmass_backward", x.type);
  check_queries("range_logmass_backward", x, q);
  check_grad_width("range_logmass_backward", x, grad_width);
  range_backward<Compute<Out>, Out>(x, q, out, grad_out, grad, grad_width, n_threads);
}

template void range_logmass<float>(const Logits&, const RangeQueries&, float*, float*, int);
template void range_logmass<double>(const Logits&, const RangeQueries&, double*, double*, int);
template void range_logmass_backward<float>(const Logits&, const RangeQueries&, const float*, const float*,
                                            const float*, float*, std::int64_t, int);
template void range_logmass_backward<double>(const Logits&, const RangeQueries&, const double*, const double*,
                                             const double*, double*, std::int64_t, int);

}  // namespace ctalign::kernels
