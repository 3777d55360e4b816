// Argument checks of the kernel entry points (checks.h).
#include "kernels/checks.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace ctalign::kernels::detail {

std::size_t elem_size(ElemType t) {
  switch (t) {
    case ElemType::f32: return 4;
    case ElemType::bf16: return 2;
    case ElemType::f16: return 2;
    case ElemType::f64: return 8;
  }
  throw InputError("logits: unknown element type");
}

void check_logits(const char* op, const Logits& x) {
  const std::string p = std::string(op) + ": ";
  elem_size(x.type);
  if (x.n_rows < 0) throw InputError(p + "negative number of rows");
  if (x.vocab_size < 1) throw InputError(p + "vocab_size must be at least 1");
  if (x.row_stride < x.vocab_size && x.n_rows > 1) {
    throw InputError(p + "row stride " + std::to_string(x.row_stride) + " is smaller than vocab_size " +
                     std::to_string(x.vocab_size));
  }
  if (x.n_rows > 0 && x.data == nullptr) throw InputError(p + "logits data is null");
  if (!(x.temperature > 0) || !std::isfinite(x.temperature)) {
    throw InputError(p + "temperature must be a finite number > 0, got " + std::to_string(x.temperature));
  }
}

void check_grad_width(const char* op, const Logits& x, std::int64_t grad_width) {
  if (grad_width < x.vocab_size) throw InputError(std::string(op) + ": grad_width is smaller than vocab_size");
}

void check_group(const char* op, const std::int32_t* group, std::int64_t v, std::int32_t n_groups) {
  if (n_groups < 1) throw InputError(std::string(op) + ": n_groups must be at least 1");
  for (std::int64_t t = 0; t < v; ++t) {
    if (group[t] < 0 || group[t] >= n_groups) {
      throw InputError(std::string(op) + ": group[" + std::to_string(t) + "] = " + std::to_string(group[t]) +
                       " is outside [0, " + std::to_string(n_groups) + ")");
    }
  }
}

// Rows and ranges of range queries (not the order).
static void check_queries_shape(const char* op, const Logits& x, const RangeQueries& q) {
  const std::string p = std::string(op) + ": ";
  if (q.order_size < 0) throw InputError(p + "bad order size");
  if (q.n_cols < 0) throw InputError(p + "negative number of range columns");
  if (q.rows == nullptr) {
    if (q.n_queries != x.n_rows) throw InputError(p + "without rows, there must be one query per logits row");
  } else {
    for (std::int64_t i = 0; i < q.n_queries; ++i) {
      if (q.rows[i] < 0 || q.rows[i] >= x.n_rows) {
        throw InputError(p + "rows[" + std::to_string(i) + "] = " + std::to_string(q.rows[i]) + " is outside [0, " +
                         std::to_string(x.n_rows) + ")");
      }
    }
  }
  const std::int64_t range_rows = q.shared ? 1 : q.n_queries;
  if (range_rows * q.n_cols > 0 && (q.lo == nullptr || q.hi == nullptr)) throw InputError(p + "ranges are null");
  for (std::int64_t i = 0; i < range_rows * q.n_cols; ++i) {
    const std::int32_t lo = q.lo[i], hi = q.hi[i];
    if (lo < 0 || lo > hi || hi > q.order_size) {
      throw InputError(p + "range [" + std::to_string(lo) + ", " + std::to_string(hi) + ") at query " +
                       std::to_string(i / std::max<std::int64_t>(1, q.n_cols)) + ", column " +
                       std::to_string(i % std::max<std::int64_t>(1, q.n_cols)) + " is not inside [0, " +
                       std::to_string(q.order_size) + "]");
    }
  }
}

void check_queries(const char* op, const Logits& x, const RangeQueries& q) {
  const std::string p = std::string(op) + ": ";
  if (q.order_size < 0 || (q.order_size > 0 && q.order == nullptr)) throw InputError(p + "bad order");
  for (std::int64_t i = 0; i < q.order_size; ++i) {
    if (q.order[i] < 0 || q.order[i] >= x.vocab_size) {
      throw InputError(p + "order[" + std::to_string(i) + "] = " + std::to_string(q.order[i]) +
                       " is not a token id below vocab_size " + std::to_string(x.vocab_size));
    }
  }
  check_queries_shape(op, x, q);
}

void check_trie_queries(const char* op, const Logits& x, const TrieQueries& q, bool whole_tables) {
  const std::string name(op);
  const TrieNodes& t = q.trie;
  const std::int64_t n_sym = q.drop_end ? q.width : q.width - 1;
  if (n_sym < 0) throw InputError(name + ": width must be at least 1 with the end column");
  for (std::int64_t i = 0; whole_tables && i < q.order_size; ++i) {
    if (q.order[i] < 0 || q.order[i] >= x.vocab_size) {
      throw InputError(name + ": order[" + std::to_string(i) + "] = " + std::to_string(q.order[i]) +
                       " is outside the vocabulary [0, " + std::to_string(x.vocab_size) + ")");
    }
  }
  auto bad_node = [&](std::int64_t v, const std::string& what) {
    throw InputError(name + ": trie node " + std::to_string(v) + " " + what);
  };
  for (std::int64_t i = 0; i < q.n_queries; ++i) {
    const std::int64_t r = q.rows[i], v = q.nodes[i];
    if (r < 0 || r >= x.n_rows) {
      throw InputError(name + ": rows[" + std::to_string(i) + "] = " + std::to_string(r) + " is outside [0, " +
                       std::to_string(x.n_rows) + ")");
    }
    if (v < 0 || v >= t.n_nodes) {
      throw InputError(name + ": nodes[" + std::to_string(i) + "] = " + std::to_string(v) + " is outside [0, " +
                       std::to_string(t.n_nodes) + ")");
    }
  }
  // Each distinct node once (queries repeat nodes: every row may ask at the root, whose children are
  // one per first symbol).
  std::vector<std::int64_t> distinct(q.nodes, q.nodes + q.n_queries);
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  for (const std::int64_t v : distinct) {
    const std::int64_t lo = t.node_lo[v], end = t.node_end[v], hi = t.node_hi[v];
    if (!(0 <= lo && lo <= end && end <= hi && hi <= q.order_size)) bad_node(v, "has a range outside the order");
    if (t.child_start[v] < 0 || t.child_start[v + 1] < t.child_start[v]) bad_node(v, "has a bad child_start entry");
    if (!whole_tables) continue;  // the caller checks the children it reads
    std::int64_t pos = end;
    for (std::int64_t j = t.child_start[v]; j < t.child_start[v + 1]; ++j) {
      const std::int64_t c = t.child_node[j];
      if (c < 0 || c >= t.n_nodes) bad_node(v, "has a child outside the table");
      if (t.node_lo[c] != pos || t.node_hi[c] < pos) bad_node(v, "has children whose ranges do not tile its own");
      if (t.node_symbol[c] < 0 || t.node_symbol[c] >= n_sym) {
        bad_node(v, "has a child symbol " + std::to_string(t.node_symbol[c]) + " outside [0, " + std::to_string(n_sym) +
                        ")");
      }
      pos = t.node_hi[c];
    }
    if (pos != hi) bad_node(v, "has children whose ranges do not tile its own");
  }
}

void check_topk_rows(const char* op, const Logits& x, const std::int64_t* rows, std::int64_t n_out, std::int64_t k) {
  const std::string p = std::string(op) + ": ";
  if (k < 1 || k > x.vocab_size) {
    throw InputError(p + "k must be in [1, vocab_size = " + std::to_string(x.vocab_size) + "], got " + std::to_string(k));
  }
  if (rows == nullptr && n_out != x.n_rows) throw InputError(p + "without rows, one output per logits row");
  for (std::int64_t i = 0; rows != nullptr && i < n_out; ++i) {
    if (rows[i] < 0 || rows[i] >= x.n_rows) {
      throw InputError(p + "rows[" + std::to_string(i) + "] = " + std::to_string(rows[i]) + " is outside [0, " +
                       std::to_string(x.n_rows) + ")");
    }
  }
}
void check_topk_ids(const char* op, const Logits& x, const std::int64_t* ids, std::int64_t n_out, std::int64_t k) {
  for (std::int64_t i = 0; i < n_out * k; ++i) {
    if (ids[i] < 0 || ids[i] >= x.vocab_size) {
      throw InputError(std::string(op) + ": output row " + std::to_string(i / k) + ": id " + std::to_string(ids[i]) +
                       " is outside [0, vocab_size)");
    }
  }
}

void check_topk(const char* op, const TopKRows& x) {
  const std::string p = std::string(op) + ": ";
  elem_size(x.type);
  if (x.n_rows < 0 || x.k < 0) throw InputError(p + "negative TopK shape");
  if (x.n_rows * x.k > 0 && (x.indices == nullptr || x.logprobs == nullptr)) throw InputError(p + "TopK data is null");
  if (x.vocab_size < 1) throw InputError(p + "vocab_size must be at least 1");
  if (!(x.temperature > 0) || !std::isfinite(x.temperature)) {
    throw InputError(p + "temperature must be a finite number > 0, got " + std::to_string(x.temperature));
  }
}

[[noreturn]] void bad_table(const char* op, const char* table, std::int64_t id, std::int64_t value) {
  throw InputError(std::string(op) + ": " + table + "[" + std::to_string(id) + "] = " + std::to_string(value) +
                   " is out of range");
}

}  // namespace ctalign::kernels::detail
