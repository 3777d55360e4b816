// Range log mass: out[q, c] = log sum_{i in [lo, hi)} softmax(x_{rows q} / T)_{order[i]}.
//
// Two forward kernels:
//  - direct: one warp per (query, range) sums its range, gathering the logits of order[lo:hi]
//    (fp64 accumulation of positive terms: exact to fp32 rounding of each term, exact zeros stay
//    zero). Cost: the total length of the ranges, in random 4-byte reads. Any GPU; also the
//    reference the row-resident kernel is tested against.
//  - cluster (sm_90): a thread-block cluster holds one row, permuted into `order`, in its
//    distributed shared memory (fp32 probabilities, 4 B per position) with fp64 prefix sums every
//    8 positions (1 B per position). Pass 1 streams the row once (coalesced 16-byte loads, online
//    max/sum) and stores each logit straight into the shared memory of the block that owns its
//    position; then each range costs two lookups S(hi) - S(lo), each one fp64 checkpoint plus at
//    most 7 fp32 terms summed in fp64. A range whose difference is below 2^-30 of its prefix (fp64
//    cancellation) is summed directly, as is any zero mass, which thus stays exactly -inf.
//    Cost: one read of the logits and of the slot table (4 B per column, L2-resident), O(1) per
//    range (plus the length of the rare tiny-mass ranges).
// Backward (direct): grad = -p_t * sum_c g_c / T for every column, then one warp per range adds
// g_c * p_t / (T * m_c) with fp32 atomics. Cost: one write of grad plus the total range length.
#include <cooperative_groups.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "launch.h"

namespace cg = cooperative_groups;

namespace ctalign_cuda {
namespace {

constexpr int kBlock = 256;

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("ctalign._cuda: ") + what + ": " + cudaGetErrorString(e));
}

struct RangeParams {
  const void* x;
  int64_t n_rows;
  int64_t stride;
  int64_t vocab;
  int64_t width;
  const int* order;
  int64_t n_order;
  const int64_t* rows;
  int64_t n_queries;
  const int* lo;
  const int* hi;
  int64_t n_ranges;
  int64_t range_stride;
  float s2;
  float inv_t;
  const float* lse;
  const float* stats;  // forward: [N, 2] row statistics (launch.h)
  const float* out;   // backward: the forward output
  const float* gout;  // backward
  float* row_gsum;    // backward
  float* res;         // forward: out; backward: grad
};

__host__ __device__ __forceinline__ int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float log2_units(float v) {
  return (float)((double)v * 1.4426950408889634);
}

template <int DT>
__global__ void __launch_bounds__(kBlock) range_fwd_direct_kernel(const RangeParams p) {
  const int64_t gw = ((int64_t)blockIdx.x * kBlock + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gw >= p.n_queries * p.n_ranges) return;
  const int64_t q = gw / p.n_ranges, c = gw - q * p.n_ranges;
  const int64_t row = p.rows ? p.rows[q] : q;
  if (row < 0 || row >= p.n_rows) {  // a query naming no row reads -inf
    if (lane == 0) p.res[gw] = -INFINITY;
    return;
  }
  const int64_t lo = max_i64(p.lo[q * p.range_stride + c], 0);
  const int64_t hi = min_i64(p.hi[q * p.range_stride + c], p.n_order);
  const float top = p.stats[2 * row], l2t = p.stats[2 * row + 1];
  const char* xrow = static_cast<const char*>(p.x) + row * p.stride * DtypeInfo<DT>::kBytes;
  double acc = 0.0;
  for (int64_t i = lo + lane; i < hi; i += 32) {
    const int t = __ldg(p.order + i);
    if ((unsigned)t < (unsigned)p.vocab) acc += fast_exp2(fmaf(load_one<DT>(xrow, t), p.s2, -top) - l2t);
  }
  acc = warp_sum(acc);
  if (lane == 0) p.res[gw] = acc > 0.0 ? (float)log(acc) : -INFINITY;
}

// Backward step 1: sum of grad_out over each query's ranges, added into its row.
__global__ void __launch_bounds__(kBlock) range_gsum_kernel(const RangeParams p) {
  const int64_t q = ((int64_t)blockIdx.x * kBlock + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (q >= p.n_queries) return;
  float s = 0.f;
  for (int64_t c = lane; c < p.n_ranges; c += 32)  // zero-mass outputs carry no gradient
    s += p.out[q * p.n_ranges + c] == -INFINITY ? 0.f : p.gout[q * p.n_ranges + c];
  s = warp_sum(s);
  const int64_t row = p.rows ? p.rows[q] : q;
  if (lane == 0 && row >= 0 && row < p.n_rows) atomicAdd(p.row_gsum + row, s);
}

// Backward step 2: grad[r, t] = -p_t * gsum_r / T (0 in padding columns), one block per row.
template <int DT>
__global__ void __launch_bounds__(kBlock) range_dense_kernel(const RangeParams p) {
  const int64_t row = blockIdx.x;
  const char* xrow = static_cast<const char*>(p.x) + row * p.stride * DtypeInfo<DT>::kBytes;
  float* drow = p.res + row * p.width;
  const float coef = -p.row_gsum[row] * p.inv_t;
  const float off = log2_units(p.lse[row]);
  for (int64_t t = threadIdx.x; t < p.width; t += kBlock)
    drow[t] = t < p.vocab ? coef * fast_exp2(fmaf(load_one<DT>(xrow, t), p.s2, -off)) : 0.f;
}

// Backward step 3: one warp per range adds g_c p_t / (T m_c) to the columns of its range.
template <int DT>
__global__ void __launch_bounds__(kBlock) range_bwd_direct_kernel(const RangeParams p) {
  const int64_t gw = ((int64_t)blockIdx.x * kBlock + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gw >= p.n_queries * p.n_ranges) return;
  const float o = p.out[gw];
  if (o == -INFINITY) return;
  const float coef = p.gout[gw] * p.inv_t;
  if (coef == 0.f) return;
  const int64_t q = gw / p.n_ranges, c = gw - q * p.n_ranges;
  const int64_t row = p.rows ? p.rows[q] : q;
  if (row < 0 || row >= p.n_rows) return;
  const int64_t lo = max_i64(p.lo[q * p.range_stride + c], 0);
  const int64_t hi = min_i64(p.hi[q * p.range_stride + c], p.n_order);
  const float off = (float)(((double)p.lse[row] + (double)o) * 1.4426950408889634);
  const char* xrow = static_cast<const char*>(p.x) + row * p.stride * DtypeInfo<DT>::kBytes;
  float* drow = p.res + row * p.width;
  for (int64_t i = lo + lane; i < hi; i += 32) {
    const int t = __ldg(p.order + i);
    if ((unsigned)t < (unsigned)p.vocab)
      atomicAdd(drow + t, coef * fast_exp2(fmaf(load_one<DT>(xrow, t), p.s2, -off)));
  }
}

// ------------------------------------------------------------------------------------------
// Row-resident kernel (thread-block clusters, sm_90).

constexpr int kClusterBlock = 512;

struct ClusterParams {
  const void* x;
  int64_t stride;
  int64_t vocab;
  int64_t slice;  // columns streamed by each block (multiple of 8)
  const int* slot;
  int P;  // positions per block (multiple of 8)
  int64_t n_order;
  const int64_t* row_query_start;  // nullptr: query r is row r
  const int64_t* query_ids;
  const int* lo;
  const int* hi;
  int64_t n_ranges;
  int64_t range_stride;
  float s2;
  float* out;
  float* lse;
  bool aligned;
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t cluster_addr(const void* local, uint32_t rank) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(local)), r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
  return r;
}
__device__ __forceinline__ uint32_t mapa_add(uint32_t local_base, uint32_t rank, uint32_t offset) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local_base + offset), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_cluster(uint32_t addr, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ float ld_cluster_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ double ld_cluster_f64(uint32_t addr) {
  double v;
  asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ float4 ld_cluster_v4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

// Online (max, sum) pair in log2 units: sum of 2^(v - m).
struct MaxSum {
  float m = -INFINITY;
  float s = 0.f;
  __device__ void merge(float om, float os) {
    const float nm = fmaxf(m, om);
    if (nm == -INFINITY) return;
    s = s * fast_exp2(m - nm) + os * fast_exp2(om - nm);
    m = nm;
  }
};

#endif

template <int DT>
__global__ void __launch_bounds__(kClusterBlock, 2) range_cluster_kernel(const ClusterParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int VEC = kVec<DT>;
  constexpr int kUnroll = 16 / VEC;  // vectors in flight per thread (16 columns)
  extern __shared__ __align__(16) unsigned char smem[];
  const int P = p.P;
  float* pv = reinterpret_cast<float*>(smem);                 // [P]
  double* ck = reinterpret_cast<double*>(smem + 4 * (size_t)P);  // [P/8 + 1]
  __shared__ float s_stat[2];
  __shared__ double s_tot;
  __shared__ float s_wm[kClusterBlock / 32], s_ws[kClusterBlock / 32];
  __shared__ double s_wd[kClusterBlock / 32];

  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const unsigned csize = cluster.num_blocks();
  const int64_t row = blockIdx.x / csize;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int nwarps = kClusterBlock / 32;

  int64_t q_begin = row, q_end = row + 1;
  if (p.row_query_start) {
    q_begin = p.row_query_start[row];
    q_end = p.row_query_start[row + 1];
  }
  const bool has_queries = q_end > q_begin;

  // Pass 1: stream this block's slice of the row; scatter each member's logit to its position.
  const char* xrow = static_cast<const char*>(p.x) + row * p.stride * DtypeInfo<DT>::kBytes;
  const int64_t t_begin = (int64_t)rank * p.slice;
  const int64_t t_end = min_i64(p.vocab, t_begin + p.slice);
  const uint32_t pv_addr = static_cast<uint32_t>(__cvta_generic_to_shared(pv));
  MaxSum ms;
  const float s2 = p.s2;
  auto consume = [&](float v, int slot) {  // as the vector path: the sum uses fma(v, s2, -m), like pass 2
    if (v != -INFINITY) {
      const float vs = v * s2;
      if (vs > ms.m) {
        ms.s *= fast_exp2(ms.m - vs);
        ms.m = vs;
      }
      ms.s += fast_exp2(fmaf(v, s2, -ms.m));
    }
    if (slot >= 0 && has_queries) {
      uint32_t a;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                   : "=r"(a)
                   : "r"(pv_addr + 4u * (uint32_t)(slot & 0xffffff)), "r"((uint32_t)slot >> 24));
      st_cluster(a, v);
    }
  };
  if (p.aligned) {
    const int64_t n_vec = (t_end - t_begin) / VEC;  // full vectors
    for (int64_t j0 = threadIdx.x; j0 < n_vec; j0 += (int64_t)kClusterBlock * kUnroll) {
      float v[kUnroll][VEC];
      int s[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + (int64_t)u * kClusterBlock;
        if (j < n_vec) {
          const int64_t t = t_begin + j * VEC;
          load_vec<DT>(xrow, t, v[u]);
#pragma unroll
          for (int k = 0; k < VEC / 4; ++k) {
            const int4 q = load_int4(p.slot, t + 4 * k);
            s[u][4 * k] = q.x;
            s[u][4 * k + 1] = q.y;
            s[u][4 * k + 2] = q.z;
            s[u][4 * k + 3] = q.w;
          }
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            v[u][k] = -INFINITY;
            s[u][k] = -1;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float vm = v[u][0];
#pragma unroll
        for (int k = 1; k < VEC; ++k) vm = fmaxf(vm, v[u][k]);
        const float vms = vm * s2;
        if (vms > ms.m) {
          ms.s *= fast_exp2(ms.m - vms);
          ms.m = vms;
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float e = fast_exp2(fmaf(v[u][k], s2, -ms.m));
          ms.s += v[u][k] == -INFINITY ? 0.f : e;
          const int slot = s[u][k];
          if (slot >= 0 && has_queries) {
            uint32_t a;
            asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                         : "=r"(a)
                         : "r"(pv_addr + 4u * (uint32_t)(slot & 0xffffff)), "r"((uint32_t)slot >> 24));
            st_cluster(a, v[u][k]);
          }
        }
      }
    }
    for (int64_t t = t_begin + n_vec * VEC + threadIdx.x; t < t_end; t += kClusterBlock)
      consume(load_one<DT>(xrow, t), __ldg(p.slot + t));
  } else {
    for (int64_t t = t_begin + threadIdx.x; t < t_end; t += kClusterBlock)
      consume(load_one<DT>(xrow, t), __ldg(p.slot + t));
  }
  {  // block (max, sum)
    float m = ms.m, s = ms.s;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, o), os = __shfl_xor_sync(0xffffffffu, s, o);
      MaxSum t;
      t.m = m;
      t.s = s;
      t.merge(om, os);
      m = t.m;
      s = t.s;
    }
    if (lane == 0) {
      s_wm[warp] = m;
      s_ws[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      MaxSum t;
      for (int w = 0; w < nwarps; ++w) t.merge(s_wm[w], s_ws[w]);
      s_stat[0] = t.m;
      s_stat[1] = t.s;
    }
  }
  cluster.sync();  // #1: every logit is in place, every block's (max, sum) is published

  MaxSum all;
  for (unsigned b = 0; b < csize; ++b)
    all.merge(ld_cluster_f32(cluster_addr(&s_stat[0], b)), ld_cluster_f32(cluster_addr(&s_stat[1], b)));
  const float top = all.m, l2_total = fast_log2(all.s);
  if (rank == 0 && threadIdx.x == 0 && p.lse) p.lse[row] = (top + l2_total) * kLn2;

  if (has_queries) {
    // Pass 2: probabilities (relative to 2^top) in place, fp64 sums of 8 positions, scanned
    // into checkpoints ck[k] = mass of this block's positions < 8k. Warp w scans a contiguous
    // run of 32-group tiles (lane = group), then the warp totals are scanned across the block.
    const int64_t first = (int64_t)rank * P;
    const int n_here = (int)max_i64(0, min_i64(P, p.n_order - first));
    const int n_groups = P / 8;
    const int n_tiles = (n_groups + 31) / 32;
    const int per_warp = (n_tiles + nwarps - 1) / nwarps;
    const int tile_begin = min(n_tiles, warp * per_warp);
    const int tile_end = min(n_tiles, tile_begin + per_warp);
    double carry = 0.0;
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int k = tile * 32 + lane;
      double g8 = 0.0;
      if (k < n_groups) {
        float4* q = reinterpret_cast<float4*>(pv + 8 * k);
        float e[8];
        const float4 a = q[0], b = q[1];
        const float raw[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          e[j] = 8 * k + j < n_here ? fast_exp2(fmaf(raw[j], s2, -top)) : 0.f;
          g8 += (double)e[j];
        }
        q[0] = make_float4(e[0], e[1], e[2], e[3]);
        q[1] = make_float4(e[4], e[5], e[6], e[7]);
      }
      double inc = g8;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
      }
      // exclusive prefix taken from the neighbour (not inc - g8): a run of zero masses keeps
      // bit-identical checkpoints, so an empty stretch differences to exactly 0
      double excl = __shfl_up_sync(0xffffffffu, inc, 1);
      if (lane == 0) excl = 0.0;
      if (k < n_groups) ck[k] = carry + excl;
      carry += __shfl_sync(0xffffffffu, inc, 31);
    }
    if (lane == 0) s_wd[warp] = carry;
    __syncthreads();
    double warp_base = 0.0, block_total = 0.0;
    for (int w = 0; w < nwarps; ++w) {
      if (w < warp) warp_base += s_wd[w];
      block_total += s_wd[w];
    }
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int k = tile * 32 + lane;
      if (k < n_groups) ck[k] += warp_base;
    }
    if (threadIdx.x == 0) {
      ck[n_groups] = block_total;
      s_tot = block_total;
    }
  }
  cluster.sync();  // #2: checkpoints and block totals published

  if (has_queries) {
    double base[8];
    {
      double b = 0.0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        base[k] = b;
        if ((unsigned)k < csize) b += ld_cluster_f64(cluster_addr(&s_tot, k));
      }
    }
    const uint32_t ck_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ck));
    const float invP = 1.f / (float)P;
    // S(k): mass of positions < k, in units of 2^top.
    auto prefix = [&](int64_t k) -> double {
      unsigned o = min((unsigned)((float)k * invP + 0.5f * invP), csize - 1);
      // exact owner: float division may be off by one at a block edge
      if ((int64_t)o * P > k) --o;
      else if (o + 1 < csize && (int64_t)(o + 1) * P <= k) ++o;
      const int l = (int)(k - (int64_t)o * P);
      double s = 0.0;
#pragma unroll
      for (int b = 0; b < 8; ++b)
        if ((unsigned)b == o) s = base[b];
      s += ld_cluster_f64(mapa_add(ck_addr, o, 8u * (uint32_t)(l >> 3)));
      const int r = l & 7;
      if (r) {
        const uint32_t a = mapa_add(pv_addr, o, 4u * (uint32_t)(l & ~7));
        const float4 u0 = ld_cluster_v4(a);
        s += (double)u0.x;
        if (r > 1) s += (double)u0.y;
        if (r > 2) s += (double)u0.z;
        if (r > 3) s += (double)u0.w;
        if (r > 4) {
          const float4 u1 = ld_cluster_v4(a + 16u);
          s += (double)u1.x;
          if (r > 5) s += (double)u1.y;
          if (r > 6) s += (double)u1.z;
        }
      }
      return s;
    };
    // Direct fp64 sum of positions [lo, hi): for ranges whose prefix difference is below 2^-30 of
    // the prefix (where fp64 cancellation would cost more than ~1e-7 relative), and exact zeros.
    auto direct = [&](int64_t lo, int64_t hi) -> double {
      double s = 0.0;
      int64_t i = lo;
      while (i < hi) {
        const unsigned o = min((unsigned)(i / P), csize - 1);
        const int64_t end = min_i64(hi, (int64_t)(o + 1) * P);
        uint32_t a = mapa_add(pv_addr, o, 4u * (uint32_t)(i - (int64_t)o * P));
        for (; i < end; ++i, a += 4u) s += (double)ld_cluster_f32(a);
      }
      return s;
    };
    const int64_t n_q = q_end - q_begin, C = p.n_ranges;
    const int64_t work = n_q * C;
    for (int64_t w = (int64_t)rank * kClusterBlock + threadIdx.x; w < work;
         w += (int64_t)csize * kClusterBlock) {
      int64_t qi = 0, c = w;
      if (n_q > 1) {
        qi = (int64_t)((uint64_t)w / (uint64_t)C);
        c = w - qi * C;
      }
      const int64_t q = p.query_ids ? p.query_ids[q_begin + qi] : q_begin + qi;
      const int64_t lo = max_i64(__ldg(p.lo + q * p.range_stride + c), 0);
      const int64_t hi = min_i64(__ldg(p.hi + q * p.range_stride + c), p.n_order);
      float res = -INFINITY;
      if (hi > lo) {
        const double s_hi = prefix(hi);
        double m = s_hi - prefix(lo);
        if (m <= 0x1p-30 * s_hi) m = direct(lo, hi);
        if (m > 0.0) res = (fast_log2((float)m) - l2_total) * kLn2;
      }
      p.out[q * C + c] = res;
    }
  }
  cluster.sync();  // #3: no block leaves while others may read its shared memory
#endif
}


RangeParams make_params(const LogitsArg& x, const RangeArg& r, float temperature) {
  RangeParams p{};
  p.x = x.data;
  p.n_rows = x.n_rows;
  p.stride = x.stride;
  p.vocab = x.vocab;
  p.order = r.order;
  p.n_order = r.n_order;
  p.rows = r.rows;
  p.n_queries = r.n_queries;
  p.lo = r.lo;
  p.hi = r.hi;
  p.n_ranges = r.n_ranges;
  p.range_stride = r.range_stride;
  p.s2 = kLog2e / temperature;
  p.inv_t = 1.f / temperature;
  return p;
}

unsigned warp_blocks(int64_t warps) { return (unsigned)((warps * 32 + kBlock - 1) / kBlock); }

}  // namespace

void range_forward_direct(const LogitsArg& x, const RangeArg& r, float temperature,
                          const float* stats, float* out, cudaStream_t stream) {
  const int64_t warps = r.n_queries * r.n_ranges;
  if (warps == 0) return;
  RangeParams p = make_params(x, r, temperature);
  p.stats = stats;
  p.res = out;
  const unsigned blocks = warp_blocks(warps);
  switch (x.dtype) {
    case kF32: range_fwd_direct_kernel<kF32><<<blocks, kBlock, 0, stream>>>(p); break;
    case kBF16: range_fwd_direct_kernel<kBF16><<<blocks, kBlock, 0, stream>>>(p); break;
    case kF16: range_fwd_direct_kernel<kF16><<<blocks, kBlock, 0, stream>>>(p); break;
    default: throw std::invalid_argument("ctalign._cuda: unsupported logits dtype");
  }
  check_launch("range_forward_direct");
}

void range_backward_direct(const LogitsArg& x, int64_t width, const RangeArg& r,
                           float temperature, const float* lse, const float* out,
                           const float* grad_out, float* row_gsum, float* grad,
                           cudaStream_t stream) {
  if (x.n_rows == 0) return;
  RangeParams p = make_params(x, r, temperature);
  p.width = width;
  p.lse = lse;
  p.out = out;
  p.gout = grad_out;
  p.row_gsum = row_gsum;
  p.res = grad;
  cudaMemsetAsync(row_gsum, 0, sizeof(float) * x.n_rows, stream);
  if (r.n_queries > 0) range_gsum_kernel<<<warp_blocks(r.n_queries), kBlock, 0, stream>>>(p);
  check_launch("range_backward (row sums)");
  const int64_t warps = r.n_queries * r.n_ranges;
  switch (x.dtype) {
    case kF32:
      range_dense_kernel<kF32><<<(unsigned)x.n_rows, kBlock, 0, stream>>>(p);
      if (warps) range_bwd_direct_kernel<kF32><<<warp_blocks(warps), kBlock, 0, stream>>>(p);
      break;
    case kBF16:
      range_dense_kernel<kBF16><<<(unsigned)x.n_rows, kBlock, 0, stream>>>(p);
      if (warps) range_bwd_direct_kernel<kBF16><<<warp_blocks(warps), kBlock, 0, stream>>>(p);
      break;
    case kF16:
      range_dense_kernel<kF16><<<(unsigned)x.n_rows, kBlock, 0, stream>>>(p);
      if (warps) range_bwd_direct_kernel<kF16><<<warp_blocks(warps), kBlock, 0, stream>>>(p);
      break;
    default: throw std::invalid_argument("ctalign._cuda: unsupported logits dtype");
  }
  check_launch("range_backward");
}

namespace {
constexpr int kClusterStaticSmem = 1024;  // generous bound on the kernel's static shared memory
}

void cluster_limits(int device, int* max_cluster, int* smem_per_block) {
  *max_cluster = 0;
  *smem_per_block = 0;
  int n = 0, major = 0, optin = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || device < 0 || device >= n || cudaSetDevice(device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  if (major < 9) return;
  // The kernel body exists only in sm_90+ machine code: a build without it (say sm_80 only) would
  // run an empty kernel on Hopper.
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, range_cluster_kernel<kF32>) != cudaSuccess || attr.binaryVersion < 90) {
    cudaGetLastError();
    return;
  }
  *max_cluster = 8;
  *smem_per_block = optin - kClusterStaticSmem;
}

bool range_forward_cluster(const LogitsArg& x, const RangeArg& r, const ClusterPlan& plan,
                           float temperature, float* out, float* lse, cudaStream_t stream) {
  if (x.n_rows == 0) return true;
  if (plan.cluster < 1 || plan.cluster > 8 || plan.positions_per_block % 8 != 0 ||
      (int64_t)plan.positions_per_block * plan.cluster < r.n_order)
    return false;
  ClusterParams p{};
  p.x = x.data;
  p.stride = x.stride;
  p.vocab = x.vocab;
  p.slice = ((x.vocab + plan.cluster - 1) / plan.cluster + 7) / 8 * 8;
  p.slot = plan.slot;
  p.P = plan.positions_per_block;
  p.n_order = r.n_order;
  p.row_query_start = plan.row_query_start;
  p.query_ids = plan.query_ids;
  p.lo = r.lo;
  p.hi = r.hi;
  p.n_ranges = r.n_ranges;
  p.range_stride = r.range_stride;
  p.s2 = kLog2e / temperature;
  p.out = out;
  p.lse = lse;
  const int elt = x.dtype == kF32 ? 4 : 2;
  p.aligned = reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && (x.stride * elt) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(plan.slot) % 16 == 0;
  const size_t smem = 4 * (size_t)p.P + 8 * ((size_t)p.P / 8 + 1);

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)(plan.cluster * x.n_rows), 1, 1);
  cfg.blockDim = dim3(kClusterBlock, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)plan.cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  auto launch = [&](auto kernel) -> bool {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, p);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return true;
  };
  switch (x.dtype) {
    case kF32: return launch(range_cluster_kernel<kF32>);
    case kBF16: return launch(range_cluster_kernel<kBF16>);
    case kF16: return launch(range_cluster_kernel<kF16>);
    default: throw std::invalid_argument("ctalign._cuda: unsupported logits dtype");
  }
}

}  // namespace ctalign_cuda
