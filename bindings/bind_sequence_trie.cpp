// TODO(owner): bindings for cpp/sequence_trie.h
#include "bindings.h"
namespace ctalign::bindings {
void bind_sequence_trie(pybind11::module_& m) { (void)m; }
}  // namespace ctalign::bindings
