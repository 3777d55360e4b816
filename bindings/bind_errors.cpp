// C++ errors are mapped to Python exceptions once, here: ctalign::InputError -> ValueError,
// ctalign::FormatError -> ctalign._core.FormatError (a ValueError), std::bad_alloc -> MemoryError.
#include "bindings.h"
#include "errors.h"

namespace ctalign::bindings {
void bind_errors(pybind11::module_& m) {
  static pybind11::exception<ctalign::FormatError> format_error(m, "FormatError", PyExc_ValueError);
  pybind11::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ctalign::FormatError& e) {
      pybind11::set_error(format_error, e.what());
    } catch (const ctalign::InputError& e) {
      pybind11::set_error(PyExc_ValueError, e.what());
    }
  });
}
}  // namespace ctalign::bindings
