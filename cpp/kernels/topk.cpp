// Top-k of dense rows (kernel contract 4, topk_logprobs): the k largest columns of logits rows with
// their log-probabilities (softmax fused), and its gradient. Two passes per row: max and e^x summed,
// then candidates from the chunks by decreasing max (projection_kernels.h: costs).
// Row primitives: row_kernels.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
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

// Candidates of one row as (value, id), ranked by value, then smaller id first.
template <class C>
struct Ranked {
  C value;
  std::int64_t id;
  bool operator<(const Ranked& o) const { return value > o.value || (value == o.value && id < o.id); }
};

// A thread's buffers for topk_row, reused from row to row.
template <class C>
struct TopKScratch {
  std::vector<Ranked<C>> cand;          // candidates (value, id)
  std::vector<C> e = std::vector<C>(kChunk);  // one chunk's e^x (the sum is what is kept)
  std::vector<C> chunk_max;             // each chunk's raw max
  std::vector<std::int32_t> visit;      // chunks in the order pass 2 visits them
};

template <class T, class C, class Out>
void topk_row(const RowKernels<C>& k, const Logits& x, std::int64_t r, std::int64_t slot, std::int64_t top, C scale,
              TopKScratch<C>& sc, std::int64_t* ids, Out* out, Out* lse) {
  const std::int64_t v = x.vocab_size;
  const T* row = reinterpret_cast<const T*>(row_ptr(x, r));
  const std::size_t cap = static_cast<std::size_t>(std::max<std::int64_t>(2 * top, 128));
  std::vector<Ranked<C>>& cand = sc.cand;
  cand.clear();
  // kth, kth_id: the top-th candidate (once `cand` was cut to top). A column ranks above it when its
  // value is larger, or equal with a smaller id; columns ranking below it can never enter the top.
  bool have_kth = false;
  C kth = -std::numeric_limits<C>::infinity();
  std::int64_t kth_id = 0;
  auto cut = [&] {
    std::nth_element(cand.begin(), cand.begin() + (top - 1), cand.end());
    cand.resize(static_cast<std::size_t>(top));
    kth = cand[static_cast<std::size_t>(top - 1)].value;
    kth_id = cand[static_cast<std::size_t>(top - 1)].id;
    have_kth = true;
  };
  auto push = [&](std::int64_t i) {
    cand.push_back({ScalarOf<C>::load(row + i), i});
    if (cand.size() >= cap) cut();
  };
  // Pass 1 (streaming): per chunk the max, then e^x summed; each chunk's raw max is kept.
  const std::int64_t n_chunks = (v + kChunk - 1) / kChunk;
  std::vector<C>& chunk_max = sc.chunk_max;
  chunk_max.resize(static_cast<std::size_t>(n_chunks));
  Shift<C> sh;
  double z = 0;
  bool bad = false;
  for (std::int64_t c = 0; c < n_chunks; ++c) {
    const std::int64_t c0 = c * kChunk, n = std::min(kChunk, v - c0);
    RowStats<C> st;
    k.stats(row + c0, n, C(1), &st);
    if (st.nan || st.max * scale == std::numeric_limits<C>::infinity()) {  // -inf columns are fine: no mass
      bad = true;
      break;
    }
    chunk_max[static_cast<std::size_t>(c)] = st.max;
    double f = 0;
    if (st.max > -std::numeric_limits<C>::infinity() &&
        move_shift(sh, static_cast<C>(st.max * scale), scale, kLead, kSlack, [&] { return st.max; }, &f)) {
      z *= f;
    }
    if (sh.total > -kInf) z += k.exp_store(row + c0, n, scale, sh.offset, sh.shift, sc.e.data());  // else all -inf
  }
  // Pass 2 (the row is likely still in L2 or L3): candidates, chunks by decreasing max. The first
  // chunks set a high k-th value, so most others are scanned without a push, and the pass stops at
  // the first chunk whose max is below it (in id order, a row rising along its ids pushed every
  // column). Ties with kth before kth_id are found with >=, not > nextafter(kth): with subnormals
  // flushed to zero (torch.set_flush_denormal), nextafter(0, -inf) compares equal to 0.
  if (!bad) {
    std::vector<std::int32_t>& visit = sc.visit;
    visit.resize(static_cast<std::size_t>(n_chunks));
    for (std::int64_t c = 0; c < n_chunks; ++c) visit[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(c);
    std::sort(visit.begin(), visit.end(), [&](std::int32_t a, std::int32_t b) {
      return chunk_max[a] > chunk_max[b] || (chunk_max[a] == chunk_max[b] && a < b);
    });
    for (const std::int32_t c : visit) {
      const std::int64_t c0 = c * kChunk, end = std::min(v, c0 + kChunk);
      if (have_kth && chunk_max[c] < kth) break;  // and so are the chunks after it
      if (have_kth && chunk_max[c] == kth && c0 >= kth_id) continue;  // ties after kth_id rank below it
      for (std::int64_t i = c0; i < end;) {
        if (!have_kth) {
          push(i++);
          continue;
        }
        const bool before = i < kth_id;  // here a tie with kth ranks above it
        const std::int64_t stop = before ? std::min(end, kth_id) : end;
        i += (before ? k.first_at_least : k.first_above)(row + i, stop - i, kth);
        if (i < stop) push(i++);
      }
    }
  }
  std::int64_t* id = ids + slot * top;
  Out* o = out + slot * top;
  if (bad || !(z > 0) || !std::isfinite(z)) {
    for (std::int64_t j = 0; j < top; ++j) {
      id[j] = j;
      o[j] = static_cast<Out>(kNaN);
    }
    lse[slot] = static_cast<Out>(kNaN);
    return;
  }
  if (cand.size() > static_cast<std::size_t>(top)) cut();
  std::sort(cand.begin(), cand.end());
  // out = (x - offset) * scale - (lse - offset * scale): x - offset is exact in double, so split shifts
  // (huge x * scale) keep the top tokens' log-probabilities exact too.
  const double log_rel = static_cast<double>(sh.shift) + std::log(z) - kBias<C> * kLn2;
  const double off = static_cast<double>(sh.offset);
  for (std::int64_t j = 0; j < top; ++j) {
    id[j] = cand[static_cast<std::size_t>(j)].id;
    o[j] = static_cast<Out>((static_cast<double>(cand[static_cast<std::size_t>(j)].value) - off) *
                                static_cast<double>(scale) - log_rel);
  }
  lse[slot] = static_cast<Out>(sh.total - static_cast<double>(sh.shift) + log_rel);
}

template <class C, class Out>
void topk_forward(const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t top, std::int64_t* ids,
                  Out* out, Out* lse, int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  const C scale = static_cast<C>(1.0 / x.temperature);
  const std::int64_t rows_per_item = std::max<std::int64_t>(1, kRowsWork / x.vocab_size);
  const std::int64_t n_items = (n_out + rows_per_item - 1) / rows_per_item;
  const int threads = thread_count(n_threads, n_out * x.vocab_size);
  std::vector<TopKScratch<C>> scratch_of(threads);
  parallel_for(n_items, threads, [&](std::int64_t item, int tid) {
    const std::int64_t i_end = std::min(n_out, (item + 1) * rows_per_item);
    for (std::int64_t i = item * rows_per_item; i < i_end; ++i) {
      const std::int64_t r = rows ? rows[i] : i;
      if constexpr (std::is_same_v<C, double>) {
        topk_row<double, C, Out>(k, x, r, i, top, scale, scratch_of[tid], ids, out, lse);
      } else if (x.type == ElemType::bf16) {
        topk_row<bf16_t, C, Out>(k, x, r, i, top, scale, scratch_of[tid], ids, out, lse);
      } else if (x.type == ElemType::f16) {
        topk_row<f16_t, C, Out>(k, x, r, i, top, scale, scratch_of[tid], ids, out, lse);
      } else {
        topk_row<float, C, Out>(k, x, r, i, top, scale, scratch_of[tid], ids, out, lse);
      }
    }
  });
}

// The softmax's gradient, one e^x per element: grouped_grad with every column in group 0, a = lse,
// c = -(sum of the row's grad_out), then + grad_out / T at the kept ids. Per logits row, over all the
// outputs that read it (rows may repeat); rows no output reads get zeros.
template <class C, class Out>
void topk_backward(const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t top,
                   const std::int64_t* ids, const Out* lse, const Out* grad_out, Out* grad, std::int64_t grad_width,
                   int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  const C scale = static_cast<C>(1.0 / x.temperature);
  const std::int64_t v = x.vocab_size;
  const std::int64_t esize = static_cast<std::int64_t>(elem_size(x.type));
  const QueriesByRow by_row = group_queries(x.n_rows, rows, n_out);
  const std::vector<std::int32_t> group0(kChunk, 0);
  const int threads = thread_count(n_threads, x.n_rows * v);
  std::vector<std::vector<C>> dx_of(threads, std::vector<C>(kChunk)), buf_of(threads);
  parallel_for(x.n_rows, threads, [&](std::int64_t r, int tid) {
    Out* o = grad + r * grad_width;
    const std::int64_t q0 = by_row.start[r], q1 = by_row.start[r + 1];
    if (q0 == q1) {
      std::fill(o, o + grad_width, Out(0));
      return;
    }
    double g_sum = 0;
    for (std::int64_t q = q0; q < q1; ++q) {
      const Out* g = grad_out + by_row.ids[q] * top;
      for (std::int64_t j = 0; j < top; ++j) g_sum += static_cast<double>(g[j]);
    }
    const auto ref = grad_reference<C>(k, x, r, scale, static_cast<double>(lse[by_row.ids[q0]]), buf_of[tid]);
    const C a = static_cast<C>(ref.second), c = static_cast<C>(-g_sum);
    const char* row = row_ptr(x, r);
    C* dx = dx_of[tid].data();
    for (std::int64_t c0 = 0; c0 < v; c0 += kChunk) {
      const std::int64_t n = std::min(kChunk, v - c0);
      k.grouped_grad(row + c0 * esize, n, scale, ref.first, group0.data(), &a, &c, dx);
      std::copy(dx, dx + n, o + c0);
    }
    std::fill(o + v, o + grad_width, Out(0));
    for (std::int64_t q = q0; q < q1; ++q) {
      const std::int64_t i = by_row.ids[q];
      for (std::int64_t j = 0; j < top; ++j) {
        o[ids[i * top + j]] += static_cast<Out>(scale * static_cast<C>(grad_out[i * top + j]));
      }
    }
  });
}

}  // namespace
}  // namespace detail

using namespace detail;

template <class Out>
void topk_logprobs(const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t k, std::int64_t* ids,
                   Out* out, Out* lse, int n_threads) {
  check_logits("topk_logprobs", x);
  check_out_type<Out>("topk_logprobs", x.type);
  check_topk_rows("topk_logprobs", x, rows, n_out, k);
  topk_forward<Compute<Out>, Out>(x, rows, n_out, k, ids, out, lse, n_threads);
}

template <class Out>
void topk_logprobs_backward(const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t k,
                            const std::int64_t* ids, const Out* lse, const Out* grad_out, Out* grad,
                            std::int64_t grad_width, int n_threads) {
  check_logits("topk_logprobs_backward", x);
  check_out_type<Out>("topk_logprobs_backward", x.type);
  check_topk_rows("topk_logprobs_backward", x, rows, n_out, k);
  check_grad_width("topk_logprobs_backward", x, grad_width);
  check_topk_ids("topk_logprobs_backward", x, ids, n_out, k);
  topk_backward<Compute<Out>, Out>(x, rows, n_out, k, ids, lse, grad_out, grad, grad_width, n_threads);
}

template void topk_logprobs<float>(const Logits&, const std::int64_t*, std::int64_t, std::int64_t, std::int64_t*, float*,
                                   float*, int);
template void topk_logprobs<double>(const Logits&, const std::int64_t*, std::int64_t, std::int64_t, std::int64_t*,
                                    double*, double*, int);
template void topk_logprobs_backward<float>(const Logits&, const std::int64_t*, std::int64_t, std::int64_t,
                                            const std::int64_t*, const float*, const float*, float*, std::int64_t,
                                            int);
template void topk_logprobs_backward<double>(const Logits&, const std::int64_t*, std::int64_t, std::int64_t,
                                             const std::int64_t*, const double*, const double*, double*,
                                             std::int64_t, int);

}  // namespace ctalign::kernels
