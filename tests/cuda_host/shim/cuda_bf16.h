// Host stand-ins for the CUDA names that csrc/cuda/unpack.cuh and decode_pairs.cuh use, so that the decoders
// compile with the host C++ compiler (unpack_host.cpp). Each intrinsic has CUDA's semantics for the arguments
// the decoders pass; the *_rn arithmetic needs -ffp-contract=off, as nvcc's intrinsics are never contracted.
#pragma once
#include <cmath>
#include <cstddef>
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
// 16-bit types as their bits; pairs low element first, as in a register. Conversions and __hfma2 are defined in
// unpack_host.cpp (through lowtune's fp16.h).
struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __half __ushort_as_half(uint16_t h) { return __half{h}; }
float __half2float(__half h);
float __bfloat162float(__nv_bfloat16 b);
__half __float2half_rn(float f);
__nv_bfloat16 __float2bfloat16_rn(float f);
__half2 __floats2half2_rn(float lo, float hi);
__nv_bfloat162 __floats2bfloat162_rn(float lo, float hi);
__half2 __hfma2(__half2 a, __half2 b, __half2 c);
__nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c);
size_t __cvta_generic_to_shared(const void* p);  // declared only: the host never runs ldmatrix
struct uint2 { uint32_t x, y; };
struct uint4 { uint32_t x, y, z, w; };
