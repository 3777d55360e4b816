// The scalar instruction set's row tables (any CPU; also the fp64 path): row_primitives.h compiled
// for the build's baseline target, with no ISA region and no eight-row kernels.
#include "kernels/row_primitives.h"

namespace ctalign::kernels::detail {

template <>
RowKernels<float> isa_row_kernels<Isa::scalar>(ElemType type) {
  return float_row_table<Scalar>(type);
}
template <>
Block8Kernels isa_block8_kernels<Isa::scalar>(ElemType) {
  return {nullptr, nullptr, nullptr, nullptr};
}
RowKernels<double> f64_row_kernels() { return row_table<ScalarF64, double>(); }

}  // namespace ctalign::kernels::detail
