// Python bindings of cpp/sequence_trie.h. Holder: std::shared_ptr<SequenceTrie>. Every array
// property is a zero-copy read-only view whose base keeps the trie alive.
#include <pybind11/stl.h>

#include "bindings.h"
#include "numpy_args.h"
#include "sequence_trie.h"
#include "token_table.h"

namespace ctalign::bindings {
namespace {

using Trie = SequenceTrie;

std::shared_ptr<Trie> make_trie(const py::object& offsets_obj, const py::object& symbols_obj,
                                const py::object& member_obj, std::int64_t n_symbols) {
  auto offsets = array_arg<std::int64_t>(offsets_obj, "offsets");
  auto member = array_arg<std::uint8_t>(member_obj, "member");
  if (offsets.size() != member.size() + 1) {
    throw py::value_error("SequenceTrie: offsets has " + std::to_string(offsets.size()) +
                          " entries, expected len(member) + 1 = " + std::to_string(member.size() + 1));
  }
  const std::int64_t n = member.size();
  if (py::isinstance<py::array>(symbols_obj) &&
      py::reinterpret_borrow<py::array>(symbols_obj).dtype().kind() == 'u' &&
      py::reinterpret_borrow<py::array>(symbols_obj).dtype().itemsize() == 1) {
    auto symbols = array_arg<std::uint8_t>(symbols_obj, "symbols");
    py::gil_scoped_release release;
    return std::make_shared<Trie>(Trie::build(offsets.data(), symbols.data(), symbols.size(), member.data(), n, n_symbols));
  }
  if (py::isinstance<py::array>(symbols_obj) &&
      !dtype_matches<std::int32_t>(py::reinterpret_borrow<py::array>(symbols_obj).dtype())) {
    throw py::type_error("symbols: expected dtype int32 (or uint8 for bytes), got " +
                         std::string(py::str(py::reinterpret_borrow<py::array>(symbols_obj).dtype())));
  }
  auto symbols = array_arg<std::int32_t>(symbols_obj, "symbols");
  py::gil_scoped_release release;
  return std::make_shared<Trie>(Trie::build(offsets.data(), symbols.data(), symbols.size(), member.data(), n, n_symbols));
}

// One sequence: bytes-like (symbols = byte values), a uint8/int32 numpy array, or a sequence of ints.
std::int32_t lookup_one(const Trie& t, const py::handle& seq) {
  if (PyBytes_Check(seq.ptr())) {
    char* p = nullptr;
    py::ssize_t n = 0;
    PyBytes_AsStringAndSize(seq.ptr(), &p, &n);
    return t.lookup(reinterpret_cast<const std::uint8_t*>(p), static_cast<std::size_t>(n));
  }
  if (PyByteArray_Check(seq.ptr())) {
    return t.lookup(reinterpret_cast<const std::uint8_t*>(PyByteArray_AsString(seq.ptr())),
                    static_cast<std::size_t>(PyByteArray_Size(seq.ptr())));
  }
  if (py::isinstance<py::array>(seq)) {
    auto arr = py::reinterpret_borrow<py::array>(seq);
    if (arr.dtype().kind() == 'u' && arr.dtype().itemsize() == 1) {
      auto a = array_arg<std::uint8_t>(seq, "seq");
      return t.lookup(a.data(), static_cast<std::size_t>(a.size()));
    }
    auto a = array_arg<std::int32_t>(seq, "seq");
    return t.lookup(a.data(), static_cast<std::size_t>(a.size()));
  }
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq)) {
    throw py::type_error("seq: expected bytes, a numpy int32/uint8 array or a sequence of ints, got " +
                         std::string(py::str(py::type::of(seq).attr("__name__"))));
  }
  std::vector<std::int32_t> v;
  for (const py::handle& x : py::reinterpret_borrow<py::sequence>(seq)) {
    const long long s = x.cast<long long>();
    if (s < 0 || s >= t.n_symbols()) {
      throw py::value_error("SequenceTrie.lookup: symbol " + std::to_string(s) + " at position " +
                            std::to_string(v.size()) + " outside [0, n_symbols = " + std::to_string(t.n_symbols()) + ")");
    }
    v.push_back(static_cast<std::int32_t>(s));
  }
  return t.lookup(v.data(), v.size());
}

}  // namespace

void bind_sequence_trie(py::module_& m) {
  py::class_<Trie, std::shared_ptr<Trie>> cls(m, "SequenceTrie", R"doc(
A trie over symbol sequences as ranges of one sorted order (docs/ARCHITECTURE.md "SequenceTrie").

SequenceTrie(offsets: int64[n+1], symbols: int32[] | uint8[], member: uint8|bool[n], n_symbols: int)
Members are the ids with member = 1 and a non-empty sequence. The byte trie of a vocabulary:
TokenTable.byte_trie() or SequenceTrie.from_token_table(table).

Arrays (int32, read-only views): order[M], rank[n], member_node[n], first_symbol[n] (n_symbols for
non-members; `first_byte` is the same table, byte tries only), node_lo, node_hi, node_end,
node_depth, node_parent, node_symbol [n_nodes], child_start[n_nodes+1], child_node[n_nodes-1].)doc");
  cls.def(py::init(&make_trie), py::arg("offsets"), py::arg("symbols"), py::arg("member"), py::arg("n_symbols"))
      .def_static(
          "from_token_table",
          [](const TokenTable& table) {
            py::gil_scoped_release release;
            return std::make_shared<Trie>(Trie::from_token_table(table));
          },
          py::arg("table"), "The byte trie of a TokenTable: members = ids with bytes, n_symbols = 256.")
      .def_property_readonly("n", &Trie::n, "Number of ids (members or not).")
      .def_property_readonly("n_members", &Trie::n_members)
      .def_property_readonly("n_nodes", &Trie::n_nodes)
      .def_property_readonly("n_symbols", &Trie::n_symbols);

  using Getter = const std::vector<std::int32_t>& (Trie::*)() const;
  const std::pair<const char*, Getter> views[] = {
      {"order", &Trie::order},           {"rank", &Trie::rank},
      {"member_node", &Trie::member_node}, {"first_symbol", &Trie::first_symbol},
      {"node_lo", &Trie::node_lo},       {"node_hi", &Trie::node_hi},
      {"node_end", &Trie::node_end},     {"node_depth", &Trie::node_depth},
      {"node_parent", &Trie::node_parent}, {"node_symbol", &Trie::node_symbol},
      {"child_start", &Trie::child_start}, {"child_node", &Trie::child_node},
  };
  for (const auto& [name, getter] : views) {
    cls.def_property_readonly(name, [getter = getter](py::object self) {
      return readonly_view((self.cast<const Trie&>().*getter)(), self);
    });
  }
  cls.def_property_readonly(
         "first_byte",
         [](py::object self) {
           const Trie& t = self.cast<const Trie&>();
           if (t.n_symbols() != 256) {
             throw py::value_error("SequenceTrie.first_byte: this trie has n_symbols = " +
                                   std::to_string(t.n_symbols()) + ", not a byte trie (use first_symbol)");
           }
           return readonly_view(t.first_symbol(), self);
         },
         "First byte of each member (256 for non-members, e.g. specials). Byte tries only.")
      .def(
          "lookup", [](const Trie& t, const py::handle& seq) { return lookup_one(t, seq); }, py::arg("seq"),
          "Node of the prefix `seq` (bytes, or a sequence of symbols), -1 if no member starts with it.")
      .def(
          "lookup_many",
          [](const Trie& t, const py::object& seqs, const py::object& symbols) -> py::array_t<std::int32_t> {
            std::vector<std::int32_t> out;
            if (!symbols.is_none()) {
              auto offsets = array_arg<std::int64_t>(seqs, "offsets");
              const std::int64_t q = offsets.size() - 1;
              const std::int64_t* o = offsets.data();
              if (q < 0) throw py::value_error("offsets: empty (expected q + 1 entries)");
              const bool bytes = py::isinstance<py::array>(symbols) &&
                                 py::reinterpret_borrow<py::array>(symbols).dtype().itemsize() == 1;
              auto check = [&](std::int64_t total) {
                for (std::int64_t i = 0; i < q; ++i) {
                  if (o[i] < 0 || o[i + 1] < o[i] || o[i + 1] > total) {
                    throw py::value_error("offsets: not monotone within [0, len(symbols)] at row " + std::to_string(i));
                  }
                }
              };
              out.resize(q);
              if (bytes) {
                auto s = array_arg<std::uint8_t>(symbols, "symbols");
                check(s.size());
                py::gil_scoped_release release;
                for (std::int64_t i = 0; i < q; ++i) out[i] = t.lookup(s.data() + o[i], static_cast<std::size_t>(o[i + 1] - o[i]));
              } else {
                auto s = array_arg<std::int32_t>(symbols, "symbols");
                check(s.size());
                py::gil_scoped_release release;
                for (std::int64_t i = 0; i < q; ++i) out[i] = t.lookup(s.data() + o[i], static_cast<std::size_t>(o[i + 1] - o[i]));
              }
            } else {
              for (const py::handle& seq : py::reinterpret_borrow<py::iterable>(seqs)) out.push_back(lookup_one(t, seq));
            }
            return to_numpy(std::move(out));
          },
          py::arg("seqs"), py::arg("symbols") = py::none(),
          "Nodes of many prefixes: lookup_many(list of sequences), or lookup_many(offsets int64[q+1], "
          "symbols uint8|int32[]) in CSR. Returns int32[q], -1 where absent.")
      .def(
          "child_ranges",
          [](const Trie& t, const py::object& nodes_obj) {
            auto nodes = array_arg<std::int32_t>(nodes_obj, "nodes");
            const std::int64_t q = nodes.size();
            const std::int64_t width = static_cast<std::int64_t>(t.n_symbols()) + 2;
            py::array_t<std::int32_t> lo({static_cast<py::ssize_t>(q), static_cast<py::ssize_t>(width)});
            py::array_t<std::int32_t> hi({static_cast<py::ssize_t>(q), static_cast<py::ssize_t>(width)});
            std::int32_t* plo = lo.mutable_data();
            std::int32_t* phi = hi.mutable_data();
            {
              py::gil_scoped_release release;
              t.child_ranges(nodes.data(), q, plo, phi);
            }
            return py::make_tuple(lo, hi);
          },
          py::arg("nodes"),
          "(lo, hi) int32[Q, n_symbols + 2]: column s = range of the child for symbol s (empty [x, x) "
          "when absent, x = end of the preceding child's range, or node_end); column n_symbols = "
          "[node_lo, node_end) (sequences ending here); column n_symbols + 1 = [node_lo, node_hi).")
      .def("__repr__", [](const Trie& t) {
        return "<SequenceTrie n=" + std::to_string(t.n()) + " members=" + std::to_string(t.n_members()) +
               " nodes=" + std::to_string(t.n_nodes()) + " n_symbols=" + std::to_string(t.n_symbols()) + ">";
      });
}

}  // namespace ctalign::bindings
