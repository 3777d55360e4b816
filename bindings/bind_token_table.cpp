// Python bindings of cpp/token_table.h (and the sha256 helper). Holder: std::shared_ptr<TokenTable>.
#include <pybind11/stl.h>

#include "bindings.h"
#include "numpy_args.h"
#include "sequence_trie.h"
#include "sha256.h"
#include "token_table.h"

namespace ctalign::bindings {
namespace {

std::string_view bytes_view(const py::bytes& b) {
  char* p = nullptr;
  py::ssize_t n = 0;
  if (PyBytes_AsStringAndSize(b.ptr(), &p, &n) != 0) throw py::error_already_set();
  return {p, static_cast<std::size_t>(n)};
}

std::shared_ptr<TokenTable> make_table(const py::object& offsets_obj, const py::object& data_obj,
                                       const py::object& has_bytes_obj) {
  auto offsets = array_arg<std::int64_t>(offsets_obj, "offsets");
  auto data = array_arg<std::uint8_t>(data_obj, "data");
  auto has_bytes = array_arg<std::uint8_t>(has_bytes_obj, "has_bytes");
  std::vector<std::int64_t> o(offsets.data(), offsets.data() + offsets.size());
  std::vector<std::uint8_t> d(data.data(), data.data() + data.size());
  std::vector<std::uint8_t> h(has_bytes.data(), has_bytes.data() + has_bytes.size());
  py::gil_scoped_release release;
  return std::make_shared<TokenTable>(std::move(o), std::move(d), std::move(h));
}

}  // namespace

void bind_token_table(py::module_& m) {
  m.def(
      "sha256_hex", [](const py::bytes& b) { return sha256_hex(bytes_view(b).data(), bytes_view(b).size()); },
      py::arg("data"), "Hex sha256 of a bytes object (the core's own SHA-256).");

  py::class_<TokenTable, std::shared_ptr<TokenTable>>(m, "TokenTable", R"doc(
The id -> bytes table of a vocabulary (docs/ARCHITECTURE.md "TokenTable").

TokenTable(offsets: int64[V+1], data: uint8[offsets[V]], has_bytes: uint8|bool[V])
Token i has the bytes data[offsets[i]:offsets[i+1]]; has_bytes[i] = 0 marks a special token, which
must have no bytes, and every other token has at least one byte. Arrays are copied and validated
(ValueError names the problem). Immutable; pickles.)doc")
      .def(py::init(&make_table), py::arg("offsets"), py::arg("data"), py::arg("has_bytes"))
      .def_static(
          "from_list",
          [](const py::iterable& tokens) {
            std::vector<std::int64_t> offsets{0};
            std::vector<std::uint8_t> data, has_bytes;
            for (const py::handle& t : tokens) {
              if (t.is_none()) {
                has_bytes.push_back(0);
              } else {
                if (!PyBytes_Check(t.ptr())) {
                  throw py::type_error("TokenTable.from_list: token " + std::to_string(has_bytes.size()) +
                                       " is neither bytes nor None");
                }
                std::string_view b = bytes_view(py::reinterpret_borrow<py::bytes>(t));
                data.insert(data.end(), b.begin(), b.end());
                has_bytes.push_back(1);
              }
              offsets.push_back(static_cast<std::int64_t>(data.size()));
            }
            py::gil_scoped_release release;
            return std::make_shared<TokenTable>(std::move(offsets), std::move(data), std::move(has_bytes));
          },
          py::arg("tokens"), "Table from a list of bytes per id (None for a special token).")
      .def_property_readonly("size", &TokenTable::size, "V, the number of ids.")
      .def("__len__", &TokenTable::size)
      .def(
          "token_bytes",
          [](const TokenTable& t, std::int64_t id) -> py::object {
            t.check_id(id, "TokenTable.token_bytes");
            if (!t.has_bytes(static_cast<std::int32_t>(id))) return py::none();
            std::string_view b = t.token_bytes(static_cast<std::int32_t>(id));
            return py::bytes(b.data(), b.size());
          },
          py::arg("id"), "Bytes of token id, None for a special token.")
      .def_property_readonly("fingerprint", &TokenTable::fingerprint,
                             "Hex sha256 over V (8 bytes LE), then per id: has_bytes byte, length (8 bytes LE), bytes.")
      .def_property_readonly("max_token_length", &TokenTable::max_token_length)
      .def_property_readonly("offsets", [](py::object self) { return readonly_view(self.cast<const TokenTable&>().offsets(), self); })
      .def_property_readonly("data", [](py::object self) { return readonly_view(self.cast<const TokenTable&>().data(), self); })
      .def_property_readonly("has_bytes",
                             [](py::object self) { return readonly_view(self.cast<const TokenTable&>().has_bytes_flags(), self); })
      .def(
          "lookup", [](const TokenTable& t, const py::bytes& b) { return t.lookup(bytes_view(b)); }, py::arg("data"),
          "Ids whose bytes equal `data`, increasing (empty if none; b'' matches nothing).")
      .def(
          "byte_trie",
          [](const TokenTable& t) {
            py::gil_scoped_release release;
            return std::make_shared<SequenceTrie>(SequenceTrie::from_token_table(t));
          },
          "The byte trie (SequenceTrie, n_symbols = 256) over the tokens with bytes. Builds a new one each call.")
      .def("__repr__",
           [](const TokenTable& t) {
             return "<TokenTable V=" + std::to_string(t.size()) + " bytes=" + std::to_string(t.data().size()) +
                    " fingerprint=" + t.fingerprint().substr(0, 12) + "...>";
           })
      .def(py::pickle(
          [](py::object self) {
            const auto& t = self.cast<const TokenTable&>();
            return py::make_tuple(py::array_t<std::int64_t>(t.offsets().size(), t.offsets().data()),
                                  py::array_t<std::uint8_t>(t.data().size(), t.data().data()),
                                  py::array_t<std::uint8_t>(t.has_bytes_flags().size(), t.has_bytes_flags().data()));
          },
          [](const py::tuple& state) {
            if (state.size() != 3) throw py::value_error("TokenTable: bad pickle state");
            return make_table(state[0], state[1], state[2]);
          }));
}

}  // namespace ctalign::bindings
