// Numpy helpers shared by the bind_*.cpp files: strict array arguments and zero-copy views.
//
//   auto a = array_arg<std::int32_t>(obj, "merges", 2);  // numpy int32, 2-D, else TypeError/ValueError
//   readonly_view(vec, owner)                           // 1-D read-only view, owner kept alive as base
//   to_numpy(std::move(vec))                            // hands a vector's buffer to numpy, no copy
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace ctalign::bindings {
namespace py = pybind11;

template <class T>
bool dtype_matches(const py::dtype& dt) {
  const char kind = dt.kind();
  if (static_cast<std::size_t>(dt.itemsize()) != sizeof(T)) return false;
  if (std::is_same_v<T, std::uint8_t>) return kind == 'u' || kind == 'b';  // uint8 or bool
  if (std::is_floating_point_v<T>) return kind == 'f';
  return std::is_signed_v<T> ? kind == 'i' : kind == 'u';
}

template <class T>
const char* dtype_name() {
  if (std::is_same_v<T, std::uint8_t>) return "uint8 (or bool)";
  if (std::is_same_v<T, std::int32_t>) return "int32";
  if (std::is_same_v<T, std::int64_t>) return "int64";
  return "the expected dtype";
}

// A C-contiguous numpy array of dtype T with `ndim` dimensions (-1: any). Rejects other types and
// dtypes with TypeError and other shapes with ValueError, naming `name`. Non-contiguous input is copied.
template <class T>
py::array_t<T, py::array::c_style | py::array::forcecast> array_arg(const py::handle& obj, const char* name, int ndim = 1) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy array of " + dtype_name<T>() + ", got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!dtype_matches<T>(arr.dtype())) {
    throw py::type_error(std::string(name) + ": expected dtype " + dtype_name<T>() + ", got " +
                         std::string(py::str(arr.dtype())));
  }
  if (ndim >= 0 && arr.ndim() != ndim) {
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) + "-d array, got " +
                          std::to_string(arr.ndim()) + " dimensions");
  }
  // Same size and kind: bool -> uint8 and non-contiguous input are converted (copied), else no copy.
  auto out = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(arr);
  if (!out) throw py::error_already_set();
  return out;
}

inline void make_readonly(py::array& a) {
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
}

// Read-only 1-D view of a vector owned by `owner` (kept alive as the array's base).
template <class T>
py::array_t<T> readonly_view(const std::vector<T>& v, const py::handle& owner) {
  py::array_t<T> a({static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))}, v.data(), owner);
  make_readonly(a);
  return a;
}

// Moves a vector into a new numpy array (no copy of the data).
template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape = {}) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  if (shape.empty()) shape = {static_cast<py::ssize_t>(heap->size())};
  return py::array_t<T>(shape, heap->data(), owner);
}

}  // namespace ctalign::bindings
