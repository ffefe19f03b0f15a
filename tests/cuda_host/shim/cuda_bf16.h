// Host stand-ins for the CUDA names that csrc/cuda/unpack.cuh uses, so that its decoders compile with the host
// C++ compiler (unpack_host.cpp). Each intrinsic has CUDA's semantics for the arguments the decoders pass; the
// *_rn arithmetic needs -ffp-contract=off, as nvcc's intrinsics are never contracted.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __popc(uint32_t x) { return __builtin_popcount(x); }
// Byte i of the result is byte (s >> 4i) & 7 of the eight bytes y:x (x the low four).
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t xy = (uint64_t)y << 32 | x;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= (uint32_t)((xy >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
}
struct __half { uint16_t bits; };
inline __half __ushort_as_half(uint16_t h) { return __half{h}; }
float __half2float(__half h);  // unpack_host.cpp: lowtune's fp16_to_fp32
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
