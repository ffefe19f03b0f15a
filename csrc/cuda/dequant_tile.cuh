// Dequantize a tile of W (rows x columns, columns a multiple of 32) into a dense matrix:
// the fast twin of reference::dequantize, and the producer of the bf16/fp16/fp32 scratch that
// the large-M path hands to cuBLAS. One thread unpacks 16 consecutive elements and writes them
// with 16-byte stores; consecutive threads take consecutive 16-element groups of a row.
#pragma once
#include "common.cuh"
#include "internal.h"
#include "mma.cuh"
#include "unpack.cuh"

namespace lowtune::cuda {

template <class OUT>
__device__ __forceinline__ void store16(OUT* dst, const float* v) {
  if constexpr (std::is_same_v<OUT, float>) {
    float4* d = reinterpret_cast<float4*>(dst);
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
  } else {
    uint32_t p[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = pack2<OUT>(v[2 * i], v[2 * i + 1]);
    uint4* d = reinterpret_cast<uint4*>(dst);
    d[0] = make_uint4(p[0], p[1], p[2], p[3]);
    d[1] = make_uint4(p[4], p[5], p[6], p[7]);
  }
}

// Grid: x over 16-element groups of a row, y over pairs of rows (strided); the loads of both
// rows are issued before either is decoded.
template <int T, class OUT>
__global__ void __launch_bounds__(128) dequant_tile_kernel(const uint8_t* __restrict__ w, int64_t row_bytes,
                                                           int64_t nrows, int64_t col0, int groups,
                                                           OUT* __restrict__ out, int64_t ldo) {
  using U = Unpack<T>;
  constexpr int W = U::template Words<16>::value;
  const int gi = blockIdx.x * blockDim.x + threadIdx.x;
  if (gi >= groups) return;
  const int64_t k = col0 + 16 * (int64_t)gi;
  const uint8_t* blk = w + (k / U::kElems) * U::kBytes;
  const int e = (int)(k % U::kElems);
  for (int64_t r = blockIdx.y; r < nrows; r += 2 * (int64_t)gridDim.y) {
    const int64_t r2 = r + gridDim.y;
    uint32_t ra[W], rb[W];
    U::template load<16>(blk + r * row_bytes, e, ra);
    if (r2 < nrows) U::template load<16>(blk + r2 * row_bytes, e, rb);
    float v[16];
    U::template decode<16>(ra, e, v);
    store16<OUT>(out + r * ldo + 16 * (int64_t)gi, v);
    if (r2 < nrows) {
      U::template decode<16>(rb, e, v);
      store16<OUT>(out + r2 * ldo + 16 * (int64_t)gi, v);
    }
  }
}

template <int T>
void launch_dequant_tile(const uint8_t* w, int64_t row_bytes, int64_t nrows, int64_t col0, int64_t ncols,
                         void* out, int out_dtype, int64_t ldo, cudaStream_t stream) {
  if (nrows <= 0 || ncols <= 0) return;
  const int groups = (int)(ncols / 16);
  const int64_t row_pairs = (nrows + 1) / 2;
  const dim3 grid((unsigned)((groups + 127) / 128), (unsigned)(row_pairs < 65535 ? row_pairs : 65535));
  switch (out_dtype) {
    case D_F32:
      dequant_tile_kernel<T, float><<<grid, 128, 0, stream>>>(w, row_bytes, nrows, col0, groups,
                                                              static_cast<float*>(out), ldo);
      break;
    case D_F16:
      dequant_tile_kernel<T, __half><<<grid, 128, 0, stream>>>(w, row_bytes, nrows, col0, groups,
                                                               static_cast<__half*>(out), ldo);
      break;
    case D_BF16:
      dequant_tile_kernel<T, __nv_bfloat16><<<grid, 128, 0, stream>>>(w, row_bytes, nrows, col0, groups,
                                                                      static_cast<__nv_bfloat16*>(out), ldo);
      break;
    default:
      throw std::invalid_argument("unknown output dtype " + std::to_string(out_dtype));
  }
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lowtune::cuda
