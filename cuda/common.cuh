// Device helpers shared by the ctalign CUDA kernels: dtype tags, 16-byte vector loads of logits,
// warp reductions. Header-only, included by every .cu file of cuda/.
//
// Logits layout (the kernel contract of docs/ARCHITECTURE.md): rows of a [N, W] matrix with a
// contiguous last dimension and a row stride in elements; the first V columns are tokens, the rest
// padding. Every kernel reads a row with 16-byte loads when the row start is 16-byte aligned (the
// host checks the base pointer and the stride) and falls back to masked scalar loads otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ctalign_cuda {

// Logits dtypes, as passed from Python.
enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int DT> struct DtypeInfo;
template <> struct DtypeInfo<kF32> { static constexpr int kBytes = 4; };
template <> struct DtypeInfo<kBF16> { static constexpr int kBytes = 2; };
template <> struct DtypeInfo<kF16> { static constexpr int kBytes = 2; };

// Elements per 16-byte vector.
template <int DT> constexpr int kVec = 16 / DtypeInfo<DT>::kBytes;

// One element of a row, as float.
template <int DT>
__device__ __forceinline__ float load_one(const void* row, int64_t i) {
  if constexpr (DT == kF32) {
    return __ldg(static_cast<const float*>(row) + i);
  } else if constexpr (DT == kBF16) {
    const unsigned short u = __ldg(static_cast<const unsigned short*>(row) + i);
    return __uint_as_float(static_cast<unsigned>(u) << 16);
  } else {
    return __half2float(__ldg(static_cast<const __half*>(row) + i));
  }
}

// 16 bytes of a row (element index i, a multiple of kVec<DT>) unpacked into kVec<DT> floats.
template <int DT>
__device__ __forceinline__ void load_vec(const void* row, int64_t i, float* out) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const char*>(row) +
                                                       i * DtypeInfo<DT>::kBytes));
  if constexpr (DT == kF32) {
    out[0] = __uint_as_float(u.x);
    out[1] = __uint_as_float(u.y);
    out[2] = __uint_as_float(u.z);
    out[3] = __uint_as_float(u.w);
  } else if constexpr (DT == kBF16) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = __uint_as_float(w[k] << 16);
      out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  } else {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      __half2 h;
      memcpy(&h, &w[k], 4);
      const float2 f = __half22float2(h);
      out[2 * k] = f.x;
      out[2 * k + 1] = f.y;
    }
  }
}

// Four int32 group ids (index i a multiple of 4, table 16-byte aligned).
__device__ __forceinline__ int4 load_int4(const int* p, int64_t i) {
  return __ldg(reinterpret_cast<const int4*>(p + i));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// exp2 / log2 on the special-function unit (ex2.approx / lg2.approx, relative error ~2^-22),
// flushing subnormals: a probability below 2^-126 of the row's reference counts as zero.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace ctalign_cuda
