// The M <= 16 forward with W decoded straight into tensor-core fragments: no shared-memory stage
// for W (the staged kernels' copy is ~1.2 of their ~5.7 instructions per weight, tools/gpu/
// kernels_notes.md). Its twin is reference.cu's forward. The default only for Q6_K from M = 8
// (cuda_policy::regs_default), forced by LOWTUNE_CUDA_PATH=regs; tools/bench_kernels.py times it as
// "regs". For the other types it is slower than staged: Nsight Compute shows the L1 bound by its
// small, scattered W loads (memory pipe 57%, DRAM 18%), which the staged kernel's 16-byte copies avoid.
//
// A warp owns 16 rows of W, two m16n8k16 n-tiles of 8: lane (g, t) = (lane / 4, lane % 4) loads and
// decodes unit 4 st + t of rows g and 8 + g (a unit: 32 elements, two 16-element spans, as the
// one-row gemv reads them, gemv::Units) and holds them as the B fragments of the unit's 8 chunks
// of four elements: in chunk q = 4 h + c, b0 = elements 4c, 4c + 1 and b1 = 4c + 2, 4c + 3 of span
// h. The MMA's k slots 2t, 2t + 1, 2t + 8, 2t + 9 are therefore unit t's chunk elements, so the A
// fragment of lane (g, t) is X[g] and X[g + 8] at those four elements, staged once per CTA in that
// order (xs: one uint4 {a0, a1, a2, a3} per lane, chunk and step; conflict-free 16-byte loads).
// A CTA is 8 warps (128 rows) over one split of K; splits write fp32 partial sums that
// launch_reduce adds in order (deterministic). Where two steps' words fit the registers (kPipe),
// the next step's loads are issued before this step's decoding.
#pragma once
#include "gemv.cuh"         // Units, LaneUnits, round_load, place_words
#include "staged_gemv.cuh"  // decode_pairs
#include "mma.cuh"

namespace lowtune::cuda {
namespace regs {

constexpr int kWarps = 8, kThreads = 32 * kWarps, kRows = 16 * kWarps;
constexpr int kMaxStepsPerSplit = 16;  // 16 steps of 4 units: 2048 elements of K, 64 KB of xs
// whether the kernel with the next step's loads in flight compiles without spills (sm_90, nvcc 13)
template <int T> constexpr bool kPipeDefault = gemv::kRoundWords<T> <= 12;

// Lane (g, t)'s unit of rows g and 8 + g, decoded into B fragments b[h][c] = {b0, b1} of chunk 4h + c.
template <int T, class ACT>
__device__ __forceinline__ void decode_unit(uint32_t* r, const uint8_t* block, int e0, int e1, uint32_t (&b)[2][8]) {
  using U = Unpack<T>;
  using Un = gemv::Units<T>;
  constexpr int kW = U::template Words<16>::value;
  constexpr int kLoads = Un::kSame ? 1 : 2;
  gemv::place_words<T>(r, (reinterpret_cast<uintptr_t>(block) & 2) != 0, block);
  staged::decode_pairs<T, ACT>(r, e0, b[0]);
  staged::decode_pairs<T, ACT>(r + (kLoads - 1) * kW, e1, b[1]);
}

template <int T, class ACT, bool kPipe>
__global__ void __launch_bounds__(kThreads)
regs_forward_kernel(const ACT* __restrict__ x, const uint8_t* __restrict__ w, ACT* __restrict__ y,
                    float* __restrict__ part, int m, int n, int k, int64_t row_bytes, int steps_per_split) {
  using U = Unpack<T>;
  using Un = gemv::Units<T>;
  constexpr int RW = gemv::kRoundWords<T>;
  extern __shared__ uint4 xs[];  // [step][chunk q][lane]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int units = k / 32, steps = (units + 3) / 4;
  const int st0 = blockIdx.y * steps_per_split, st1 = min(steps, st0 + steps_per_split), nst = st1 - st0;

  // X's slice in fragment order; zeros past M and past the last unit
  for (int i = threadIdx.x; i < nst * 8 * 32; i += kThreads) {
    const int ln = i & 31, q = (i >> 5) & 7, st = st0 + (i >> 8);
    const int gg = ln >> 2, u = 4 * st + (ln & 3), h = q >> 2, c = q & 3;
    uint2 lo = make_uint2(0u, 0u), hi = make_uint2(0u, 0u);
    if (u < units) {
      const int e = (u / Un::kPerBlock) * U::kElems + Un::e0(u % Un::kPerBlock) + h * Un::kGap + 4 * c;
      if (gg < m) lo = *reinterpret_cast<const uint2*>(x + (int64_t)gg * k + e);
      if (gg + 8 < m) hi = *reinterpret_cast<const uint2*>(x + (int64_t)(gg + 8) * k + e);
    }
    xs[i] = make_uint4(lo.x, hi.x, lo.y, hi.y);  // a0 = X[g][4c..], a1 = X[g+8][4c..], a2, a3: +2
  }
  __syncthreads();

  const int row0 = blockIdx.x * kRows + warp * 16 + g;  // rows row0 and row0 + 8
  float d[2][4] = {};
  // Step st of lane (g, t): unit 4 st + t, or (past the last unit) none. Such lanes load nothing but
  // still take part in the warp-wide MMAs with zero B fragments: the MMAs stay outside every
  // lane-dependent branch.
  struct Step {
    bool has;
    int e0, e1;
    const uint8_t* blk[2];
  };
  auto step_at = [&](int st) {
    const int u = 4 * st + t;
    Step p;
    p.has = u < units;
    const int uu = p.has ? u : 4 * st;
    p.e0 = Un::e0(uu % Un::kPerBlock);
    p.e1 = p.e0 + Un::kGap;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      p.blk[j] = w + (int64_t)(row0 + 8 * j) * row_bytes + (int64_t)(uu / Un::kPerBlock) * U::kBytes;
    return p;
  };
  auto load_step = [&](const Step& p, uint32_t (&r)[2][RW]) {
    const gemv::LaneUnits l{p.e0, p.e1, nullptr, nullptr};
#pragma unroll
    for (int j = 0; j < 2; ++j)
      if (p.has && row0 + 8 * j < n)
        gemv::round_load<T, 1, false>(p.blk[j], 0, units, l, *reinterpret_cast<uint32_t(*)[1][RW]>(&r[j]));
  };
  uint32_t r[2][RW];
  if constexpr (kPipe) {
    if (st0 < st1) load_step(step_at(st0), r);
  }
  for (int st = st0; st < st1; ++st) {
    const Step p = step_at(st);
    uint32_t nr[2][RW];
    if constexpr (kPipe) {  // the next step's loads in flight while this step decodes
      if (st + 1 < st1) load_step(step_at(st + 1), nr);
    } else {
      load_step(p, r);
    }
    // the step's A fragments, read from shared memory once for both n-tiles
    uint4 a[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) a[q] = xs[((st - st0) * 8 + q) * 32 + lane];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      uint32_t b[2][8] = {};
      if (p.has && row0 + 8 * j < n)
        decode_unit<T, ACT>(r[j], p.blk[j], p.e0, p.e1, b);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const uint32_t af[4] = {a[q].x, a[q].y, a[q].z, a[q].w};
        mma16816<ACT>(d[j], af, b[q >> 2][2 * (q & 3)], b[q >> 2][2 * (q & 3) + 1]);
      }
    }
    if constexpr (kPipe) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < RW; ++i) r[j][i] = nr[j][i];
    }
  }
  // d[j] = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]} of n-tile j: rows m, columns of W's
  // rows base + 2t, base + 2t + 1 (base = the n-tile's first row)
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int base = blockIdx.x * kRows + warp * 16 + 8 * j;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int mm = g + 8 * (v >> 1), nn = base + 2 * t + (v & 1);
      if (mm >= m || nn >= n) continue;
      if (part) part[((int64_t)blockIdx.y * m + mm) * n + nn] = d[j][v];
      else y[(int64_t)mm * n + nn] = f_to_act<ACT>(d[j][v]);
    }
  }
}

}  // namespace regs

template <int T>
void launch_regs_forward(const void* x, int dtype, const uint8_t* w, void* y, int m, int n, int k, int64_t row_bytes,
                         cudaStream_t stream) {
  if constexpr (!HasCodes<T>) {
    throw std::invalid_argument("regs: this type has no codes kernel (cuda_policy::has_gemv)");
  } else {
    using namespace regs;
    if (m < 1 || m > 16) throw std::invalid_argument("the regs forward takes 1 <= M <= 16");
    auto launch = [&](auto tag, auto pipe) {
      using ACT = decltype(tag);
      constexpr auto kernel = regs_forward_kernel<T, ACT, decltype(pipe)::value>;
      const int steps = (k / 32 + 3) / 4, tiles = (n + kRows - 1) / kRows;
      const size_t smem_max = (size_t)kMaxStepsPerSplit * 8 * 32 * sizeof(uint4);
      const int fit = std::max(kernel_ctas<kernel>(smem_max, kThreads), 1);
      // splits of K: enough CTAs for a wave of those that fit, at most 16 steps (64 KB of xs) each
      const int per = units_per_split(tiles, steps, kMaxStepsPerSplit, fit);
      const int splits = (steps + per - 1) / per;
      const size_t smem = (size_t)std::min(per, steps) * 8 * 32 * sizeof(uint4);
      ScratchBuffer part(splits > 1 ? (size_t)splits * m * n * sizeof(float) : 0, stream);
      kernel<<<dim3((unsigned)tiles, (unsigned)splits), kThreads, smem, stream>>>(
          static_cast<const ACT*>(x), w, static_cast<ACT*>(y), part.as<float>(), m, n, k, row_bytes, per);
      LT_CUDA_CHECK_LAUNCH();
      if (splits > 1) launch_reduce<ACT>(part.as<float>(), splits, (int64_t)m * n, y, stream);
    };
    // the next step's loads overlapped with this step's decoding (kPipe) where the two sets of words
    // fit without spilling; LOWTUNE_CUDA_REGS_PIPE=0 or 1 overrides it, to time both
    const int64_t pipe = cuda_policy::env_int("LOWTUNE_CUDA_REGS_PIPE", kPipeDefault<T>);
    auto with_pipe = [&](auto tag) {
      if constexpr (kPipeDefault<T>) {
        if (pipe) return launch(tag, std::true_type{});
      }
      launch(tag, std::false_type{});
    };
    if (dtype == D_BF16) with_pipe(__nv_bfloat16{});
    else if (dtype == D_F16) with_pipe(__half{});
    else throw std::invalid_argument("the regs forward takes bfloat16 or float16 activations");
  }
}

}  // namespace lowtune::cuda
