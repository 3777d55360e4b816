// Bindings for cpp/token_alignment.h: numpy in, dict of numpy out (outputs own their buffers, no copy).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "errors.h"
#include "token_alignment.h"

namespace py = pybind11;

namespace ctalign::bindings {
namespace {

template <class T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
py::array_t<T> to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, heap->data(), owner);
}

template <class T>
void need_shape(const Arr<T>& a, const char* name, std::vector<py::ssize_t> shape) {
  if (a.ndim() != py::ssize_t(shape.size()))
    throw InputError(std::string(name) + ": expected " + std::to_string(shape.size()) + " dimensions, got " +
                     std::to_string(a.ndim()));
  for (size_t i = 0; i < shape.size(); ++i)
    if (a.shape(i) != shape[i])
      throw InputError(std::string(name) + ": dimension " + std::to_string(i) + " is " + std::to_string(a.shape(i)) +
                       ", expected " + std::to_string(shape[i]));
}

struct HeldTrie {
  Arr<int32_t> member_node, node_parent, node_depth, node_symbol, child_start, child_node;
  TrieArrays view() const {
    TrieArrays t;
    t.n_nodes = node_parent.shape(0);
    t.n_members = member_node.shape(0);
    t.member_node = member_node.data();
    t.node_parent = node_parent.data();
    t.node_depth = node_depth.data();
    t.node_symbol = node_symbol.data();
    t.child_start = child_start.data();
    t.child_node = child_node.data();
    return t;
  }
};

HeldTrie hold_trie(const py::tuple& arrays, const char* name) {
  if (arrays.size() != 6)
    throw InputError(std::string(name) +
                     ": expected (member_node, node_parent, node_depth, node_symbol, child_start, child_node)");
  HeldTrie h{arrays[0].cast<Arr<int32_t>>(), arrays[1].cast<Arr<int32_t>>(), arrays[2].cast<Arr<int32_t>>(),
             arrays[3].cast<Arr<int32_t>>(), arrays[4].cast<Arr<int32_t>>(), arrays[5].cast<Arr<int32_t>>()};
  const py::ssize_t n = h.node_parent.shape(0);
  if (h.node_depth.shape(0) != n || h.node_symbol.shape(0) != n || h.child_start.shape(0) != n + 1)
    throw InputError(std::string(name) + ": node arrays have inconsistent lengths");
  if (n > 0 && h.child_node.shape(0) < h.child_start.at(n))
    throw InputError(std::string(name) + ": child_node is shorter than child_start says");
  return h;
}

struct HeldSide {
  Arr<int32_t> ids, lead, role;
  Arr<int64_t> start, end, length;
  TokenSpans view(const char* name) const {
    TokenSpans s;
    if (ids.ndim() != 2) throw InputError(std::string(name) + " ids must be [B, L]");
    s.batch = ids.shape(0);
    s.width = ids.shape(1);
    need_shape(start, name, {s.batch, s.width});
    need_shape(end, name, {s.batch, s.width});
    need_shape(lead, name, {s.batch, s.width});
    need_shape(role, name, {s.batch, s.width});
    need_shape(length, name, {s.batch});
    s.ids = ids.data(); s.start = start.data(); s.end = end.data(); s.lead = lead.data();
    s.role = role.data(); s.length = length.data();
    return s;
  }
};

py::dict align(const HeldSide& t, const HeldSide& s, const py::tuple& byte_trie, const std::optional<py::tuple>& dec,
               int byte_queries, int threads) {
  TokenSpans tv = t.view("teacher"), sv = s.view("student");
  HeldTrie bt = hold_trie(byte_trie, "byte_trie");
  std::optional<HeldTrie> dt;
  if (dec) dt = hold_trie(*dec, "dec_trie");
  TrieArrays btv = bt.view();
  TrieArrays dtv;
  if (dt) dtv = dt->view();
  TokenAlignment a;
  {
    py::gil_scoped_release release;
    a = align_tokens(tv, sv, btv, dt ? &dtv : nullptr, byte_queries, threads);
  }
  const py::ssize_t B = a.batch, Lt = a.t_width, Ls = a.s_width, C = a.chunk_width, K = a.byte_queries;
  py::dict d;
  d["n_chunks"] = to_numpy(std::move(a.n_chunks), {B});
  d["chunk_start"] = to_numpy(std::move(a.chunk_start), {B, C});
  d["chunk_end"] = to_numpy(std::move(a.chunk_end), {B, C});
  d["chunk_special"] = to_numpy(std::move(a.chunk_special), {B, C});
  d["chunk_t_count"] = to_numpy(std::move(a.chunk_t_count), {B, C});
  d["chunk_s_count"] = to_numpy(std::move(a.chunk_s_count), {B, C});
  d["t_chunk"] = to_numpy(std::move(a.t_chunk), {B, Lt});
  d["s_chunk"] = to_numpy(std::move(a.s_chunk), {B, Ls});
  d["s_teacher_token"] = to_numpy(std::move(a.s_teacher_token), {B, Ls});
  d["s_teacher_row"] = to_numpy(std::move(a.s_teacher_row), {B, Ls});
  d["s_prefix"] = to_numpy(std::move(a.s_prefix), {B, Ls});
  d["s_consumed"] = to_numpy(std::move(a.s_consumed), {B, Ls});
  d["s_consumed_after"] = to_numpy(std::move(a.s_consumed_after), {B, Ls});
  d["s_at_boundary"] = to_numpy(std::move(a.s_at_boundary), {B, Ls});
  d["s_ends_teacher"] = to_numpy(std::move(a.s_ends_teacher), {B, Ls});
  d["byte_row"] = to_numpy(std::move(a.byte_row), {B, Ls, K});
  d["byte_prefix"] = to_numpy(std::move(a.byte_prefix), {B, Ls, K});
  return d;
}

py::tuple locate(const Arr<int32_t>& ids, const Arr<int64_t>& length, const Arr<int64_t>& tok_offsets,
                 const Arr<uint8_t>& tok_data, const Arr<int32_t>& role_of_id, const py::bytes& texts,
                 const Arr<int64_t>& text_offsets, bool lead_space, bool skip_space) {
  if (ids.ndim() != 2) throw InputError("ids must be [B, L]");
  const py::ssize_t B = ids.shape(0), L = ids.shape(1);
  need_shape(length, "length", {B});
  need_shape(text_offsets, "text_offsets", {B + 1});
  const py::ssize_t V = role_of_id.shape(0);
  need_shape(tok_offsets, "tok_offsets", {V + 1});
  if (tok_data.shape(0) < tok_offsets.at(V)) throw InputError("tok_data is shorter than tok_offsets says");
  std::string_view text_view(texts);
  if (B > 0 && py::ssize_t(text_view.size()) < text_offsets.at(B)) throw InputError("texts are shorter than text_offsets say");
  std::vector<int64_t> start(B * L, 0), end(B * L, 0);
  std::vector<int32_t> lead(B * L, 0);
  {
    py::gil_scoped_release release;
    locate_tokens(ids.data(), B, L, length.data(), tok_offsets.data(), tok_data.data(), role_of_id.data(), V,
                  reinterpret_cast<const uint8_t*>(text_view.data()), text_offsets.data(), lead_space, skip_space,
                  start.data(), end.data(), lead.data());
  }
  return py::make_tuple(to_numpy(std::move(start), {B, L}), to_numpy(std::move(end), {B, L}),
                        to_numpy(std::move(lead), {B, L}));
}

}  // namespace

void bind_token_alignment(py::module_& m) {
  m.def(
      "align_tokens",
      [](Arr<int32_t> t_ids, Arr<int64_t> t_start, Arr<int64_t> t_end, Arr<int32_t> t_lead, Arr<int32_t> t_role,
         Arr<int64_t> t_length, Arr<int32_t> s_ids, Arr<int64_t> s_start, Arr<int64_t> s_end, Arr<int32_t> s_lead,
         Arr<int32_t> s_role, Arr<int64_t> s_length, py::tuple byte_trie, std::optional<py::tuple> dec_trie,
         int byte_queries, int threads) {
        HeldSide t{t_ids, t_lead, t_role, t_start, t_end, t_length};
        HeldSide s{s_ids, s_lead, s_role, s_start, s_end, s_length};
        return align(t, s, byte_trie, dec_trie, byte_queries, threads);
      },
      py::arg("t_ids"), py::arg("t_start"), py::arg("t_end"), py::arg("t_lead"), py::arg("t_role"),
      py::arg("t_length"), py::arg("s_ids"), py::arg("s_start"), py::arg("s_end"), py::arg("s_lead"),
      py::arg("s_role"), py::arg("s_length"), py::arg("byte_trie"), py::arg("dec_trie") = py::none(),
      py::arg("byte_queries") = 0, py::arg("threads") = 1,
      "Aligns two padded tokenizations of the same texts (cpp/token_alignment.h). Tries are tuples "
      "(member_node, node_parent, node_depth, node_symbol, child_start, child_node). Returns a dict of arrays.");
  m.def("locate_tokens", &locate, py::arg("ids"), py::arg("length"), py::arg("tok_offsets"), py::arg("tok_data"),
        py::arg("role_of_id"), py::arg("texts"), py::arg("text_offsets"), py::arg("lead_space") = false,
        py::arg("skip_space") = false,
        "Byte spans (start, end, lead) [B, L] of each token in its text; ValueError where ids and text disagree.");
}

}  // namespace ctalign::bindings
