// TODO(owner): bindings for cpp/alignment_map.h
#include "bindings.h"
namespace ctalign::bindings {
void bind_alignment_map(pybind11::module_& m) { (void)m; }
}  // namespace ctalign::bindings
