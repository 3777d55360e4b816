// The row primitives the kernel families are built on, as tables of function pointers: one table per
// (instruction set, element type), picked at run time (isa.cpp: cpuid, or set_isa). The primitives
// themselves are written once over the instruction-set traits (row_primitives.h, simd_traits.h) and
// compiled once per instruction set (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp).
#pragma once
#include <cstdint>
#include <type_traits>

#include "projection_kernels.h"

namespace ctalign::kernels::detail {

constexpr std::int64_t kChunk = 2048;      // one row: elements per max-then-exp step (L1)
constexpr std::int64_t kBlockChunk = 512;  // eight rows: elements per step (8 x 2 KB in L1)
constexpr double kTinyRatio = 0x1p-120;    // log_ratio: probabilities below this take a double log
// Masses are accumulated as e^(x/T - shift) 2^kExpBias (fast_math.h): float's range then holds
// e^-150 .. e^25 around the shift (the shifts are chosen by the drivers, grouped.cpp).
constexpr int kExpBias = 90;
template <class C>
constexpr int kBias = std::is_same_v<C, float> ? kExpBias : 0;  // the fp64 path needs none
// Accumulator lines of the groups kAccAhead tokens ahead are prefetched: with many groups the [G][8]
// table outgrows L2 and each token's line would otherwise be a cache miss on the critical path.
constexpr std::int64_t kAccAhead = 64;

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
  // The exponents below are d = (x[i] - offset) * scale - shift, formed with one rounding after the
  // subtraction (common.h, Shift: offset is 0 unless the row's scaled logits are too large for a
  // shift in C; offset 0 runs a loop without the subtraction, so those rows cost nothing more).
  // e[i] = exp(d); returns the sum in double.
  double (*exp_store)(const void* x, std::int64_t n, C scale, C offset, C shift, C* e);
  // acc[group[i] * copies + (i % copies)] += exp(d); copies is 1 or 8.
  void (*exp_scatter)(const void* x, std::int64_t n, C scale, C offset, C shift, const std::int32_t* group,
                      double* acc, int copies);
  // dx[i] = scale * c[g] * exp((x[i] - offset) * scale - a[g]), g = group[i]: the grouped gradient
  // with a[g] = log of the group's unnormalised mass (exp(...) = the token's share of its group) and
  // c[g] = grad_out[g] - sum(grad_out) P(g).
  void (*grouped_grad)(const void* x, std::int64_t n, C scale, C offset, const std::int32_t* group, const C* a,
                       const C* c, C* dx);
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
  // For i in [begin, begin + n): acc[group[i]][k] += exp((rows[k][i] - offset[k]) * scale - shift[k])
  // 2^kExpBias, and z[k] += the same (the rows' running totals); offset nullptr: all 0 (no
  // subtraction in the loop). rows are the eight row starts. `readable`:
  // entries of group readable from begin on (>= n), for prefetching accumulator lines kAccAhead
  // tokens ahead; 0 turns that prefetch off (tables that fit in cache).
  void (*accumulate)(const void* const* rows, std::int64_t begin, std::int64_t n, std::int64_t readable,
                     float scale, const float* offset, const float* shift, const std::int32_t* group, double* acc,
                     double* z);
  // The same without the running totals (z is not touched; readable is ignored): for tables that fit
  // in cache, whose column sums give z at the end for less than the per-token adds cost (next_byte:
  // 11.4 -> 9.6 ms for 256 x 152k rows).
  void (*accumulate_no_totals)(const void* const* rows, std::int64_t begin, std::int64_t n, std::int64_t readable,
                               float scale, const float* offset, const float* shift, const std::int32_t* group,
                               double* acc, double* z);
  // out[k][g] = log(acc[g][k] * pow2[k]) + corr[k] for g < n_groups, then acc is zeroed. pow2[k] is the
  // power of two near 1 / z[k] (exact scaling), corr[k] = log(1 / pow2[k]) - log z[k] (|corr| < 1), so
  // the float log works on the group's probability itself; probabilities below 2^-120 are redone
  // as log(acc) - logz[k] in double.
  void (*finish)(double* acc, std::int64_t n_groups, const double* pow2, const float* corr, const double* logz,
                 float* const* out);
  // The grouped gradient of eight rows: dx[k][i] = scale * c[g][k] exp((rows[k][i] - offset[k]) * scale -
  // a[g][k]), g = group[i], for i < n (a, c: [G][8] floats, one 32-byte line per group; offset as above).
  void (*grad)(const void* const* rows, std::int64_t n, float scale, const float* offset, const std::int32_t* group,
               const float* a, const float* c, float* const* dx);
};

// The tables of the instruction set in use (active_isa()). row_kernels<float> throws InputError for
// fp64 logits, row_kernels<double> for any other type. block8_kernels: null members on the scalar ISA
// (one row at a time there).
template <class C>
RowKernels<C> row_kernels(ElemType type);
Block8Kernels block8_kernels(ElemType type);

// Each instruction set's tables, defined by isa_<name>.cpp (the SIMD ones on x86 only), for isa.cpp.
template <Isa I>
RowKernels<float> isa_row_kernels(ElemType type);
template <Isa I>
Block8Kernels isa_block8_kernels(ElemType type);
RowKernels<double> f64_row_kernels();  // fp64 logits: ScalarF64 on every instruction set

}  // namespace ctalign::kernels::detail
