// TODO(owner): bindings for cpp/token_table.h
#include "bindings.h"
namespace ctalign::bindings {
void bind_token_table(pybind11::module_& m) { (void)m; }
}  // namespace ctalign::bindings
