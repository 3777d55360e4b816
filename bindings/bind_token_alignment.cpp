// TODO(owner): bindings for cpp/token_alignment.h
#include "bindings.h"
namespace ctalign::bindings {
void bind_token_alignment(pybind11::module_& m) { (void)m; }
}  // namespace ctalign::bindings
