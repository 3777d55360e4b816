// Argument checks of the kernels' entry points: each throws InputError naming the op and the bad
// argument. Run once per call, before any work (O(V + queries + ranges); table entries that the
// sparse-row kernels read are checked where they are read, bad_table).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "errors.h"
#include "projection_kernels.h"

namespace ctalign::kernels::detail {

std::size_t elem_size(ElemType t);  // bytes per element; throws for an unknown type

void check_logits(const char* op, const Logits& x);

template <class Out>
void check_out_type(const char* op, ElemType t) {
  if ((t == ElemType::f64) != std::is_same_v<Out, double>) {
    throw InputError(std::string(op) + ": outputs must be double for fp64 logits and float otherwise");
  }
}

void check_grad_width(const char* op, const Logits& x, std::int64_t grad_width);
// group: int32[v] in [0, n_groups).
void check_group(const char* op, const std::int32_t* group, std::int64_t v, std::int32_t n_groups);
// Range queries: the order (ids below vocab_size), rows, and ranges inside [0, order_size].
void check_queries(const char* op, const Logits& x, const RangeQueries& q);
// Validates rows, nodes and the order once per call: ids in [0, V), node ranges inside the order,
// children in range whose ranges tile [end, hi) in order, symbols below the output's symbol columns
// (each distinct node once). whole_tables = false (the sparse kernels, which read no order and check
// each child they probe): rows, nodes, node ranges and child_start only.
void check_trie_queries(const char* op, const Logits& x, const TrieQueries& q, bool whole_tables = true);
// Dense top-k: 1 <= k <= V, rows inside [0, n_rows) (rows nullptr: one output per row).
void check_topk_rows(const char* op, const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t k);
// ids [n_out, k] of topk_logprobs, for its backward.
void check_topk_ids(const char* op, const Logits& x, const std::int64_t* ids, std::int64_t n_out, std::int64_t k);
// Sparse rows: shapes, data, vocab_size and temperature (the entries are checked row by row).
void check_topk(const char* op, const TopKRows& x);
// A table entry read by a sparse-row kernel is out of range.
[[noreturn]] void bad_table(const char* op, const char* table, std::int64_t id, std::int64_t value);

}  // namespace ctalign::kernels::detail
