// Instruction-set traits of the CPU projection kernels: one struct per instruction set with the
// vector operations the row primitives (row_primitives.h) are written in, so a primitive is written
// once and adding an instruction set is one new struct here (plus its table file, isa_<name>.cpp).
//
//   ScalarOf<C>  plain C++, one lane; C = float (any CPU) or double (the fp64 path)
//   Avx2         AVX2 + FMA + F16C, 8 floats
//   Avx512       AVX-512 F/BW/DQ/VL, 16 floats
//
// Every struct has: C (compute type), V (kLanes values of C), M (a NaN accumulator), DW (kLanes
// doubles), and set1/load/store/arithmetic/exp/log/horizontal reductions/gather/compare masks. The
// SIMD structs also have the eight-row block operations: L8 (eight doubles: one accumulator line),
// and join8/split8 between V and kLanes / 8 groups of eight floats (__m256).
// The element math (exp, log, the fp16/bf16 widening) is fast_math.h's; the scalar lane forms
// x * scale - shift with one rounding like the vector paths' fused multiply-subtract.
//
// Each SIMD member carries its own target attribute; the primitives that use them are compiled
// inside CTALIGN_ISA_REGION_BEGIN/END (isa_avx2.cpp, isa_avx512.cpp), so no -march is needed.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fast_math.h"

// A region of functions compiled for one instruction set (the file's templates and lambdas too).
#define CTALIGN_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define CTALIGN_ISA_REGION_BEGIN(targets) \
  CTALIGN_PRAGMA(clang attribute push(__attribute__((target(targets))), apply_to = function))
#define CTALIGN_ISA_REGION_END _Pragma("clang attribute pop")
#else
#define CTALIGN_ISA_REGION_BEGIN(targets) _Pragma("GCC push_options") CTALIGN_PRAGMA(GCC target(targets))
#define CTALIGN_ISA_REGION_END _Pragma("GCC pop_options")
#endif
#define CTALIGN_AVX2_TARGETS "avx2,fma,f16c"
#define CTALIGN_AVX512_TARGETS "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"

namespace ctalign::kernels::detail {

using simd::bf16_t;
using simd::f16_t;

// ---- one lane (any CPU; C = double: the fp64 path, libm exp and log) -------------------------
template <class Comp>
struct ScalarOf {
  using C = Comp;
  using V = C;
  using M = bool;
  using DW = double;
  static constexpr int kLanes = 1;

  static V set1(C v) { return v; }
  static V load(const C* p) { return *p; }
  static V load(const bf16_t* p) { return simd::to_float(*p); }
  static V load(const f16_t* p) { return simd::to_float(*p); }
  static void store(C* p, V v) { *p = v; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) { return b > a ? b : a; }
  static V min(V a, V b) { return b < a ? b : a; }
  // a * b - c with one rounding (a * b is exact in double for float inputs).
  static V fmsub(V a, V b, V c) {
    if constexpr (std::is_same_v<C, float>) {
      return static_cast<float>(static_cast<double>(a) * b - c);
    } else {
      return a * b - c;
    }
  }
  // e^d 2^bias (float; bias 0 for double, which needs none).
  static V exp(V d, int bias) {
    if constexpr (std::is_same_v<C, float>) {
      return simd::exp_scalar(d, bias);
    } else {
      (void)bias;
      return std::exp(d);
    }
  }
  static V log(V v) {
    if constexpr (std::is_same_v<C, float>) {
      return simd::log_scalar(v);
    } else {
      return std::log(v);
    }
  }
  static C hmax(V v) { return v; }
  static C hmin(V v) { return v; }
  static M no_nan() { return false; }
  static M nan_or(M m, V y) { return m | (y != y); }
  static bool any(M m) { return m; }
  static V gather(const C* base, const std::int32_t* idx) { return base[*idx]; }
  template <bool kOrEqual>
  static unsigned cmp_bits(V a, V t) {
    return kOrEqual ? a >= t : a > t;
  }
  static DW zero_dw() { return 0.0; }
  static DW add_dw(DW acc, V v) { return acc + static_cast<double>(v); }  // acc + widen(v)
  static double hsum_dw(DW v) { return v; }
  static DW load_dw(const double* p) { return *p; }
  static DW mul_dw(DW a, double b) { return a * b; }
  static unsigned tiny_bits(DW m, double tiny) { return m < tiny && m > 0; }  // lanes in (0, tiny)
  static V narrow(DW m) { return static_cast<C>(m); }
};
using Scalar = ScalarOf<float>;
using ScalarF64 = ScalarOf<double>;

#ifdef CTALIGN_X86
#define CTALIGN_AVX2_FN CTALIGN_TARGET_AVX2 static inline
#define CTALIGN_AVX512_FN CTALIGN_TARGET_AVX512 static inline

// The members both x86 vector sets spell alike, _mm256_* and _mm512_*: FN is the member prefix (its
// target attribute), P the intrinsic prefix, VEC the float vector and MASK the NaN accumulator's
// type; WIDEN, EXP and LOG are fast_math.h's functions.
#define CTALIGN_X86_COMMON_OPS(FN, P, VEC, MASK, WIDEN, EXP, LOG)                                       \
  using C = float;                                                                                   \
  using V = VEC;                                                                                     \
  using M = MASK;                                                                                    \
  struct DW { /* kLanes doubles */                                                                   \
    VEC##d lo, hi;                                                                                   \
  };                                                                                                 \
  static constexpr int kLanes = sizeof(VEC) / sizeof(float);                                         \
  FN V set1(float v) { return P##_set1_ps(v); }                                                      \
  FN V load(const float* p) { return P##_loadu_ps(p); }                                              \
  FN V load(const bf16_t* p) { return simd::WIDEN(p); }                                              \
  FN V load(const f16_t* p) { return simd::WIDEN(p); }                                               \
  FN void store(float* p, V v) { P##_storeu_ps(p, v); }                                              \
  FN V add(V a, V b) { return P##_add_ps(a, b); }                                                    \
  FN V sub(V a, V b) { return P##_sub_ps(a, b); }                                                    \
  FN V mul(V a, V b) { return P##_mul_ps(a, b); }                                                    \
  FN V max(V a, V b) { return P##_max_ps(a, b); }                                                    \
  FN V min(V a, V b) { return P##_min_ps(a, b); }                                                    \
  FN V fmsub(V a, V b, V c) { return P##_fmsub_ps(a, b, c); }                                        \
  FN V exp(V d, int bias) { return simd::EXP(d, bias); }                                             \
  FN V log(V v) { return simd::LOG(v); }                                                             \
  FN DW zero_dw() { return {P##_setzero_pd(), P##_setzero_pd()}; }                                   \
  FN DW load_dw(const double* p) { return {P##_loadu_pd(p), P##_loadu_pd(p + kLanes / 2)}; }         \
  FN DW mul_dw(DW a, double b) { return {P##_mul_pd(a.lo, P##_set1_pd(b)), P##_mul_pd(a.hi, P##_set1_pd(b))}; }

// ---- AVX2 + FMA + F16C (8 floats) ------------------------------------------------------------
struct Avx2 {
  CTALIGN_X86_COMMON_OPS(CTALIGN_AVX2_FN, _mm256, __m256, __m256, load8, exp_avx2, log_avx2)
  using L8 = DW;  // eight doubles: one accumulator line of the eight-row blocks
  CTALIGN_AVX2_FN float hmax(V v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  CTALIGN_AVX2_FN float hmin(V v) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  CTALIGN_AVX2_FN M no_nan() { return _mm256_setzero_ps(); }
  CTALIGN_AVX2_FN M nan_or(M m, V y) { return _mm256_or_ps(m, _mm256_cmp_ps(y, y, _CMP_UNORD_Q)); }
  CTALIGN_AVX2_FN bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  CTALIGN_AVX2_FN V gather(const float* base, const std::int32_t* idx) {
    return _mm256_i32gather_ps(base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4);
  }
  template <bool kOrEqual>
  CTALIGN_AVX2_FN unsigned cmp_bits(V a, V t) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, t, kOrEqual ? _CMP_GE_OQ : _CMP_GT_OQ)));
  }
  CTALIGN_AVX2_FN DW add_dw(DW acc, V v) {
    return {_mm256_add_pd(acc.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v))),
            _mm256_add_pd(acc.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)))};
  }
  CTALIGN_AVX2_FN double hsum_dw(DW v) {
    const __m256d t = _mm256_add_pd(v.lo, v.hi);
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
  CTALIGN_AVX2_FN unsigned tiny_bits(DW m, double tiny) {
    const __m256d t = _mm256_set1_pd(tiny), zero = _mm256_setzero_pd();
    const int lo = _mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(m.lo, t, _CMP_LT_OQ), _mm256_cmp_pd(m.lo, zero, _CMP_GT_OQ)));
    const int hi = _mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(m.hi, t, _CMP_LT_OQ), _mm256_cmp_pd(m.hi, zero, _CMP_GT_OQ)));
    return static_cast<unsigned>(lo | hi << 4);
  }
  CTALIGN_AVX2_FN V narrow(DW m) { return _mm256_set_m128(_mm256_cvtpd_ps(m.hi), _mm256_cvtpd_ps(m.lo)); }

  // Eight-row blocks: one V is one group of eight floats.
  CTALIGN_AVX2_FN V join8(const __m256* parts) { return parts[0]; }
  CTALIGN_AVX2_FN void split8(V v, __m256* parts) { parts[0] = v; }
  CTALIGN_AVX2_FN L8 zero_l8() { return zero_dw(); }
  CTALIGN_AVX2_FN L8 load_l8(const double* p) { return {_mm256_load_pd(p), _mm256_load_pd(p + 4)}; }
  CTALIGN_AVX2_FN L8 loadu_l8(const double* p) { return load_dw(p); }
  CTALIGN_AVX2_FN void store_l8(double* p, L8 v) {
    _mm256_store_pd(p, v.lo);
    _mm256_store_pd(p + 4, v.hi);
  }
  CTALIGN_AVX2_FN L8 add_l8(L8 a, L8 b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
  CTALIGN_AVX2_FN L8 mul_l8(L8 a, L8 b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
  CTALIGN_AVX2_FN L8 widen8(__m256 v) {
    return {_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))};
  }
  CTALIGN_AVX2_FN __m256 narrow8(L8 m) { return narrow(m); }
  CTALIGN_AVX2_FN unsigned tiny8(L8 m, double tiny) { return tiny_bits(m, tiny); }
};

// ---- AVX-512 F/BW/DQ/VL (16 floats) ----------------------------------------------------------
struct Avx512 {
  CTALIGN_X86_COMMON_OPS(CTALIGN_AVX512_FN, _mm512, __m512, __mmask16, load16, exp_avx512, log_avx512)
  using L8 = __m512d;  // eight doubles: one accumulator line of the eight-row blocks
  CTALIGN_AVX512_FN float hmax(V v) { return _mm512_reduce_max_ps(v); }
  CTALIGN_AVX512_FN float hmin(V v) { return _mm512_reduce_min_ps(v); }
  CTALIGN_AVX512_FN M no_nan() { return 0; }
  CTALIGN_AVX512_FN M nan_or(M m, V y) { return m | _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q); }
  CTALIGN_AVX512_FN bool any(M m) { return m != 0; }
  CTALIGN_AVX512_FN V gather(const float* base, const std::int32_t* idx) {
    return _mm512_i32gather_ps(_mm512_loadu_si512(idx), base, 4);
  }
  template <bool kOrEqual>
  CTALIGN_AVX512_FN unsigned cmp_bits(V a, V t) {
    return _mm512_cmp_ps_mask(a, t, kOrEqual ? _CMP_GE_OQ : _CMP_GT_OQ);
  }
  CTALIGN_AVX512_FN DW add_dw(DW acc, V v) {
    return {_mm512_add_pd(acc.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v))),
            _mm512_add_pd(acc.hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)))};
  }
  CTALIGN_AVX512_FN double hsum_dw(DW v) { return _mm512_reduce_add_pd(_mm512_add_pd(v.lo, v.hi)); }
  CTALIGN_AVX512_FN unsigned tiny8(L8 m, double tiny) {
    return _mm512_cmp_pd_mask(m, _mm512_set1_pd(tiny), _CMP_LT_OQ) & _mm512_cmp_pd_mask(m, _mm512_setzero_pd(), _CMP_GT_OQ);
  }
  CTALIGN_AVX512_FN unsigned tiny_bits(DW m, double tiny) { return tiny8(m.lo, tiny) | tiny8(m.hi, tiny) << 8; }
  CTALIGN_AVX512_FN V narrow(DW m) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(m.lo)), _mm512_cvtpd_ps(m.hi), 1);
  }

  // Eight-row blocks: one V is two groups of eight floats.
  CTALIGN_AVX512_FN V join8(const __m256* parts) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(parts[0]), parts[1], 1);
  }
  CTALIGN_AVX512_FN void split8(V v, __m256* parts) {
    parts[0] = _mm512_castps512_ps256(v);
    parts[1] = _mm512_extractf32x8_ps(v, 1);
  }
  CTALIGN_AVX512_FN L8 zero_l8() { return _mm512_setzero_pd(); }
  CTALIGN_AVX512_FN L8 load_l8(const double* p) { return _mm512_load_pd(p); }
  CTALIGN_AVX512_FN L8 loadu_l8(const double* p) { return _mm512_loadu_pd(p); }
  CTALIGN_AVX512_FN void store_l8(double* p, L8 v) { _mm512_store_pd(p, v); }
  CTALIGN_AVX512_FN L8 add_l8(L8 a, L8 b) { return _mm512_add_pd(a, b); }
  CTALIGN_AVX512_FN L8 mul_l8(L8 a, L8 b) { return _mm512_mul_pd(a, b); }
  CTALIGN_AVX512_FN L8 widen8(__m256 v) { return _mm512_cvtps_pd(v); }
  CTALIGN_AVX512_FN __m256 narrow8(L8 m) { return _mm512_cvtpd_ps(m); }
};
#undef CTALIGN_AVX2_FN
#undef CTALIGN_AVX512_FN
#undef CTALIGN_X86_COMMON_OPS
#endif  // CTALIGN_X86

}  // namespace ctalign::kernels::detail
