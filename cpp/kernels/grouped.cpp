// Grouped log mass (kernel contract 1): out[r, g] = log sum of p_r(t) over the tokens of group g, and
// its gradient; next_byte_logprobs (G = 257) and project_to_student (G = V_s + 1) run here.
// Numerics and costs: projection_kernels.h. Row primitives: row_kernels.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/checks.h"
#include "kernels/common.h"
#include "kernels/row_kernels.h"
#include "kernels/threads.h"
#include "projection_kernels.h"

namespace ctalign::kernels {
namespace detail {
namespace {

constexpr std::int64_t kAccInCache = 256 * 1024;  // accumulator tables up to this size are not prefetched

// A 64-byte aligned buffer of doubles, zeroed when (re)allocated.
class AlignedDoubles {
 public:
  double* get(std::size_t n) {
    if (n > size_) {
      storage_.assign(n + 8, 0.0);
      const auto p = reinterpret_cast<std::uintptr_t>(storage_.data());
      data_ = reinterpret_cast<double*>((p + 63) & ~static_cast<std::uintptr_t>(63));
      size_ = n;
    }
    return data_;
  }

 private:
  std::vector<double> storage_;
  double* data_ = nullptr;
  std::size_t size_ = 0;
};

// One row: chunks of kChunk elements, max first (moving the shift as described at kLead), then
// e^x scatter-added into `copies` interleaved accumulators per group.
template <class C, class Out>
void grouped_row(const RowKernels<C>& k, const Logits& x, std::int64_t r, const std::int32_t* group,
                 std::int64_t g_count, int copies, C scale, std::vector<double>& acc, Out* out, Out* lse) {
  const std::int64_t v = x.vocab_size;
  const std::int64_t esize = static_cast<std::int64_t>(elem_size(x.type));
  const char* row = row_ptr(x, r);
  Out* o = out + r * g_count;
  acc.assign(g_count * copies, 0.0);
  Shift<C> sh;
  for (std::int64_t c0 = 0; c0 < v; c0 += kChunk) {
    const std::int64_t n = std::min(kChunk, v - c0);
    const char* chunk = row + c0 * esize;
    RowStats<C> st;
    k.stats(chunk, n, scale, &st);
    if (row_is_bad(st.max, st.min, st.nan)) {
      std::fill(o, o + g_count, static_cast<Out>(kNaN));
      lse[r] = static_cast<Out>(kNaN);
      return;
    }
    auto raw_max = [&] {
      RowStats<C> raw;
      k.stats(chunk, n, C(1), &raw);
      return raw.max;
    };
    double f = 0;
    if (move_shift(sh, st.max, scale, kLead, kSlack, raw_max, &f)) {
      for (double& a : acc) a *= f;
    }
    k.exp_scatter(chunk, n, scale, sh.offset, sh.shift, group + c0, acc.data(), copies);
  }
  const double shift = sh.total;
  double z = 0;
  for (std::int64_t g = 0; g < g_count; ++g) {
    double m = 0;
    for (int c = 0; c < copies; ++c) m += acc[g * copies + c];
    acc[g * copies] = m;
    z += m;
  }
  const double log_z = std::log(z);
  for (std::int64_t g = 0; g < g_count; ++g) {
    const double m = acc[g * copies];
    o[g] = static_cast<Out>(m > 0 ? std::log(m) - log_z : -kInf);
  }
  lse[r] = static_cast<Out>(shift + log_z - kBias<C> * kLn2);
}

// Eight rows [r0, r0 + 8) at once (float paths): the same chunked max/shift per row, then the block
// kernel adds each token's eight e^x values to its group's accumulator line.
void grouped_block8(const RowKernels<float>& k, const Block8Kernels& b, const Logits& x, std::int64_t r0,
                    const std::int32_t* group, std::int64_t g_count, float scale, double* acc, float* out,
                    float* lse) {
  const std::int64_t v = x.vocab_size;
  const std::int64_t esize = static_cast<std::int64_t>(elem_size(x.type));
  const bool prefetch_acc = g_count * 8 * static_cast<std::int64_t>(sizeof(double)) > kAccInCache;
  const void* rows[8];
  Shift<float> sh[8];
  double z[8];
  float shift_f[8], offset_f[8];
  bool bad[8];
  for (int j = 0; j < 8; ++j) {
    rows[j] = row_ptr(x, r0 + j);
    z[j] = 0;
    bad[j] = false;
  }
  for (std::int64_t c0 = 0; c0 < v; c0 += kBlockChunk) {
    const std::int64_t n = std::min(kBlockChunk, v - c0);
    bool split = false;
    for (int j = 0; j < 8; ++j) {
      if (bad[j]) continue;
      const char* chunk = static_cast<const char*>(rows[j]) + c0 * esize;
      RowStats<float> st;
      k.stats(chunk, n, scale, &st);
      if (row_is_bad(st.max, st.min, st.nan)) {
        bad[j] = true;  // its column fills with garbage from here on; the row's outputs become NaN
        if (!(sh[j].total > -kInf)) sh[j] = {0.0f, 0.0f, 0.0, false};
        continue;
      }
      auto raw_max = [&] {
        RowStats<float> raw;
        k.stats(chunk, n, 1.0f, &raw);
        return raw.max;
      };
      double f = 0;
      if (move_shift(sh[j], st.max, scale, kLead, kSlack, raw_max, &f)) {
        for (std::int64_t g = 0; g < g_count; ++g) acc[g * 8 + j] *= f;
        z[j] *= f;
      }
      split |= sh[j].offset != 0;
    }
    for (int j = 0; j < 8; ++j) {
      shift_f[j] = sh[j].shift;
      offset_f[j] = sh[j].offset;
    }
    (prefetch_acc ? b.accumulate : b.accumulate_no_totals)(rows, c0, n, prefetch_acc ? v - c0 : 0, scale,
                                                           split ? offset_f : nullptr, shift_f, group, acc, z);
  }
  if (!prefetch_acc) {  // the totals are the accumulator's column sums (its lines are in cache)
    for (int j = 0; j < 8; ++j) z[j] = 0;
    for (std::int64_t g = 0; g < g_count; ++g) {
      for (int j = 0; j < 8; ++j) z[j] += acc[g * 8 + j];
    }
  }
  double pow2[8], logz[8];
  float corr[8];
  float* outs[8];
  for (int j = 0; j < 8; ++j) {
    int e = 0;
    std::frexp(z[j], &e);  // z in [2^(e-1), 2^e)
    pow2[j] = std::ldexp(1.0, -e);
    logz[j] = std::log(z[j]);
    corr[j] = static_cast<float>(e * kLn2 - logz[j]);
    outs[j] = out + (r0 + j) * g_count;
  }
  b.finish(acc, g_count, pow2, corr, logz, outs);
  for (int j = 0; j < 8; ++j) {
    if (bad[j] || !(z[j] > 0) || !std::isfinite(z[j])) {
      std::fill(outs[j], outs[j] + g_count, std::numeric_limits<float>::quiet_NaN());
      lse[r0 + j] = std::numeric_limits<float>::quiet_NaN();
    } else {
      lse[r0 + j] = static_cast<float>(sh[j].total + std::log(z[j]) - kExpBias * kLn2);
    }
  }
}

template <class C, class Out>
void grouped_forward(const Logits& x, const std::int32_t* group, std::int32_t n_groups, Out* out, Out* lse,
                     int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  Block8Kernels b{nullptr, nullptr, nullptr, nullptr};
  if constexpr (std::is_same_v<C, float>) b = block8_kernels(x.type);
  const std::int64_t v = x.vocab_size, g_count = n_groups;
  const int copies = n_groups <= 2048 ? 8 : 1;
  const C scale = static_cast<C>(1.0 / x.temperature);
  // Items: blocks of eight rows first (when the instruction set has them), then the remaining rows,
  // batched when rows are short.
  const std::int64_t n_blocks = b.accumulate ? x.n_rows / 8 : 0;
  const std::int64_t first_single = n_blocks * 8;
  const std::int64_t rows_per_item = std::max<std::int64_t>(1, kRowsWork / v);
  const std::int64_t n_single_items = (x.n_rows - first_single + rows_per_item - 1) / rows_per_item;
  const int threads = thread_count(n_threads, x.n_rows * v);
  std::vector<std::vector<double>> acc_of(threads);
  std::vector<AlignedDoubles> block_acc_of(threads);

  parallel_for(n_blocks + n_single_items, threads, [&](std::int64_t item, int tid) {
    if (item < n_blocks) {
      if constexpr (std::is_same_v<C, float> && std::is_same_v<Out, float>) {
        grouped_block8(k, b, x, item * 8, group, g_count, scale, block_acc_of[tid].get(g_count * 8), out, lse);
      }
      return;
    }
    const std::int64_t r_begin = first_single + (item - n_blocks) * rows_per_item;
    const std::int64_t r_end = std::min(x.n_rows, r_begin + rows_per_item);
    for (std::int64_t r = r_begin; r < r_end; ++r) {
      grouped_row(k, x, r, group, g_count, copies, scale, acc_of[tid], out, lse);
    }
  });
}

// Per-group constants of the grouped gradient for one row: a = lse + out (log of the group's
// unnormalised mass), c = grad_out - (sum of grad_out) P(group); groups without mass (or of NaN rows)
// get a = +inf, c = 0 (their members have p = 0; -inf outputs carry no gradient). stride: 1, or 8
// for the eight-row tables.
template <class C, class Out>
void grad_constants(const Out* o, const Out* go, double lse, std::int64_t g_count, C* a, C* c, std::int64_t stride) {
  double gsum = 0;
  for (std::int64_t g = 0; g < g_count; ++g) {
    if (static_cast<double>(o[g]) > -kInf) gsum += static_cast<double>(go[g]);
  }
  for (std::int64_t g = 0; g < g_count; ++g) {
    const double og = static_cast<double>(o[g]);
    if (og > -kInf) {
      a[g * stride] = static_cast<C>(lse + og);
      c[g * stride] = static_cast<C>(static_cast<double>(go[g]) - gsum * std::exp(og));
    } else {
      a[g * stride] = std::numeric_limits<C>::infinity();
      c[g * stride] = 0;
    }
  }
}

template <class C, class Out>
void grouped_backward(const Logits& x, const std::int32_t* group, std::int32_t n_groups, const Out* out,
                      const Out* lse, const Out* grad_out, Out* grad, std::int64_t grad_width, int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  Block8Kernels b{nullptr, nullptr, nullptr, nullptr};
  if constexpr (std::is_same_v<C, float>) b = block8_kernels(x.type);
  const std::int64_t v = x.vocab_size, g_count = n_groups;
  const C scale = static_cast<C>(1.0 / x.temperature);
  const std::int64_t n_blocks = b.grad ? x.n_rows / 8 : 0;
  const std::int64_t first_single = n_blocks * 8;
  const std::int64_t rows_per_item = std::max<std::int64_t>(1, kRowsWork / v);
  const std::int64_t n_single_items = (x.n_rows - first_single + rows_per_item - 1) / rows_per_item;
  const int threads = thread_count(n_threads, x.n_rows * v);
  std::vector<std::vector<C>> a_of(threads), c_of(threads), buf_of(threads);

  parallel_for(n_blocks + n_single_items, threads, [&](std::int64_t item, int tid) {
    std::vector<C>& a = a_of[tid];
    std::vector<C>& c = c_of[tid];
    if (item < n_blocks) {
      if constexpr (std::is_same_v<C, float> && std::is_same_v<Out, float>) {
        a.resize(g_count * 8 + 8);  // + 8: room to align the tables to 32 bytes
        c.resize(g_count * 8 + 8);
        float* a8 = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(a.data()) + 31) & ~std::uintptr_t(31));
        float* c8 = reinterpret_cast<float*>((reinterpret_cast<std::uintptr_t>(c.data()) + 31) & ~std::uintptr_t(31));
        const void* rows[8];
        float* dx[8];
        float offset[8];
        bool split = false;
        for (int j = 0; j < 8; ++j) {
          const std::int64_t r = item * 8 + j;
          const auto ref = grad_reference<float>(k, x, r, scale, static_cast<double>(lse[r]), buf_of[tid]);
          offset[j] = ref.first;
          split |= ref.first != 0;
          grad_constants<float, Out>(out + r * g_count, grad_out + r * g_count, ref.second, g_count, a8 + j, c8 + j, 8);
          rows[j] = row_ptr(x, r);
          dx[j] = grad + r * grad_width;
        }
        b.grad(rows, v, scale, split ? offset : nullptr, group, a8, c8, dx);
        for (int j = 0; j < 8; ++j) std::fill(dx[j] + v, dx[j] + grad_width, 0.0f);
      }
      return;
    }
    a.resize(g_count);
    c.resize(g_count);
    const std::int64_t r_begin = first_single + (item - n_blocks) * rows_per_item;
    const std::int64_t r_end = std::min(x.n_rows, r_begin + rows_per_item);
    for (std::int64_t r = r_begin; r < r_end; ++r) {
      const auto ref = grad_reference<C>(k, x, r, scale, static_cast<double>(lse[r]), buf_of[tid]);
      grad_constants<C, Out>(out + r * g_count, grad_out + r * g_count, ref.second, g_count, a.data(), c.data(), 1);
      Out* dx = grad + r * grad_width;
      k.grouped_grad(row_ptr(x, r), v, scale, ref.first, group, a.data(), c.data(), dx);
      std::fill(dx + v, dx + grad_width, Out(0));
    }
  });
}

}  // namespace
}  // namespace detail

using namespace detail;

template <class Out>
void grouped_logmass(const Logits& x, const std::int32_t* group, std::int32_t n_groups, Out* out, Out* lse,
                     int n_threads) {
  check_logits("grouped_logmass", x);
  check_out_type<Out>("grouped_logmass", x.type);
  check_group("grouped_logmass", group, x.vocab_size, n_groups);
  grouped_forward<Compute<Out>, Out>(x, group, n_groups, out, lse, n_threads);
}

template <class Out>
void grouped_logmass_backward(const Logits& x, const std::int32_t* group, std::int32_t n_groups, const Out* out,
                              const Out* lse, const Out* grad_out, Out* grad, std::int64_t grad_width,
                              int n_threads) {
  check_logits("grouped_logmass_backward", x);
  check_out_type<Out>("grouped_logmass_backward", x.type);
  check_group("grouped_logmass_backward", group, x.vocab_size, n_groups);
  check_grad_width("grouped_logmass_backward", x, grad_width);
  grouped_backward<Compute<Out>, Out>(x, group, n_groups, out, lse, grad_out, grad, grad_width, n_threads);
}

template void grouped_logmass<float>(const Logits&, const std::int32_t*, std::int32_t, float*, float*, int);
template void grouped_logmass<double>(const Logits&, const std::int32_t*, std::int32_t, double*, double*, int);
template void grouped_logmass_backward<float>(const Logits&, const std::int32_t*, std::int32_t, const float*,
                                              const float*, const float*, float*, std::int64_t, int);
template void grouped_logmass_backward<double>(const Logits&, const std::int32_t*, std::int32_t, const double*,
                                               const double*, const double*, double*, std::int64_t, int);

}  // namespace ctalign::kernels
