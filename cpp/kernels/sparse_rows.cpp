// Sparse rows (kernel contract 3: TopK rows of k kept entries, used as given): the grouped masses
// (topk_grouped_logmass, topk_grouped_sparse), and the sparse outputs of the trie conditionals and of
// cover_logmass (topk_trie_sparse, topk_cover_sparse). O(k log k) a row; the entries are validated
// row by row, and the lowest failing row is the one reported.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/checks.h"
#include "kernels/common.h"
#include "kernels/row_kernels.h"
#include "kernels/simd_traits.h"
#include "kernels/threads.h"
#include "projection_kernels.h"

namespace ctalign::kernels {
namespace detail {
namespace {

template <class T>
double logprob_at(const void* p, std::int64_t i) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<const double*>(p)[i];
  } else {
    return simd::to_float(static_cast<const T*>(p)[i]);
  }
}

// Detects a token id listed twice in a row: open addressing over a power-of-two table >= 2k slots.
class DuplicateFinder {
 public:
  // True when some id occurs twice in ids[0:k); sets `which` to it.
  bool any(const std::int64_t* ids, std::int64_t k, std::int64_t* which) {
    std::size_t cap = 16;
    while (cap < static_cast<std::size_t>(2 * k)) cap <<= 1;
    slots_.assign(cap, -1);
    const std::size_t mask = cap - 1;
    for (std::int64_t j = 0; j < k; ++j) {
      std::size_t h = static_cast<std::size_t>(static_cast<std::uint64_t>(ids[j]) * 0x9E3779B97F4A7C15ull >> 20) & mask;
      while (slots_[h] >= 0) {
        if (slots_[h] == ids[j]) {
          *which = ids[j];
          return true;
        }
        h = (h + 1) & mask;
      }
      slots_[h] = ids[j];
    }
    return false;
  }

 private:
  std::vector<std::int64_t> slots_;
};

// Row r's entries as probabilities p[j] (ids are x.indices[r]), validated; tempered as described
// in the header. C: float for float outputs, double for fp64 log-probabilities.
template <class T, class C>
void sparse_row(const RowKernels<C>& kern, const TopKRows& x, std::int64_t r, DuplicateFinder& dup, std::vector<C>& p) {
  const std::int64_t k = x.k;
  const std::int64_t* ids = x.indices + r * k;
  p.resize(k);
  double mx = -kInf;
  bool bad = false;
  for (std::int64_t j = 0; j < k; ++j) {
    const double lp = logprob_at<T>(x.logprobs, r * k + j);
    bad |= std::isnan(lp) || lp == kInf || ids[j] < 0 || ids[j] >= x.vocab_size;
    p[j] = static_cast<C>(lp);
    mx = lp > mx ? lp : mx;
  }
  if (bad) {
    for (std::int64_t j = 0; j < k; ++j) {
      const double lp = logprob_at<T>(x.logprobs, r * k + j);
      if (std::isnan(lp) || lp == kInf) {
        throw InputError("TopK row " + std::to_string(r) + " holds NaN or +inf log-probabilities");
      }
      if (ids[j] < 0 || ids[j] >= x.vocab_size) {
        throw InputError("TopK row " + std::to_string(r) + ": index " + std::to_string(ids[j]) +
                         " is not a token id (vocabulary of " + std::to_string(x.vocab_size) + ")");
      }
    }
  }
  std::int64_t twice = 0;
  if (dup.any(ids, k, &twice)) {
    throw InputError("TopK row " + std::to_string(r) + " lists token id " + std::to_string(twice) + " more than once");
  }
  if (x.temperature != 1.0 && mx > -kInf) {
    const double inv_t = 1.0 / x.temperature;
    double s1 = 0, st = 0;
    for (std::int64_t j = 0; j < k; ++j) {
      const double lp = logprob_at<T>(x.logprobs, r * k + j);
      s1 += ScalarOf<C>::exp(static_cast<C>(lp - mx), 0);
      st += ScalarOf<C>::exp(static_cast<C>((lp - mx) * inv_t), 0);
    }
    const double shift = std::log(s1) - std::log(st);  // lp_T = (lp - mx) / T + log s1 - log st + mx
    for (std::int64_t j = 0; j < k; ++j) {
      p[j] = static_cast<C>((logprob_at<T>(x.logprobs, r * k + j) - mx) * inv_t + shift + mx);
    }
  }
  kern.exp_n(p.data(), k, p.data());
}

// Runs fn(r, tid) for each row in parallel, rethrowing the error of the lowest failing row.
template <class Fn>
void sparse_rows_for(std::int64_t n_items, int threads, Fn&& fn) {
  std::mutex m;
  std::int64_t bad_row = -1;
  std::string message;
  parallel_for(n_items, threads, [&](std::int64_t item, int tid) {
    try {
      fn(item, tid);
    } catch (const InputError& e) {
      std::lock_guard<std::mutex> lock(m);
      if (bad_row < 0 || item < bad_row) {
        bad_row = item;
        message = e.what();
      }
    }
  });
  if (bad_row >= 0) throw InputError(message);
}

template <class C>
struct SparseScratch {
  DuplicateFinder dup;
  std::vector<std::int64_t> keys;
  std::vector<C> p, mass;
  std::vector<std::int32_t> touched;
  std::vector<double> acc;
};

template <class T, class Out>
void topk_grouped_impl(const TopKRows& x, const std::int32_t* group, std::int32_t n_groups, Out* out, int n_threads) {
  const RowKernels<Out> kern = row_kernels<Out>(std::is_same_v<Out, double> ? ElemType::f64 : ElemType::f32);
  // Threads only pay off for large calls: a row costs well under a microsecond.
  const int threads = thread_count(n_threads, (x.n_rows * (x.k * 16 + n_groups)) >> 4);
  std::vector<SparseScratch<Out>> scratch(threads);
  sparse_rows_for(x.n_rows, threads, [&](std::int64_t r, int tid) {
    SparseScratch<Out>& sc = scratch[tid];
    sc.acc.resize(n_groups, 0.0);
    sparse_row<T, Out>(kern, x, r, sc.dup, sc.p);
    const std::int64_t* ids = x.indices + r * x.k;
    sc.touched.clear();
    for (std::int64_t j = 0; j < x.k; ++j) {  // the table is checked where it is read (O(k), not O(V))
      const std::int32_t g = group[ids[j]];
      if (g < 0 || g >= n_groups) bad_table("topk_grouped_logmass", "group", ids[j], g);
      if (sc.p[j] > 0) {
        if (sc.acc[g] == 0) sc.touched.push_back(g);
        sc.acc[g] += static_cast<double>(sc.p[j]);
      }
    }
    sc.mass.resize(sc.touched.size());
    for (std::size_t i = 0; i < sc.touched.size(); ++i) {
      sc.mass[i] = static_cast<Out>(sc.acc[sc.touched[i]]);
      sc.acc[sc.touched[i]] = 0;
    }
    kern.log_n(sc.mass.data(), static_cast<std::int64_t>(sc.mass.size()), sc.mass.data());
    Out* o = out + r * n_groups;
    std::fill(o, o + n_groups, static_cast<Out>(-kInf));
    for (std::size_t i = 0; i < sc.touched.size(); ++i) o[sc.touched[i]] = sc.mass[i];
  });
}

// Sparse output padding: slots [used, width) get the smallest ids not among row_ids[0, used)
// (sorted), so a row's ids stay distinct, with -inf values.
template <class Out>
void pad_unused_ids(std::int64_t* row_ids, Out* row_out, std::int64_t used, std::int64_t width) {
  std::int64_t next = 0, taken = 0;
  for (std::int64_t slot = used; slot < width; ++slot) {
    while (taken < used && row_ids[taken] < next) ++taken;
    while (taken < used && row_ids[taken] == next) {
      ++next;
      ++taken;
    }
    row_ids[slot] = next++;
    row_out[slot] = static_cast<Out>(-kInf);
  }
}

template <class T, class Out>
void topk_grouped_sparse_impl(const TopKRows& x, const std::int32_t* group, std::int32_t n_groups, std::int64_t* ids,
                              Out* out, int n_threads) {
  const RowKernels<Out> kern = row_kernels<Out>(std::is_same_v<Out, double> ? ElemType::f64 : ElemType::f32);
  const std::int64_t width = std::min<std::int64_t>(x.k, n_groups);
  // A row costs about a microsecond (k = 64): a second thread pays off from a few hundred rows.
  const int threads = thread_count(n_threads, x.n_rows * x.k * 8);
  std::vector<SparseScratch<Out>> scratch(threads);
  sparse_rows_for(x.n_rows, threads, [&](std::int64_t r, int tid) {
    SparseScratch<Out>& sc = scratch[tid];
    sparse_row<T, Out>(kern, x, r, sc.dup, sc.p);
    const std::int64_t* tok = x.indices + r * x.k;
    // Keys (group << 32 | entry), sorted: the row's entries grouped, groups in increasing id order.
    sc.keys.resize(static_cast<std::size_t>(x.k));
    for (std::int64_t j = 0; j < x.k; ++j) {
      sc.keys[j] = static_cast<std::int64_t>(static_cast<std::uint64_t>(group[tok[j]]) << 32 | static_cast<std::uint64_t>(j));
    }
    for (std::int64_t j = 0; j < x.k; ++j) {
      const std::int64_t g = sc.keys[j] >> 32;
      if (g < 0 || g >= n_groups) bad_table("topk_grouped_sparse", "group", tok[j], g);
    }
    std::sort(sc.keys.begin(), sc.keys.end());
    std::int64_t* row_ids = ids + r * width;
    sc.mass.clear();
    for (std::size_t i = 0; i < sc.keys.size();) {
      const std::int64_t g = sc.keys[i] >> 32;
      double m = 0;
      for (; i < sc.keys.size() && (sc.keys[i] >> 32) == g; ++i) m += static_cast<double>(sc.p[sc.keys[i] & 0xffffffff]);
      row_ids[sc.mass.size()] = g;
      sc.mass.push_back(static_cast<Out>(m));
    }
    const std::int64_t used = static_cast<std::int64_t>(sc.mass.size());
    kern.log_n(sc.mass.data(), used, sc.mass.data());  // log 0 = -inf
    Out* row_out = out + r * width;
    std::copy(sc.mass.begin(), sc.mass.end(), row_out);
    pad_unused_ids(row_ids, row_out, used, width);
  });
}


// A sparse output row from (column, mass) items: equal columns summed, columns in increasing order
// with log(mass / den) (-inf without mass; den <= 0: all -inf), then padding ids (the smallest unused
// columns) at -inf up to `width`. Items are sorted in place.
template <class Out>
void emit_sparse_row(std::vector<std::pair<std::int64_t, double>>& items, double den, std::int64_t width,
                     std::int64_t* row_ids, Out* row_out) {
  std::sort(items.begin(), items.end(),
            [](const std::pair<std::int64_t, double>& a, const std::pair<std::int64_t, double>& b) { return a.first < b.first; });
  const double log_den = den > 0 ? std::log(den) : kInf;
  std::int64_t used = 0;
  for (std::size_t i = 0; i < items.size();) {
    const std::int64_t col = items[i].first;
    double m = 0;
    for (; i < items.size() && items[i].first == col; ++i) m += items[i].second;
    row_ids[used] = col;
    row_out[used] = static_cast<Out>(m > 0 && den > 0 ? std::log(m) - log_den : -kInf);
    ++used;
  }
  pad_unused_ids(row_ids, row_out, used, width);
}

// Sparse rows, trie-node conditionals with sparse output (the torch path in ops.py,
// _topk_trie_conditional(sparse=True), gives the same ids in the same order).
template <class T, class Out>
void topk_trie_sparse_impl(const TopKRows& x, const std::int32_t* rank, const std::int32_t* first_symbol,
                           const TrieQueries& q, std::int64_t* ids, Out* out, int n_threads) {
  // Probabilities in double whatever the output type: a conditional is a ratio, defined however small
  // its masses (float e^lp would drop entries below e^-87).
  const RowKernels<double> kern = row_kernels<double>(ElemType::f64);
  const std::int64_t width = std::min<std::int64_t>(x.k, q.width);
  const std::int64_t n_sym = q.drop_end ? q.width : q.width - 1;
  const TrieNodes& t = q.trie;
  const QueriesByRow byrow = group_queries(x.n_rows, q.rows, q.n_queries);
  const std::int64_t n_active = static_cast<std::int64_t>(byrow.active_rows.size());
  const int threads = thread_count(n_threads, q.n_queries * x.k * 8);
  struct Scratch {
    DuplicateFinder dup;
    std::vector<double> p;
    std::vector<std::pair<std::int64_t, double>> items;
  };
  std::vector<Scratch> scratch(threads);
  sparse_rows_for(n_active, threads, [&](std::int64_t item, int tid) {
    Scratch& sc = scratch[tid];
    const std::int64_t r = byrow.active_rows[item];
    sparse_row<T, double>(kern, x, r, sc.dup, sc.p);  // the row's probabilities, once for all its queries
    const std::int64_t* tok = x.indices + r * x.k;
    for (std::int64_t jq = byrow.start[r]; jq < byrow.start[r + 1]; ++jq) {
      const std::int64_t qi = byrow.ids[jq], v = q.nodes[qi];
      const std::int64_t lo = t.node_lo[v], end = t.node_end[v], hi = t.node_hi[v];
      const std::int32_t* kids = t.child_node + t.child_start[v];
      const std::int64_t n_kids = t.child_start[v + 1] - t.child_start[v];
      sc.items.clear();
      double den = 0;
      for (std::int64_t j = 0; j < x.k; ++j) {
        const std::int64_t pos = rank[tok[j]];
        if (pos < -1 || pos >= q.order_size) bad_table("topk_trie_sparse", "rank", tok[j], pos);
        if (pos < lo || pos >= hi || (q.drop_end && pos < end)) continue;
        std::int64_t col = q.width - 1;  // the end column
        if (pos >= end && v == 0 && first_symbol != nullptr) {  // at the root: the token's first symbol
          col = first_symbol[tok[j]];
          if (col < 0 || col >= n_sym) bad_table("topk_trie_sparse", "first_symbol", tok[j], col);
        } else if (pos >= end) {  // the child whose range holds pos: the last one starting at or before it
          std::int64_t a = 0, b = n_kids;
          while (b - a > 1) {
            const std::int64_t m = (a + b) / 2;
            if (kids[m] < 0 || kids[m] >= t.n_nodes) bad_table("topk_trie_sparse", "child_node", v, kids[m]);
            if (t.node_lo[kids[m]] <= pos) a = m; else b = m;
          }
          if (n_kids == 0 || kids[a] < 0 || kids[a] >= t.n_nodes) bad_table("topk_trie_sparse", "child_node", v, n_kids);
          col = t.node_symbol[kids[a]];
          if (col < 0 || col >= n_sym) bad_table("topk_trie_sparse", "node_symbol", kids[a], col);
        }
        const double pj = static_cast<double>(sc.p[j]);
        sc.items.emplace_back(col, pj);
        den += pj;
      }
      emit_sparse_row<Out>(sc.items, den, width, ids + qi * width, out + qi * width);
    }
  });
}

// Sparse rows, cover log masses with sparse output: each entry reaches the students listed for its
// position (students[ptr[pos] : ptr[pos + 1]]); a row's (student, mass) pairs merged and sorted, kept
// per row until the widest row is known.
template <class T, class Out>
void topk_cover_sparse_impl(const TopKRows& x, const std::int32_t* rank, std::int64_t order_size,
                            const std::int64_t* ptr, const std::int64_t* students, std::int64_t n_entries,
                            std::int64_t n_students, SparseCover& result, int n_threads) {
  const RowKernels<double> kern = row_kernels<double>(ElemType::f64);  // masses down to e^-708, as given
  const int threads = thread_count(n_threads, x.n_rows * x.k * 32);
  struct Scratch {
    DuplicateFinder dup;
    std::vector<double> p;
  };
  std::vector<Scratch> scratch(threads);
  result.rows.assign(static_cast<std::size_t>(x.n_rows), {});
  sparse_rows_for(x.n_rows, threads, [&](std::int64_t r, int tid) {
    Scratch& sc = scratch[tid];
    sparse_row<T, double>(kern, x, r, sc.dup, sc.p);
    const std::int64_t* tok = x.indices + r * x.k;
    std::vector<std::pair<std::int64_t, double>>& items = result.rows[r];
    for (std::int64_t j = 0; j < x.k; ++j) {
      const std::int64_t pos = rank[tok[j]];
      if (pos < -1 || pos >= order_size) bad_table("topk_cover_sparse", "rank", tok[j], pos);
      if (pos < 0) continue;
      const std::int64_t a = ptr[pos], b = ptr[pos + 1];
      if (a < 0 || b < a || b > n_entries) bad_table("topk_cover_sparse", "ptr", pos, b);
      for (std::int64_t e = a; e < b; ++e) {
        if (students[e] < 0 || students[e] >= n_students) bad_table("topk_cover_sparse", "students", e, students[e]);
        items.emplace_back(students[e], static_cast<double>(sc.p[j]));
      }
    }
    std::sort(items.begin(), items.end());
    std::size_t u = 0;
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (u > 0 && items[u - 1].first == items[i].first) {
        items[u - 1].second += items[i].second;
      } else {
        items[u++] = items[i];
      }
    }
    items.resize(u);
  });
  result.width = 0;
  for (const auto& row : result.rows) result.width = std::max<std::int64_t>(result.width, static_cast<std::int64_t>(row.size()));
}

template <class Out, class Fn>
void dispatch_sparse(ElemType type, Fn&& fn) {
  if constexpr (std::is_same_v<Out, double>) {
    if (type != ElemType::f64) throw InputError("sparse rows: double outputs need fp64 log-probabilities");
    fn(double());
  } else {
    switch (type) {
      case ElemType::f32: fn(float()); break;
      case ElemType::bf16: fn(bf16_t()); break;
      case ElemType::f16: fn(f16_t()); break;
      default: throw InputError("sparse rows: fp64 log-probabilities need double outputs");
    }
  }
}

}  // namespace
}  // namespace detail

using namespace detail;

template <class Out>
void topk_grouped_logmass(const TopKRows& x, const std::int32_t* group, std::int32_t n_groups, Out* out, int n_threads) {
  check_topk("topk_grouped_logmass", x);
  if (n_groups < 1) throw InputError("topk_grouped_logmass: n_groups must be at least 1");
  dispatch_sparse<Out>(x.type, [&](auto t) { topk_grouped_impl<decltype(t), Out>(x, group, n_groups, out, n_threads); });
}

template <class Out>
void topk_grouped_sparse(const TopKRows& x, const std::int32_t* group, std::int32_t n_groups, std::int64_t* ids,
                         Out* out, int n_threads) {
  check_topk("topk_grouped_sparse", x);
  if (n_groups < 1) throw InputError("topk_grouped_sparse: n_groups must be at least 1");
  dispatch_sparse<Out>(x.type,
                       [&](auto t) { topk_grouped_sparse_impl<decltype(t), Out>(x, group, n_groups, ids, out, n_threads); });
}

template void topk_grouped_logmass<float>(const TopKRows&, const std::int32_t*, std::int32_t, float*, int);
template void topk_grouped_logmass<double>(const TopKRows&, const std::int32_t*, std::int32_t, double*, int);
template void topk_grouped_sparse<float>(const TopKRows&, const std::int32_t*, std::int32_t, std::int64_t*, float*,
                                          int);
template void topk_grouped_sparse<double>(const TopKRows&, const std::int32_t*, std::int32_t, std::int64_t*, double*,
                                           int);

template <class Out>
void topk_trie_sparse(const TopKRows& x, const std::int32_t* rank, const std::int32_t* first_symbol,
                      const TrieQueries& q, std::int64_t* ids, Out* out, int n_threads) {
  check_topk("topk_trie_sparse", x);
  Logits shape;
  shape.n_rows = x.n_rows;
  shape.vocab_size = x.vocab_size;
  check_trie_queries("topk_trie_sparse", shape, q, /*whole_tables=*/false);
  dispatch_sparse<Out>(x.type,
                       [&](auto t) { topk_trie_sparse_impl<decltype(t), Out>(x, rank, first_symbol, q, ids, out, n_threads); });
}

template <class Out>
void topk_cover_sparse(const TopKRows& x, const std::int32_t* rank, std::int64_t order_size, const std::int64_t* ptr,
                       const std::int64_t* students, std::int64_t n_entries, std::int64_t n_students,
                       SparseCover& result, int n_threads) {
  check_topk("topk_cover_sparse", x);
  dispatch_sparse<Out>(x.type, [&](auto t) {
    topk_cover_sparse_impl<decltype(t), Out>(x, rank, order_size, ptr, students, n_entries, n_students, result,
                                             n_threads);
  });
}

template <class Out>
void write_sparse_rows(SparseCover& rows, std::int64_t* ids, Out* out) {
  const std::int64_t width = rows.width;
  for (std::size_t r = 0; r < rows.rows.size(); ++r) {
    emit_sparse_row<Out>(rows.rows[r], 1.0, width, ids + static_cast<std::int64_t>(r) * width,
                         out + static_cast<std::int64_t>(r) * width);
  }
}

template void topk_trie_sparse<float>(const TopKRows&, const std::int32_t*, const std::int32_t*, const TrieQueries&,
                                      std::int64_t*, float*, int);
template void topk_trie_sparse<double>(const TopKRows&, const std::int32_t*, const std::int32_t*, const TrieQueries&,
                                       std::int64_t*, double*, int);
template void topk_cover_sparse<float>(const TopKRows&, const std::int32_t*, std::int64_t, const std::int64_t*,
                                       const std::int64_t*, std::int64_t, std::int64_t, SparseCover&, int);
template void topk_cover_sparse<double>(const TopKRows&, const std::int32_t*, std::int64_t, const std::int64_t*,
                                        const std::int64_t*, std::int64_t, std::int64_t, SparseCover&, int);
template void write_sparse_rows<float>(SparseCover&, std::int64_t*, float*);
template void write_sparse_rows<double>(SparseCover&, std::int64_t*, double*);

}  // namespace ctalign::kernels
