// Python bindings of cpp/merge_table.h. Holder: std::shared_ptr<MergeTable>; it keeps its TokenTable.
#include <pybind11/stl.h>

#include "bindings.h"
#include "merge_table.h"
#include "numpy_args.h"
#include "token_table.h"

namespace ctalign::bindings {
namespace {

MergeTable::Options make_options(const std::string& initial, bool ignore_merges) {
  MergeTable::Options o;
  if (initial == "bytes") {
    o.initial = MergeTable::Initial::Bytes;
  } else if (initial == "chars") {
    o.initial = MergeTable::Initial::Chars;
  } else {
    throw py::value_error("initial: expected 'bytes' or 'chars', got '" + initial + "'");
  }
  o.ignore_merges = ignore_merges;
  return o;
}

py::tuple csr_to_numpy(Csr&& csr) {
  return py::make_tuple(to_numpy(std::move(csr.offsets)), to_numpy(std::move(csr.ids)));
}

std::string_view bytes_arg(const py::handle& b, const char* name) {
  char* p = nullptr;
  py::ssize_t n = 0;
  if (!PyBytes_Check(b.ptr())) {
    throw py::type_error(std::string(name) + ": expected bytes, got " +
                         std::string(py::str(py::type::of(b).attr("__name__"))));
  }
  PyBytes_AsStringAndSize(b.ptr(), &p, &n);
  return {p, static_cast<std::size_t>(n)};
}

py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast> keep_arg(const MergeTable& mt,
                                                                              const py::object& keep) {
  auto k = array_arg<std::uint8_t>(keep, "keep");
  if (k.size() != mt.table().size()) {
    throw py::value_error("keep: has " + std::to_string(k.size()) + " entries, expected V = " +
                          std::to_string(mt.table().size()));
  }
  return k;
}

}  // namespace

void bind_merge_table(py::module_& m) {
  py::class_<MergeTable, std::shared_ptr<MergeTable>> cls(m, "MergeTable", R"doc(
BPE merge recursion of a vocabulary and a compiled BPE encoder over raw bytes (cpp/merge_table.h).

MergeTable.from_merges(table, merges: int32[K, 2], *, initial="bytes", ignore_merges=False)
    HF merge list (left id, right id) in rank order; the result of a merge is the token whose bytes
    are the concatenation (ValueError naming the merge when there is none).
MergeTable.from_ranks(table, priority: int32[V], *, initial="bytes", ignore_merges=False)
    tiktoken / Tekken / SentencePiece-BPE priorities: lower merges first, -1 never a merge result;
    a token's merge is the last merge of BPE over its bytes with lower ranks only.
initial="chars" starts BPE from whole UTF-8 characters that are tokens (SentencePiece with byte
fallback); ignore_merges=True returns a pre-token that is itself a token whole (HF option).

Views (read-only int32[V] unless said): left, right, rank (-1 for base pieces, specials and
unreachable tokens), base_token int32[256] (-1 where no token), reachable uint8[V] (pure BPE over
the token's bytes gives the token itself).)doc");
  cls.def_static(
         "from_merges",
         [](std::shared_ptr<TokenTable> table, const py::object& merges_obj, const std::string& initial,
            bool ignore_merges) {
           if (!table) throw py::type_error("table: expected a TokenTable, got None");
           auto merges = array_arg<std::int32_t>(merges_obj, "merges", 2);
           if (merges.shape(1) != 2) {
             throw py::value_error("merges: expected shape (K, 2), got (" + std::to_string(merges.shape(0)) + ", " +
                                   std::to_string(merges.shape(1)) + ")");
           }
           const auto options = make_options(initial, ignore_merges);
           py::gil_scoped_release release;
           return std::make_shared<MergeTable>(MergeTable::from_merges(table, merges.data(), merges.shape(0), options));
         },
         py::arg("table"), py::arg("merges"), py::kw_only(), py::arg("initial") = "bytes",
         py::arg("ignore_merges") = false)
      .def_static(
          "from_ranks",
          [](std::shared_ptr<TokenTable> table, const py::object& priority_obj, const std::string& initial,
             bool ignore_merges) {
            if (!table) throw py::type_error("table: expected a TokenTable, got None");
            auto priority = array_arg<std::int32_t>(priority_obj, "priority");
            if (priority.size() != table->size()) {
              throw py::value_error("priority: has " + std::to_string(priority.size()) + " entries, expected V = " +
                                    std::to_string(table->size()));
            }
            const auto options = make_options(initial, ignore_merges);
            py::gil_scoped_release release;
            return std::make_shared<MergeTable>(MergeTable::from_ranks(table, priority.data(), options));
          },
          py::arg("table"), py::arg("priority"), py::kw_only(), py::arg("initial") = "bytes",
          py::arg("ignore_merges") = false)
      .def_property_readonly("table", [](const MergeTable& mt) { return std::const_pointer_cast<TokenTable>(mt.table_ptr()); })
      .def_property_readonly("size", [](const MergeTable& mt) { return mt.table().size(); })
      .def_property_readonly("n_merges", &MergeTable::n_merges,
                             "from_merges: K (the list's length); from_ranks: the number of recovered merges.")
      .def_property_readonly("initial", [](const MergeTable& mt) {
        return mt.options().initial == MergeTable::Initial::Chars ? "chars" : "bytes";
      })
      .def_property_readonly("ignore_merges", [](const MergeTable& mt) { return mt.options().ignore_merges; })
      .def_property_readonly("left", [](py::object self) { return readonly_view(self.cast<const MergeTable&>().left(), self); })
      .def_property_readonly("right", [](py::object self) { return readonly_view(self.cast<const MergeTable&>().right(), self); })
      .def_property_readonly("rank", [](py::object self) { return readonly_view(self.cast<const MergeTable&>().rank(), self); })
      .def_property_readonly("base_token",
                             [](py::object self) { return readonly_view(self.cast<const MergeTable&>().base_token(), self); })
      .def_property_readonly("reachable",
                             [](py::object self) { return readonly_view(self.cast<const MergeTable&>().reachable(), self); })
      .def(
          "encode", [](const MergeTable& mt, const py::handle& b) { return mt.encode(bytes_arg(b, "data")); },
          py::arg("data"),
          "BPE of one pre-token (raw bytes) -> list of ids. ValueError names a byte without a base token.")
      .def(
          "encode_many",
          [](const MergeTable& mt, const py::object& pieces, const py::object& data) {
            if (!data.is_none()) {
              auto offsets = array_arg<std::int64_t>(pieces, "offsets");
              auto bytes = array_arg<std::uint8_t>(data, "data");
              const std::int64_t q = offsets.size() - 1;
              if (q < 0) throw py::value_error("offsets: empty (expected q + 1 entries)");
              if (offsets.data()[0] < 0 || offsets.data()[q] > bytes.size()) {
                throw py::value_error("offsets: outside [0, len(data)]");
              }
              Csr csr;
              {
                py::gil_scoped_release release;
                csr = mt.encode_many(offsets.data(), bytes.data(), q);
              }
              return csr_to_numpy(std::move(csr));
            }
            std::vector<py::object> held;
            std::vector<std::string_view> views;
            for (const py::handle& p : py::reinterpret_borrow<py::iterable>(pieces)) {
              views.push_back(bytes_arg(p, "pieces"));
              held.push_back(py::reinterpret_borrow<py::object>(p));
            }
            Csr csr;
            {
              py::gil_scoped_release release;
              csr = mt.encode_many(views);
            }
            return csr_to_numpy(std::move(csr));
          },
          py::arg("pieces"), py::arg("data") = py::none(),
          "BPE of many pre-tokens: encode_many(list of bytes) or encode_many(offsets int64[q+1], "
          "data uint8[]) -> (offsets int64[q+1], ids int32[]).")
      .def(
          "unroll",
          [](const MergeTable& mt, std::int64_t t, const py::object& keep) {
            auto k = keep_arg(mt, keep);
            mt.table().check_id(t, "MergeTable.unroll");
            return mt.unroll(static_cast<std::int32_t>(t), k.data());
          },
          py::arg("token"), py::arg("keep"),
          "Expands `token` down its merge tree until every piece has keep = 1 (unreachable tokens "
          "through the BPE pieces of their bytes). Specials give []. ValueError when a base piece is not kept.")
      .def(
          "unroll_all",
          [](const MergeTable& mt, const py::object& keep) {
            auto k = keep_arg(mt, keep);
            Csr csr;
            {
              py::gil_scoped_release release;
              csr = mt.unroll_all(k.data());
            }
            return csr_to_numpy(std::move(csr));
          },
          py::arg("keep"), "unroll of every id -> (offsets int64[V+1], ids int32[]).")
      .def("__repr__", [](const MergeTable& mt) {
        return "<MergeTable V=" + std::to_string(mt.table().size()) + " merges=" + std::to_string(mt.n_merges()) +
               (mt.from_rank_list() ? " from_ranks" : " from_merges") + ">";
      });
}

}  // namespace ctalign::bindings
