// The M = 1 forward of Q4_K on CUDA cores (decoding): y[n] = sum_k x[k] * deq(W)[n, k], bf16 or
// fp16 activations. cuda_policy::choose sends one-row Q4_K forwards here ("gemv").
//
// Why not the staged MMA kernels at M = 1: an m16n8k16 tile computes 8 columns where one is used,
// and feeding it costs ~5.7 instructions per weight (BENCHMARKS.md, "What bounds the staged
// small-M forward"), so those kernels are bound by issue, not by memory, at 37-47% of the read
// bandwidth. Here a weight costs ~3 instructions: one warp reads a row, each lane 16 bytes of codes
// (32 weights) per super-block, and
//   - two codes become the halves 1024 + q with one LOP3 (and a shift), exact; one HSUB2 takes
//     1024 off and one HFMA2 accumulates q * xh in fp16 over the lane's 16 elements of a sub-block;
//   - xh = x / sigma with sigma the power of two at or above max |x| of those 16 elements, so
//     |xh| < 1, sums stay below 240, nothing overflows fp16, and bf16 inputs are exact in fp16;
//   - the sub-block's scale and min apply in fp32: y += sigma * (d sc sum(q xh) - dmin mn sum(xh)).
// Each CTA first rewrites x into shared memory in that form, in the order the codes come out of a
// code word (pairs (i, i+2) and (i+1, i+3), low then high nibbles), with sigma and sum(xh) per
// 16-element piece; then its warps take rows.
//
// Error: each fp16 sum of at most 8 products rounds to 11 bits, below the bf16 rounding of the
// weight the MMA kernels apply; tests/test_cuda.py holds both to one tolerance against float64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "../blocks.h"
#include "common.cuh"
#include "internal.h"
#include "mma.cuh"     // act_to_f
#include "unpack.cuh"  // half_f, scale_min_k4_words

namespace lowtune::cuda {
namespace {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kBlockBytes = 144;  // block_q4_K: d, dmin (4 bytes), scales (12), qs (128)

// Shared memory per K: x as halves (2 bytes per element) and per 32-element chunk one float4
// (sigma and S of its low and high piece): 2.5 bytes per element.
size_t gemv_smem_bytes(int64_t k) { return (size_t)k * 2 + (size_t)(k / 32) * 16; }

// Codes at bits [s, s+4) and [s+16, s+20) of w, s = kShift, as the halves 1024 + q (exact: the
// nibble fills the low mantissa bits under the exponent of 1024).
template <int kShift>
__device__ __forceinline__ uint32_t codes_1024(uint32_t w) {
  return ((w >> kShift) & 0x000F000Fu) | 0x64006400u;
}

__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
// q·x + acc for the two codes of codes_1024 (1024 + q - 1024 is exact)
__device__ __forceinline__ uint32_t code_fma(uint32_t c1024, uint32_t x, uint32_t acc) {
  return hfma2(hsub2(c1024, 0x64006400u), x, acc);
}

__device__ __forceinline__ float sum_halves(uint32_t h2) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
  return f.x + f.y;
}

__device__ __forceinline__ uint32_t pack_halves(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// x's shared-memory form: word t (bytes 4t..4t+3 of a lane's 16 code bytes) of chunk (sb, c) is the
// uint4 xs[(4 sb + t) * 8 + c], so the eight lanes of a super-block read 128 contiguous bytes.
__device__ __forceinline__ int xs_index(int sb, int t, int c) { return (4 * sb + t) * 8 + c; }

// Chunk q = (super-block sb, lane chunk c) of x: elements base + i (low piece) and base + 32 + i
// (high piece), i < 16, base = 256 sb + 64 (c / 2) + 16 (c % 2), into xs and aux[q].
template <class ACT>
__device__ void prepare_chunk(const ACT* __restrict__ x, int q, uint4* xs, float4* aux) {
  const int sb = q >> 3, c = q & 7;
  const ACT* base = x + 256 * sb + 64 * (c >> 1) + 16 * (c & 1);
  constexpr int kPer16 = 16 / (int)sizeof(ACT);  // elements per 16-byte load
  float v[2][16];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const uint4* src = reinterpret_cast<const uint4*>(base + 32 * p);
#pragma unroll
    for (int h = 0; h < 16 / kPer16; ++h) {
      const uint4 u = src[h];
      const ACT* e = reinterpret_cast<const ACT*>(&u);
#pragma unroll
      for (int i = 0; i < kPer16; ++i) v[p][h * kPer16 + i] = act_to_f(e[i]);
    }
  }
  float sig[2], s[2];
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    float mx = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) mx = fmaxf(mx, fabsf(v[p][i]));
    int e = 0;
    frexpf(mx, &e);  // mx = f * 2^e, f in [0.5, 1): |x| * 2^-e < 1 (e = 0 for mx = 0)
    const float inv = ldexpf(1.0f, -e);
    sig[p] = ldexpf(1.0f, e);
    s[p] = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      v[p][i] = __half2float(__float2half_rn(v[p][i] * inv));
      s[p] += v[p][i];
    }
  }
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int i = 4 * t;
    xs[xs_index(sb, t, c)] = make_uint4(pack_halves(v[0][i], v[0][i + 2]), pack_halves(v[0][i + 1], v[0][i + 3]),
                                        pack_halves(v[1][i], v[1][i + 2]), pack_halves(v[1][i + 1], v[1][i + 3]));
  }
  aux[q] = make_float4(sig[0], s[0], sig[1], s[1]);
}

// kRows rows per warp at a time (they share each load of x from shared memory); per row and
// lane, kUnroll / kRows super-blocks' loads in flight before their math. One row is the default:
// two were slower on every decode shape measured (BENCHMARKS.md); LOWTUNE_CUDA_GEMV_ROWS=2 keeps
// them for comparisons.
template <class ACT, int kRows>
__global__ void __launch_bounds__(kThreads) gemv_q4k_kernel(const ACT* __restrict__ x, const uint8_t* __restrict__ w,
                                                            ACT* __restrict__ y, int n, int k, int64_t row_bytes) {
  constexpr int kU = 4 / kRows;
  extern __shared__ uint4 smem[];
  const int chunks = k / 32, nsb = k / 256;
  uint4* xs = smem;
  float4* aux = reinterpret_cast<float4*>(smem + 4 * chunks);
  const int lane = threadIdx.x & 31, c = lane & 7, j = c >> 1;
  const int first = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * kRows;
  // the warp's first rows stream into L2 while x is prepared (every CTA prepares at once)
  for (int r = 0; r < kRows && first + r < n; ++r)
    for (int sb = lane >> 3; sb < nsb; sb += 4) {
      const uint8_t* b = w + (int64_t)(first + r) * row_bytes + (int64_t)sb * kBlockBytes;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(b + 16 + 16 * c));
      if (c == 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(b));
    }
  for (int q = threadIdx.x; q < chunks; q += kThreads) prepare_chunk(x, q, xs, aux);
  __syncthreads();

  for (int row0 = first; row0 < n; row0 += gridDim.x * kWarps * kRows) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    for (int sb0 = 0; sb0 < nsb; sb0 += 4 * kU) {
      uint4 hdr[kU][kRows], qs[kU][kRows];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int sb = sb0 + 4 * u + (lane >> 3);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          hdr[u][r] = qs[u][r] = make_uint4(0, 0, 0, 0);  // past the last row or super-block: d = dmin = 0
          if (sb < nsb && row0 + r < n) {
            const uint8_t* b = w + (int64_t)(row0 + r) * row_bytes + (int64_t)sb * kBlockBytes;
            hdr[u][r] = __ldg(reinterpret_cast<const uint4*>(b));
            qs[u][r] = __ldg(reinterpret_cast<const uint4*>(b + 16 + 16 * c));
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int sb = sb0 + 4 * u + (lane >> 3);
        if (sb >= nsb) break;
        uint32_t lo[kRows], hi[kRows];  // fp16x2 sums of q * xh over the low and the high piece
#pragma unroll
        for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = 0;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const uint4 xv = xs[xs_index(sb, t, c)];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const uint32_t code = reinterpret_cast<const uint32_t*>(&qs[u][r])[t];
            lo[r] = code_fma(codes_1024<0>(code), xv.x, lo[r]);
            lo[r] = code_fma(codes_1024<8>(code), xv.y, lo[r]);
            hi[r] = code_fma(codes_1024<4>(code), xv.z, hi[r]);
            hi[r] = code_fma(codes_1024<12>(code), xv.w, hi[r]);
          }
        }
        const float4 a = aux[8 * sb + c];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float d = half_f(hdr[u][r].x & 0xFFFF), dmin = half_f(hdr[u][r].x >> 16);
          const uint32_t sw[3] = {hdr[u][r].y, hdr[u][r].z, hdr[u][r].w};
          uint32_t sc0, mn0, sc1, mn1;
          scale_min_k4_words(sw, 2 * j, &sc0, &mn0);
          scale_min_k4_words(sw, 2 * j + 1, &sc1, &mn1);
          // sum over the piece of w * x = sigma * (d sc sum(q xh) - dmin mn sum(xh))
          acc[r] = fmaf(a.x, fmaf(d * (float)sc0, sum_halves(lo[r]), -dmin * (float)mn0 * a.y), acc[r]);
          acc[r] = fmaf(a.z, fmaf(d * (float)sc1, sum_halves(hi[r]), -dmin * (float)mn1 * a.w), acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
      if (lane == 0 && row0 + r < n) y[row0 + r] = f_to_act<ACT>(acc[r]);
    }
  }
}

// CTAs of gemv_q4k_kernel<ACT> one multiprocessor holds with `smem` bytes of shared memory (asked
// once per size; the kernel's shared-memory limit is raised as K needs).
template <class ACT, int kRows>
int resident_ctas(size_t smem) {
  static std::mutex mu;
  static size_t configured = 48 * 1024;
  static std::map<size_t, int> known;
  std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find(smem);
  if (it != known.end()) return it->second;
  if (smem > configured) {
    LT_CUDA_CHECK(cudaFuncSetAttribute(gemv_q4k_kernel<ACT, kRows>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem));
    configured = smem;
  }
  int per_sm = 0;
  LT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_q4k_kernel<ACT, kRows>, kThreads, smem));
  return known[smem] = per_sm;
}

}  // namespace

bool gemv_q4k_fits(int64_t k) { return k % 256 == 0 && gemv_fits(k); }  // the same 2.5 bytes per element

void launch_gemv_q4k(const void* x, int dtype, const uint8_t* w, void* y, int64_t n, int64_t k, int64_t row_bytes,
                     cudaStream_t stream) {
  const size_t smem = gemv_smem_bytes(k);
  const char* knob = std::getenv("LOWTUNE_CUDA_GEMV_ROWS");  // rows per warp at a time: 1 (default) or 2
  const int rows = knob && *knob == '2' ? 2 : 1;
  auto launch = [&](auto tag, auto rows_c) {
    using ACT = decltype(tag);
    constexpr int R = decltype(rows_c)::value;
    const int per_sm = resident_ctas<ACT, R>(smem);
    if (per_sm < 1) throw std::runtime_error("gemv_q4k: no CTA fits for this K");
    const int64_t want = (n + kWarps * R - 1) / (kWarps * R);
    const int grid = (int)std::min<int64_t>(want, (int64_t)per_sm * sm_count());
    gemv_q4k_kernel<ACT, R><<<grid, kThreads, smem, stream>>>(static_cast<const ACT*>(x), w, static_cast<ACT*>(y),
                                                              (int)n, (int)k, row_bytes);
  };
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (dtype == D_BF16) rows == 1 ? launch(__nv_bfloat16{}, One{}) : launch(__nv_bfloat16{}, Two{});
  else if (dtype == D_F16) rows == 1 ? launch(__half{}, One{}) : launch(__half{}, Two{});
  else throw std::invalid_argument("gemv_q4k takes bfloat16 or float16 activations");
  LT_CUDA_CHECK_LAUNCH();
}

}  // namespace lowtune::cuda
