// Grouped log mass (the partition op of the kernel contract), forward and backward.
//
// Forward, out[r, g] = log sum_{group[t] = g} softmax(x_r / T)_t, in one pass over each row:
//  - Bins: fp32 shared-memory accumulators, one per group (of the chunk [g0, g0 + gc) this block
//    owns), filled with shared-memory atomics (a compare-and-swap loop in SASS, ATOMS.CAST.SPIN:
//    there is no native shared float add). For small G every warp owns a private copy of the
//    bins (a "team" of one warp), so rescaling needs no block barrier and atomics only contend
//    within a warp; for large G the block is one team and the bins are shared. Measured on H100
//    (docs/cuda-notes.md): one row per block beats 2 or 4 rows per block (fewer registers, more
//    blocks in flight), and per-warp bins beat shared bins by 2x.
//  - Online softmax without a max pass: each team keeps a reference m (scaled to log2 units) and
//    accumulates 2^(x*s - m). It moves the reference (and rescales its bins) only when a value
//    exceeds it by 2^64, so in practice once per row; values stay below 2^64 * V, far from fp32
//    overflow, and flush to zero only below 2^-126 of the row's maximum.
//  - The two most populated groups (`hot`, e.g. the byte 0x20 that starts ~40% of a byte-level
//    BPE vocabulary) are summed in registers: without this, the atomics of one warp land on the
//    same bin ~14 times per instruction and serialise.
//  - Large G: the groups are split into chunks that fit in shared memory; the blocks of one row
//    (adjacent block indices) each read the whole row, mostly from L2.
// Cost: one read of the logits and of the group table (int32, 4 B per column, L2-resident and
// shared by the R rows of a block), one write of out.
//
// Backward: grad[r, t] = (g[group t] * p_t / q_{group t} - p_t * sum_g g[g]) / T with
// p_t / q_g = 2^(x_t * s - (lse + out[g]) * log2 e); groups with out[g] = -inf carry no gradient
// (they count neither in the ratio term nor in sum_g g[g], as in ctalign.reference); the per-group
// terms live in shared memory for G <= 12288 and are gathered from global memory above.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "launch.h"

namespace ctalign_cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr float kRescaleLog2 = 64.f;  // a team's values stay below 2^64 of its reference
constexpr int kEpt = 8;               // elements per thread and step

struct FwdParams {
  const void* x;
  int64_t stride;
  int64_t n_rows;
  int64_t vocab;
  const int* group;
  int64_t n_groups;
  int g0;
  int gc;
  int n_chunks;
  const int* hot;
  float s2;  // log2(e) / T
  float* out;
  float* lse;
  float* stats;  // optional [N, 2]: (scaled row maximum m, log2 sum 2^(x*s - m)), see launch.h
  bool aligned;  // logits rows and group table 16-byte aligned
};

template <int DT, int R, bool WARP_TEAM>
__global__ void __launch_bounds__(kBlock) grouped_fwd_kernel(const FwdParams p) {
  constexpr int VEC = kVec<DT>;
  constexpr int NV = kEpt / VEC;
  constexpr int NTEAMS = WARP_TEAM ? kWarps : 1;
  constexpr int WT = 32 * kEpt;  // elements per warp and step
  extern __shared__ float bins[];  // [NTEAMS][R][gc]
  __shared__ float s_ref[kWarps][R];
  __shared__ float s_sum[kWarps][R];
  __shared__ float s_red[kWarps][R];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = blockIdx.x % p.n_chunks;
  const int64_t row0 = (int64_t)(blockIdx.x / p.n_chunks) * R;
  const int gc = (chunk == p.n_chunks - 1) ? (int)(p.n_groups - (int64_t)chunk * p.gc) : p.gc;
  const int g0 = chunk * p.gc;
  const float s2 = p.s2;
  const float thresh = kRescaleLog2 / s2;
  float* my_bins = bins + (WARP_TEAM ? warp * R * gc : 0);

  for (int i = threadIdx.x; i < NTEAMS * R * gc; i += kBlock) bins[i] = 0.f;
  const int hot0 = p.hot ? p.hot[0] : -1;
  const int hot1 = p.hot ? p.hot[1] : -1;

  const char* rowp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = min(row0 + r, p.n_rows - 1);
    rowp[r] = static_cast<const char*>(p.x) + row * p.stride * DtypeInfo<DT>::kBytes;
  }
  float ref_s[R], lim[R], acc[R], h0[R], h1[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    ref_s[r] = -INFINITY;
    lim[r] = -INFINITY;
    acc[r] = h0[r] = h1[r] = 0.f;
  }
  __syncthreads();

  const int64_t V = p.vocab;
  const int64_t n_steps = ((V + WT - 1) / WT + kWarps - 1) / kWarps;
  for (int64_t step = 0; step < n_steps; ++step) {
    const int64_t base = (step * kWarps + warp) * WT;
    float v[R][kEpt];
    int g[kEpt];
    const bool full = p.aligned && base + WT <= V;
    if (full) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int64_t idx = base + (int64_t)(j * 32 + lane) * VEC;
#pragma unroll
        for (int r = 0; r < R; ++r) load_vec<DT>(rowp[r], idx, &v[r][j * VEC]);
#pragma unroll
        for (int k = 0; k < VEC / 4; ++k) {
          const int4 q = p.group ? load_int4(p.group, idx + 4 * k) : make_int4(-1, -1, -1, -1);
          g[j * VEC + 4 * k] = q.x;
          g[j * VEC + 4 * k + 1] = q.y;
          g[j * VEC + 4 * k + 2] = q.z;
          g[j * VEC + 4 * k + 3] = q.w;
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
          const int64_t e = base + (int64_t)(j * 32 + lane) * VEC + u;
          const bool ok = e < V;
          g[j * VEC + u] = (ok && p.group) ? __ldg(p.group + e) : -1;
#pragma unroll
          for (int r = 0; r < R; ++r) v[r][j * VEC + u] = ok ? load_one<DT>(rowp[r], e) : -INFINITY;
        }
      }
    }

    // Move a team's reference when a value runs 2^64 past it (the first valid values always do).
    float tmax[R];
    bool need_any = false;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float m = v[r][0];
#pragma unroll
      for (int k = 1; k < kEpt; ++k) m = fmaxf(m, v[r][k]);
      tmax[r] = m;
      need_any |= m > lim[r];
    }
    if constexpr (WARP_TEAM) {
      if (__any_sync(0xffffffffu, need_any)) {
        __syncwarp();
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float nm = warp_max(tmax[r]);
          if (nm > lim[r]) {
            const float new_s = nm * s2;
            const float f = fast_exp2(ref_s[r] - new_s);
            for (int i = lane; i < gc; i += 32) my_bins[r * gc + i] *= f;
            acc[r] *= f;
            h0[r] *= f;
            h1[r] *= f;
            ref_s[r] = new_s;
            lim[r] = nm + thresh;
          }
        }
        __syncwarp();
      }
    } else {
      if (__syncthreads_or(need_any)) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float m = warp_max(tmax[r]);
          if (lane == 0) s_red[warp][r] = m;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float nm = s_red[0][r];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) nm = fmaxf(nm, s_red[w][r]);
          if (nm > lim[r]) {
            const float new_s = nm * s2;
            const float f = fast_exp2(ref_s[r] - new_s);
            for (int i = threadIdx.x; i < gc; i += kBlock) bins[r * gc + i] *= f;
            acc[r] *= f;
            h0[r] *= f;
            h1[r] *= f;
            ref_s[r] = new_s;
            lim[r] = nm + thresh;
          }
        }
        __syncthreads();
      }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int k = 0; k < kEpt; ++k) {
        float e = fast_exp2(fmaf(v[r][k], s2, -ref_s[r]));
        if (!full) e = (v[r][k] == -INFINITY) ? 0.f : e;
        acc[r] += e;
        const int gg = g[k];
        h0[r] += (gg == hot0) ? e : 0.f;
        h1[r] += (gg == hot1) ? e : 0.f;
        const unsigned li = (unsigned)(gg - g0);
        if (gg != hot0 && gg != hot1 && li < (unsigned)gc) atomicAdd(&my_bins[r * gc + li], e);
      }
    }
  }

  // Team partials: the hot groups go into their bins, sums and references to shared memory.
  __syncwarp();
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float a = warp_sum(acc[r]);
    const float x0 = warp_sum(h0[r]);
    const float x1 = warp_sum(h1[r]);
    if (lane == 0) {
      s_sum[warp][r] = a;
      if (WARP_TEAM || warp == 0) s_ref[warp][r] = ref_s[r];
      const unsigned l0 = (unsigned)(hot0 - g0), l1 = (unsigned)(hot1 - g0);
      if (WARP_TEAM) {
        if (l0 < (unsigned)gc) my_bins[r * gc + l0] += x0;
        if (l1 < (unsigned)gc && hot1 != hot0) my_bins[r * gc + l1] += x1;
      } else {
        if (l0 < (unsigned)gc) atomicAdd(&bins[r * gc + l0], x0);
        if (l1 < (unsigned)gc && hot1 != hot0) atomicAdd(&bins[r * gc + l1], x1);
      }
    }
  }
  __syncthreads();

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    if (row >= p.n_rows) break;
    float top = s_ref[0][r];
#pragma unroll
    for (int t = 1; t < NTEAMS; ++t) top = fmaxf(top, s_ref[t][r]);
    float fac[NTEAMS];
#pragma unroll
    for (int t = 0; t < NTEAMS; ++t) fac[t] = fast_exp2(s_ref[t][r] - top);
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += s_sum[w][r] * fac[WARP_TEAM ? w : 0];
    const float l2t = fast_log2(total);
    if (chunk == 0 && threadIdx.x == 0) {
      if (p.lse) p.lse[row] = (top + l2t) * kLn2;
      if (p.stats) {
        p.stats[2 * row] = top;
        p.stats[2 * row + 1] = l2t;
      }
    }
    float* orow = p.out + row * p.n_groups + g0;
    for (int i = threadIdx.x; i < gc; i += kBlock) {
      float b = 0.f;
#pragma unroll
      for (int t = 0; t < NTEAMS; ++t) b += bins[(t * R + r) * gc + i] * fac[t];
      orow[i] = (fast_log2(b) - l2t) * kLn2;
    }
  }
}


struct BwdParams {
  const void* x;
  int64_t stride;
  int64_t n_rows;
  int64_t vocab;
  int64_t width;
  const int* group;
  int64_t n_groups;
  float s2;
  float inv_t;
  const float* out;
  const float* lse;
  const float* gout;
  float* grad;
  bool aligned;  // logits rows, group table and grad rows 16-byte aligned
};

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += scratch[w];
  __syncthreads();
  return t;
}

// (lse + out) in log2 units, or +inf (a zero coefficient) where out = -inf.
__device__ __forceinline__ float group_offset(float lse, float out) {
  return out == -INFINITY ? INFINITY : (float)(((double)lse + (double)out) * 1.4426950408889634);
}

template <int DT, bool SMEM>
__global__ void __launch_bounds__(kBlock) grouped_bwd_kernel(const BwdParams p) {
  constexpr int VEC = kVec<DT>;
  extern __shared__ float tab[];  // SMEM: [2][G]: offset (log2 units), grad_out / T
  __shared__ float scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t G = p.n_groups;
  const float* gout = p.gout + row * G;
  const float* orow = p.out + row * G;
  const float lse = p.lse[row];
  float part = 0.f;
  for (int64_t g = threadIdx.x; g < G; g += kBlock) {
    const float o = orow[g];
    const float gg = o == -INFINITY ? 0.f : gout[g];  // zero mass carries no gradient
    part += gg;
    if (SMEM) {
      tab[g] = group_offset(lse, o);
      tab[G + g] = gg * p.inv_t;
    }
  }
  const float gsum_t = block_sum(part, scratch) * p.inv_t;  // also orders the table writes
  const float c0 = (float)((double)lse * 1.4426950408889634);
  const float s2 = p.s2;
  const char* xrow = static_cast<const char*>(p.x) + row * p.stride * DtypeInfo<DT>::kBytes;
  float* drow = p.grad + row * p.width;

  auto term = [&](float x, int g) -> float {
    float off, gg;
    if (SMEM) {
      off = tab[g];
      gg = tab[G + g];
    } else {
      off = group_offset(lse, __ldg(orow + g));
      gg = __ldg(gout + g) * p.inv_t;
    }
    const float pt = fast_exp2(fmaf(x, s2, -c0));
    const float ratio = fast_exp2(fmaf(x, s2, -off));
    return gg * ratio - pt * gsum_t;
  };

  const int64_t V = p.vocab, W = p.width;
  for (int64_t base = (int64_t)threadIdx.x * VEC; base < W; base += (int64_t)kBlock * VEC) {
    if (p.aligned && base + VEC <= V) {
      float v[VEC];
      load_vec<DT>(xrow, base, v);
      float d[VEC];
#pragma unroll
      for (int k = 0; k < VEC / 4; ++k) {
        const int4 q = load_int4(p.group, base + 4 * k);
        d[4 * k] = term(v[4 * k], q.x);
        d[4 * k + 1] = term(v[4 * k + 1], q.y);
        d[4 * k + 2] = term(v[4 * k + 2], q.z);
        d[4 * k + 3] = term(v[4 * k + 3], q.w);
      }
#pragma unroll
      for (int k = 0; k < VEC / 4; ++k)
        reinterpret_cast<float4*>(drow + base)[k] =
            make_float4(d[4 * k], d[4 * k + 1], d[4 * k + 2], d[4 * k + 3]);
    } else {
      for (int u = 0; u < VEC; ++u) {
        const int64_t t = base + u;
        if (t >= W) break;
        drow[t] = (t < V) ? term(load_one<DT>(xrow, t), __ldg(p.group + t)) : 0.f;
      }
    }
  }
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("ctalign._cuda: ") + what + ": " + cudaGetErrorString(e));
}

int max_dynamic_smem() {
  int dev = 0, v = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return v;
}

template <int DT, int R, bool WARP_TEAM>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const int teams = WARP_TEAM ? kWarps : 1;
  const size_t smem = (size_t)teams * R * p.gc * sizeof(float);
  auto kernel = grouped_fwd_kernel<DT, R, WARP_TEAM>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  const int64_t blocks = ((p.n_rows + R - 1) / R) * p.n_chunks;
  kernel<<<(unsigned)blocks, kBlock, smem, stream>>>(p);
  check_launch("grouped_forward");
}

// variant: 0 = automatic (per-warp bins, one row per block, while 8 copies of the bins fit in
// 40 KB, i.e. G <= 1280); else 10 * rows per block + (1 for per-warp bins), for benchmarks.
template <int DT>
void dispatch_fwd(FwdParams p, int variant, cudaStream_t stream) {
  const int64_t G = p.n_groups;
  const int64_t budget = 40 * 1024;  // bytes of bins that keep several blocks per multiprocessor
  p.gc = (int)G;
  p.n_chunks = 1;
  switch (variant) {
    case 11: return launch_fwd<DT, 1, true>(p, stream);
    case 21: return launch_fwd<DT, 2, true>(p, stream);
    case 41: return launch_fwd<DT, 4, true>(p, stream);
    case 20: return launch_fwd<DT, 2, false>(p, stream);
    case 40: return launch_fwd<DT, 4, false>(p, stream);
    default: break;
  }
  if (G * 4 * kWarps <= budget) return launch_fwd<DT, 1, true>(p, stream);
  if (G * 4 * 2 <= budget) return launch_fwd<DT, 2, false>(p, stream);
  const int64_t cap = std::max<int64_t>(1024, (max_dynamic_smem() - 2048) / 4);
  p.n_chunks = (int)((G + cap - 1) / cap);
  p.gc = (int)((G + p.n_chunks - 1) / p.n_chunks);
  launch_fwd<DT, 1, false>(p, stream);
}

}  // namespace

void grouped_forward(const LogitsArg& x, const int* group, int64_t n_groups, const int* hot,
                     float temperature, float* out, float* lse, cudaStream_t stream, int variant,
                     float* stats) {
  if (x.n_rows == 0) return;
  FwdParams p{};
  p.x = x.data;
  p.stride = x.stride;
  p.n_rows = x.n_rows;
  p.vocab = x.vocab;
  p.group = group;
  p.n_groups = n_groups;
  p.hot = hot;
  p.s2 = kLog2e / temperature;
  p.out = out;
  p.lse = lse;
  p.stats = stats;
  const int elt = x.dtype == kF32 ? 4 : 2;
  p.aligned = reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && (x.stride * elt) % 16 == 0 &&
              (group == nullptr || reinterpret_cast<uintptr_t>(group) % 16 == 0);
  switch (x.dtype) {
    case kF32: return dispatch_fwd<kF32>(p, variant, stream);
    case kBF16: return dispatch_fwd<kBF16>(p, variant, stream);
    case kF16: return dispatch_fwd<kF16>(p, variant, stream);
    default: throw std::invalid_argument("ctalign._cuda: unsupported logits dtype");
  }
}

void grouped_backward(const LogitsArg& x, int64_t width, const int* group, int64_t n_groups,
                      float temperature, const float* out, const float* lse,
                      const float* grad_out, float* grad, cudaStream_t stream) {
  if (x.n_rows == 0) return;
  BwdParams p{};
  p.x = x.data;
  p.stride = x.stride;
  p.n_rows = x.n_rows;
  p.vocab = x.vocab;
  p.width = width;
  p.group = group;
  p.n_groups = n_groups;
  p.s2 = kLog2e / temperature;
  p.inv_t = 1.f / temperature;
  p.out = out;
  p.lse = lse;
  p.gout = grad_out;
  p.grad = grad;
  const int elt = x.dtype == kF32 ? 4 : 2;
  p.aligned = reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && (x.stride * elt) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(group) % 16 == 0 &&
              reinterpret_cast<uintptr_t>(grad) % 16 == 0 && width % 4 == 0;
  const bool smem = n_groups <= 12288;
  const size_t bytes = smem ? (size_t)n_groups * 2 * sizeof(float) : 0;
  auto go = [&](auto kernel) {
    if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    kernel<<<(unsigned)x.n_rows, kBlock, bytes, stream>>>(p);
    check_launch("grouped_backward");
  };
  switch (x.dtype) {
    case kF32: return smem ? go(grouped_bwd_kernel<kF32, true>) : go(grouped_bwd_kernel<kF32, false>);
    case kBF16: return smem ? go(grouped_bwd_kernel<kBF16, true>) : go(grouped_bwd_kernel<kBF16, false>);
    case kF16: return smem ? go(grouped_bwd_kernel<kF16, true>) : go(grouped_bwd_kernel<kF16, false>);
    default: throw std::invalid_argument("ctalign._cuda: unsupported logits dtype");
  }
}

}  // namespace ctalign_cuda
