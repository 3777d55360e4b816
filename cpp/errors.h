// Error types of the core. Bindings translate them once (bindings/bind_errors.cpp).
#pragma once
#include <stdexcept>
#include <string>

namespace ctalign {
// Bad arguments: wrong sizes, ids out of range, inconsistent tables. Becomes ValueError.
struct InputError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Malformed serialized data (artifacts, tables). Becomes ctalign._core.FormatError (a ValueError).
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
}  // namespace ctalign
