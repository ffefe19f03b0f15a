// fp16 / bf16 <-> fp32 and E8M0 / UE4M3 -> fp32 conversions usable on the host and in CUDA device code.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LT_HD __host__ __device__ __forceinline__
#else
#define LT_HD inline
#endif

namespace lowtune {

LT_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
LT_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

// IEEE half -> float, exact for every input (subnormals, inf, nan).
LT_HD float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// float -> IEEE half, round to nearest even (the conversion numpy and ggml's reference use).
LT_HD uint16_t fp32_to_fp16(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (ax < 0x33000000u) return (uint16_t)sign;  // < 2^-25: rounds to zero
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // result = m >> (shift) with rounding, in units of 2^-24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ax - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) r++;
  return (uint16_t)(sign | r);
}

LT_HD float bf16_to_fp32(uint16_t b) { return bits_to_float((uint32_t)b << 16); }

// float -> bf16, round to nearest even; nan stays nan.
LT_HD uint16_t fp32_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Half the value of an E8M0 scale (2^(e-127) / 2 = 2^(e-128)), ggml's GGML_E8M0_TO_FP32_HALF: MXFP4's
// levels are the E2M1 values doubled, so the block scale is taken at half. e = 0 and 1 give the
// subnormals 2^-128 and 2^-127; e = 255 gives 2^127 (ggml reads no NaN).
LT_HD float e8m0_to_fp32_half(uint8_t e) {
  return bits_to_float(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23);
}

// Half the value of an unsigned E4M3 scale (4 exponent bits, bias 7, 3 mantissa bits), ggml's
// ggml_ue4m3_to_fp32: NVFP4's levels are MXFP4's doubled E2M1 values. Bit 7 is ignored; 0x7F (E4M3's
// NaN) reads as 0; exponent 0 gives the subnormals man * 2^-10. Every value is exact in float.
LT_HD float ue4m3_to_fp32_half(uint8_t x) {
  const uint32_t exp = (x >> 3) & 0xF, man = x & 7;
  if (x == 0x7F) return 0.0f;
  if (exp == 0) return (float)man * (1.0f / 1024.0f);
  return bits_to_float(((exp + 119) << 23) | (man << 20));  // (1 + man/8) * 2^(exp - 8)
}

}  // namespace lowtune
