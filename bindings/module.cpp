// ctalign._core: the compiled core. Each bind_* function lives in the bind_*.cpp of its core file.
#include "bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "ctalign compiled core: token tables, byte tries, BPE merge tables, alignment maps, kernels";
  using namespace ctalign::bindings;
  bind_errors(m);
  bind_token_table(m);
  bind_sequence_trie(m);
  bind_merge_table(m);
  bind_alignment_map(m);
  bind_projection_kernels(m);
  bind_token_alignment(m);
}
