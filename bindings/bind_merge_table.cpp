// TODO(owner): bindings for cpp/merge_table.h
#include "bindings.h"
namespace ctalign::bindings {
void bind_merge_table(pybind11::module_& m) { (void)m; }
}  // namespace ctalign::bindings
