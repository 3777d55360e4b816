// Run-time choice of the instruction set: the best the CPU runs (cpuid), unless set_isa forced a
// lower one (tests and benchmarks run every ISA this way); each kernel call asks for its tables here.
#include <atomic>
#include <string>

#include "errors.h"
#include "kernels/row_kernels.h"
#include "kernels/simd_traits.h"

namespace ctalign::kernels {
namespace {

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

}  // namespace

namespace detail {

template <>
RowKernels<float> row_kernels<float>(ElemType type) {
  switch (current_isa()) {
#ifdef CTALIGN_X86
    case Isa::avx512: return isa_row_kernels<Isa::avx512>(type);
    case Isa::avx2: return isa_row_kernels<Isa::avx2>(type);
#endif
    default: return isa_row_kernels<Isa::scalar>(type);
  }
}

template <>
RowKernels<double> row_kernels<double>(ElemType type) {
  if (type != ElemType::f64) throw InputError("projection kernels: double outputs need fp64 logits");
  return f64_row_kernels();
}

Block8Kernels block8_kernels(ElemType type) {
  switch (current_isa()) {
#ifdef CTALIGN_X86
    case Isa::avx512: {
      Block8Kernels b = isa_block8_kernels<Isa::avx512>(type);
      b.grad = isa_block8_kernels<Isa::avx2>(type).grad;  // the eight-row gradient runs 256 bits wide
      return b;
    }
    case Isa::avx2: return isa_block8_kernels<Isa::avx2>(type);
#endif
    default: return isa_block8_kernels<Isa::scalar>(type);
  }
}

}  // namespace detail

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
