// Shared declarations for the pybind11 module ctalign._core: one bind_*.cpp per core file.
#pragma once
#include <pybind11/pybind11.h>

namespace ctalign::bindings {
void bind_errors(pybind11::module_& m);
void bind_token_table(pybind11::module_& m);
void bind_sequence_trie(pybind11::module_& m);
void bind_merge_table(pybind11::module_& m);
void bind_alignment_map(pybind11::module_& m);
void bind_projection_kernels(pybind11::module_& m);
void bind_token_alignment(pybind11::module_& m);
}  // namespace ctalign::bindings
