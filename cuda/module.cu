// ctalign._cuda: placeholder until the CUDA kernels land (issue: CUDA kernels for the projection ops).
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_cuda, m) { m.doc() = "ctalign CUDA kernels"; }
