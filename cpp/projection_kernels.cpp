// CPU projection kernels (see projection_kernels.h for the contract, numerics and costs).
//
// Structure: per (instruction set, element type) a table of four row primitives (stats, e^x into a
// buffer, e^x scatter-added into group accumulators, the grouped gradient), then generic drivers that
// split rows over threads and do the scalar bookkeeping (prefix sums, ranges, logs).
#include "projection_kernels.h"

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* placeholders.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "errors.h"
#include "fast_math.h"

namespace ctalign::kernels {
namespace {

using simd::bf16_t;
using simd::f16_t;

constexpr std::int64_t kChunk = 2048;        // grouped forward, one row: elements per max-then-exp step (L1)
constexpr std::int64_t kBlockChunk = 512;    // grouped forward, eight rows: elements per step (8 x 2 KB in L1)
constexpr double kDirectSumBelow = 1.0 / 8388608.0;  // 2^-23: sum a range directly below this share
constexpr double kTinyRatio = 0x1p-120;  // log_ratio: probabilities below this take a double log
// Masses are accumulated as e^(x/T - shift) 2^kExpBias (fast_math.h): float's range then holds
// e^-150 .. e^25 around the shift. The range kernels use shift = row max; the grouped forward runs
// in one pass with shift = the first chunk's max + kLead, moved to (chunk max + kLead) only when a
// chunk's max exceeds the shift by more than kSlack. So the row's top tokens have |x/T - shift| <= 24
// (float rounding of that difference: < 1e-6 relative) and tokens down to e^-140 of the top count.
constexpr int kExpBias = 90;
constexpr double kLead = 8.0;
constexpr double kSlack = 24.0;
template <class C>
constexpr int kBias = std::is_same_v<C, float> ? kExpBias : 0;  // the fp64 path needs none
constexpr std::int64_t kRowsWork = 1 << 16;  // elements per work item (rows are batched below it)
constexpr std::int64_t kMinParallelWork = 1 << 17;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kLn2 = 0.693147180559945309417;

template <class C>
struct RowStats {
  C max;
  C min;
  bool nan;
};

// Row primitives over n elements of one row (x points at the first one). C = compute type.
template <class C>
struct RowKernels {
  void (*stats)(const void* x, std::int64_t n, C scale, RowStats<C>* s);
  // e[i] = exp(x[i] * scale - shift); returns the sum in double.
  double (*exp_store)(const void* x, std::int64_t n, C scale, C shift, C* e);
  // acc[group[i] * copies + (i % copies)] += exp(x[i] * scale - shift); copies is 1 or 8.
  void (*exp_scatter)(const void* x, std::int64_t n, C scale, C shift, const std::int32_t* group, double* acc,
                      int copies);
  // dx[i] = scale * c[g] * exp(x[i] * scale - a[g]), g = group[i]: the grouped gradient with
  // a[g] = log of the group's unnormalised mass (exp(...) = the token's share of its group) and
  // c[g] = grad_out[g] - sum(grad_out) P(g).
  void (*grouped_grad)(const void* x, std::int64_t n, C scale, const std::int32_t* group, const C* a, const C* c,
                       C* dx);
  // y[i] = exp(v[i]) and y[i] = log(v[i]) (in place allowed): the sparse rows' element math.
  void (*exp_n)(const C* v, std::int64_t n, C* y);
  void (*log_n)(const C* v, std::int64_t n, C* y);
  // out[i] = log(mass[i] / z) for masses >= 0 (log 0 = -inf): in float, log(mass * pz) + corr, with pz a
  // power of two near 1 / z (exact scaling) and corr = log(1 / pz) - log z; in double below 2^-120
  // (float would lose precision there), and throughout for C = double.
  void (*log_ratio)(const double* mass, std::int64_t n, double pz, C corr, double log_z, C* out);
  // The first i < n with x[i] > threshold, or x[i] >= threshold (unscaled), else n: the top-k scans.
  std::int64_t (*first_above)(const void* x, std::int64_t n, C threshold);
  std::int64_t (*first_at_least)(const void* x, std::int64_t n, C threshold);
};

// Eight rows at once (SIMD float paths only). acc is [G][8] doubles, 64-byte aligned: one cache
// line per group holds the eight rows' sums, so each token costs one vector add.
struct Block8Kernels {
  // For i in [begin, begin + n): acc[group[i]][k] += exp(rows[k][i] * scale - shift[k]) 2^kExpBias,
  // and z[k] += the same (the rows' running totals). rows are the eight row starts. `readable`:
  // entries of group readable from begin on (>= n), for prefetching accumulator lines kAccAhead
  // tokens ahead; 0 turns that prefetch off (tables that fit in cache).
  void (*accumulate)(const void* const* rows, std::int64_t begin, std::int64_t n, std::int64_t readable,
                     float scale, const float* shift, const std::int32_t* group, double* acc, double* z);
  // The same without the running totals (z is not touched; readable is ignored): for tables that fit
  // in cache, whose column sums give z at the end for less than the per-token adds cost (next_byte:
  // 11.4 -> 9.6 ms for 256 x 152k rows).
  void (*accumulate_no_totals)(const void* const* rows, std::int64_t begin, std::int64_t n, std::int64_t readable,
                               float scale, const float* shift, const std::int32_t* group, double* acc, double* z);
  // out[k][g] = log(acc[g][k] * pow2[k]) + corr[k] for g < n_groups, then acc is zeroed. pow2[k] is the
  // power of two near 1 / z[k] (exact scaling), corr[k] = log(1 / pow2[k]) - log z[k] (|corr| < 1), so
  // the float log works on the group's probability itself; probabilities below 2^-120 are redone
  // as log(acc) - logz[k] in double.
  void (*finish)(double* acc, std::int64_t n_groups, const double* pow2, const float* corr, const double* logz,
                 float* const* out);
  // The grouped gradient of eight rows: dx[k][i] = scale * c[g][k] exp(rows[k][i] * scale - a[g][k]),
  // g = group[i], for i < n (a, c: [G][8] floats, one 32-byte line per group).
  void (*grad)(const void* const* rows, std::int64_t n, float scale, const std::int32_t* group, const float* a,
               const float* c, float* const* dx);
};

// ---- scalar primitives (any CPU; also fp64, computed in double with std::exp) ----------------
inline float exp_c(float v) { return simd::exp_scalar(v); }
inline double exp_c(double v) { return std::exp(v); }
inline float exp_b(float v) { return simd::exp_scalar(v, kExpBias); }  // e^v 2^kBias<C>
inline double exp_b(double v) { return std::exp(v); }
inline float to_c(float v, float) { return v; }
inline float to_c(bf16_t v, float) { return simd::to_float(v); }
inline float to_c(f16_t v, float) { return simd::to_float(v); }
inline double to_c(double v, double) { return v; }
// x * scale - shift with one rounding, like the vector paths' fused multiply-subtract: the
// difference stays exact to its own ulp even when x * scale is large.
inline float shifted(float x, float scale, float shift) {
  return static_cast<float>(static_cast<double>(x) * scale - shift);
}
inline double shifted(double x, double scale, double shift) { return x * scale - shift; }

template <class T, class C>
void stats_scalar(const void* xv, std::int64_t n, C scale, RowStats<C>* s) {
  const T* x = static_cast<const T*>(xv);
  C mx = -std::numeric_limits<C>::infinity(), mn = std::numeric_limits<C>::infinity();
  bool nan = false;
  for (std::int64_t i = 0; i < n; ++i) {
    const C y = to_c(x[i], C()) * scale;
    nan |= (y != y);
    mx = y > mx ? y : mx;
    mn = y < mn ? y : mn;
  }
  *s = {mx, mn, nan};
}

template <class T, class C>
double exp_store_scalar(const void* xv, std::int64_t n, C scale, C shift, C* e) {
  const T* x = static_cast<const T*>(xv);
  double sum = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    e[i] = exp_b(shifted(to_c(x[i], C()), scale, shift));
    sum += e[i];
  }
  return sum;
}

template <class T, class C>
void exp_scatter_scalar(const void* xv, std::int64_t n, C scale, C shift, const std::int32_t* group, double* acc,
                        int copies) {
  const T* x = static_cast<const T*>(xv);
  const std::int64_t mask = copies - 1;
  for (std::int64_t i = 0; i < n; ++i) {
    acc[static_cast<std::int64_t>(group[i]) * copies + (i & mask)] += exp_b(shifted(to_c(x[i], C()), scale, shift));
  }
}

template <class T, class C>
void grouped_grad_scalar(const void* xv, std::int64_t n, C scale, const std::int32_t* group, const C* a, const C* c,
                         C* dx) {
  const T* x = static_cast<const T*>(xv);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int32_t g = group[i];
    dx[i] = scale * c[g] * exp_c(shifted(to_c(x[i], C()), scale, a[g]));
  }
}

template <class C>
void exp_n_scalar(const C* v, std::int64_t n, C* y) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = exp_c(v[i]);
}
inline float log_c(float v) { return simd::log_scalar(v); }
inline double log_c(double v) { return std::log(v); }
template <class C>
void log_n_scalar(const C* v, std::int64_t n, C* y) {
  for (std::int64_t i = 0; i < n; ++i) y[i] = log_c(v[i]);
}

template <class C>
void log_ratio_scalar(const double* mass, std::int64_t n, double pz, C corr, double log_z, C* out) {
  for (std::int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<C, double>) {
      out[i] = mass[i] > 0 ? std::log(mass[i]) - log_z : -kInf;
    } else {
      const double m = mass[i] * pz;
      out[i] = m > 0 && m < kTinyRatio ? static_cast<float>(std::log(mass[i]) - log_z)
                                       : log_c(static_cast<float>(m)) + corr;
    }
  }
}

template <class T, class C, bool kOrEqual = false>
std::int64_t first_above_scalar(const void* xv, std::int64_t n, C threshold) {
  const T* x = static_cast<const T*>(xv);
  for (std::int64_t i = 0; i < n; ++i) {
    const C v = to_c(x[i], C());
    if (kOrEqual ? v >= threshold : v > threshold) return i;
  }
  return n;
}

template <class T, class C>
RowKernels<C> scalar_table() {
  return {stats_scalar<T, C>, exp_store_scalar<T, C>, exp_scatter_scalar<T, C>, grouped_grad_scalar<T, C>,
          exp_n_scalar<C>, log_n_scalar<C>, log_ratio_scalar<C>, first_above_scalar<T, C>,
          first_above_scalar<T, C, true>};
}

// acc[g[i] * K + (i % K)] += v[i], unrolled by 8 so the copy index is a constant displacement.
template <int K>
inline void scatter_add(const std::int32_t* g, const float* v, std::int64_t n, double* acc) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[static_cast<std::int64_t>(g[i + j]) * K + (j & (K - 1))] += static_cast<double>(v[i + j]);
  }
  for (; i < n; ++i) acc[static_cast<std::int64_t>(g[i]) * K + (i & (K - 1))] += static_cast<double>(v[i]);
}

template <class T>
void block8_tail(const T* const* r, std::int64_t i, std::int64_t end, float scale, const float* shift,
                 const std::int32_t* group, double* acc, double* z) {
  for (; i < end; ++i) {
    double* a = acc + static_cast<std::int64_t>(group[i]) * 8;
    for (int k = 0; k < 8; ++k) {
      const double e = simd::exp_scalar(shifted(simd::to_float(r[k][i]), scale, shift[k]), kExpBias);
      a[k] += e;
      z[k] += e;
    }
  }
}

// Accumulator lines of the groups kAccAhead tokens ahead are prefetched: with many groups the [G][8]
// table outgrows L2 and each token's line would otherwise be a cache miss on the critical path.
constexpr std::int64_t kAccAhead = 64;
constexpr std::int64_t kAccInCache = 256 * 1024;  // accumulator tables up to this size are not prefetched

#ifdef CTALIGN_X86
// ---- AVX2 primitives ------------------------------------------------------------------------
CTALIGN_TARGET_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
CTALIGN_TARGET_AVX2 inline float hmin8(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
CTALIGN_TARGET_AVX2 inline double hsum4d(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

template <class T>
CTALIGN_TARGET_AVX2 void stats_avx2(const void* xv, std::int64_t n, float scale, RowStats<float>* s) {
  const T* x = static_cast<const T*>(xv);
  const __m256 vs = _mm256_set1_ps(scale);
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vmin = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vnan = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = _mm256_mul_ps(simd::load8(x + i), vs);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, y);
    vmin = _mm256_min_ps(vmin, y);
  }
  RowStats<float> tail;
  stats_scalar<T, float>(x + i, n - i, scale, &tail);
  s->max = std::max(hmax8(vmax), tail.max);
  s->min = std::min(hmin8(vmin), tail.min);
  s->nan = tail.nan || _mm256_movemask_ps(vnan) != 0;
}

template <class T>
CTALIGN_TARGET_AVX2 double exp_store_avx2(const void* xv, std::int64_t n, float scale, float shift, float* e) {
  const T* x = static_cast<const T*>(xv);
  const __m256 vs = _mm256_set1_ps(scale), vsh = _mm256_set1_ps(shift);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = simd::exp_avx2(_mm256_fmsub_ps(simd::load8(x + i), vs, vsh), kExpBias);
    _mm256_storeu_ps(e + i, v);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  return hsum4d(_mm256_add_pd(s0, s1)) + exp_store_scalar<T, float>(x + i, n - i, scale, shift, e + i);
}

template <class T, int K>
CTALIGN_TARGET_AVX2 void exp_scatter_avx2_k(const T* x, std::int64_t n, float scale, float shift,
                                            const std::int32_t* group, double* acc) {
  // e^x into an L1 buffer, then the scalar scatter (reading lanes back right after a vector store
  // would stall on store forwarding).
  const __m256 vs = _mm256_set1_ps(scale), vsh = _mm256_set1_ps(shift);
  alignas(32) float buf[kChunk];
  for (std::int64_t b0 = 0; b0 < n; b0 += kChunk) {
    const std::int64_t m = std::min(kChunk, n - b0);
    std::int64_t i = 0;
    for (; i + 8 <= m; i += 8) {
      _mm256_store_ps(buf + i, simd::exp_avx2(_mm256_fmsub_ps(simd::load8(x + b0 + i), vs, vsh), kExpBias));
    }
    for (; i < m; ++i) buf[i] = simd::exp_scalar(shifted(simd::to_float(x[b0 + i]), scale, shift), kExpBias);
    scatter_add<K>(group + b0, buf, m, acc);
  }
}

template <class T>
CTALIGN_TARGET_AVX2 void exp_scatter_avx2(const void* xv, std::int64_t n, float scale, float shift,
                                          const std::int32_t* group, double* acc, int copies) {
  const T* x = static_cast<const T*>(xv);
  if (copies == 8) {
    exp_scatter_avx2_k<T, 8>(x, n, scale, shift, group, acc);
  } else {
    exp_scatter_avx2_k<T, 1>(x, n, scale, shift, group, acc);
  }
}

template <class T>
CTALIGN_TARGET_AVX2 void grouped_grad_avx2(const void* xv, std::int64_t n, float scale, const std::int32_t* group,
                                           const float* a, const float* c, float* dx) {
  const T* x = static_cast<const T*>(xv);
  const __m256 vs = _mm256_set1_ps(scale);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + i));
    const __m256 va = _mm256_i32gather_ps(a, idx, 4);
    const __m256 vc = _mm256_i32gather_ps(c, idx, 4);
    const __m256 share = simd::exp_avx2(_mm256_fmsub_ps(simd::load8(x + i), vs, va));
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_mul_ps(vs, vc), share));
  }
  grouped_grad_scalar<T, float>(x + i, n - i, scale, group + i, a, c, dx + i);
}

template <class T, bool kTotals>
CTALIGN_TARGET_AVX2 void block8_accumulate_avx2(const void* const* rows, std::int64_t begin, std::int64_t n,
                                                std::int64_t readable, float scale, const float* shift,
                                                const std::int32_t* group, double* acc, double* z) {
  const T* r[8];
  for (int k = 0; k < 8; ++k) r[k] = static_cast<const T*>(rows[k]) + begin;
  group += begin;
  const __m256 vs = _mm256_set1_ps(scale), vsh = _mm256_loadu_ps(shift);
  __m256d zlo[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()}, zhi[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if ((i & 15) == 0) {
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
    for (int j = 0; j < 8; ++j) {
      const __m256 e = simd::exp_avx2(_mm256_fmsub_ps(v[j], vs, vsh), kExpBias);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(e));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1));
      double* a = acc + static_cast<std::int64_t>(group[i + j]) * 8;
      _mm256_store_pd(a, _mm256_add_pd(_mm256_load_pd(a), lo));
      _mm256_store_pd(a + 4, _mm256_add_pd(_mm256_load_pd(a + 4), hi));
      if constexpr (kTotals) {
        zlo[j & 1] = _mm256_add_pd(zlo[j & 1], lo);
        zhi[j & 1] = _mm256_add_pd(zhi[j & 1], hi);
      }
    }
  }
  if constexpr (kTotals) {
    alignas(32) double zs[8];
    _mm256_store_pd(zs, _mm256_add_pd(zlo[0], zlo[1]));
    _mm256_store_pd(zs + 4, _mm256_add_pd(zhi[0], zhi[1]));
    for (int k = 0; k < 8; ++k) z[k] += zs[k];
  }
  block8_tail<T>(r, i, n, scale, shift, group, acc, z);
}

CTALIGN_TARGET_AVX2 void block8_finish_avx2(double* acc, std::int64_t n_groups, const double* pow2, const float* corr,
                                            const double* logz, float* const* out) {
  const __m256d zero = _mm256_setzero_pd();
  const __m256d p_lo = _mm256_loadu_pd(pow2), p_hi = _mm256_loadu_pd(pow2 + 4);
  const __m256d tiny = _mm256_set1_pd(kTinyRatio);  // below: the float would lose precision
  std::int64_t g0 = 0;
  for (; g0 + 8 <= n_groups; g0 += 8) {
    __m256 v[8];
    int small = 0;
    for (int j = 0; j < 8; ++j) {
      const double* a = acc + (g0 + j) * 8;
      const __m256d lo = _mm256_mul_pd(_mm256_load_pd(a), p_lo), hi = _mm256_mul_pd(_mm256_load_pd(a + 4), p_hi);
      small |= _mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(lo, tiny, _CMP_LT_OQ), _mm256_cmp_pd(lo, zero, _CMP_GT_OQ))) |
               _mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(hi, tiny, _CMP_LT_OQ), _mm256_cmp_pd(hi, zero, _CMP_GT_OQ)))
                   << 4;
      v[j] = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
    }
    simd::transpose8(v);  // v[k] = row k, groups g0..g0+7
    for (int k = 0; k < 8; ++k) {
      _mm256_storeu_ps(out[k] + g0, _mm256_add_ps(simd::log_avx2(v[k]), _mm256_set1_ps(corr[k])));
    }
    if (small) {  // probabilities below 2^-120 (rare): redo the block in double
      for (int j = 0; j < 8; ++j) {
        for (int k = 0; k < 8; ++k) {
          const double m = acc[(g0 + j) * 8 + k];
          if (m > 0) out[k][g0 + j] = static_cast<float>(std::log(m) - logz[k]);
        }
      }
    }
    for (int j = 0; j < 8; ++j) {
      _mm256_store_pd(acc + (g0 + j) * 8, zero);
      _mm256_store_pd(acc + (g0 + j) * 8 + 4, zero);
    }
  }
  for (; g0 < n_groups; ++g0) {
    for (int k = 0; k < 8; ++k) {
      const double m = acc[g0 * 8 + k];
      out[k][g0] = m > 0 ? static_cast<float>(std::log(m) - logz[k]) : -std::numeric_limits<float>::infinity();
      acc[g0 * 8 + k] = 0;
    }
  }
}

CTALIGN_TARGET_AVX2 void exp_n_avx2(const float* v, std::int64_t n, float* y) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, simd::exp_avx2(_mm256_loadu_ps(v + i)));
  exp_n_scalar<float>(v + i, n - i, y + i);
}
CTALIGN_TARGET_AVX2 void log_n_avx2(const float* v, std::int64_t n, float* y) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, simd::log_avx2(_mm256_loadu_ps(v + i)));
  log_n_scalar<float>(v + i, n - i, y + i);
}

CTALIGN_TARGET_AVX2 void log_ratio_avx2(const double* mass, std::int64_t n, double pz, float corr, double log_z,
                                        float* out) {
  const __m256d p = _mm256_set1_pd(pz), tiny = _mm256_set1_pd(kTinyRatio), zero = _mm256_setzero_pd();
  const __m256 c = _mm256_set1_ps(corr);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256d a = _mm256_mul_pd(_mm256_loadu_pd(mass + i), p);
    const __m256d b = _mm256_mul_pd(_mm256_loadu_pd(mass + i + 4), p);
    const int small =
        _mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(a, tiny, _CMP_LT_OQ), _mm256_cmp_pd(a, zero, _CMP_GT_OQ))) |
        (_mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(b, tiny, _CMP_LT_OQ), _mm256_cmp_pd(b, zero, _CMP_GT_OQ)))
         << 4);
    const __m256 f = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(a)), _mm256_cvtpd_ps(b), 1);
    _mm256_storeu_ps(out + i, _mm256_add_ps(simd::log_avx2(f), c));
    for (int j = 0; j < 8; ++j) {
      if (small >> j & 1) out[i + j] = static_cast<float>(std::log(mass[i + j]) - log_z);
    }
  }
  log_ratio_scalar<float>(mass + i, n - i, pz, corr, log_z, out + i);
}

template <class T>
CTALIGN_TARGET_AVX2 void block8_grad_avx2(const void* const* rows, std::int64_t n, float scale, const std::int32_t* group,
                                          const float* a, const float* c, float* const* dx) {
  const T* r[8];
  for (int k = 0; k < 8; ++k) r[k] = static_cast<const T*>(rows[k]);
  const __m256 vs = _mm256_set1_ps(scale);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if ((i & 15) == 0) {
      for (int k = 0; k < 8; ++k) _mm_prefetch(reinterpret_cast<const char*>(r[k] + i + 256), _MM_HINT_T0);
    }
    __m256 v[8];
    for (int k = 0; k < 8; ++k) v[k] = simd::load8(r[k] + i);
    simd::transpose8(v);  // v[j] = element i + j of the eight rows
    for (int j = 0; j < 8; ++j) {
      const std::int64_t g = group[i + j];
      const __m256 share = simd::exp_avx2(_mm256_fmsub_ps(v[j], vs, _mm256_load_ps(a + g * 8)));
      v[j] = _mm256_mul_ps(_mm256_mul_ps(vs, _mm256_load_ps(c + g * 8)), share);
    }
    simd::transpose8(v);  // back to v[k] = row k, elements i..i+7
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dx[k] + i, v[k]);
  }
  for (; i < n; ++i) {
    const std::int64_t g = group[i];
    for (int k = 0; k < 8; ++k) {
      dx[k][i] = scale * c[g * 8 + k] * simd::exp_scalar(shifted(simd::to_float(r[k][i]), scale, a[g * 8 + k]));
    }
  }
}

template <class T, bool kOrEqual = false>
CTALIGN_TARGET_AVX2 std::int64_t first_above_avx2(const void* xv, std::int64_t n, float threshold) {
  constexpr int kCmp = kOrEqual ? _CMP_GE_OQ : _CMP_GT_OQ;
  const T* x = static_cast<const T*>(xv);
  const __m256 t = _mm256_set1_ps(threshold);
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const int lo = _mm256_movemask_ps(_mm256_cmp_ps(simd::load8(x + i), t, kCmp));
    const int hi = _mm256_movemask_ps(_mm256_cmp_ps(simd::load8(x + i + 8), t, kCmp));
    if (lo | hi) return i + __builtin_ctz(static_cast<unsigned>(lo | (hi << 8)));
  }
  return i + first_above_scalar<T, float, kOrEqual>(x + i, n - i, threshold);
}

template <class T>
RowKernels<float> avx2_table() {
  return {stats_avx2<T>, exp_store_avx2<T>, exp_scatter_avx2<T>, grouped_grad_avx2<T>, exp_n_avx2, log_n_avx2,
          log_ratio_avx2, first_above_avx2<T>, first_above_avx2<T, true>};
}

// ---- AVX-512 primitives ---------------------------------------------------------------------
template <class T>
CTALIGN_TARGET_AVX512 void stats_avx512(const void* xv, std::int64_t n, float scale, RowStats<float>* s) {
  const T* x = static_cast<const T*>(xv);
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmin = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 y = _mm512_mul_ps(simd::load16(x + i), vs);
    nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, y);
    vmin = _mm512_min_ps(vmin, y);
  }
  RowStats<float> tail;
  stats_scalar<T, float>(x + i, n - i, scale, &tail);
  s->max = std::max(_mm512_reduce_max_ps(vmax), tail.max);
  s->min = std::min(_mm512_reduce_min_ps(vmin), tail.min);
  s->nan = tail.nan || nan != 0;
}

template <class T>
CTALIGN_TARGET_AVX512 double exp_store_avx512(const void* xv, std::int64_t n, float scale, float shift, float* e) {
  const T* x = static_cast<const T*>(xv);
  const __m512 vs = _mm512_set1_ps(scale), vsh = _mm512_set1_ps(shift);
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = simd::exp_avx512(_mm512_fmsub_ps(simd::load16(x + i), vs, vsh), kExpBias);
    _mm512_storeu_ps(e + i, v);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) +
         exp_store_scalar<T, float>(x + i, n - i, scale, shift, e + i);
}

template <class T, int K>
CTALIGN_TARGET_AVX512 void exp_scatter_avx512_k(const T* x, std::int64_t n, float scale, float shift,
                                                const std::int32_t* group, double* acc) {
  const __m512 vs = _mm512_set1_ps(scale), vsh = _mm512_set1_ps(shift);
  alignas(64) float buf[kChunk];
  for (std::int64_t b0 = 0; b0 < n; b0 += kChunk) {
    const std::int64_t m = std::min(kChunk, n - b0);
    std::int64_t i = 0;
    for (; i + 16 <= m; i += 16) {
      _mm512_store_ps(buf + i, simd::exp_avx512(_mm512_fmsub_ps(simd::load16(x + b0 + i), vs, vsh), kExpBias));
    }
    for (; i < m; ++i) buf[i] = simd::exp_scalar(shifted(simd::to_float(x[b0 + i]), scale, shift), kExpBias);
    scatter_add<K>(group + b0, buf, m, acc);
  }
}

template <class T>
CTALIGN_TARGET_AVX512 void exp_scatter_avx512(const void* xv, std::int64_t n, float scale, float shift,
                                              const std::int32_t* group, double* acc, int copies) {
  const T* x = static_cast<const T*>(xv);
  if (copies == 8) {
    exp_scatter_avx512_k<T, 8>(x, n, scale, shift, group, acc);
  } else {
    exp_scatter_avx512_k<T, 1>(x, n, scale, shift, group, acc);
  }
}

template <class T>
CTALIGN_TARGET_AVX512 void grouped_grad_avx512(const void* xv, std::int64_t n, float scale, const std::int32_t* group,
                                               const float* a, const float* c, float* dx) {
  const T* x = static_cast<const T*>(xv);
  const __m512 vs = _mm512_set1_ps(scale);
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i idx = _mm512_loadu_si512(group + i);
    const __m512 va = _mm512_i32gather_ps(idx, a, 4);
    const __m512 vc = _mm512_i32gather_ps(idx, c, 4);
    const __m512 share = simd::exp_avx512(_mm512_fmsub_ps(simd::load16(x + i), vs, va));
    _mm512_storeu_ps(dx + i, _mm512_mul_ps(_mm512_mul_ps(vs, vc), share));
  }
  grouped_grad_scalar<T, float>(x + i, n - i, scale, group + i, a, c, dx + i);
}

template <class T, bool kTotals>
CTALIGN_TARGET_AVX512 void block8_accumulate_avx512(const void* const* rows, std::int64_t begin, std::int64_t n,
                                                    std::int64_t readable, float scale, const float* shift,
                                                    const std::int32_t* group, double* acc, double* z) {
  const T* r[8];
  for (int k = 0; k < 8; ++k) r[k] = static_cast<const T*>(rows[k]) + begin;
  group += begin;
  const __m256 sh8 = _mm256_loadu_ps(shift);
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512 vsh = _mm512_insertf32x8(_mm512_castps256_ps512(sh8), sh8, 1);
  __m512d za[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, zb[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
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
    for (int j = 0; j < 8; j += 2) {
      const __m512 pair = _mm512_insertf32x8(_mm512_castps256_ps512(v[j]), v[j + 1], 1);
      const __m512 e = simd::exp_avx512(_mm512_fmsub_ps(pair, vs, vsh), kExpBias);
      const __m512d e0 = _mm512_cvtps_pd(_mm512_castps512_ps256(e));
      const __m512d e1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(e, 1));
      double* a0 = acc + static_cast<std::int64_t>(group[i + j]) * 8;
      _mm512_store_pd(a0, _mm512_add_pd(_mm512_load_pd(a0), e0));
      double* a1 = acc + static_cast<std::int64_t>(group[i + j + 1]) * 8;
      _mm512_store_pd(a1, _mm512_add_pd(_mm512_load_pd(a1), e1));
      if constexpr (kTotals) {
        za[(j >> 1) & 1] = _mm512_add_pd(za[(j >> 1) & 1], e0);
        zb[(j >> 1) & 1] = _mm512_add_pd(zb[(j >> 1) & 1], e1);
      }
    }
  }
  if constexpr (kTotals) {
    alignas(64) double zs[8];
    _mm512_store_pd(zs, _mm512_add_pd(_mm512_add_pd(za[0], za[1]), _mm512_add_pd(zb[0], zb[1])));
    for (int k = 0; k < 8; ++k) z[k] += zs[k];
  }
  block8_tail<T>(r, i, n, scale, shift, group, acc, z);
}

// block8_finish_avx2 with 512-bit steps: one accumulator line per load, two rows per log.
CTALIGN_TARGET_AVX512 void block8_finish_avx512(double* acc, std::int64_t n_groups, const double* pow2,
                                                const float* corr, const double* logz, float* const* out) {
  const __m512d zero = _mm512_setzero_pd();
  const __m512d p8 = _mm512_loadu_pd(pow2);
  const __m512d tiny = _mm512_set1_pd(kTinyRatio);  // below: the float would lose precision
  __m512 corr2[4];
  for (int k = 0; k < 8; k += 2) {
    corr2[k / 2] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(corr[k])), _mm256_set1_ps(corr[k + 1]), 1);
  }
  std::int64_t g0 = 0;
  for (; g0 + 8 <= n_groups; g0 += 8) {
    __m256 v[8];
    unsigned small = 0;
    for (int j = 0; j < 8; ++j) {
      const __m512d m = _mm512_mul_pd(_mm512_load_pd(acc + (g0 + j) * 8), p8);
      small |= _mm512_cmp_pd_mask(m, tiny, _CMP_LT_OQ) & _mm512_cmp_pd_mask(m, zero, _CMP_GT_OQ);
      v[j] = _mm512_cvtpd_ps(m);
    }
    simd::transpose8(v);  // v[k] = row k, groups g0..g0+7
    for (int k = 0; k < 8; k += 2) {
      const __m512 two = _mm512_insertf32x8(_mm512_castps256_ps512(v[k]), v[k + 1], 1);
      const __m512 l = _mm512_add_ps(simd::log_avx512(two), corr2[k / 2]);
      _mm256_storeu_ps(out[k] + g0, _mm512_castps512_ps256(l));
      _mm256_storeu_ps(out[k + 1] + g0, _mm512_extractf32x8_ps(l, 1));
    }
    if (small) {  // probabilities below 2^-120 (rare): redo the block in double
      for (int j = 0; j < 8; ++j) {
        for (int k = 0; k < 8; ++k) {
          const double m = acc[(g0 + j) * 8 + k];
          if (m > 0) out[k][g0 + j] = static_cast<float>(std::log(m) - logz[k]);
        }
      }
    }
    for (int j = 0; j < 8; ++j) _mm512_store_pd(acc + (g0 + j) * 8, zero);
  }
  for (; g0 < n_groups; ++g0) {
    for (int k = 0; k < 8; ++k) {
      const double m = acc[g0 * 8 + k];
      out[k][g0] = m > 0 ? static_cast<float>(std::log(m) - logz[k]) : -std::numeric_limits<float>::infinity();
      acc[g0 * 8 + k] = 0;
    }
  }
}

CTALIGN_TARGET_AVX512 void log_n_avx512(const float* v, std::int64_t n, float* y) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, simd::log_avx512(_mm512_loadu_ps(v + i)));
  log_n_scalar<float>(v + i, n - i, y + i);
}

// log_ratio_avx2 sixteen lanes wide.
CTALIGN_TARGET_AVX512 void log_ratio_avx512(const double* mass, std::int64_t n, double pz, float corr, double log_z,
                                            float* out) {
  const __m512d p = _mm512_set1_pd(pz), tiny = _mm512_set1_pd(kTinyRatio), zero = _mm512_setzero_pd();
  const __m512 c = _mm512_set1_ps(corr);
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512d a = _mm512_mul_pd(_mm512_loadu_pd(mass + i), p);
    const __m512d b = _mm512_mul_pd(_mm512_loadu_pd(mass + i + 8), p);
    const unsigned small =
        static_cast<unsigned>(_mm512_cmp_pd_mask(a, tiny, _CMP_LT_OQ) & _mm512_cmp_pd_mask(a, zero, _CMP_GT_OQ)) |
        static_cast<unsigned>(_mm512_cmp_pd_mask(b, tiny, _CMP_LT_OQ) & _mm512_cmp_pd_mask(b, zero, _CMP_GT_OQ)) << 8;
    const __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(a)), _mm512_cvtpd_ps(b), 1);
    _mm512_storeu_ps(out + i, _mm512_add_ps(simd::log_avx512(f), c));
    for (unsigned s = small; s != 0; s &= s - 1) {
      const int j = __builtin_ctz(s);
      out[i + j] = static_cast<float>(std::log(mass[i + j]) - log_z);
    }
  }
  log_ratio_scalar<float>(mass + i, n - i, pz, corr, log_z, out + i);
}

CTALIGN_TARGET_AVX512 void exp_n_avx512(const float* v, std::int64_t n, float* y) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, simd::exp_avx512(_mm512_loadu_ps(v + i)));
  exp_n_scalar<float>(v + i, n - i, y + i);
}

template <class T, bool kOrEqual = false>
CTALIGN_TARGET_AVX512 std::int64_t first_above_avx512(const void* xv, std::int64_t n, float threshold) {
  constexpr int kCmp = kOrEqual ? _CMP_GE_OQ : _CMP_GT_OQ;
  const T* x = static_cast<const T*>(xv);
  const __m512 t = _mm512_set1_ps(threshold);
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const unsigned lo = _mm512_cmp_ps_mask(simd::load16(x + i), t, kCmp);
    const unsigned hi = _mm512_cmp_ps_mask(simd::load16(x + i + 16), t, kCmp);
    if (lo | hi) return i + __builtin_ctz(lo | (hi << 16));
  }
  return i + first_above_scalar<T, float, kOrEqual>(x + i, n - i, threshold);
}

template <class T>
RowKernels<float> avx512_table() {
  return {stats_avx512<T>, exp_store_avx512<T>, exp_scatter_avx512<T>, grouped_grad_avx512<T>, exp_n_avx512,
          log_n_avx512, log_ratio_avx512, first_above_avx512<T>, first_above_avx512<T, true>};
}
#endif  // CTALIGN_X86

// ---- instruction set selection --------------------------------------------------------------
Isa detect_isa() {
#ifdef CTALIGN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;  // AVX2 CPUs have F16C
#endif
  return Isa::scalar;
}

std::atomic<int> g_isa{-1};

Isa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(detect_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

template <class T>
RowKernels<float> float_table_for(Isa isa) {
#ifdef CTALIGN_X86
  if (isa == Isa::avx512) return avx512_table<T>();
  if (isa == Isa::avx2) return avx2_table<T>();
#endif
  (void)isa;
  return scalar_table<T, float>();
}

template <class C>
RowKernels<C> row_kernels(ElemType type);

template <>
RowKernels<float> row_kernels<float>(ElemType type) {
  const Isa isa = current_isa();
  switch (type) {
    case ElemType::f32: return float_table_for<float>(isa);
    case ElemType::bf16: return float_table_for<bf16_t>(isa);
    case ElemType::f16: return float_table_for<f16_t>(isa);
    default: throw InputError("projection kernels: fp64 logits need double outputs");
  }
}

#ifdef CTALIGN_X86
// The eight-row table of an instruction set for element type T (accumulate with and without the
// in-loop totals, finish, gradient).
template <class T>
Block8Kernels avx512_block8() {
  return {block8_accumulate_avx512<T, true>, block8_accumulate_avx512<T, false>, block8_finish_avx512,
          block8_grad_avx2<T>};
}
template <class T>
Block8Kernels avx2_block8() {
  return {block8_accumulate_avx2<T, true>, block8_accumulate_avx2<T, false>, block8_finish_avx2, block8_grad_avx2<T>};
}
#endif

// Eight-row kernels of the current instruction set, or nullptr members (scalar ISA: one row at a time).
Block8Kernels block8_kernels(ElemType type) {
#ifdef CTALIGN_X86
  const Isa isa = current_isa();
  if (isa == Isa::avx512) {
    switch (type) {
      case ElemType::f32: return avx512_block8<float>();
      case ElemType::bf16: return avx512_block8<bf16_t>();
      case ElemType::f16: return avx512_block8<f16_t>();
      default: break;
    }
  } else if (isa == Isa::avx2) {
    switch (type) {
      case ElemType::f32: return avx2_block8<float>();
      case ElemType::bf16: return avx2_block8<bf16_t>();
      case ElemType::f16: return avx2_block8<f16_t>();
      default: break;
    }
  }
#endif
  (void)type;
  return {nullptr, nullptr, nullptr, nullptr};
}

template <>
RowKernels<double> row_kernels<double>(ElemType type) {
  if (type != ElemType::f64) throw InputError("projection kernels: double outputs need fp64 logits");
  return scalar_table<double, double>();
}

// ---- threads --------------------------------------------------------------------------------
// Calls fn(item, thread_index) for every item in [0, n_items) on up to n_threads threads (the
// caller's thread included), items handed out one at a time. Rethrows the first worker exception.
template <class Fn>
void parallel_for(std::int64_t n_items, int n_threads, Fn&& fn) {
  n_threads = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(n_threads, n_items)));
  if (n_threads <= 1) {
    for (std::int64_t i = 0; i < n_items; ++i) fn(i, 0);
    return;
  }
  std::atomic<std::int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&](int tid) {
    try {
      for (std::int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) fn(i, tid);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n_items);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_threads - 1);
  for (int t = 1; t < n_threads; ++t) threads.emplace_back(worker, t);
  worker(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

int thread_count(int requested, std::int64_t total_elements) {
  if (requested <= 0) requested = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (total_elements < kMinParallelWork) return 1;
  return requested;
}

// ---- validation -----------------------------------------------------------------------------
std::size_t elem_size(ElemType t) {
  switch (t) {
    case ElemType::f32: return 4;
    case ElemType::bf16: return 2;
    case ElemType::f16: return 2;
    case ElemType::f64: return 8;
  }
  throw InputError("logits: unknown element type");
}

void check_logits(const char* op, const Logits& x) {
  const std::string p = std::string(op) + ": ";
  elem_size(x.type);
  if (x.n_rows < 0) throw InputError(p + "negative number of rows");
  if (x.vocab_size < 1) throw InputError(p + "vocab_size must be at least 1");
  if (x.row_stride < x.vocab_size && x.n_rows > 1) {
    throw InputError(p + "row stride " + std::to_string(x.row_stride) + " is smaller than vocab_size " +
                     std::to_string(x.vocab_size));
  }
  if (x.n_rows > 0 && x.data == nullptr) throw InputError(p + "logits data is null");
  if (!(x.temperature > 0) || !std::isfinite(x.temperature)) {
    throw InputError(p + "temperature must be a finite number > 0, got " + std::to_string(x.temperature));
  }
}

template <class Out>
void check_out_type(const char* op, ElemType t) {
  if ((t == ElemType::f64) != std::is_same_v<Out, double>) {
    throw InputError(std::string(op) + ": outputs must be double for fp64 logits and float otherwise");
  }
}

void check_group(const char* op, const std::int32_t* group, std::int64_t v, std::int32_t n_groups) {
  if (n_groups < 1) throw InputError(std::string(op) + ": n_groups must be at least 1");
  for (std::int64_t t = 0; t < v; ++t) {
    if (group[t] < 0 || group[t] >= n_groups) {
      throw InputError(std::string(op) + ": group[" + std::to_string(t) + "] = " + std::to_string(group[t]) +
                       " is outside [0, " + std::to_string(n_groups) + ")");
    }
  }
}

// Rows and ranges of range queries (not the order).
void check_queries_shape(const char* op, const Logits& x, const RangeQueries& q) {
  const std::string p = std::string(op) + ": ";
  if (q.order_size < 0) throw InputError(p + "bad order size");
  if (q.n_cols < 0) throw InputError(p + "negative number of range columns");
  if (q.rows == nullptr) {
    if (q.n_queries != x.n_rows) throw InputError(p + "without rows, there must be one query per logits row");
  } else {
    for (std::int64_t i = 0; i < q.n_queries; ++i) {
      if (q.rows[i] < 0 || q.rows[i] >= x.n_rows) {
        throw InputError(p + "rows[" + std::to_string(i) + "] = " + std::to_string(q.rows[i]) + " is outside [0, " +
                         std::to_string(x.n_rows) + ")");
      }
    }
  }
  const std::int64_t range_rows = q.shared ? 1 : q.n_queries;
  if (range_rows * q.n_cols > 0 && (q.lo == nullptr || q.hi == nullptr)) throw InputError(p + "ranges are null");
  for (std::int64_t i = 0; i < range_rows * q.n_cols; ++i) {
    const std::int32_t lo = q.lo[i], hi = q.hi[i];
    if (lo < 0 || lo > hi || hi > q.order_size) {
      throw InputError(p + "range [" + std::to_string(lo) + ", " + std::to_string(hi) + ") at query " +
                       std::to_string(i / std::max<std::int64_t>(1, q.n_cols)) + ", column " +
                       std::to_string(i % std::max<std::int64_t>(1, q.n_cols)) + " is not inside [0, " +
                       std::to_string(q.order_size) + "]");
    }
  }
}

void check_queries(const char* op, const Logits& x, const RangeQueries& q) {
  const std::string p = std::string(op) + ": ";
  if (q.order_size < 0 || (q.order_size > 0 && q.order == nullptr)) throw InputError(p + "bad order");
  for (std::int64_t i = 0; i < q.order_size; ++i) {
    if (q.order[i] < 0 || q.order[i] >= x.vocab_size) {
      throw InputError(p + "order[" + std::to_string(i) + "] = " + std::to_string(q.order[i]) +
                       " is not a token id below vocab_size " + std::to_string(x.vocab_size));
    }
  }
  check_queries_shape(op, x, q);
}

const char* row_ptr(const Logits& x, std::int64_t r) {
  return static_cast<const char*>(x.data) + r * x.row_stride * static_cast<std::int64_t>(elem_size(x.type));
}

bool row_is_bad(double mx, double mn, bool nan) { return nan || !std::isfinite(mx) || !std::isfinite(mn); }

// Rows grouped by the queries that read them: queries of row r are ids[start[r] : start[r + 1]].
struct QueriesByRow {
  std::vector<std::int64_t> start, ids, active_rows;
};

// rows: [n_queries] row of each query, or nullptr (query q reads row q).
QueriesByRow group_queries(std::int64_t n_rows, const std::int64_t* rows, std::int64_t n_queries) {
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

QueriesByRow group_queries(const Logits& x, const RangeQueries& q) { return group_queries(x.n_rows, q.rows, q.n_queries); }

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

// ---- drivers --------------------------------------------------------------------------------
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
  double shift = -kInf;
  for (std::int64_t c0 = 0; c0 < v; c0 += kChunk) {
    const std::int64_t n = std::min(kChunk, v - c0);
    RowStats<C> st;
    k.stats(row + c0 * esize, n, scale, &st);
    if (row_is_bad(st.max, st.min, st.nan)) {
      std::fill(o, o + g_count, static_cast<Out>(kNaN));
      lse[r] = static_cast<Out>(kNaN);
      return;
    }
    if (st.max > shift + kSlack) {
      const double next = static_cast<double>(static_cast<C>(static_cast<double>(st.max) + kLead));
      if (shift > -kInf) {
        const double f = std::exp(shift - next);
        for (double& a : acc) a *= f;
      }
      shift = next;
    }
    k.exp_scatter(row + c0 * esize, n, scale, static_cast<C>(shift), group + c0, acc.data(), copies);
  }
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
  double shift[8], z[8];
  float shift_f[8];
  bool bad[8];
  for (int j = 0; j < 8; ++j) {
    rows[j] = row_ptr(x, r0 + j);
    shift[j] = -kInf;
    z[j] = 0;
    bad[j] = false;
  }
  for (std::int64_t c0 = 0; c0 < v; c0 += kBlockChunk) {
    const std::int64_t n = std::min(kBlockChunk, v - c0);
    for (int j = 0; j < 8; ++j) {
      if (bad[j]) continue;
      RowStats<float> st;
      k.stats(static_cast<const char*>(rows[j]) + c0 * esize, n, scale, &st);
      if (row_is_bad(st.max, st.min, st.nan)) {
        bad[j] = true;  // its column fills with garbage from here on; the row's outputs become NaN
        if (!(shift[j] > -kInf)) shift[j] = 0;
        continue;
      }
      if (st.max > shift[j] + kSlack) {
        const double next = static_cast<double>(static_cast<float>(static_cast<double>(st.max) + kLead));
        if (shift[j] > -kInf) {
          const double f = std::exp(shift[j] - next);
          for (std::int64_t g = 0; g < g_count; ++g) acc[g * 8 + j] *= f;
          z[j] *= f;
        }
        shift[j] = next;
      }
    }
    for (int j = 0; j < 8; ++j) shift_f[j] = static_cast<float>(shift[j]);
    (prefetch_acc ? b.accumulate : b.accumulate_no_totals)(rows, c0, n, prefetch_acc ? v - c0 : 0, scale, shift_f,
                                                           group, acc, z);
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
      lse[r0 + j] = static_cast<float>(shift[j] + std::log(z[j]) - kExpBias * kLn2);
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
  std::vector<std::vector<C>> a_of(threads), c_of(threads);

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
        for (int j = 0; j < 8; ++j) {
          const std::int64_t r = item * 8 + j;
          grad_constants<float, Out>(out + r * g_count, grad_out + r * g_count, static_cast<double>(lse[r]), g_count,
                                     a8 + j, c8 + j, 8);
          rows[j] = row_ptr(x, r);
          dx[j] = grad + r * grad_width;
        }
        b.grad(rows, v, scale, group, a8, c8, dx);
        for (int j = 0; j < 8; ++j) std::fill(dx[j] + v, dx[j] + grad_width, 0.0f);
      }
      return;
    }
    a.resize(g_count);
    c.resize(g_count);
    const std::int64_t r_begin = first_single + (item - n_blocks) * rows_per_item;
    const std::int64_t r_end = std::min(x.n_rows, r_begin + rows_per_item);
    for (std::int64_t r = r_begin; r < r_end; ++r) {
      grad_constants<C, Out>(out + r * g_count, grad_out + r * g_count, static_cast<double>(lse[r]), g_count, a.data(),
                             c.data(), 1);
      Out* dx = grad + r * grad_width;
      k.grouped_grad(row_ptr(x, r), v, scale, group, a.data(), c.data(), dx);
      std::fill(dx + v, dx + grad_width, Out(0));
    }
  });
}

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

template <class C, class Out>
void range_forward(const Logits& x, const RangeQueries& q, Out* out, Out* lse, int n_threads) {
  const RowKernels<C> k = row_kernels<C>(x.type);
  const std::int64_t v = x.vocab_size, m = q.order_size, cols = q.n_cols;
  const C scale = static_cast<C>(1.0 / x.temperature);
  const QueriesByRow byrow = group_queries(x, q);
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
      shift = st.max;
      z = k.exp_store(row, v, scale, static_cast<C>(shift), sc.e.data());
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
  const QueriesByRow byrow = group_queries(x, q);
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
    const double z = k.exp_store(row, v, scale, st.max, sc.e.data());
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


// ---- trie-node conditionals -----------------------------------------------------------------
// Validates rows, nodes and the order once per call: ids in [0, V), node ranges inside the order,
// children in range whose ranges tile [end, hi) in order, symbols below the output's symbol columns
// (each distinct node once). whole_tables = false (the sparse kernels, which read no order and check
// each child they probe): rows, nodes, node ranges and child_start only.
void check_trie_queries(const char* op, const Logits& x, const TrieQueries& q, bool whole_tables = true) {
  const std::string name(op);
  const TrieNodes& t = q.trie;
  const std::int64_t n_sym = q.drop_end ? q.width : q.width - 1;
  if (n_sym < 0) throw InputError(name + ": width must be at least 1 with the end column");
  for (std::int64_t i = 0; whole_tables && i < q.order_size; ++i) {
    if (q.order[i] < 0 || q.order[i] >= x.vocab_size) {
      throw InputError(name + ": order[" + std::to_string(i) + "] = " + std::to_string(q.order[i]) +
                       " is outside the vocabulary [0, " + std::to_string(x.vocab_size) + ")");
    }
  }
  auto bad_node = [&](std::int64_t v, const std::string& what) {
    throw InputError(name + ": trie node " + std::to_string(v) + " " + what);
  };
  for (std::int64_t i = 0; i < q.n_queries; ++i) {
    const std::int64_t r = q.rows[i], v = q.nodes[i];
    if (r < 0 || r >= x.n_rows) {
      throw InputError(name + ": rows[" + std::to_string(i) + "] = " + std::to_string(r) + " is outside [0, " +
                       std::to_string(x.n_rows) + ")");
    }
    if (v < 0 || v >= t.n_nodes) {
      throw InputError(name + ": nodes[" + std::to_string(i) + "] = " + std::to_string(v) + " is outside [0, " +
                       std::to_string(t.n_nodes) + ")");
    }
  }
  // Each distinct node once (queries repeat nodes: every row may ask at the root, whose children are
  // one per first symbol).
  std::vector<std::int64_t> distinct(q.nodes, q.nodes + q.n_queries);
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  for (const std::int64_t v : distinct) {
    const std::int64_t lo = t.node_lo[v], end = t.node_end[v], hi = t.node_hi[v];
    if (!(0 <= lo && lo <= end && end <= hi && hi <= q.order_size)) bad_node(v, "has a range outside the order");
    if (t.child_start[v] < 0 || t.child_start[v + 1] < t.child_start[v]) bad_node(v, "has a bad child_start entry");
    if (!whole_tables) continue;  // the caller checks the children it reads
    std::int64_t pos = end;
    for (std::int64_t j = t.child_start[v]; j < t.child_start[v + 1]; ++j) {
      const std::int64_t c = t.child_node[j];
      if (c < 0 || c >= t.n_nodes) bad_node(v, "has a child outside the table");
      if (t.node_lo[c] != pos || t.node_hi[c] < pos) bad_node(v, "has children whose ranges do not tile its own");
      if (t.node_symbol[c] < 0 || t.node_symbol[c] >= n_sym) {
        bad_node(v, "has a child symbol " + std::to_string(t.node_symbol[c]) + " outside [0, " + std::to_string(n_sym) +
                        ")");
      }
      pos = t.node_hi[c];
    }
    if (pos != hi) bad_node(v, "has children whose ranges do not tile its own");
  }
}

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
      shift = st.max;
      z = k.exp_store(row, v, scale, static_cast<C>(shift), sc.e.data());
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
    k.exp_store(row, v, scale, st.max, sc.e.data());
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

// ---- sparse rows ----------------------------------------------------------------------------
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
      s1 += exp_c(static_cast<C>(lp - mx));
      st += exp_c(static_cast<C>((lp - mx) * inv_t));
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

[[noreturn]] void bad_table(const char* op, const char* table, std::int64_t id, std::int64_t value) {
  throw InputError(std::string(op) + ": " + table + "[" + std::to_string(id) + "] = " + std::to_string(value) +
                   " is out of range");
}

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

void check_topk(const char* op, const TopKRows& x) {
  const std::string p = std::string(op) + ": ";
  elem_size(x.type);
  if (x.n_rows < 0 || x.k < 0) throw InputError(p + "negative TopK shape");
  if (x.n_rows * x.k > 0 && (x.indices == nullptr || x.logprobs == nullptr)) throw InputError(p + "TopK data is null");
  if (x.vocab_size < 1) throw InputError(p + "vocab_size must be at least 1");
  if (!(x.temperature > 0) || !std::isfinite(x.temperature)) {
    throw InputError(p + "temperature must be a finite number > 0, got " + std::to_string(x.temperature));
  }
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

template <class Out>
using Compute = std::conditional_t<std::is_same_v<Out, double>, double, float>;

// ---- top-k of dense rows ----------------------------------------------------------------------
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
    cand.push_back({to_c(row[i], C()), i});
    if (cand.size() >= cap) cut();
  };
  // Pass 1 (streaming): per chunk the max, then e^x summed; each chunk's raw max is kept.
  const std::int64_t n_chunks = (v + kChunk - 1) / kChunk;
  std::vector<C>& chunk_max = sc.chunk_max;
  chunk_max.resize(static_cast<std::size_t>(n_chunks));
  double shift = -kInf, z = 0;
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
    const double scaled_max = static_cast<double>(st.max * scale);
    if (scaled_max > shift + kSlack) {
      const double next = static_cast<double>(static_cast<C>(scaled_max + kLead));
      if (shift > -kInf) z *= std::exp(shift - next);
      shift = next;
    }
    if (shift > -kInf) z += k.exp_store(row + c0, n, scale, static_cast<C>(shift), sc.e.data());  // else all -inf
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
  const double log_norm = shift + std::log(z) - kBias<C> * kLn2;
  for (std::int64_t j = 0; j < top; ++j) {
    id[j] = cand[static_cast<std::size_t>(j)].id;
    o[j] = static_cast<Out>(static_cast<double>(cand[static_cast<std::size_t>(j)].value) * static_cast<double>(scale) -
                            log_norm);
  }
  lse[slot] = static_cast<Out>(log_norm);
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
  std::vector<std::vector<C>> dx_of(threads, std::vector<C>(kChunk));
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
    const C a = static_cast<C>(lse[by_row.ids[q0]]), c = static_cast<C>(-g_sum);
    const char* row = row_ptr(x, r);
    C* dx = dx_of[tid].data();
    for (std::int64_t c0 = 0; c0 < v; c0 += kChunk) {
      const std::int64_t n = std::min(kChunk, v - c0);
      k.grouped_grad(row + c0 * esize, n, scale, group0.data(), &a, &c, dx);
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

// ---- public entry points --------------------------------------------------------------------
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
  if (grad_width < x.vocab_size) throw InputError("grouped_logmass_backward: grad_width is smaller than vocab_size");
  grouped_backward<Compute<Out>, Out>(x, group, n_groups, out, lse, grad_out, grad, grad_width, n_threads);
}

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
  if (grad_width < x.vocab_size) throw InputError("range_logmass_backward: grad_width is smaller than vocab_size");
  range_backward<Compute<Out>, Out>(x, q, out, grad_out, grad, grad_width, n_threads);
}

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

namespace {
void check_topk_rows(const char* op, const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t k) {
  const std::string p = std::string(op) + ": ";
  if (k < 1 || k > x.vocab_size) {
    throw InputError(p + "k must be in [1, vocab_size = " + std::to_string(x.vocab_size) + "], got " + std::to_string(k));
  }
  if (rows == nullptr && n_out != x.n_rows) throw InputError(p + "without rows, one output per logits row");
  for (std::int64_t i = 0; rows != nullptr && i < n_out; ++i) {
    if (rows[i] < 0 || rows[i] >= x.n_rows) {
      throw InputError(p + "rows[" + std::to_string(i) + "] = " + std::to_string(rows[i]) + " is outside [0, " +
                       std::to_string(x.n_rows) + ")");
    }
  }
}
}  // namespace

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
  if (grad_width < x.vocab_size) throw InputError("topk_logprobs_backward: grad_width is smaller than vocab_size");
  for (std::int64_t i = 0; i < n_out * k; ++i) {
    if (ids[i] < 0 || ids[i] >= x.vocab_size) {
      throw InputError("topk_logprobs_backward: output row " + std::to_string(i / k) + ": id " + std::to_string(ids[i]) +
                       " is outside [0, vocab_size)");
    }
  }
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

template void topk_grouped_logmass<float>(const TopKRows&, const std::int32_t*, std::int32_t, float*, int);
template void topk_grouped_logmass<double>(const TopKRows&, const std::int32_t*, std::int32_t, double*, int);
template void topk_grouped_sparse<float>(const TopKRows&, const std::int32_t*, std::int32_t, std::int64_t*, float*,
                                          int);
template void topk_grouped_sparse<double>(const TopKRows&, const std::int32_t*, std::int32_t, std::int64_t*, double*,
                                           int);

template void grouped_logmass<float>(const Logits&, const std::int32_t*, std::int32_t, float*, float*, int);
template void grouped_logmass<double>(const Logits&, const std::int32_t*, std::int32_t, double*, double*, int);
template void grouped_logmass_backward<float>(const Logits&, const std::int32_t*, std::int32_t, const float*,
                                              const float*, const float*, float*, std::int64_t, int);
template void grouped_logmass_backward<double>(const Logits&, const std::int32_t*, std::int32_t, const double*,
                                               const double*, const double*, double*, std::int64_t, int);
template void range_logmass<float>(const Logits&, const RangeQueries&, float*, float*, int);
template void range_logmass<double>(const Logits&, const RangeQueries&, double*, double*, int);
template void range_logmass_backward<float>(const Logits&, const RangeQueries&, const float*, const float*,
                                            const float*, float*, std::int64_t, int);
template void range_logmass_backward<double>(const Logits&, const RangeQueries&, const double*, const double*,
                                             const double*, double*, std::int64_t, int);


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
  if (grad_width < x.vocab_size) {
    throw InputError("trie_conditional_logprobs_backward: grad_width is smaller than vocab_size");
  }
  trie_backward<Compute<Out>, Out>(x, q, grad_out, grad, grad_width, n_threads);
}

template void trie_conditional_logprobs<float>(const Logits&, const TrieQueries&, float*, float*, int);
template void trie_conditional_logprobs<double>(const Logits&, const TrieQueries&, double*, double*, int);
template void trie_conditional_logprobs_backward<float>(const Logits&, const TrieQueries&, const float*, float*,
                                                        std::int64_t, int);
template void trie_conditional_logprobs_backward<double>(const Logits&, const TrieQueries&, const double*, double*,
                                                         std::int64_t, int);


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

Isa best_isa() { return detect_isa(); }
Isa active_isa() { return current_isa(); }

void set_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(detect_isa())) {
    throw InputError(std::string("set_isa: this CPU cannot run ") + isa_name(isa) + " (best: " +
                     isa_name(detect_isa()) + ")");
  }
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "unknown";
}

}  // namespace ctalign::kernels
