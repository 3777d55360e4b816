// ctalign._cuda: thin pybind11 bindings of the CUDA kernels (cuda/launch.h).
//
// Every function takes device pointers and the CUDA stream as Python ints (torch's
// `data_ptr()` and `torch.cuda.current_stream().cuda_stream`), plus the device index, and only
// enqueues work: no synchronisation, no allocation. Shapes and dtypes are checked by the caller
// (ctalign._cuda_backend). The GIL is released for every call. The CUDA runtime is linked
// statically: importing this module needs the driver only, and a machine without a GPU imports it
// fine (device_count() returns 0).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "launch.h"

namespace py = pybind11;
using namespace ctalign_cuda;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void set_device(int device) {
  const cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("ctalign._cuda: cudaSetDevice: ") + cudaGetErrorString(e));
  }
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

LogitsArg logits(uintptr_t data, int dtype, int64_t n_rows, int64_t vocab, int64_t stride) {
  return LogitsArg{ptr<const void>(data), dtype, n_rows, vocab, stride};
}

RangeArg ranges(uintptr_t order, int64_t n_order, uintptr_t rows, int64_t n_queries, uintptr_t lo,
                uintptr_t hi, int64_t n_ranges, int64_t range_stride) {
  return RangeArg{ptr<const int>(order), n_order, ptr<const int64_t>(rows), n_queries,
                  ptr<const int>(lo),    ptr<const int>(hi), n_ranges, range_stride};
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "ctalign CUDA kernels (raw pointers in, work enqueued on the given stream)";
  auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "device_count",
      []() {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess) {
          cudaGetLastError();
          return 0;
        }
        return n;
      },
      "Number of CUDA devices the driver reports (0 without a driver or GPU).");

  m.def(
      "grouped_forward",
      [](uintptr_t x, int dtype, int64_t n_rows, int64_t vocab, int64_t stride, uintptr_t group,
         int64_t n_groups, uintptr_t hot, float temperature, uintptr_t out, uintptr_t lse,
         uintptr_t stream, int device, int variant, uintptr_t stats) {
        set_device(device);
        grouped_forward(logits(x, dtype, n_rows, vocab, stride), ptr<const int>(group), n_groups,
                        ptr<const int>(hot), temperature, ptr<float>(out), ptr<float>(lse),
                        stream_of(stream), variant, ptr<float>(stats));
      },
      py::arg("x"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"), py::arg("stride"),
      py::arg("group"), py::arg("n_groups"), py::arg("hot"), py::arg("temperature"),
      py::arg("out"), py::arg("lse"), py::arg("stream"), py::arg("device"),
      py::arg("variant") = 0, py::arg("stats") = 0, nogil);

  m.def(
      "grouped_backward",
      [](uintptr_t x, int dtype, int64_t n_rows, int64_t vocab, int64_t stride, int64_t width,
         uintptr_t group, int64_t n_groups, float temperature, uintptr_t out, uintptr_t lse,
         uintptr_t grad_out, uintptr_t grad, uintptr_t stream, int device) {
        set_device(device);
        grouped_backward(logits(x, dtype, n_rows, vocab, stride), width, ptr<const int>(group),
                         n_groups, temperature, ptr<const float>(out), ptr<const float>(lse),
                         ptr<const float>(grad_out), ptr<float>(grad), stream_of(stream));
      },
      nogil);

  m.def(
      "range_forward_direct",
      [](uintptr_t x, int dtype, int64_t n_rows, int64_t vocab, int64_t stride, uintptr_t order,
         int64_t n_order, uintptr_t rows, int64_t n_queries, uintptr_t lo, uintptr_t hi,
         int64_t n_ranges, int64_t range_stride, float temperature, uintptr_t stats, uintptr_t out,
         uintptr_t stream, int device) {
        set_device(device);
        range_forward_direct(logits(x, dtype, n_rows, vocab, stride),
                             ranges(order, n_order, rows, n_queries, lo, hi, n_ranges, range_stride),
                             temperature, ptr<const float>(stats), ptr<float>(out), stream_of(stream));
      },
      nogil);

  m.def(
      "range_backward_direct",
      [](uintptr_t x, int dtype, int64_t n_rows, int64_t vocab, int64_t stride, int64_t width,
         uintptr_t order, int64_t n_order, uintptr_t rows, int64_t n_queries, uintptr_t lo,
         uintptr_t hi, int64_t n_ranges, int64_t range_stride, float temperature, uintptr_t lse,
         uintptr_t out, uintptr_t grad_out, uintptr_t row_gsum, uintptr_t grad, uintptr_t stream,
         int device) {
        set_device(device);
        range_backward_direct(logits(x, dtype, n_rows, vocab, stride), width,
                              ranges(order, n_order, rows, n_queries, lo, hi, n_ranges, range_stride),
                              temperature, ptr<const float>(lse), ptr<const float>(out),
                              ptr<const float>(grad_out), ptr<float>(row_gsum), ptr<float>(grad),
                              stream_of(stream));
      },
      nogil);

  m.def(
      "range_forward_cluster",
      [](uintptr_t x, int dtype, int64_t n_rows, int64_t vocab, int64_t stride, uintptr_t order,
         int64_t n_order, uintptr_t lo, uintptr_t hi, int64_t n_ranges, int64_t range_stride,
         uintptr_t slot, int positions_per_block, int cluster, uintptr_t row_query_start,
         uintptr_t query_ids, int64_t n_queries, float temperature, uintptr_t out, uintptr_t lse,
         uintptr_t stream, int device) {
        set_device(device);
        const ClusterPlan plan{ptr<const int>(slot), positions_per_block, cluster,
                               ptr<const int64_t>(row_query_start), ptr<const int64_t>(query_ids)};
        return range_forward_cluster(
            logits(x, dtype, n_rows, vocab, stride),
            ranges(order, n_order, 0, n_queries, lo, hi, n_ranges, range_stride), plan,
            temperature, ptr<float>(out), ptr<float>(lse), stream_of(stream));
      },
      nogil,
      "Row-resident range kernel (sm_90 clusters); False when it cannot run (nothing launched).");

  m.def(
      "cluster_limits",
      [](int device) {
        int c = 0, s = 0;
        cluster_limits(device, &c, &s);  // (0, 0) without a usable device
        return py::make_tuple(c, s);
      },
      "(largest cluster, shared-memory bytes per block) for the row-resident kernel; (0, 0) when "
      "the device has no thread-block clusters.");
}
