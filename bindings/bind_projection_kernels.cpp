// TODO(owner): bindings for cpp/projection_kernels.h
#include "bindings.h"
namespace ctalign::bindings {
void bind_projection_kernels(pybind11::module_& m) { (void)m; }
}  // namespace ctalign::bindings
