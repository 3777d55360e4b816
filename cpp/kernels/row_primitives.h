// The row primitives of row_kernels.h, written once over an instruction-set traits type Isa
// (simd_traits.h): a vector loop of Isa::kLanes elements, then the rest through ScalarOf<C> (the
// same template with one lane). Included only by the isa_<name>.cpp files, each inside its own
// CTALIGN_ISA_REGION, so every copy is compiled for one instruction set. Everything here has internal
// linkage on purpose: the scalar tails instantiated in an AVX2 file must not be merged by the linker
// with the scalar ISA's own copy (which must run on any CPU).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "errors.h"
#include "kernels/row_kernels.h"
#include "kernels/simd_traits.h"

namespace ctalign::kernels::detail {
namespace {

template <class Isa>
using ScalarFor = ScalarOf<typename Isa::C>;
template <class Isa>
constexpr bool kHasTail = Isa::kLanes > 1;  // elements after the last full vector go to ScalarFor<Isa>

template <class Isa, class T>
void stats(const void* xv, std::int64_t n, typename Isa::C scale, RowStats<typename Isa::C>* s) {
  using C = typename Isa::C;
  const T* x = static_cast<const T*>(xv);
  const auto vs = Isa::set1(scale);
  auto vmax = Isa::set1(-std::numeric_limits<C>::infinity());
  auto vmin = Isa::set1(std::numeric_limits<C>::infinity());
  auto nan = Isa::no_nan();
  std::int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const auto y = Isa::mul(Isa::load(x + i), vs);
    nan = Isa::nan_or(nan, y);
    vmax = Isa::max(vmax, y);
    vmin = Isa::min(vmin, y);
  }
  if constexpr (kHasTail<Isa>) {
    RowStats<C> tail;
    stats<ScalarFor<Isa>, T>(x + i, n - i, scale, &tail);
    s->max = std::max(Isa::hmax(vmax), tail.max);
    s->min = std::min(Isa::hmin(vmin), tail.min);
    s->nan = tail.nan || Isa::any(nan);
  } else {
    *s = {vmax, vmin, Isa::any(nan)};
  }
}

// x[i] - offset when kOffset (the rows whose shift is split, common.h: Shift), else x[i].
template <class Isa, bool kOffset, class T>
inline typename Isa::V load_off(const T* p, typename Isa::V off) {
  if constexpr (kOffset) {
    return Isa::sub(Isa::load(p), off);
  } else {
    (void)off;
    return Isa::load(p);
  }
}

// e[i] = exp((x[i] - offset) * scale - shift) 2^kBias; returns their sum in double when kSum.
template <class Isa, class T, bool kSum, bool kOffset>
double exp_store_k(const T* x, std::int64_t n, typename Isa::C scale, typename Isa::C offset, typename Isa::C shift,
                   typename Isa::C* e) {
  using C = typename Isa::C;
  const auto vs = Isa::set1(scale), vsh = Isa::set1(shift), voff = Isa::set1(offset);
  auto sum = Isa::zero_dw();
  std::int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const auto v = Isa::exp(Isa::fmsub(load_off<Isa, kOffset>(x + i, voff), vs, vsh), kBias<C>);
    Isa::store(e + i, v);
    if constexpr (kSum) sum = Isa::add_dw(sum, v);
  }
  double total = 0;
  if constexpr (kSum) total = Isa::hsum_dw(sum);
  if constexpr (kHasTail<Isa>) {
    total += exp_store_k<ScalarFor<Isa>, T, kSum, kOffset>(x + i, n - i, scale, offset, shift, e + i);
  }
  return total;
}

template <class Isa, class T, bool kSum = true>
double exp_store(const void* xv, std::int64_t n, typename Isa::C scale, typename Isa::C offset, typename Isa::C shift,
                 typename Isa::C* e) {
  const T* x = static_cast<const T*>(xv);
  return offset == 0 ? exp_store_k<Isa, T, kSum, false>(x, n, scale, offset, shift, e)
                     : exp_store_k<Isa, T, kSum, true>(x, n, scale, offset, shift, e);
}

// acc[g[i] * K + (i % K)] += v[i], unrolled by 8 so the copy index is a constant displacement.
template <int K, class C>
inline void scatter_add(const std::int32_t* g, const C* v, std::int64_t n, double* acc) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[static_cast<std::int64_t>(g[i + j]) * K + (j & (K - 1))] += static_cast<double>(v[i + j]);
  }
  for (; i < n; ++i) acc[static_cast<std::int64_t>(g[i]) * K + (i & (K - 1))] += static_cast<double>(v[i]);
}

// e^x into an L1 buffer, then the scalar scatter (reading lanes back right after a vector store
// would stall on store forwarding).
template <class Isa, class T, int K>
void exp_scatter_k(const T* x, std::int64_t n, typename Isa::C scale, typename Isa::C offset, typename Isa::C shift,
                   const std::int32_t* group, double* acc) {
  using C = typename Isa::C;
  alignas(64) C buf[kChunk];
  for (std::int64_t b0 = 0; b0 < n; b0 += kChunk) {
    const std::int64_t m = std::min(kChunk, n - b0);
    exp_store<Isa, T, false>(x + b0, m, scale, offset, shift, buf);
    scatter_add<K>(group + b0, buf, m, acc);
  }
}

template <class Isa, class T>
void exp_scatter(const void* xv, std::int64_t n, typename Isa::C scale, typename Isa::C offset, typename Isa::C shift,
                 const std::int32_t* group, double* acc, int copies) {
  const T* x = static_cast<const T*>(xv);
  if (copies == 8) {
    exp_scatter_k<Isa, T, 8>(x, n, scale, offset, shift, group, acc);
  } else {
    exp_scatter_k<Isa, T, 1>(x, n, scale, offset, shift, group, acc);
  }
}

template <class Isa, class T, bool kOffset>
void grouped_grad_k(const T* x, std::int64_t n, typename Isa::C scale, typename Isa::C offset,
                    const std::int32_t* group, const typename Isa::C* a, const typename Isa::C* c,
                    typename Isa::C* dx) {
  const auto vs = Isa::set1(scale), voff = Isa::set1(offset);
  std::int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const auto va = Isa::gather(a, group + i);
    const auto vc = Isa::gather(c, group + i);
    const auto share = Isa::exp(Isa::fmsub(load_off<Isa, kOffset>(x + i, voff), vs, va), 0);
    Isa::store(dx + i, Isa::mul(Isa::mul(vs, vc), share));
  }
  if constexpr (kHasTail<Isa>) {
    grouped_grad_k<ScalarFor<Isa>, T, kOffset>(x + i, n - i, scale, offset, group + i, a, c, dx + i);
  }
}

template <class Isa, class T>
void grouped_grad(const void* xv, std::int64_t n, typename Isa::C scale, typename Isa::C offset,
                  const std::int32_t* group, const typename Isa::C* a, const typename Isa::C* c, typename Isa::C* dx) {
  const T* x = static_cast<const T*>(xv);
  if (offset == 0) {
    grouped_grad_k<Isa, T, false>(x, n, scale, offset, group, a, c, dx);
  } else {
    grouped_grad_k<Isa, T, true>(x, n, scale, offset, group, a, c, dx);
  }
}

template <class Isa, bool kLog>
void exp_or_log_n(const typename Isa::C* v, std::int64_t n, typename Isa::C* y) {
  std::int64_t i = 0;
  for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
    const auto a = Isa::load(v + i);
    if constexpr (kLog) {
      Isa::store(y + i, Isa::log(a));
    } else {
      Isa::store(y + i, Isa::exp(a, 0));
    }
  }
  if constexpr (kHasTail<Isa>) exp_or_log_n<ScalarFor<Isa>, kLog>(v + i, n - i, y + i);
}

template <class Isa>
void log_ratio(const double* mass, std::int64_t n, double pz, typename Isa::C corr, double log_z,
               typename Isa::C* out) {
  using C = typename Isa::C;
  if constexpr (std::is_same_v<C, double>) {
    for (std::int64_t i = 0; i < n; ++i) {
      out[i] = mass[i] > 0 ? std::log(mass[i]) - log_z : -std::numeric_limits<double>::infinity();
    }
  } else {
    const auto c = Isa::set1(corr);
    std::int64_t i = 0;
    for (; i + Isa::kLanes <= n; i += Isa::kLanes) {
      const auto m = Isa::mul_dw(Isa::load_dw(mass + i), pz);
      const unsigned small = Isa::tiny_bits(m, kTinyRatio);
      Isa::store(out + i, Isa::add(Isa::log(Isa::narrow(m)), c));
      for (unsigned s = small; s != 0; s &= s - 1) {  // probabilities below 2^-120 (rare): in double
        const int j = __builtin_ctz(s);
        out[i + j] = static_cast<float>(std::log(mass[i + j]) - log_z);
      }
    }
    if constexpr (kHasTail<Isa>) log_ratio<ScalarFor<Isa>>(mass + i, n - i, pz, corr, log_z, out + i);
  }
}

// Two vectors a step: the first i with x[i] > threshold (>= with kOrEqual), else n.
template <class Isa, class T, bool kOrEqual>
std::int64_t first_above(const void* xv, std::int64_t n, typename Isa::C threshold) {
  constexpr int W = Isa::kLanes;
  const T* x = static_cast<const T*>(xv);
  const auto t = Isa::set1(threshold);
  std::int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const unsigned lo = Isa::template cmp_bits<kOrEqual>(Isa::load(x + i), t);
    const unsigned hi = Isa::template cmp_bits<kOrEqual>(Isa::load(x + i + W), t);
    if (lo | hi) return i + __builtin_ctz(lo | (hi << W));
  }
  if constexpr (kHasTail<Isa>) {
    return i + first_above<ScalarFor<Isa>, T, kOrEqual>(x + i, n - i, threshold);
  } else {
    return i < n && Isa::template cmp_bits<kOrEqual>(Isa::load(x + i), t) ? i : n;
  }
}

template <class Isa, class T>
RowKernels<typename Isa::C> row_table() {
  return {stats<Isa, T>,           exp_store<Isa, T>,   exp_scatter<Isa, T>,
          grouped_grad<Isa, T>,    exp_or_log_n<Isa, false>, exp_or_log_n<Isa, true>,
          log_ratio<Isa>,          first_above<Isa, T, false>, first_above<Isa, T, true>};
}

// The table for float compute of each element type (fp64 logits take ScalarF64's table).
template <class Isa>
RowKernels<float> float_row_table(ElemType type) {
  switch (type) {
    case ElemType::f32: return row_table<Isa, float>();
    case ElemType::bf16: return row_table<Isa, bf16_t>();
    case ElemType::f16: return row_table<Isa, f16_t>();
    default: break;
  }
  throw InputError("projection kernels: fp64 logits need double outputs");
}

#ifdef CTALIGN_X86
// ---- eight rows at once (SIMD ISAs): groups of eight floats (__m256) hold one token of 8 rows ----
template <class Isa>
constexpr int kTokensPerVector = Isa::kLanes / 8;

template <class T>
void block8_tail(const T* const* r, std::int64_t i, std::int64_t end, float scale, const float* offset,
                 const float* shift, const std::int32_t* group, double* acc, double* z) {
  for (; i < end; ++i) {
    double* a = acc + static_cast<std::int64_t>(group[i]) * 8;
    for (int k = 0; k < 8; ++k) {
      const float xk = offset ? Scalar::load(r[k] + i) - offset[k] : Scalar::load(r[k] + i);
      const double e = Scalar::exp(Scalar::fmsub(xk, scale, shift[k]), kExpBias);
      a[k] += e;
      z[k] += e;
    }
  }
}

template <class Isa, class T, bool kTotals, bool kOffset>
void block8_accumulate_k(const void* const* rows, std::int64_t begin, std::int64_t n, std::int64_t readable,
                         float scale, const float* offset, const float* shift, const std::int32_t* group, double* acc,
                         double* z) {
  constexpr int P = kTokensPerVector<Isa>;
  constexpr int kZ = 2 * P;  // running totals: token i + j goes to zt[j % kZ] (two chains per part)
  using L8 = typename Isa::L8;
  const T* r[8];
  for (int k = 0; k < 8; ++k) r[k] = static_cast<const T*>(rows[k]) + begin;
  group += begin;
  __m256 sh8[P], off8[P];
  for (int p = 0; p < P; ++p) {
    sh8[p] = _mm256_loadu_ps(shift);
    off8[p] = kOffset ? _mm256_loadu_ps(offset) : _mm256_setzero_ps();
  }
  const auto vs = Isa::set1(scale), vsh = Isa::join8(sh8), voff = Isa::join8(off8);
  L8 zt[kZ];
  for (int j = 0; j < kZ; ++j) zt[j] = Isa::zero_l8();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if ((i & 15) == 0) {  // one cache line of each row, one chunk ahead: DRAM latency hides behind the math
      for (int k = 0; k < 8; ++k) _mm_prefetch(reinterpret_cast<const char*>(r[k] + i + kBlockChunk), _MM_HINT_T0);
    }
    if (i + kAccAhead + 8 <= readable) {  // readable = 0: no prefetch (small tables stay in L1/L2)
      for (int j = 0; j < 8; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(acc + static_cast<std::int64_t>(group[i + kAccAhead + j]) * 8),
                     _MM_HINT_T0);
      }
    }
    __m256 v[8];
    for (int k = 0; k < 8; ++k) v[k] = simd::load8(r[k] + i);
    simd::transpose8(v);  // v[j] = element i + j of the eight rows
    for (int j = 0; j < 8; j += P) {
      __m256 e8[P];
      auto xj = Isa::join8(v + j);
      if constexpr (kOffset) xj = Isa::sub(xj, voff);
      Isa::split8(Isa::exp(Isa::fmsub(xj, vs, vsh), kExpBias), e8);
      for (int p = 0; p < P; ++p) {
        const L8 e = Isa::widen8(e8[p]);
        double* a = acc + static_cast<std::int64_t>(group[i + j + p]) * 8;
        Isa::store_l8(a, Isa::add_l8(Isa::load_l8(a), e));
        if constexpr (kTotals) zt[(j + p) % kZ] = Isa::add_l8(zt[(j + p) % kZ], e);
      }
    }
  }
  if constexpr (kTotals) {
    for (int h = kZ / 2; h >= 1; h /= 2) {
      for (int j = 0; j < h; ++j) zt[j] = Isa::add_l8(zt[j], zt[j + h]);
    }
    alignas(64) double zs[8];
    Isa::store_l8(zs, zt[0]);
    for (int k = 0; k < 8; ++k) z[k] += zs[k];
  }
  block8_tail<T>(r, i, n, scale, kOffset ? offset : nullptr, shift, group, acc, z);
}

template <class Isa, class T, bool kTotals>
void block8_accumulate(const void* const* rows, std::int64_t begin, std::int64_t n, std::int64_t readable,
                       float scale, const float* offset, const float* shift, const std::int32_t* group, double* acc,
                       double* z) {
  if (offset) {
    block8_accumulate_k<Isa, T, kTotals, true>(rows, begin, n, readable, scale, offset, shift, group, acc, z);
  } else {
    block8_accumulate_k<Isa, T, kTotals, false>(rows, begin, n, readable, scale, offset, shift, group, acc, z);
  }
}

template <class Isa>
void block8_finish(double* acc, std::int64_t n_groups, const double* pow2, const float* corr, const double* logz,
                   float* const* out) {
  constexpr int P = kTokensPerVector<Isa>;
  const auto p8 = Isa::loadu_l8(pow2);
  typename Isa::V corr_v[8 / P];  // rows k .. k + P - 1 of one log
  for (int k = 0; k < 8; k += P) {
    __m256 c[P];
    for (int p = 0; p < P; ++p) c[p] = _mm256_set1_ps(corr[k + p]);
    corr_v[k / P] = Isa::join8(c);
  }
  std::int64_t g0 = 0;
  for (; g0 + 8 <= n_groups; g0 += 8) {
    __m256 v[8];
    unsigned small = 0;
    for (int j = 0; j < 8; ++j) {
      const auto m = Isa::mul_l8(Isa::load_l8(acc + (g0 + j) * 8), p8);
      small |= Isa::tiny8(m, kTinyRatio);
      v[j] = Isa::narrow8(m);
    }
    simd::transpose8(v);  // v[k] = row k, groups g0..g0+7
    for (int k = 0; k < 8; k += P) {
      __m256 l[P];
      Isa::split8(Isa::add(Isa::log(Isa::join8(v + k)), corr_v[k / P]), l);
      for (int p = 0; p < P; ++p) _mm256_storeu_ps(out[k + p] + g0, l[p]);
    }
    if (small) {  // probabilities below 2^-120 (rare): redo the block in double
      for (int j = 0; j < 8; ++j) {
        for (int k = 0; k < 8; ++k) {
          const double m = acc[(g0 + j) * 8 + k];
          if (m > 0) out[k][g0 + j] = static_cast<float>(std::log(m) - logz[k]);
        }
      }
    }
    for (int j = 0; j < 8; ++j) Isa::store_l8(acc + (g0 + j) * 8, Isa::zero_l8());
  }
  for (; g0 < n_groups; ++g0) {
    for (int k = 0; k < 8; ++k) {
      const double m = acc[g0 * 8 + k];
      out[k][g0] = m > 0 ? static_cast<float>(std::log(m) - logz[k]) : -std::numeric_limits<float>::infinity();
      acc[g0 * 8 + k] = 0;
    }
  }
}

template <class Isa, class T, bool kOffset>
void block8_grad_k(const void* const* rows, std::int64_t n, float scale, const float* offset,
                   const std::int32_t* group, const float* a, const float* c, float* const* dx) {
  constexpr int P = kTokensPerVector<Isa>;
  const T* r[8];
  for (int k = 0; k < 8; ++k) r[k] = static_cast<const T*>(rows[k]);
  const auto vs = Isa::set1(scale);
  __m256 off8[P];
  for (int p = 0; p < P; ++p) off8[p] = kOffset ? _mm256_loadu_ps(offset) : _mm256_setzero_ps();
  const auto voff = Isa::join8(off8);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if ((i & 15) == 0) {
      for (int k = 0; k < 8; ++k) _mm_prefetch(reinterpret_cast<const char*>(r[k] + i + 256), _MM_HINT_T0);
    }
    __m256 v[8];
    for (int k = 0; k < 8; ++k) v[k] = simd::load8(r[k] + i);
    simd::transpose8(v);  // v[j] = element i + j of the eight rows
    for (int j = 0; j < 8; j += P) {
      __m256 ag[P], cg[P];
      for (int p = 0; p < P; ++p) {
        const std::int64_t g = group[i + j + p];
        ag[p] = _mm256_load_ps(a + g * 8);
        cg[p] = _mm256_load_ps(c + g * 8);
      }
      auto xj = Isa::join8(v + j);
      if constexpr (kOffset) xj = Isa::sub(xj, voff);
      const auto share = Isa::exp(Isa::fmsub(xj, vs, Isa::join8(ag)), 0);
      Isa::split8(Isa::mul(Isa::mul(vs, Isa::join8(cg)), share), v + j);
    }
    simd::transpose8(v);  // back to v[k] = row k, elements i..i+7
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dx[k] + i, v[k]);
  }
  for (; i < n; ++i) {
    const std::int64_t g = group[i];
    for (int k = 0; k < 8; ++k) {
      const float xk = kOffset ? Scalar::load(r[k] + i) - offset[k] : Scalar::load(r[k] + i);
      dx[k][i] = scale * c[g * 8 + k] * Scalar::exp(Scalar::fmsub(xk, scale, a[g * 8 + k]), 0);
    }
  }
}

template <class Isa, class T>
void block8_grad(const void* const* rows, std::int64_t n, float scale, const float* offset, const std::int32_t* group,
                 const float* a, const float* c, float* const* dx) {
  if (offset) {
    block8_grad_k<Isa, T, true>(rows, n, scale, offset, group, a, c, dx);
  } else {
    block8_grad_k<Isa, T, false>(rows, n, scale, offset, group, a, c, dx);
  }
}

// The eight-row table of an instruction set (accumulate with and without the in-loop totals, finish,
// gradient).
template <class Isa, class T>
Block8Kernels block8_table() {
  return {block8_accumulate<Isa, T, true>, block8_accumulate<Isa, T, false>, block8_finish<Isa>, block8_grad<Isa, T>};
}

template <class Isa>
Block8Kernels block8_table_for(ElemType type) {
  switch (type) {
    case ElemType::f32: return block8_table<Isa, float>();
    case ElemType::bf16: return block8_table<Isa, bf16_t>();
    case ElemType::f16: return block8_table<Isa, f16_t>();
    default: break;
  }
  return {nullptr, nullptr, nullptr, nullptr};
}
#endif  // CTALIGN_X86

}  // namespace
}  // namespace ctalign::kernels::detail
