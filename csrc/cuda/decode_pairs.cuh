// A span of a block decoded into 16-bit pairs, the operand form of the tensor-core kernels (staged_gemv.cuh,
// small_m_regs.cuh). Types whose codes fit the activation type's magic exponent take the narrow path: each
// code becomes the pair (M + u) by one byte permute, and one FMA pair maps it to u*s + z; the others decode
// to floats (decode_fast) and round them to pairs. Host-compiled too (tests/cuda_host).
#pragma once
#include <cstdint>
#include <type_traits>

#include "mma.cuh"     // pack2
#include "unpack.cuh"  // Unpack<T>, HasCodes

namespace lowtune::cuda::staged {

constexpr int kSpan = 16;  // elements one lane decodes per call

template <class ACT> struct Magic;
template <> struct Magic<__nv_bfloat16> {  // bf16 0x43xx = 128 + xx for xx < 128
  static constexpr uint32_t kWord = 0x43434343u, kNeg = 0xC300C300u, kOne = 0x3F803F80u;
  static constexpr int kBits = 7;
};
template <> struct Magic<__half> {  // fp16 0x64xx = 1024 + xx for xx < 256
  static constexpr uint32_t kWord = 0x64646464u, kNeg = 0xE400E400u, kOne = 0x3C003C00u;
  static constexpr int kBits = 8;
};

template <class ACT> __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  using P2 = std::conditional_t<std::is_same_v<ACT, __half>, __half2, __nv_bfloat162>;
  const P2 r = __hfma2(*reinterpret_cast<const P2*>(&a), *reinterpret_cast<const P2*>(&b),
                       *reinterpret_cast<const P2*>(&c));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// Whether a type's codes fit the magic of the activation type (else decode_fast + conversion).
template <int T, class ACT> constexpr bool narrow_codes() {
  if constexpr (HasCodes<T>) return Unpack<T>::kCodeBits <= Magic<ACT>::kBits && !Unpack<T>::kTableCodes;
  else return false;
}

// pw[j] = the pair (x[2j], x[2j+1]) of span elements e .. e+15 in ACT. Narrow path: one rounding
// of the exact u*s + z, with s and z rounded to ACT (within about one ACT rounding of decode_fast).
template <int T, class ACT>
__device__ __forceinline__ void decode_pairs(const uint32_t* r, int e, uint32_t* pw) {
  using U = Unpack<T>;
  if constexpr (narrow_codes<T, ACT>()) {
    uint32_t cw[kSpan / 4];
    float s, z;
    U::template codes<kSpan>(r, e, cw, s, z);
    const uint32_t s2 = pack2<ACT>(s, s), z2 = pack2<ACT>(z, z);
#pragma unroll
    for (int j = 0; j < kSpan / 4; ++j) {
      const uint32_t lo = __byte_perm(cw[j], Magic<ACT>::kWord, 0x4140);  // (M + u0, M + u1)
      const uint32_t hi = __byte_perm(cw[j], Magic<ACT>::kWord, 0x4342);  // (M + u2, M + u3)
      pw[2 * j] = fma2<ACT>(fma2<ACT>(lo, Magic<ACT>::kOne, Magic<ACT>::kNeg), s2, z2);
      pw[2 * j + 1] = fma2<ACT>(fma2<ACT>(hi, Magic<ACT>::kOne, Magic<ACT>::kNeg), s2, z2);
    }
  } else {
    float v[kSpan];
    U::template decode_fast<kSpan>(r, e, v);
#pragma unroll
    for (int i = 0; i < kSpan / 2; ++i) pw[i] = pack2<ACT>(v[2 * i], v[2 * i + 1]);
  }
}

}  // namespace lowtune::cuda::staged
