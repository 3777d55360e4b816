// Python bindings of cpp/alignment_map.h: one function that builds the map and hands every table
// to numpy without copying (python/ctalign/alignment_map.py orchestrates and wraps the result).
#include "alignment_map.h"
#include "bindings.h"
#include "merge_table.h"
#include "numpy_args.h"
#include "sequence_trie.h"
#include "token_table.h"

namespace ctalign::bindings {
namespace {

py::dict stats_dict(const AlignmentStats& s) {
  py::dict d;
  d["identical_pairs"] = s.identical_pairs;
  d["teacher_with_bytes"] = s.teacher_with_bytes;
  d["student_with_bytes"] = s.student_with_bytes;
  d["teacher_with_identical"] = s.teacher_with_identical;
  d["student_with_identical"] = s.student_with_identical;
  d["uncovered_student"] = s.uncovered_student;
  d["dec_empty"] = s.dec_empty;
  d["dec_bytes_mismatch"] = s.dec_bytes_mismatch;
  d["dec_single"] = s.dec_single;
  d["dec_max_length"] = s.dec_max_length;
  d["dec_total"] = s.dec_total;
  d["unroll_mismatch"] = s.unroll_mismatch;
  d["first_unroll_mismatch"] = s.first_unroll_mismatch;
  d["subset_exempt"] = s.subset_exempt;
  return d;
}

template <class T>
std::vector<T> to_vector(const py::object& obj, const char* name) {
  auto a = array_arg<T>(obj, name);
  return std::vector<T>(a.data(), a.data() + a.size());
}

py::dict build(const py::object& teacher_obj, const py::object& teacher_trie_obj, const py::object& student_obj,
               const py::object& dec_offsets_obj, const py::object& dec_ids_obj, const py::object& special_target_obj,
               const py::object& merges_obj, const py::object& exempt_obj) {
  const auto& teacher = teacher_obj.cast<const TokenTable&>();
  const auto& teacher_trie = teacher_trie_obj.cast<const SequenceTrie&>();
  const auto& student = student_obj.cast<const TokenTable&>();
  const MergeTable* merges = merges_obj.is_none() ? nullptr : &merges_obj.cast<const MergeTable&>();
  auto dec_offsets = to_vector<std::int64_t>(dec_offsets_obj, "dec_offsets");
  auto dec_ids = to_vector<std::int32_t>(dec_ids_obj, "dec_ids");
  auto special_target = to_vector<std::int32_t>(special_target_obj, "special_target");
  std::vector<std::uint8_t> exempt;
  if (!exempt_obj.is_none()) exempt = to_vector<std::uint8_t>(exempt_obj, "subset_exempt");
  AlignmentMap map = [&] {
    py::gil_scoped_release release;
    return AlignmentMap::build(teacher, teacher_trie, student, std::move(dec_offsets), std::move(dec_ids),
                               special_target, merges, exempt);
  }();
  py::dict out;
  out["regime"] = regime_name(map.regime());
  out["stats"] = stats_dict(map.stats());
  const auto K = static_cast<py::ssize_t>(map.identical().size() / 2);
  out["identical"] = to_numpy(map.take_identical(), {K, 2});
  out["cover_lo"] = to_numpy(map.take_cover_lo());
  out["cover_hi"] = to_numpy(map.take_cover_hi());
  out["dec_offsets"] = to_numpy(map.take_dec_offsets());
  out["dec_ids"] = to_numpy(map.take_dec_ids());
  out["first_student"] = to_numpy(map.take_first_student());
  out["dec_trie"] = py::cast(std::make_shared<SequenceTrie>(map.take_dec_trie()));
  return out;
}

}  // namespace

void bind_alignment_map(py::module_& m) {
  m.def("build_alignment_map", &build, py::arg("teacher_table"), py::arg("teacher_trie"), py::arg("student_table"),
        py::arg("dec_offsets"), py::arg("dec_ids"), py::arg("special_target"), py::arg("teacher_merges") = py::none(),
        py::arg("subset_exempt") = py::none(),
        R"doc(
Build the teacher -> student alignment map (docs/ARCHITECTURE.md "Alignment map"); the GIL is released.

teacher_table, student_table: TokenTable; teacher_trie: the teacher's byte trie (SequenceTrie);
dec_offsets int64[V_t+1], dec_ids int32[]: dec_S of every teacher token (empty for specials);
special_target int32[V_t]: -1 for a non-special, else the student column of the teacher special
(V_s = the end column); teacher_merges: the teacher's MergeTable or None (no subset check);
subset_exempt: None or uint8[V_t], 1 = leave the teacher token out of the subset check.
Returns a dict: regime ('identical' | 'subset' | 'general'), stats (counts), identical int32[K, 2],
cover_lo, cover_hi int32[V_s], dec_offsets, dec_ids, first_student int32[V_t], dec_trie (SequenceTrie).
)doc");
}

}  // namespace ctalign::bindings
