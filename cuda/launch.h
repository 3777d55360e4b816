// Host entry points of the ctalign CUDA kernels (plain C++, no Python, no torch).
//
// Every function enqueues its kernels on `stream` and returns at once: no host synchronisation,
// no allocation (callers pass every buffer). Pointers are device pointers on the current device.
// A launch error is thrown as std::runtime_error naming the kernel.
//
// Logits: `logits` points at row 0 of an [N, W] matrix with a contiguous last dimension and a
// row stride of `stride` elements, dtype kF32 / kBF16 / kF16 (common.cuh). Columns [V, W) are
// padding. `temperature` T > 0: every op works on softmax(x / T). Outputs are fp32 natural logs,
// -inf for zero mass.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ctalign_cuda {

struct LogitsArg {
  const void* data;
  int dtype;
  int64_t n_rows;
  int64_t vocab;   // V: columns used
  int64_t stride;  // elements between rows
};

// grouped log mass, forward. out: fp32 [N, G] (row stride G), lse: fp32 [N].
// `hot`: device int32[2] of the two most populated groups (or -1): their mass is summed in
// registers instead of shared-memory atomics. G == 0 (group may be nullptr) computes lse only.
// `variant` 0 picks the kernel (per-warp bins for G <= 1280, block bins up to 5120 groups,
// chunks of block bins above); benchmarks pass 10 * rows-per-block + (1: per-warp bins).
// `stats` (optional, fp32 [N, 2]): per row (m, l) with lse = (m + l) * ln 2, m a scaled maximum
// (log2 units) and l = log2 sum 2^(x*log2(e)/T - m): probabilities 2^(x*log2(e)/T - m - l) keep
// full precision even when |lse| is large, unlike 2^(x*log2(e)/T - lse*log2(e)).
void grouped_forward(const LogitsArg& x, const int* group, int64_t n_groups, const int* hot,
                     float temperature, float* out, float* lse, cudaStream_t stream,
                     int variant = 0, float* stats = nullptr);

// grouped log mass, backward. grad_out, out: fp32 [N, G]; lse fp32 [N]; grad: fp32 [N, W]
// (row stride W; zero in the padding columns).
void grouped_backward(const LogitsArg& x, int64_t width, const int* group, int64_t n_groups,
                      float temperature, const float* out, const float* lse,
                      const float* grad_out, float* grad, cudaStream_t stream);

// range log mass. order: int32[M]; rows: int64[Q] or nullptr (query q reads row q);
// lo, hi: int32 [Q, C] with query stride `range_stride` (C, or 0 when every query shares one
// row of ranges). stats: fp32 [N, 2] (from grouped_forward with G = 0). out: fp32 [Q, C].
struct RangeArg {
  const int* order;
  int64_t n_order;  // M
  const int64_t* rows;
  int64_t n_queries;  // Q
  const int* lo;
  const int* hi;
  int64_t n_ranges;      // C
  int64_t range_stride;  // C or 0
};

// Direct summation, one warp per (query, range): exact (fp64 accumulation of positive terms),
// cost proportional to the total range length. Any GPU.
void range_forward_direct(const LogitsArg& x, const RangeArg& r, float temperature,
                          const float* stats, float* out, cudaStream_t stream);

// Backward: grad fp32 [N, W] (row stride W). row_gsum: fp32 scratch [N] (overwritten).
void range_backward_direct(const LogitsArg& x, int64_t width, const RangeArg& r,
                           float temperature, const float* lse, const float* out,
                           const float* grad_out, float* row_gsum, float* grad,
                           cudaStream_t stream);

// Row-resident range forward (sm_90 thread-block clusters): each row is permuted once into the
// distributed shared memory of a cluster, with fp64 checkpoints every 8 positions; every range is
// then two O(1) lookups. Queries must be grouped by row: `row_query_start` int64[N+1] (CSR of the
// queries of each row, in `query_ids` int64[Q]; both nullptr when rows is nullptr: query r is
// row r). `slot`: int32[V] packed (owner block << 24 | position within the block), or -1 for
// tokens outside `order`; `positions_per_block` P and `cluster` blocks (P * cluster >= M).
// Returns false (and launches nothing) when the device or the sizes do not allow it.
struct ClusterPlan {
  const int* slot;
  int positions_per_block;
  int cluster;
  const int64_t* row_query_start;
  const int64_t* query_ids;
};
bool range_forward_cluster(const LogitsArg& x, const RangeArg& r, const ClusterPlan& plan,
                           float temperature, float* out, float* lse, cudaStream_t stream);

// Largest cluster size and shared-memory bytes per block the cluster kernel may use on `device`
// (0, 0 when clusters are unsupported).
void cluster_limits(int device, int* max_cluster, int* smem_per_block);

}  // namespace ctalign_cuda
