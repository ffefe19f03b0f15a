// The CUDA decoders (csrc/cuda/unpack.cuh: Unpack<T>'s load, decode, codes and codes2; decode_pairs.cuh: the
// tensor-core kernels' 16-bit pairs) compiled for the host through shim/, so that tests/test_unpack_host.py holds
// them to the CPU's dequantization without a GPU.
//   unpack_host TYPE_ID < blocks > values
// stdin: the blocks of one type, back to back. stdout: int32 flags (bit 0: the type has codes, bit 1: codes2), then for
// each block eight runs of kElems floats: decode<16>, decode_fast<16>, decode<8>, decode_fast<8>, codes<16>,
// codes2's spans through affine_codes (zeros without codes2), and decode_pairs' bf16 and fp16 values.
// Exit 3: a code at or above 2^kCodeBits.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_bf16.h"  // shim/: before anything that reads __device__
#include "cuda/decode_pairs.cuh"
#include "cuda/unpack.cuh"

float __half2float(__half h) { return lowtune::fp16_to_fp32(h.bits); }
float __bfloat162float(__nv_bfloat16 b) { return lowtune::bf16_to_fp32(b.bits); }
__half __float2half_rn(float f) { return __half{lowtune::fp32_to_fp16(f)}; }
__nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{lowtune::fp32_to_bf16(f)}; }
__half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
__nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
// a*b + c: exact in double for these operands' products, then rounded through float (a second rounding that the
// test's tolerance covers).
__half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  auto f = [](__half p, __half q, __half r) {
    return __float2half_rn((float)((double)__half2float(p) * __half2float(q) + __half2float(r)));
  };
  return {f(a.x, b.x, c.x), f(a.y, b.y, c.y)};
}
__nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  auto f = [](__nv_bfloat16 p, __nv_bfloat16 q, __nv_bfloat16 r) {
    return __float2bfloat16_rn((float)((double)__bfloat162float(p) * __bfloat162float(q) + __bfloat162float(r)));
  };
  return {f(a.x, b.x, c.x), f(a.y, b.y, c.y)};
}

namespace {
using namespace lowtune;
using namespace lowtune::cuda;

template <int T, int S>
bool codes_in_range(const uint32_t* cw) {
  for (int i = 0; i < S; ++i)
    if (((cw[i / 4] >> (8 * (i % 4))) & 0xFF) >> Unpack<T>::kCodeBits) return false;
  return true;
}

template <int T, int S>
bool spans(const uint8_t* b, float* dec, float* fast, float* coded) {
  using U = Unpack<T>;
  bool ok = true;
  for (int e = 0; e < U::kElems; e += S) {
    uint32_t r[U::template Words<S>::value];
    U::template load<S>(b, e, r);
    U::template decode<S>(r, e, dec + e);
    U::template decode_fast<S>(r, e, fast + e);
    if constexpr (HasCodes<T> && S == 16) {
      uint32_t cw[S / 4];
      float s, z;
      U::template codes<S>(r, e, cw, s, z);
      ok = ok && codes_in_range<T, S>(cw);
      affine_codes<S>(cw, s, z, coded + e);
    }
  }
  return ok;
}

template <int T>
bool codes2_spans(const uint8_t* b, float* v) {
  using U = Unpack<T>;
  bool ok = true;
  if constexpr (HasCodes2<T>) {
    for (int e = 0; e < U::kElems; e += 2 * U::kSameWords) {
      uint32_t r[U::template Words<16>::value], cw[4], cw1[4];
      float s, z;
      U::template load<16>(b, e, r);
      U::template codes2<16>(r, e, cw, cw1, s, z);
      ok = ok && codes_in_range<T, 16>(cw) && codes_in_range<T, 16>(cw1);
      affine_codes<16>(cw, s, z, v + e);
      affine_codes<16>(cw1, s, z, v + e + U::kSameWords);
    }
  }
  return ok;
}

template <int T, class ACT>
void pairs16(const uint8_t* b, float* v) {
  for (int e = 0; e < Unpack<T>::kElems; e += staged::kSpan) {
    uint32_t r[Unpack<T>::template Words<staged::kSpan>::value], pw[staged::kSpan / 2];
    Unpack<T>::template load<staged::kSpan>(b, e, r);
    staged::decode_pairs<T, ACT>(r, e, pw);
    for (int i = 0; i < staged::kSpan; ++i) {
      const uint16_t bits = (uint16_t)(pw[i / 2] >> (16 * (i % 2)));
      v[e + i] = std::is_same_v<ACT, __half> ? fp16_to_fp32(bits) : bf16_to_fp32(bits);
    }
  }
}

template <int T>
int run() {
  using U = Unpack<T>;
  if constexpr (GridOf<T>::kPoints > 0)  // what the kernels' stage_grid does before codes()
    std::copy(GridOf<T>::table(), GridOf<T>::table() + GridOf<T>::kPoints, grid_copy<T>());
  const int32_t flags = (HasCodes<T> ? 1 : 0) | (HasCodes2<T> ? 2 : 0);
  std::fwrite(&flags, 4, 1, stdout);
  alignas(16) uint8_t b[U::kBytes + 16];
  std::vector<float> out(8 * U::kElems);
  bool ok = true;
  while (std::fread(b, 1, U::kBytes, stdin) == (size_t)U::kBytes) {
    std::fill(out.begin(), out.end(), 0.0f);
    float* o = out.data();
    ok = spans<T, 16>(b, o, o + U::kElems, o + 4 * U::kElems) && ok;
    ok = spans<T, 8>(b, o + 2 * U::kElems, o + 3 * U::kElems, nullptr) && ok;
    ok = codes2_spans<T>(b, o + 5 * U::kElems) && ok;
    pairs16<T, __nv_bfloat16>(b, o + 6 * U::kElems);
    pairs16<T, __half>(b, o + 7 * U::kElems);
    std::fwrite(out.data(), 4, out.size(), stdout);
  }
  return ok ? 0 : 3;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: unpack_host TYPE_ID < blocks > values\n");
    return 2;
  }
  const int type = std::atoi(argv[1]);
  int rc = 2;
  if (!lowtune::dispatch_qtype(type, [&]<int T>() { rc = run<T>(); }))
    std::fprintf(stderr, "unpack_host: unknown type id %d\n", type);
  return rc;
}
