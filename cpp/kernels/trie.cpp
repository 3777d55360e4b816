// Trie-node conditionals from dense rows (trie_conditional_logprobs): per query, the log mass of each
// child of a trie node over the node's mass, straight from the trie's node arrays (no [Q, children]
// range tables), and its gradient; byte_conditional and project_within run here. Also the compact
// child range tables (compact_child_ranges) for the range kernels.
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

// Sum of e over order positions [lo, hi), in double.
template <class C>
double order_mass(const C* e, const std::int32_t* order, std::int64_t lo, std::int64_t hi) {
  double s = 0;
  for (std::int64_t i = lo; i < hi; ++i) s += static_cast<double>(e[order[i]]);
  return s;
}

// Masses of a query's node: mass[j] for child j (symbol order), *end_mass = [lo, end), *den the
// denominator ([lo, hi) or [end, hi) with drop_end).
template <class C>
void node_masses(const C* e, const TrieQueries& q, std::int64_t v, std::vector<double>& mass, double* end_mass,
                 double* den) {
  const TrieNodes& t = q.trie;
  const std::int64_t c0 = t.child_start[v], n = t.child_start[v + 1] - c0;
  mass.resize(n);
  double kids = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    const std::int32_t c = t.child_node[c0 + j];
    mass[j] = order_mass(e, q.order, t.node_lo[c], t.node_hi[c]);
    kids += mass[j];
  }
  *end_mass = order_mass(e, q.order, t.node_lo[v], t.node_end[v]);
  *den = q.drop_end ? kids : kids + *end_mass;
}

template <class C, class Out>
void trie_forward(const Logits& x, const TrieQueries& q, Out* out, Out* lse, int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  const std::int64_t v = x.vocab_size, width = q.width;
  const C scale = static_cast<C>(1.0 / x.temperature);
  const QueriesByRow byrow = group_queries(x.n_rows, q.rows, q.n_queries);
  for (std::int64_t r = 0; r < x.n_rows; ++r) lse[r] = 0;
  const std::int64_t n_active = static_cast<std::int64_t>(byrow.active_rows.size());
  const int threads = thread_count(n_threads, n_active * v + q.n_queries * width);
  std::vector<RangeScratch<C>> scratch(threads);
  std::vector<std::vector<Out>> logs_of(threads);

  parallel_for(n_active, threads, [&](std::int64_t item, int tid) {
    RangeScratch<C>& sc = scratch[tid];
    std::vector<Out>& logs = logs_of[tid];
    sc.e.resize(v);
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
    }
    for (std::int64_t j = byrow.start[r]; j < byrow.start[r + 1]; ++j) {
      const std::int64_t qi = byrow.ids[j];
      Out* o = out + qi * width;
      if (bad) {
        std::fill(o, o + width, static_cast<Out>(kNaN));
        continue;
      }
      std::fill(o, o + width, static_cast<Out>(-kInf));
      const std::int64_t node = q.nodes[qi];
      double end_mass = 0, den = 0;
      node_masses(sc.e.data(), q, node, sc.mass, &end_mass, &den);
      if (!(den > 0)) continue;  // a node without mass: a row of -inf
      const std::int64_t n = static_cast<std::int64_t>(sc.mass.size());
      sc.mass.push_back(end_mass);
      logs.resize(n + 1);
      log_masses(k, sc.mass.data(), n + 1, den, logs.data());
      const std::int32_t* kids = q.trie.child_node + q.trie.child_start[node];
      for (std::int64_t c = 0; c < n; ++c) o[q.trie.node_symbol[kids[c]]] = logs[c];
      if (!q.drop_end) o[width - 1] = logs[n];
    }
    lse[r] = static_cast<Out>(bad ? kNaN : shift + std::log(z) - kBias<C> * kLn2);
  });
}

// d out[q, j] / d x_t = (e_t / T) (1[t in j] / mass_j - 1[t in den] / mass_den); every t of the
// denominator lies in exactly one output's range, so the gradient is (e_t / T) (g_j / mass_j -
// G / mass_den) with G the summed gradient of the query's outputs that have mass (the others are
// -inf constants). Masses are recomputed from the row as in the forward.
template <class C, class Out>
void trie_backward(const Logits& x, const TrieQueries& q, const Out* grad_out, Out* grad, std::int64_t grad_width,
                   int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  const std::int64_t v = x.vocab_size, width = q.width;
  const double scale_d = 1.0 / x.temperature;
  const C scale = static_cast<C>(scale_d);
  const QueriesByRow byrow = group_queries(x.n_rows, q.rows, q.n_queries);
  const int threads = thread_count(n_threads, x.n_rows * v + q.n_queries * width);
  std::vector<RangeScratch<C>> scratch(threads);

  parallel_for(x.n_rows, threads, [&](std::int64_t r, int tid) {
    Out* dx = grad + r * grad_width;
    std::fill(dx, dx + grad_width, Out(0));
    if (byrow.start[r + 1] == byrow.start[r]) return;
    RangeScratch<C>& sc = scratch[tid];
    sc.e.resize(v);
    const char* row = row_ptr(x, r);
    RowStats<C> st;
    k.stats(row, v, scale, &st);
    if (row_is_bad(st.max, st.min, st.nan)) {
      std::fill(dx, dx + grad_width, static_cast<Out>(kNaN));
      return;
    }
    const Shift<C> sh = row_shift(k, row, v, scale, st.max);
    k.exp_store(row, v, scale, sh.offset, sh.shift, sc.e.data());
    const C* e = sc.e.data();
    for (std::int64_t j = byrow.start[r]; j < byrow.start[r + 1]; ++j) {
      const std::int64_t qi = byrow.ids[j];
      const Out* g = grad_out + qi * width;
      const std::int64_t node = q.nodes[qi];
      double end_mass = 0, den = 0;
      node_masses(e, q, node, sc.mass, &end_mass, &den);
      if (!(den > 0)) continue;
      const std::int32_t* kids = q.trie.child_node + q.trie.child_start[node];
      const std::int64_t n = static_cast<std::int64_t>(sc.mass.size());
      const double g_end = q.drop_end ? 0.0 : static_cast<double>(g[width - 1]);
      double gsum = end_mass > 0 ? g_end : 0.0;
      for (std::int64_t c = 0; c < n; ++c) {
        if (sc.mass[c] > 0) gsum += static_cast<double>(g[q.trie.node_symbol[kids[c]]]);
      }
      const double u = gsum / den;
      auto add = [&](std::int64_t lo, std::int64_t hi, double coef) {
        const double w = (coef - u) * scale_d;
        for (std::int64_t i = lo; i < hi; ++i) {
          const std::int32_t id = q.order[i];
          dx[id] = static_cast<Out>(static_cast<double>(dx[id]) + static_cast<double>(e[id]) * w);
        }
      };
      if (!q.drop_end) add(q.trie.node_lo[node], q.trie.node_end[node], end_mass > 0 ? g_end / end_mass : 0.0);
      for (std::int64_t c = 0; c < n; ++c) {
        const std::int32_t child = kids[c];
        const double coef = sc.mass[c] > 0 ? static_cast<double>(g[q.trie.node_symbol[child]]) / sc.mass[c] : 0.0;
        add(q.trie.node_lo[child], q.trie.node_hi[child], coef);
      }
    }
  });
}

}  // namespace
}  // namespace detail

using namespace detail;

template <class Out>
void trie_conditional_logprobs(const Logits& x, const TrieQueries& q, Out* out, Out* lse, int n_threads) {
  check_logits("trie_conditional_logprobs", x);
  check_out_type<Out>("trie_conditional_logprobs", x.type);
  check_trie_queries("trie_conditional_logprobs", x, q);
  trie_forward<Compute<Out>, Out>(x, q, out, lse, n_threads);
}

template <class Out>
void trie_conditional_logprobs_backward(const Logits& x, const TrieQueries& q, const Out* grad_out, Out* grad,
                                        std::int64_t grad_width, int n_threads) {
  check_logits("trie_conditional_logprobs_backward", x);
  check_out_type<Out>("trie_conditional_logprobs_backward", x.type);
  check_trie_queries("trie_conditional_logprobs_backward", x, q);
  check_grad_width("trie_conditional_logprobs_backward", x, grad_width);
  trie_backward<Compute<Out>, Out>(x, q, grad_out, grad, grad_width, n_threads);
}

template void trie_conditional_logprobs<float>(const Logits&, const TrieQueries&, float*, float*, int);
template void trie_conditional_logprobs<double>(const Logits&, const TrieQueries&, double*, double*, int);
template void trie_conditional_logprobs_backward<float>(const Logits&, const TrieQueries&, const float*, float*,
                                                        std::int64_t, int);
template void trie_conditional_logprobs_backward<double>(const Logits&, const TrieQueries&, const double*, double*,
                                                         std::int64_t, int);

std::int64_t max_children(const TrieNodes& t, const std::int64_t* nodes, std::int64_t q) {
  std::int64_t k = 0;
  for (std::int64_t i = 0; i < q; ++i) {
    const std::int64_t v = nodes[i];
    if (v < 0 || v >= t.n_nodes) {
      throw InputError("trie node " + std::to_string(v) + " at position " + std::to_string(i) + " is outside [0, " +
                       std::to_string(t.n_nodes) + ")");
    }
    k = std::max<std::int64_t>(k, t.child_start[v + 1] - t.child_start[v]);
  }
  return k;
}

void compact_child_ranges(const TrieNodes& t, const std::int64_t* nodes, std::int64_t q, std::int64_t k,
                          std::int64_t filler, std::int32_t* lo, std::int32_t* hi, std::int64_t* symbol) {
  if (max_children(t, nodes, q) > k) throw InputError("compact_child_ranges: k is below the most children");
  const std::int64_t cols = k + 3;
  for (std::int64_t i = 0; i < q; ++i) {
    const std::int64_t v = nodes[i];
    std::int32_t* l = lo + i * cols;
    std::int32_t* h = hi + i * cols;
    std::int64_t* sym = symbol + i * k;
    const std::int64_t c0 = t.child_start[v], n = t.child_start[v + 1] - c0;
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int32_t child = t.child_node[c0 + j];
      l[j] = t.node_lo[child];
      h[j] = t.node_hi[child];
      sym[j] = t.node_symbol[child];
    }
    for (std::int64_t j = n; j < k; ++j) {
      l[j] = h[j] = 0;
      sym[j] = filler;
    }
    l[k] = t.node_lo[v];
    h[k] = t.node_end[v];
    l[k + 1] = t.node_lo[v];
    h[k + 1] = t.node_hi[v];
    l[k + 2] = t.node_end[v];
    h[k + 2] = t.node_hi[v];
  }
}

}  // namespace ctalign::kernels
