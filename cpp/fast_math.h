// Vectorised exp and log in float for the projection kernels, element loads that widen fp32 / bf16 /
// fp16 to float, and an 8x8 float transpose, for three instruction sets: plain C++ (any CPU),
// AVX2+FMA+F16C and AVX-512 (F, BW, DQ, VL). kernels/isa.cpp picks one at run time (cpuid);
// nothing here needs -march at build time: every SIMD function carries its own target attribute.
//
// exp(d, bias) = e^d 2^bias: n = round(d log2(e)), r = d - n ln2 (two-part ln2, so r is exact to
//   float rounding), e^r by a degree-5 polynomial fitted on [-ln2/2, ln2/2] (relative error about
//   2.8e-7 evaluated in float), times 2^(n + bias) (scalef / exponent bits). The bias moves float's
//   range: with bias 90, e^d is kept down to d = -150 and up to d = 26. n + bias < -126 gives
//   exactly 0, as does d = -inf; NaN stays NaN; n + bias is clamped at 127. The scalar twin runs
//   the same steps without fused multiply-adds (results agree to an ulp or two).
// log(x), x >= 0: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(1 + f) by the classic degree-9
//   series-fitted polynomial (Cephes logf coefficients), about 1 ulp; log(0) = -inf, log(inf) = inf,
//   NaN stays NaN. Inputs below the smallest normal float are scaled up first.
// Cost: about 13 vector operations per exp, 20 per log, 24 shuffles per 8x8 transpose. log has an
// AVX-512 twin (log_avx512, same steps, 16 lanes).
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#define CTALIGN_X86 1
#include <immintrin.h>
#endif

namespace ctalign::simd {

// Element types of logits rows. bf16 and fp16 are carried as raw 16-bit patterns.
struct bf16_t { std::uint16_t bits; };
struct f16_t { std::uint16_t bits; };

namespace mathc {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kTiny = -126.0f;  // below: 2^t is not a normal float, the result is 0
constexpr float kClampLo = -127.0f, kClampHi = 127.0f;
// e^r on [-ln2/2, ln2/2], highest degree first (degree 5, fitted: relative error 2.8e-7 in float).
constexpr float kE5 = 8.52525606751442e-3f, kE4 = 4.192159324884415e-2f, kE3 = 0.1666434407234192f,
                kE2 = 0.49998828768730164f, kE1 = 1.0000005960464478f, kE0 = 1.0000001192092896f;
// log(1 + f) = f - f^2/2 + f^3 P(f), P highest degree first.
constexpr float kL8 = 7.0376836292e-2f, kL7 = -1.1514610310e-1f, kL6 = 1.1676998740e-1f,
                kL5 = -1.2420140846e-1f, kL4 = 1.4249322787e-1f, kL3 = -1.6668057665e-1f,
                kL2 = 2.0000714765e-1f, kL1 = -2.4999993993e-1f, kL0 = 3.3333331174e-1f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kSqrtHalf = 0.707106781186547524f;
constexpr float kMinNormal = 1.17549435e-38f;
}  // namespace mathc

inline float bits_to_float(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline std::uint32_t float_to_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// ---- scalar ---------------------------------------------------------------------------------
inline float exp_scalar(float d, int bias = 0) {
  using namespace mathc;
  const float b = static_cast<float>(bias);
  float t = d * kLog2e;
  if (!(t >= kTiny - b)) return t != t ? t : 0.0f;  // NaN stays NaN; tiny and -inf give 0
  if (t > kClampHi - b) t = kClampHi - b;
  const float magic = 12582912.0f;  // 1.5 * 2^23: rounds to nearest without libm or SSE4.1
  const float n = (t + magic) - magic;
  float f = d - n * kLn2Hi;
  f = f - n * kLn2Lo;
  float p = kE5;
  p = p * f + kE4;
  p = p * f + kE3;
  p = p * f + kE2;
  p = p * f + kE1;
  p = p * f + kE0;
  return p * bits_to_float(static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + bias + 127) << 23);
}

inline float log_scalar(float x) {
  using namespace mathc;
  if (!(x > 0)) return x == 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  if (x == std::numeric_limits<float>::infinity()) return x;
  float e_adj = 0;
  if (x < kMinNormal) {
    x *= 16777216.0f;  // 2^24
    e_adj = -24;
  }
  const std::uint32_t b = float_to_bits(x);
  float e = static_cast<float>(static_cast<std::int32_t>(b >> 23) - 127) + e_adj;
  float m = bits_to_float((b & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  if (m < kSqrtHalf) {
    m = m + m;
    e -= 1;
  }
  e += 1;  // m in [0.5, 1) carried one power of two
  const float f = m - 1.0f;
  const float z = f * f;
  float y = kL8;
  y = y * f + kL7;
  y = y * f + kL6;
  y = y * f + kL5;
  y = y * f + kL4;
  y = y * f + kL3;
  y = y * f + kL2;
  y = y * f + kL1;
  y = y * f + kL0;
  y = y * f * z;
  y = y + e * kLn2Lo;
  y = y - 0.5f * z;
  return (f + y) + e * kLn2Hi;
}

inline float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }

inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);
  std::uint32_t e = 113;  // subnormal half: renormalise
  while ((man & 0x400u) == 0) {
    man <<= 1;
    --e;
  }
  return bits_to_float(sign | (e << 23) | ((man & 0x3ffu) << 13));
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bf16_to_float(x.bits); }
inline float to_float(f16_t x) { return f16_to_float(x.bits); }

#ifdef CTALIGN_X86
#define CTALIGN_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CTALIGN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

// ---- AVX2 (8 floats) ------------------------------------------------------------------------
CTALIGN_TARGET_AVX2 inline __m256 exp_avx2(__m256 d, int bias = 0) {
  using namespace mathc;
  const float b = static_cast<float>(bias);
  __m256 t = _mm256_mul_ps(d, _mm256_set1_ps(kLog2e));
  const __m256 tiny = _mm256_cmp_ps(t, _mm256_set1_ps(kTiny - b), _CMP_LT_OQ);  // false for NaN
  // max/min return their second operand when one is NaN: keep t second so NaN propagates.
  t = _mm256_max_ps(_mm256_set1_ps(kClampLo - b), t);
  t = _mm256_min_ps(_mm256_set1_ps(kClampHi - b), t);
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), d);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), f);
  __m256 p = _mm256_set1_ps(kE5);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE0));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127 + bias)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

CTALIGN_TARGET_AVX2 inline __m256 log_avx2(__m256 x) {
  using namespace mathc;
  const __m256 zero = _mm256_setzero_ps();
  const __m256 is_zero = _mm256_cmp_ps(x, zero, _CMP_EQ_OQ);
  const __m256 is_inf = _mm256_cmp_ps(x, _mm256_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  const __m256 not_pos = _mm256_cmp_ps(x, zero, _CMP_NGT_UQ);  // x <= 0 or NaN
  const __m256 small = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(kMinNormal), _CMP_LT_OQ),
                                     _mm256_cmp_ps(x, zero, _CMP_GT_OQ));
  const __m256 xs = _mm256_blendv_ps(x, _mm256_mul_ps(x, _mm256_set1_ps(16777216.0f)), small);
  const __m256 e_adj = _mm256_and_ps(small, _mm256_set1_ps(-24.0f));
  const __m256i b = _mm256_castps_si256(xs);
  __m256 e = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(126))), e_adj);
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));
  const __m256 lt = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrtHalf), _CMP_LT_OQ);
  m = _mm256_add_ps(m, _mm256_and_ps(lt, m));
  e = _mm256_sub_ps(e, _mm256_and_ps(lt, _mm256_set1_ps(1.0f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(kL8);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL7));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL6));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL5));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL4));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL3));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL2));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL1));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(kL0));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Lo), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  __m256 r = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Hi), _mm256_add_ps(f, y));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), not_pos);
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), is_zero);
  return _mm256_blendv_ps(r, x, is_inf);
}

CTALIGN_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
CTALIGN_TARGET_AVX2 inline __m256 load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
CTALIGN_TARGET_AVX2 inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// In place: r[j] lane k <- r[k] lane j.
CTALIGN_TARGET_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// ---- AVX-512 (16 floats) --------------------------------------------------------------------
CTALIGN_TARGET_AVX512 inline __m512 exp_avx512(__m512 d, int bias = 0) {
  using namespace mathc;
  const float b = static_cast<float>(bias);
  __m512 t = _mm512_mul_ps(d, _mm512_set1_ps(kLog2e));
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(kTiny - b), _CMP_NLT_UQ);  // n + bias >= -126 or NaN
  t = _mm512_max_ps(_mm512_set1_ps(kClampLo - b), t);  // no upper clamp: scalef overflows to +inf itself
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), d);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), f);
  __m512 p = _mm512_set1_ps(kE5);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE0));
  return _mm512_maskz_scalef_ps(keep, p, _mm512_add_ps(n, _mm512_set1_ps(b)));
}

// log_avx2's steps on 16 lanes, special cases by mask.
CTALIGN_TARGET_AVX512 inline __m512 log_avx512(__m512 x) {
  using namespace mathc;
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 is_zero = _mm512_cmp_ps_mask(x, zero, _CMP_EQ_OQ);
  const __mmask16 is_inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  const __mmask16 not_pos = _mm512_cmp_ps_mask(x, zero, _CMP_NGT_UQ);  // x <= 0 or NaN
  const __mmask16 small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMinNormal), _CMP_LT_OQ) &
                          _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ);
  const __m512 xs = _mm512_mask_mul_ps(x, small, x, _mm512_set1_ps(16777216.0f));
  const __m512 e_adj = _mm512_maskz_mov_ps(small, _mm512_set1_ps(-24.0f));
  const __m512i b = _mm512_castps_si512(xs);
  __m512 e = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(126))), e_adj);
  __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x007fffff)),
                                                 _mm512_set1_epi32(0x3f000000)));
  const __mmask16 lt = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrtHalf), _CMP_LT_OQ);
  m = _mm512_mask_add_ps(m, lt, m, m);
  e = _mm512_mask_sub_ps(e, lt, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 y = _mm512_set1_ps(kL8);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL7));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL6));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL5));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL4));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL3));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL2));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL1));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(kL0));
  y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Lo), y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  __m512 r = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Hi), _mm512_add_ps(f, y));
  r = _mm512_mask_mov_ps(r, not_pos, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  r = _mm512_mask_mov_ps(r, is_zero, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
  return _mm512_mask_mov_ps(r, is_inf, x);
}

CTALIGN_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
CTALIGN_TARGET_AVX512 inline __m512 load16(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
CTALIGN_TARGET_AVX512 inline __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif  // CTALIGN_X86

}  // namespace ctalign::simd
