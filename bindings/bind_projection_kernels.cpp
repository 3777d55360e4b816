// Bindings for cpp/projection_kernels.h: numpy views in (zero copy; torch tensors arrive through
// Tensor.numpy(), bf16 as int16 bits), new numpy arrays out, the GIL released during the kernel.
// ctalign/_cpu_backend.py is the only intended caller; it validates the torch-level arguments.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "numpy_args.h"
#include "projection_kernels.h"

namespace ctalign::bindings {
namespace {
namespace py = pybind11;
using kernels::ElemType;

ElemType parse_elem_type(const std::string& name) {
  if (name == "f32") return ElemType::f32;
  if (name == "bf16") return ElemType::bf16;
  if (name == "f16") return ElemType::f16;
  if (name == "f64") return ElemType::f64;
  throw py::value_error("elem_type must be one of f32, bf16, f16, f64; got " + name);
}

// A 2-D logits array [N, W] whose last dimension is contiguous, of the numpy dtype matching elem_type
// (bf16: any 2-byte integer dtype carrying the bits).
struct LogitsArg {
  py::array array;
  kernels::Logits view;
  py::ssize_t width = 0;
};

LogitsArg logits_arg(const py::handle& obj, const std::string& elem_type, std::int64_t vocab_size, double temperature) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error("logits: expected a numpy array");
  LogitsArg a;
  a.array = py::reinterpret_borrow<py::array>(obj);
  const ElemType type = parse_elem_type(elem_type);
  const char kind = a.array.dtype().kind();
  const py::ssize_t size = a.array.itemsize();
  const bool ok = (type == ElemType::f32 && kind == 'f' && size == 4) || (type == ElemType::f16 && kind == 'f' && size == 2) ||
                  (type == ElemType::f64 && kind == 'f' && size == 8) ||
                  (type == ElemType::bf16 && (kind == 'i' || kind == 'u') && size == 2);
  if (!ok) throw py::type_error("logits: numpy dtype " + std::string(py::str(a.array.dtype())) + " does not carry " + elem_type);
  if (a.array.ndim() != 2) throw py::value_error("logits: expected a 2-d array [rows, width]");
  const py::ssize_t n = a.array.shape(0);
  a.width = a.array.shape(1);
  if (n > 0 && a.width > 1 && a.array.strides(1) != size) throw py::value_error("logits: the last dimension must be contiguous");
  if (n > 1 && (a.array.strides(0) % size != 0 || a.array.strides(0) < 0)) throw py::value_error("logits: unsupported row stride");
  if (vocab_size > a.width) {
    throw py::value_error("logits: width " + std::to_string(a.width) + " is smaller than the vocabulary size " +
                          std::to_string(vocab_size));
  }
  a.view.data = a.array.data();
  a.view.type = type;
  a.view.n_rows = n;
  a.view.row_stride = n > 1 ? a.array.strides(0) / size : a.width;
  a.view.vocab_size = vocab_size;
  a.view.temperature = temperature;
  return a;
}

// Large outputs ([N, G] log masses, [N, W] gradients: often 100+ MB) come from a small cache of
// blocks freed by earlier outputs. A fresh block costs a page fault and a kernel page clear per
// 4 KB / 2 MB page on first write, which for these sizes costs as much as the kernel itself; a
// training loop asks for the same sizes every step, so reused blocks skip that. Blocks are rounded
// up to 2 MB and matched by exact rounded size; at most kPoolBytes stay cached (oldest freed first).
constexpr std::size_t kPooledFrom = std::size_t(16) << 20;  // smaller outputs: numpy's allocator
constexpr std::size_t kPoolBytes = std::size_t(512) << 20;
constexpr std::size_t kPoolAlign = std::size_t(2) << 20;

class OutputPool {
 public:
  static OutputPool& instance() {
    static OutputPool* pool = new OutputPool;  // never destroyed: capsules may release blocks at exit
    return *pool;
  }
  void* acquire(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(m_);
      for (std::size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].first == bytes) {
          void* p = free_[i].second;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= bytes;
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(kPoolAlign, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  void release(void* p, std::size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(m_);
      free_.emplace_back(bytes, p);
      cached_ += bytes;
      while (cached_ > kPoolBytes) {
        drop.push_back(free_.front().second);
        cached_ -= free_.front().first;
        free_.erase(free_.begin());
      }
    }
    for (void* d : drop) std::free(d);
  }

 private:
  std::mutex m_;
  std::vector<std::pair<std::size_t, void*>> free_;  // oldest first
  std::size_t cached_ = 0;
};

struct PooledBlock {
  void* data;
  std::size_t bytes;
};

// A new, uninitialised [rows, cols] output (the kernels write every element).
template <class Out>
py::array_t<Out> new_output(std::int64_t rows, std::int64_t cols) {
  const std::size_t bytes = sizeof(Out) * static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)};
  if (bytes < kPooledFrom) return py::array_t<Out>(shape);
  const std::size_t rounded = (bytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  auto* block = new PooledBlock{OutputPool::instance().acquire(rounded), rounded};
  py::capsule owner(block, [](void* v) {
    auto* b = static_cast<PooledBlock*>(v);
    OutputPool::instance().release(b->data, b->bytes);
    delete b;
  });
  return py::array_t<Out>(shape, static_cast<Out*>(block->data), owner);
}

template <class Out>
py::array_t<Out, py::array::c_style> out_arg(const py::handle& obj, const char* name, std::int64_t rows, std::int64_t cols) {
  auto a = array_arg<Out>(obj, name, 2);
  if (a.shape(0) != rows || a.shape(1) != cols) {
    throw py::value_error(std::string(name) + ": expected shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
  }
  return a;
}

template <class Out>
py::array_t<Out, py::array::c_style> vec_arg(const py::handle& obj, const char* name, std::int64_t n) {
  auto a = array_arg<Out>(obj, name, 1);
  if (a.shape(0) != n) throw py::value_error(std::string(name) + ": expected length " + std::to_string(n));
  return a;
}

struct RangeArgs {
  py::array_t<std::int32_t, py::array::c_style | py::array::forcecast> order, lo, hi;
  py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> rows;
  kernels::RangeQueries q;
};

RangeArgs range_args(const kernels::Logits& x, const py::handle& order, const py::handle& rows, const py::handle& lo,
                     const py::handle& hi) {
  RangeArgs a;
  a.order = array_arg<std::int32_t>(order, "order", 1);
  a.lo = array_arg<std::int32_t>(lo, "lo", 2);
  a.hi = array_arg<std::int32_t>(hi, "hi", 2);
  if (a.lo.shape(0) != a.hi.shape(0) || a.lo.shape(1) != a.hi.shape(1)) throw py::value_error("lo and hi differ in shape");
  a.q.order = a.order.data();
  a.q.order_size = a.order.shape(0);
  if (rows.is_none()) {
    a.q.rows = nullptr;
    a.q.n_queries = x.n_rows;
  } else {
    a.rows = array_arg<std::int64_t>(rows, "rows", 1);
    a.q.rows = a.rows.data();
    a.q.n_queries = a.rows.shape(0);
  }
  a.q.n_cols = a.lo.shape(1);
  a.q.shared = a.lo.shape(0) == 1;
  if (!a.q.shared && a.lo.shape(0) != a.q.n_queries) {
    throw py::value_error("lo, hi: expected " + std::to_string(a.q.n_queries) + " rows of ranges (one per query) or 1 (shared), got " +
                          std::to_string(a.lo.shape(0)));
  }
  a.q.lo = a.lo.data();
  a.q.hi = a.hi.data();
  return a;
}

template <class Out>
py::tuple grouped_forward(LogitsArg& x, const py::handle& group_obj, std::int32_t n_groups, int n_threads) {
  auto group = vec_arg<std::int32_t>(group_obj, "group", x.view.vocab_size);
  py::array_t<Out> out = new_output<Out>(x.view.n_rows, n_groups);
  py::array_t<Out> lse(static_cast<py::ssize_t>(x.view.n_rows));
  {
    py::gil_scoped_release release;
    kernels::grouped_logmass<Out>(x.view, group.data(), n_groups, out.mutable_data(), lse.mutable_data(), n_threads);
  }
  return py::make_tuple(out, lse);
}

template <class Out>
py::array grouped_backward(LogitsArg& x, const py::handle& group_obj, std::int32_t n_groups, const py::handle& out_obj,
                           const py::handle& lse_obj, const py::handle& grad_obj, int n_threads) {
  auto group = vec_arg<std::int32_t>(group_obj, "group", x.view.vocab_size);
  auto out = out_arg<Out>(out_obj, "out", x.view.n_rows, n_groups);
  auto grad_out = out_arg<Out>(grad_obj, "grad_out", x.view.n_rows, n_groups);
  auto lse = vec_arg<Out>(lse_obj, "lse", x.view.n_rows);
  py::array_t<Out> grad = new_output<Out>(x.view.n_rows, x.width);
  {
    py::gil_scoped_release release;
    kernels::grouped_logmass_backward<Out>(x.view, group.data(), n_groups, out.data(), lse.data(), grad_out.data(),
                                           grad.mutable_data(), x.width, n_threads);
  }
  return grad;
}

template <class Out>
py::tuple range_forward(LogitsArg& x, RangeArgs& r, int n_threads) {
  py::array_t<Out> out = new_output<Out>(r.q.n_queries, r.q.n_cols);
  py::array_t<Out> lse(static_cast<py::ssize_t>(x.view.n_rows));
  {
    py::gil_scoped_release release;
    kernels::range_logmass<Out>(x.view, r.q, out.mutable_data(), lse.mutable_data(), n_threads);
  }
  return py::make_tuple(out, lse);
}

template <class Out>
py::array range_backward(LogitsArg& x, RangeArgs& r, const py::handle& out_obj, const py::handle& lse_obj,
                         const py::handle& grad_obj, int n_threads) {
  auto out = out_arg<Out>(out_obj, "out", r.q.n_queries, r.q.n_cols);
  auto grad_out = out_arg<Out>(grad_obj, "grad_out", r.q.n_queries, r.q.n_cols);
  auto lse = vec_arg<Out>(lse_obj, "lse", x.view.n_rows);
  py::array_t<Out> grad = new_output<Out>(x.view.n_rows, x.width);
  {
    py::gil_scoped_release release;
    kernels::range_logmass_backward<Out>(x.view, r.q, out.data(), lse.data(), grad_out.data(), grad.mutable_data(),
                                         x.width, n_threads);
  }
  return grad;
}

struct TopKArg {
  py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> indices;
  py::array logprobs;
  kernels::TopKRows view;
};

TopKArg topk_arg(const py::handle& indices, const py::handle& logprobs, const std::string& elem_type,
                 std::int64_t vocab_size, double temperature) {
  TopKArg a;
  a.indices = array_arg<std::int64_t>(indices, "indices", 2);
  LogitsArg lp = logits_arg(logprobs, elem_type, 0, temperature);
  if (lp.view.n_rows != a.indices.shape(0) || lp.width != a.indices.shape(1)) {
    throw py::value_error("TopK: indices and logprobs differ in shape");
  }
  if (lp.view.n_rows > 1 && lp.view.row_stride != lp.width) throw py::value_error("TopK: logprobs must be contiguous");
  a.logprobs = lp.array;
  a.view.indices = a.indices.data();
  a.view.logprobs = lp.view.data;
  a.view.type = lp.view.type;
  a.view.n_rows = lp.view.n_rows;
  a.view.k = lp.width;
  a.view.vocab_size = vocab_size;
  a.view.temperature = temperature;
  return a;
}

template <class Out>
py::array topk_grouped(TopKArg& x, const py::handle& group_obj, std::int32_t n_groups, int n_threads) {
  auto group = vec_arg<std::int32_t>(group_obj, "group", x.view.vocab_size);
  py::array_t<Out> out = new_output<Out>(x.view.n_rows, n_groups);
  {
    py::gil_scoped_release release;
    kernels::topk_grouped_logmass<Out>(x.view, group.data(), n_groups, out.mutable_data(), n_threads);
  }
  return out;
}

template <class Out>
py::tuple topk_grouped_sparse(TopKArg& x, const py::handle& group_obj, std::int32_t n_groups, int n_threads) {
  auto group = vec_arg<std::int32_t>(group_obj, "group", x.view.vocab_size);
  const std::int64_t width = std::min<std::int64_t>(x.view.k, n_groups);
  py::array_t<std::int64_t> ids({x.view.n_rows, width});
  py::array_t<Out> out({x.view.n_rows, width});
  {
    py::gil_scoped_release release;
    kernels::topk_grouped_sparse<Out>(x.view, group.data(), n_groups, ids.mutable_data(), out.mutable_data(),
                                      n_threads);
  }
  return py::make_tuple(ids, out);
}

kernels::Isa parse_isa(const std::string& name) {
  if (name == "scalar") return kernels::Isa::scalar;
  if (name == "avx2") return kernels::Isa::avx2;
  if (name == "avx512") return kernels::Isa::avx512;
  throw py::value_error("kernel instruction set must be scalar, avx2 or avx512; got " + name);
}

}  // namespace


// The trie's node arrays and the queries of trie_conditional_logprobs, kept alive with their views.
struct TrieArgs {
  using I32 = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;
  using I64 = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
  I32 order, child_start, child_node, node_lo, node_hi, node_end, node_symbol;
  I64 rows, nodes;
  kernels::TrieQueries q;
};

TrieArgs trie_args(const py::handle& order, const py::tuple& trie, const py::handle& rows, const py::handle& nodes,
                   std::int64_t width, bool drop_end) {
  if (trie.size() != 6) {
    throw py::value_error("trie: expected (child_start, child_node, node_lo, node_hi, node_end, node_symbol)");
  }
  TrieArgs a;
  a.order = array_arg<std::int32_t>(order, "order");
  a.child_start = array_arg<std::int32_t>(trie[0], "child_start");
  a.child_node = array_arg<std::int32_t>(trie[1], "child_node");
  a.node_lo = array_arg<std::int32_t>(trie[2], "node_lo");
  a.node_hi = array_arg<std::int32_t>(trie[3], "node_hi");
  a.node_end = array_arg<std::int32_t>(trie[4], "node_end");
  a.node_symbol = array_arg<std::int32_t>(trie[5], "node_symbol");
  a.rows = array_arg<std::int64_t>(rows, "rows");
  a.nodes = array_arg<std::int64_t>(nodes, "nodes");
  const std::int64_t n_nodes = a.node_lo.shape(0);
  if (a.node_hi.shape(0) != n_nodes || a.node_end.shape(0) != n_nodes || a.node_symbol.shape(0) != n_nodes ||
      a.child_start.shape(0) != n_nodes + 1 || a.child_node.shape(0) < std::max<std::int64_t>(0, n_nodes - 1)) {
    throw py::value_error("trie: node arrays differ in length");
  }
  if (a.rows.shape(0) != a.nodes.shape(0)) {
    throw py::value_error("rows has " + std::to_string(a.rows.shape(0)) + " entries but nodes has " +
                          std::to_string(a.nodes.shape(0)));
  }
  for (std::int64_t v = 0; v <= n_nodes; ++v) {  // child ids are checked per query node; their slice here
    const std::int32_t c = a.child_start.data()[v];
    if (c < 0 || c > a.child_node.shape(0) || (v > 0 && c < a.child_start.data()[v - 1])) {
      throw py::value_error("trie: child_start is not a non-decreasing offset table into child_node");
    }
  }
  a.q.order = a.order.data();
  a.q.order_size = a.order.shape(0);
  a.q.trie = kernels::TrieNodes{a.child_start.data(), a.child_node.data(), a.node_lo.data(), a.node_hi.data(),
                                a.node_end.data(), a.node_symbol.data(), n_nodes};
  a.q.rows = a.rows.data();
  a.q.nodes = a.nodes.data();
  a.q.n_queries = a.rows.shape(0);
  a.q.width = width;
  a.q.drop_end = drop_end;
  return a;
}

template <class Out>
py::tuple trie_forward(LogitsArg& x, TrieArgs& t, int n_threads) {
  py::array_t<Out> out = new_output<Out>(t.q.n_queries, t.q.width);
  py::array_t<Out> lse(static_cast<py::ssize_t>(x.view.n_rows));
  {
    py::gil_scoped_release release;
    kernels::trie_conditional_logprobs<Out>(x.view, t.q, out.mutable_data(), lse.mutable_data(), n_threads);
  }
  return py::make_tuple(out, lse);
}

template <class Out>
py::array trie_backward(LogitsArg& x, TrieArgs& t, const py::handle& grad_obj, int n_threads) {
  auto grad_out = out_arg<Out>(grad_obj, "grad_out", t.q.n_queries, t.q.width);
  py::array_t<Out> grad = new_output<Out>(x.view.n_rows, x.width);
  {
    py::gil_scoped_release release;
    kernels::trie_conditional_logprobs_backward<Out>(x.view, t.q, grad_out.data(), grad.mutable_data(), x.width,
                                                     n_threads);
  }
  return grad;
}

// Optional row selection of topk_logprobs: None (every row, in order) or int64 [n_out].
struct OutputRows {
  py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> array;
  const std::int64_t* data = nullptr;
  std::int64_t n_out = 0;
};

OutputRows output_rows(const kernels::Logits& x, const py::handle& rows) {
  OutputRows r;
  if (rows.is_none()) {
    r.n_out = x.n_rows;
  } else {
    r.array = array_arg<std::int64_t>(rows, "rows", 1);
    r.data = r.array.data();
    r.n_out = r.array.shape(0);
  }
  return r;
}

template <class Out>
py::tuple topk_forward(LogitsArg& x, const py::handle& rows_obj, std::int64_t k, int n_threads) {
  if (k < 1 || k > x.view.vocab_size) {
    throw py::value_error("k must be in [1, " + std::to_string(x.view.vocab_size) + "] (the vocabulary size), got " +
                          std::to_string(k));
  }
  const OutputRows rows = output_rows(x.view, rows_obj);
  py::array_t<std::int64_t> ids({static_cast<py::ssize_t>(rows.n_out), static_cast<py::ssize_t>(k)});
  py::array_t<Out> out({static_cast<py::ssize_t>(rows.n_out), static_cast<py::ssize_t>(k)});
  py::array_t<Out> lse(static_cast<py::ssize_t>(rows.n_out));
  {
    py::gil_scoped_release release;
    kernels::topk_logprobs<Out>(x.view, rows.data, rows.n_out, k, ids.mutable_data(), out.mutable_data(),
                                lse.mutable_data(), n_threads);
  }
  return py::make_tuple(ids, out, lse);
}

template <class Out>
py::array topk_backward(LogitsArg& x, const py::handle& rows_obj, const py::handle& ids_obj, const py::handle& lse_obj,
                        const py::handle& grad_obj, int n_threads) {
  const OutputRows rows = output_rows(x.view, rows_obj);
  auto ids = array_arg<std::int64_t>(ids_obj, "ids", 2);
  const std::int64_t k = ids.shape(1);
  if (ids.shape(0) != rows.n_out) throw py::value_error("ids: expected one row per output row");
  auto lse = vec_arg<Out>(lse_obj, "lse", rows.n_out);
  auto grad_out = out_arg<Out>(grad_obj, "grad_out", rows.n_out, k);
  py::array_t<Out> grad = new_output<Out>(x.view.n_rows, x.width);
  {
    py::gil_scoped_release release;
    kernels::topk_logprobs_backward<Out>(x.view, rows.data, rows.n_out, k, ids.data(), lse.data(), grad_out.data(),
                                         grad.mutable_data(), x.width, n_threads);
  }
  return grad;
}

py::tuple sorted_l1(const py::handle& student_obj, const py::handle& teacher_obj, int n_threads) {
  auto student = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(student_obj);
  auto teacher = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(teacher_obj);
  if (!student || student.ndim() != 2) throw py::value_error("student: expected a float32 array [N, V_s]");
  if (!teacher || teacher.ndim() != 2) throw py::value_error("teacher: expected a float32 array [N, V_t]");
  if (teacher.shape(0) != student.shape(0)) throw py::value_error("student and teacher: different numbers of rows");
  const std::int64_t n = student.shape(0), vs = student.shape(1), vt = teacher.shape(1);
  py::array_t<double> distance(static_cast<py::ssize_t>(n));
  py::array_t<float> sign({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(vs)});
  {
    py::gil_scoped_release release;
    kernels::sorted_l1_distance(student.data(), n, vs, teacher.data(), vt, distance.mutable_data(),
                                sign.mutable_data(), n_threads);
  }
  return py::make_tuple(distance, sign);
}

py::tuple sorted_l1_of_logits(const py::handle& student_obj, const std::string& student_type, std::int64_t vs,
                              const py::handle& s_rows_obj, double ts, const py::handle& teacher_obj,
                              const std::string& teacher_type, std::int64_t vt, const py::handle& t_rows_obj, double tt,
                              int n_threads) {
  LogitsArg s = logits_arg(student_obj, student_type, vs, ts);
  LogitsArg t = logits_arg(teacher_obj, teacher_type, vt, tt);
  if (s.view.type == ElemType::f64 || t.view.type == ElemType::f64) {
    throw py::type_error("sorted_l1_logits: float64 logits take the reference path");
  }
  auto s_rows = array_arg<std::int64_t>(s_rows_obj, "student rows", 1);
  auto t_rows = array_arg<std::int64_t>(t_rows_obj, "teacher rows", 1);
  if (s_rows.shape(0) != t_rows.shape(0)) throw py::value_error("student rows and teacher rows: one of each per pair");
  const std::int64_t n = s_rows.shape(0);
  py::array_t<double> distance(static_cast<py::ssize_t>(n));
  py::array_t<float> grad({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(vs)});
  py::array_t<std::uint8_t> bad(static_cast<py::ssize_t>(n));
  {
    py::gil_scoped_release release;
    kernels::sorted_l1_logits(s.view, s_rows.data(), t.view, t_rows.data(), n, distance.mutable_data(),
                              grad.mutable_data(), bad.mutable_data(), n_threads);
  }
  return py::make_tuple(distance, grad, bad);
}

void bind_projection_kernels(py::module_& m) {
  m.def("sorted_l1_logits", &sorted_l1_of_logits, py::arg("student"), py::arg("student_type"), py::arg("vs"),
        py::arg("student_rows"), py::arg("student_temperature"), py::arg("teacher"), py::arg("teacher_type"),
        py::arg("vt"), py::arg("teacher_rows"), py::arg("teacher_temperature"), py::arg("n_threads"),
        "(distance float64 [P], grad float32 [P, V_s], bad uint8 [P]): sorted_l1_distance of the softmaxes of the "
        "paired logits rows, its gradient in the student logits times T (bad: 1 student, 2 teacher row not finite).");
  m.def("sorted_l1_distance", &sorted_l1, py::arg("student"), py::arg("teacher"), py::arg("n_threads"),
        "(distance float64 [N], sign float32 [N, V_s]): ULD's exact distance between the rows' probabilities "
        "sorted in decreasing order (the shorter padded with zeros), and its gradient in each student entry.");
  m.def(
      "grouped_logmass",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& group,
         std::int32_t n_groups, double temperature, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        return x.view.type == ElemType::f64 ? grouped_forward<double>(x, group, n_groups, n_threads)
                                            : grouped_forward<float>(x, group, n_groups, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("group"), py::arg("n_groups"),
      py::arg("temperature"), py::arg("n_threads"),
      "(out [N, G], lse [N]): log mass of each token group per row, softmax fused (float32; float64 for f64).");
  m.def(
      "topk_logprobs",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& rows,
         std::int64_t k, double temperature, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        return x.view.type == ElemType::f64 ? topk_forward<double>(x, rows, k, n_threads)
                                            : topk_forward<float>(x, rows, k, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("rows"), py::arg("k"),
      py::arg("temperature"), py::arg("n_threads"),
      "(ids int64 [Q, k], logprobs [Q, k], lse [Q]): the k largest columns of rows[q] (every row when rows is None; "
      "ties: smaller id first), in decreasing order, with their log-probabilities (softmax fused).");
  m.def(
      "topk_logprobs_backward",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& rows,
         const py::handle& ids, double temperature, const py::handle& lse, const py::handle& grad_out, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        return x.view.type == ElemType::f64 ? topk_backward<double>(x, rows, ids, lse, grad_out, n_threads)
                                            : topk_backward<float>(x, rows, ids, lse, grad_out, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("rows"), py::arg("ids"),
      py::arg("temperature"), py::arg("lse"), py::arg("grad_out"), py::arg("n_threads"),
      "grad_logits [N, W] of topk_logprobs (zero in padding columns and in rows no output reads).");
  m.def(
      "grouped_logmass_backward",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& group,
         std::int32_t n_groups, double temperature, const py::handle& out, const py::handle& lse,
         const py::handle& grad_out, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        return x.view.type == ElemType::f64 ? grouped_backward<double>(x, group, n_groups, out, lse, grad_out, n_threads)
                                            : grouped_backward<float>(x, group, n_groups, out, lse, grad_out, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("group"), py::arg("n_groups"),
      py::arg("temperature"), py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("n_threads"),
      "grad_logits [N, W] of grouped_logmass (zero in padding columns).");
  m.def(
      "range_logmass",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& order,
         const py::handle& rows, const py::handle& lo, const py::handle& hi, double temperature, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        RangeArgs r = range_args(x.view, order, rows, lo, hi);
        return x.view.type == ElemType::f64 ? range_forward<double>(x, r, n_threads) : range_forward<float>(x, r, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("order"), py::arg("rows"), py::arg("lo"),
      py::arg("hi"), py::arg("temperature"), py::arg("n_threads"),
      "(out [Q, C], lse [N]): log mass of ranges of `order` per query row (lse 0 for rows no query reads).");
  m.def(
      "range_logmass_backward",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& order,
         const py::handle& rows, const py::handle& lo, const py::handle& hi, double temperature, const py::handle& out,
         const py::handle& lse, const py::handle& grad_out, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        RangeArgs r = range_args(x.view, order, rows, lo, hi);
        return x.view.type == ElemType::f64 ? range_backward<double>(x, r, out, lse, grad_out, n_threads)
                                            : range_backward<float>(x, r, out, lse, grad_out, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("order"), py::arg("rows"), py::arg("lo"),
      py::arg("hi"), py::arg("temperature"), py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("n_threads"),
      "grad_logits [N, W] of range_logmass (zero in padding columns and rows no query reads).");
  m.def(
      "topk_grouped_logmass",
      [](const py::handle& indices, const py::handle& logprobs, const std::string& elem_type, std::int64_t vocab_size,
         const py::handle& group, std::int32_t n_groups, double temperature, int n_threads) {
        TopKArg x = topk_arg(indices, logprobs, elem_type, vocab_size, temperature);
        return x.view.type == ElemType::f64 ? topk_grouped<double>(x, group, n_groups, n_threads)
                                            : topk_grouped<float>(x, group, n_groups, n_threads);
      },
      py::arg("indices"), py::arg("logprobs"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("group"),
      py::arg("n_groups"), py::arg("temperature"), py::arg("n_threads"),
      "out [N, G] from sparse rows (indices int64 [N, k], log-probabilities [N, k]); float64 for f64.");
  m.def(
      "topk_grouped_sparse",
      [](const py::handle& indices, const py::handle& logprobs, const std::string& elem_type, std::int64_t vocab_size,
         const py::handle& group, std::int32_t n_groups, double temperature, int n_threads) {
        TopKArg x = topk_arg(indices, logprobs, elem_type, vocab_size, temperature);
        return x.view.type == ElemType::f64 ? topk_grouped_sparse<double>(x, group, n_groups, n_threads)
                                            : topk_grouped_sparse<float>(x, group, n_groups, n_threads);
      },
      py::arg("indices"), py::arg("logprobs"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("group"),
      py::arg("n_groups"), py::arg("temperature"), py::arg("n_threads"),
      "(ids int64 [N, w], out [N, w]), w = min(k, G): the row's groups in id order, then padding ids at -inf.");
  m.def(
      "empty_output",
      [](std::int64_t rows, std::int64_t cols, const std::string& dtype) -> py::array {
        if (rows < 0 || cols < 0) throw py::value_error("empty_output: negative shape");
        if (dtype == "f32") return new_output<float>(rows, cols);
        if (dtype == "f64") return new_output<double>(rows, cols);
        throw py::value_error("empty_output: dtype must be f32 or f64, got " + dtype);
      },
      py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      "An uninitialised [rows, cols] array; large ones come from the kernels' cache of freed outputs.");
  m.def(
      "trie_conditional_logprobs",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& order,
         const py::tuple& trie, const py::handle& rows, const py::handle& nodes, std::int64_t width, bool drop_end,
         double temperature, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        TrieArgs t = trie_args(order, trie, rows, nodes, width, drop_end);
        return x.view.type == ElemType::f64 ? trie_forward<double>(x, t, n_threads) : trie_forward<float>(x, t, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("order"), py::arg("trie"), py::arg("rows"),
      py::arg("nodes"), py::arg("width"), py::arg("drop_end"), py::arg("temperature"), py::arg("n_threads"),
      "(out [Q, width], lse [N]): next-symbol log-probabilities below trie nodes (trie: the six node arrays).");
  m.def(
      "trie_conditional_logprobs_backward",
      [](const py::handle& logits, const std::string& elem_type, std::int64_t vocab_size, const py::handle& order,
         const py::tuple& trie, const py::handle& rows, const py::handle& nodes, std::int64_t width, bool drop_end,
         double temperature, const py::handle& grad_out, int n_threads) {
        LogitsArg x = logits_arg(logits, elem_type, vocab_size, temperature);
        TrieArgs t = trie_args(order, trie, rows, nodes, width, drop_end);
        return x.view.type == ElemType::f64 ? trie_backward<double>(x, t, grad_out, n_threads)
                                            : trie_backward<float>(x, t, grad_out, n_threads);
      },
      py::arg("logits"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("order"), py::arg("trie"), py::arg("rows"),
      py::arg("nodes"), py::arg("width"), py::arg("drop_end"), py::arg("temperature"), py::arg("grad_out"),
      py::arg("n_threads"), "grad_logits [N, W] of trie_conditional_logprobs (zero in padding columns).");
  m.def(
      "topk_trie_sparse",
      [](const py::handle& indices, const py::handle& logprobs, const std::string& elem_type, std::int64_t vocab_size,
         const py::handle& rank, const py::handle& first_symbol, const py::handle& order, const py::tuple& trie,
         const py::handle& rows, const py::handle& nodes, std::int64_t width, bool drop_end, double temperature,
         int n_threads) {
        TopKArg x = topk_arg(indices, logprobs, elem_type, vocab_size, temperature);
        auto rk = vec_arg<std::int32_t>(rank, "rank", vocab_size);
        auto fs = vec_arg<std::int32_t>(first_symbol, "first_symbol", vocab_size);
        TrieArgs t = trie_args(order, trie, rows, nodes, width, drop_end);
        const std::int64_t w = std::min<std::int64_t>(x.view.k, width);
        py::array_t<std::int64_t> ids({t.q.n_queries, w});
        auto run = [&](auto tag) -> py::tuple {
          using Out = decltype(tag);
          py::array_t<Out> out({t.q.n_queries, w});
          {
            py::gil_scoped_release release;
            kernels::topk_trie_sparse<Out>(x.view, rk.data(), fs.data(), t.q, ids.mutable_data(), out.mutable_data(),
                                           n_threads);
          }
          return py::make_tuple(ids, out);
        };
        return x.view.type == ElemType::f64 ? run(double{}) : run(float{});
      },
      py::arg("indices"), py::arg("logprobs"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("rank"),
      py::arg("first_symbol"), py::arg("order"), py::arg("trie"), py::arg("rows"), py::arg("nodes"), py::arg("width"),
      py::arg("drop_end"),
      py::arg("temperature"), py::arg("n_threads"),
      "(ids int64 [Q, w], out [Q, w]): sparse trie conditionals from sparse rows, w = min(k, width).");
  m.def(
      "topk_cover_sparse",
      [](const py::handle& indices, const py::handle& logprobs, const std::string& elem_type, std::int64_t vocab_size,
         const py::handle& rank, std::int64_t order_size, const py::handle& ptr, const py::handle& students,
         std::int64_t n_students, double temperature, int n_threads) {
        TopKArg x = topk_arg(indices, logprobs, elem_type, vocab_size, temperature);
        auto rk = vec_arg<std::int32_t>(rank, "rank", vocab_size);
        auto pt = vec_arg<std::int64_t>(ptr, "ptr", order_size + 1);
        auto st = array_arg<std::int64_t>(students, "students");
        auto run = [&](auto tag) -> py::tuple {
          using Out = decltype(tag);
          kernels::SparseCover rows;
          {
            py::gil_scoped_release release;
            kernels::topk_cover_sparse<Out>(x.view, rk.data(), order_size, pt.data(), st.data(), st.shape(0), n_students,
                                            rows, n_threads);
          }
          py::array_t<std::int64_t> ids({x.view.n_rows, rows.width});
          py::array_t<Out> out({x.view.n_rows, rows.width});
          {
            py::gil_scoped_release release;
            kernels::write_sparse_rows<Out>(rows, ids.mutable_data(), out.mutable_data());
          }
          return py::make_tuple(ids, out);
        };
        return x.view.type == ElemType::f64 ? run(double{}) : run(float{});
      },
      py::arg("indices"), py::arg("logprobs"), py::arg("elem_type"), py::arg("vocab_size"), py::arg("rank"),
      py::arg("order_size"), py::arg("ptr"), py::arg("students"), py::arg("n_students"), py::arg("temperature"),
      py::arg("n_threads"),
      "(ids int64 [N, w], out [N, w]): sparse cover log masses from sparse rows, w = the most students a row reaches.");
  m.def(
      "compact_child_ranges",
      [](const py::handle& child_start, const py::handle& child_node, const py::handle& node_lo,
         const py::handle& node_hi, const py::handle& node_end, const py::handle& node_symbol, const py::handle& nodes,
         std::int64_t filler) {
        auto cs = array_arg<std::int32_t>(child_start, "child_start");
        auto cn = array_arg<std::int32_t>(child_node, "child_node");
        auto nl = array_arg<std::int32_t>(node_lo, "node_lo");
        auto nh = array_arg<std::int32_t>(node_hi, "node_hi");
        auto ne = array_arg<std::int32_t>(node_end, "node_end");
        auto ns = array_arg<std::int32_t>(node_symbol, "node_symbol");
        auto nd = array_arg<std::int64_t>(nodes, "nodes");
        const std::int64_t n_nodes = nl.shape(0);
        if (nh.shape(0) != n_nodes || ne.shape(0) != n_nodes || ns.shape(0) != n_nodes || cs.shape(0) != n_nodes + 1 ||
            cn.shape(0) < std::max<std::int64_t>(0, n_nodes - 1)) {
          throw py::value_error("compact_child_ranges: trie node arrays differ in length");
        }
        kernels::TrieNodes t{cs.data(), cn.data(), nl.data(), nh.data(), ne.data(), ns.data(), n_nodes};
        const std::int64_t q = nd.shape(0);
        const std::int64_t k = kernels::max_children(t, nd.data(), q);
        py::array_t<std::int32_t> lo({q, k + 3}), hi({q, k + 3});
        py::array_t<std::int64_t> symbol({q, k});
        kernels::compact_child_ranges(t, nd.data(), q, k, filler, lo.mutable_data(), hi.mutable_data(),
                                      symbol.mutable_data());
        return py::make_tuple(lo, hi, symbol);
      },
      py::arg("child_start"), py::arg("child_node"), py::arg("node_lo"), py::arg("node_hi"), py::arg("node_end"),
      py::arg("node_symbol"), py::arg("nodes"), py::arg("filler"),
      "(lo, hi int32 [Q, K+3], symbol int64 [Q, K]): children's ranges, then end, node and continuing ranges.");
  m.def("kernel_isa", [] { return std::string(kernels::isa_name(kernels::active_isa())); },
        "Instruction set the float projection kernels use now: scalar, avx2 or avx512.");
  m.def("best_kernel_isa", [] { return std::string(kernels::isa_name(kernels::best_isa())); },
        "Best instruction set this CPU runs.");
  m.def("set_kernel_isa", [](const std::string& name) { kernels::set_isa(parse_isa(name)); }, py::arg("name"),
        "Force the projection kernels' instruction set (tests, benchmarks); not above best_kernel_isa().");
}

}  // namespace ctalign::bindings
