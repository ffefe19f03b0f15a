// The M = 1 input gradient on CUDA cores, the one-row forward's transpose (gemv.cuh):
// dx[k] = sum_n dy[n] deq(W)[n, k], bf16 or fp16, for every type with codes. cuda_policy::choose
// sends one-row input gradients here ("gemv") for the types of gemv_grad_default (the table types and the
// K-quants but Q6_K), and for any type when forced (LOWTUNE_CUDA_PATH=gemv): the staged kernel was timed
// faster for the others; its twin is reference.cu's input gradient.
//
// W is read as the forward reads it, a row's units side by side across a warp's lanes, but the sum
// runs over rows: lane l of a CTA's slice s owns unit 32 s + l (its two 16-element spans) and keeps
// their 32 partial sums in registers while its warp walks the rows of the CTA's row group, each
// row's weights u s + z (Unpack<T>::codes) scaled by the row's dy:
//   acc_i += (dy s) u_i in fp32 (add_span; at four rows a step in integer arithmetic, add_span_rows),
//   and per span z_sum += dy z (added once at the end).
// The eight warps of a CTA then add their sums through shared memory in a fixed order, each CTA
// writes its row group's partial dx (fp32), and finish_kernel adds the groups in order: the result
// does not depend on timing. Both launch with programmatic dependent launch (launch_pdl), the first
// rows' words loaded before the wait for the kernel that wrote dy.
// Two ways to bring the rows in (cuda_policy::gemv_grad_staged):
//   grad_kernel: each warp loads its next step's words into registers while it decodes this step's
//     (two sets of words held, one step ahead: its profile waited on L1TEX loads 38% of the time);
//   grad_staged_kernel: the CTA copies stages of 32 rows of its slice into a shared-memory ring by
//     cp.async, two stages ahead, and each warp reads its rows' words from there: more bytes in flight
//     and no registers holding them, so four rows a step (the integer path) for more types.
#pragma once
#include "gemv.cuh"         // Units, LaneUnits, round_load, place_words
#include "staged_gemv.cuh"  // seg_chunks, row_pitch, staged_block, copy_chunk16

namespace lowtune::cuda {
namespace gemv_grad {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
// rows a warp decodes per step while the next step's loads are in flight: the most whose two sets of
// words fit the 128 registers of two CTAs per multiprocessor without spilling. The table types take
// at most two, whose sums stay in fp32: add_span_rows' int16 scaling of a step's a_j is relative to
// the codes, and their codes (level + 128) are large against the levels that the offset leaves
// (MXFP4's fp16 input gradient missed the tolerance of the tests by 1.2-1.4x with four rows a step).
template <int T>
constexpr int kRowsInFlight =
    gemv::kRoundWords<T> <= 6 && !Unpack<T>::kTableCodes ? 4 : gemv::kRoundWords<T> <= 12 ? 2 : 1;

// acc[i] += a u_i for the span's codes (bytes of cw[4]); one byte permute makes each code's float
// bits 2^23 + u (code_f without the shift and mask)
__device__ __forceinline__ void add_span(float* acc, const uint32_t* cw, float a) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float f = __uint_as_float(__byte_perm(cw[i >> 2], 0x4B000000u, 0x7540u | (i & 3)));
    acc[i] = fmaf(a, __fsub_rn(f, 8388608.0f), acc[i]);
  }
}

// acc[i] += sum_j a_j u_ji over a step's NR rows (NR even) in integer arithmetic, a quarter of the
// instructions of add_span per product: the a_j are rounded to int16 on the step's largest |a_j|
// (relative error 2^-16 of it, or 2^-13 for 8-bit codes), two rows' codes interleaved by a byte
// permute, and dp2a adds both rows' products into an int that starts at 0x4B400000: its bits are
// the float C + sum (C = 2^23 + 2^22), exact while |sum| < 2^22, which kQMax keeps. One FFMA adds
// unit (C + sum) to acc and the span's z takes -C unit once a step (z is added to every acc[i] at
// the end): where an FADD took C off each element first. The rounding of acc at ~C sum(unit) costs
// ~2^-24 C unit a step, below the int16 rounding's 2^-16 kQMax unit.
template <int NR, int kCodeBits>
__device__ __forceinline__ void add_span_rows(float* acc, float& z, const uint32_t (&cw)[NR][4], const float (&a)[NR]) {
  static_assert(NR % 2 == 0, "rows are taken in pairs");
  constexpr int kQMax = std::min(32767, ((1 << 22) - 1) / (((1 << kCodeBits) - 1) * NR));
  float m = 0.0f;
#pragma unroll
  for (int j = 0; j < NR; ++j) m = fmaxf(m, fabsf(a[j]));
  if (m == 0.0f) return;
  // unit: m / kQMax by a constant's product; inv: its reciprocal by the special-function unit (two
  // instructions where two IEEE divisions took a dozen each, on the step's critical path: 0.94-1.00x the
  // time, BENCHMARKS.md "The one-row input gradient through a shared-memory ring"). inv's error of ~2^-22
  // leaves a * inv <= kQMax (1 + 2^-22): rounded, at most kQMax, so the int16 never wraps.
  const float unit = m * (1.0f / (float)kQMax), inv = __fdividef(1.0f, unit);
  int ia[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) ia[i] = 0x4B400000;
#pragma unroll
  for (int p = 0; p < NR; p += 2) {
    const uint32_t q2 = gemv::pack_xq(a[p] * inv, a[p + 1] * inv);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t lo = __byte_perm(cw[p][w], cw[p + 1][w], 0x5140u);  // codes 4w, 4w + 1 of both rows
      const uint32_t hi = __byte_perm(cw[p][w], cw[p + 1][w], 0x7362u);  // codes 4w + 2, 4w + 3
      ia[4 * w] = gemv::dp2a_lo(q2, lo, ia[4 * w]);
      ia[4 * w + 1] = gemv::dp2a_hi(q2, lo, ia[4 * w + 1]);
      ia[4 * w + 2] = gemv::dp2a_lo(q2, hi, ia[4 * w + 2]);
      ia[4 * w + 3] = gemv::dp2a_hi(q2, hi, ia[4 * w + 3]);
    }
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = fmaf(unit, __int_as_float(ia[i]), acc[i]);
  z = fmaf(-12582912.0f, unit, z);
}

// The (s, z) of both spans of a lane's unit (e0 and e0 + kGap) from its words r. Q4_K and Q5_K: both
// sub-blocks' six-bit scales and mins from one scale_min_pair_k4, d and dmin once; Q3_K: both six-bit
// scales from the same two scale words (as the forward's unit_sum). The values are codes()' own, bit
// for bit; the other types take each span's codes() (their code words unused: the compiler drops them).
template <int T>
__device__ __forceinline__ void unit_scales(const uint32_t* r, int e0, float& s0, float& z0, float& s1, float& z1) {
  using U = Unpack<T>;
  if constexpr (T == T_Q4_K || T == T_Q5_K) {
    const uint32_t sm = gemv::scale_min_pair_k4(r + 1, e0 >> 5);  // sc_j, sc_j+1, m_j, m_j+1
    const float d = half_f(r[0] & 0xFFFF), dmin = half_f(r[0] >> 16);
    s0 = __fmul_rn(d, byte_f(sm, 0));
    s1 = __fmul_rn(d, byte_f(sm, 1));
    z0 = -__fmul_rn(dmin, byte_f(sm, 2));
    z1 = -__fmul_rn(dmin, byte_f(sm, 3));
  } else if constexpr (T == T_Q3_K) {
    const int h = e0 >> 7, s = (e0 & 127) >> 5, sh = 8 * ((e0 >> 4) & 1);
    const uint32_t lo = r[1] >> sh, hi = r[2] >> (sh + 2 * (2 * h + (s >> 1)));
    const int sc0 = (int)((h ? (lo >> 4) & 0xF : lo & 0xF) | ((hi & 3) << 4)) - 32;
    const int sc1 = (int)((h ? (lo >> 20) & 0xF : (lo >> 16) & 0xF) | (((hi >> 16) & 3) << 4)) - 32;
    const float d = half_f((uint16_t)r[0]);
    s0 = __fmul_rn(d, (float)sc0);
    s1 = __fmul_rn(d, (float)sc1);
    z0 = __fmul_rn(-4.0f, s0);
    z1 = __fmul_rn(-4.0f, s1);
  } else {
    constexpr int kW = U::template Words<16>::value, kLoads = gemv::Units<T>::kSame ? 1 : 2;
    uint32_t cw[4];
    U::template codes<16>(r, e0, cw, s0, z0);
    U::template codes<16>(r + (kLoads - 1) * kW, e0 + gemv::Units<T>::kGap, cw, s1, z1);
  }
}

// One step of NR rows of the lane's unit (words r, already placed; row j's dy d[j], ok[j]: the row
// exists): its two spans' sums into acc0, acc1 and the dy z sums into z0, z1.
template <int T, int NR>
__device__ __forceinline__ void add_step(const uint32_t (&r)[NR][gemv::kRoundWords<T>], const float (&d)[NR],
                                         const bool (&ok)[NR], int e0, int e1, float* acc0, float* acc1, float& z0,
                                         float& z1) {
  using U = Unpack<T>;
  constexpr int kW = U::template Words<16>::value;
  constexpr int kLoads = gemv::Units<T>::kSame ? 1 : 2;
  if constexpr (NR >= 4) {
    // every row's two spans' scales first (unit_scales: one decoding for both), then a span of every
    // row, then the other span (a row past r1 has no words: its a and z are 0)
    float a0[NR], a1[NR];
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      float s0, zz0, s1, zz1;
      unit_scales<T>(r[j], e0, s0, zz0, s1, zz1);
      a0[j] = ok[j] ? d[j] * s0 : 0.0f;
      a1[j] = ok[j] ? d[j] * s1 : 0.0f;
      z0 = ok[j] ? fmaf(d[j], zz0, z0) : z0;
      z1 = ok[j] ? fmaf(d[j], zz1, z1) : z1;
    }
    auto add_spans = [&](int e, int off, float* acc, float& z, const float (&a)[NR]) {
      uint32_t cw[NR][4];
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        float sc, zz;  // unused: unit_scales gave them
        U::template codes<16>(r[j] + off, e, cw[j], sc, zz);
      }
      add_span_rows<NR, U::kCodeBits>(acc, z, cw, a);
    };
    add_spans(e0, 0, acc0, z0, a0);
    add_spans(e1, (kLoads - 1) * kW, acc1, z1, a1);
  } else {
    // one or two rows a step in fp32, each row's spans added as soon as they are decoded (decoding
    // every row first ran Q5_0 and Q8_0 6-10% slower: BENCHMARKS.md "The one-row input gradient")
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      if (!ok[j]) continue;
      uint32_t cw[4];
      float sc, zz;
      U::template codes<16>(r[j], e0, cw, sc, zz);
      add_span(acc0, cw, d[j] * sc);
      z0 = fmaf(d[j], zz, z0);
      U::template codes<16>(r[j] + (kLoads - 1) * kW, e1, cw, sc, zz);
      add_span(acc1, cw, d[j] * sc);
      z1 = fmaf(d[j], zz, z1);
    }
  }
}

// The CTA's eight warps' sums added in a fixed order (red: kWarps * 32 * 32 floats of shared memory,
// [warp][element of the unit][lane]: conflict-free), then its partial dx written: partial[g K + the
// slice's elements].
template <int T>
__device__ __forceinline__ void store_partial(float* red, const float* acc0, const float* acc1, float z0, float z1,
                                              float* __restrict__ partial, int k) {
  using U = Unpack<T>;
  using Un = gemv::Units<T>;
  const int units = k / 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, s = blockIdx.x;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    red[(warp * 32 + i) * 32 + lane] = acc0[i] + z0;
    red[(warp * 32 + 16 + i) * 32 + lane] = acc1[i] + z1;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < 32 * 32; t += kThreads) {
    const int e = t >> 5, ln = t & 31, uu = 32 * s + ln;
    if (uu >= units) continue;
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) sum += red[(v * 32 + e) * 32 + ln];
    const int first = Un::e0(ln % Un::kPerBlock) + (e >= 16 ? Un::kGap : 0);
    partial[(int64_t)blockIdx.y * k + (int64_t)(uu / Un::kPerBlock) * U::kElems + first + (e & 15)] = sum;
  }
}

// CTA (s, g): units [32 s, 32 s + 32) of rows [g R, g R + R) (R = rows_per_group); its partial sums
// in partial[g K + the units' elements].
template <int T, class ACT>
__global__ void __launch_bounds__(kThreads, 2) grad_kernel(const ACT* __restrict__ dy, const uint8_t* __restrict__ w,
                                                        float* __restrict__ partial, int n, int k, int64_t row_bytes,
                                                        int rows_per_group) {
  using U = Unpack<T>;
  using Un = gemv::Units<T>;
  constexpr int NR = kRowsInFlight<T>;
  constexpr int RW = gemv::kRoundWords<T>;
  __shared__ float red[kWarps * 32 * 32];  // [warp][element of the unit][lane]: conflict-free
  const int units = k / 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int s = blockIdx.x, u = 32 * s + lane;
  const bool on = u < units;
  const int r0 = blockIdx.y * rows_per_group, r1 = min(n, r0 + rows_per_group);
  const int e0 = Un::e0(lane % Un::kPerBlock), e1 = e0 + Un::kGap;
  const gemv::LaneUnits l{e0, e1, nullptr, nullptr};
  const uint8_t* col = w + (int64_t)(u / Un::kPerBlock) * U::kBytes;  // the lane's block in row 0
  float acc0[16], acc1[16], z0 = 0.0f, z1 = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) acc0[i] = acc1[i] = 0.0f;
  // the next NR rows' loads are issued before this NR's decoding, so a warp's loads overlap its math
  auto load_words = [&](int row, uint32_t (&r)[NR][RW]) {
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      const int rr = row + j * kWarps;
      if (on && rr < r1)
        gemv::round_load<T, 1, false>(col + (int64_t)rr * row_bytes, 32 * s, units, l,
                                      *reinterpret_cast<uint32_t(*)[1][RW]>(&r[j]));
    }
  };
  // dy as loaded (rows past the group read the group's last row; add_step skips them): converted where
  // add_step reads it, so that no instruction beside the loads waits for them (see grad_staged_kernel)
  auto load_dy = [&](int row, ACT (&d)[NR]) {
#pragma unroll
    for (int j = 0; j < NR; ++j) d[j] = dy[min(row + j * kWarps, r1 - 1)];
  };
  constexpr int kStep = kWarps * NR;
  uint32_t r[NR][RW];
  ACT d[NR];
  // the first rows' words (W: the previous kernel does not write it) are requested before the wait for
  // that kernel, their dy after it
  if (r0 + warp < r1) load_words(r0 + warp, r);
  if constexpr (GridOf<T>::kPoints > 0) {  // codes() read the grid's copy
    gemv::stage_grid<T>();
    cp_async_wait<0>();
    __syncthreads();
  }
  pdl_launch_dependents();
  pdl_wait();  // dy is the previous kernel's output; partial is written after this
  if (r0 + warp < r1) load_dy(r0 + warp, d);
  for (int row = r0 + warp; row < r1; row += kStep) {
    uint32_t nr[NR][RW];
    ACT nd[NR];
    const bool more = row + kStep < r1;
    if (more) {
      load_words(row + kStep, nr);
      load_dy(row + kStep, nd);
    }
    if (on) {
      bool ok[NR];
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        const int rr = row + j * kWarps;
        ok[j] = rr < r1;
        const uint8_t* block = col + (int64_t)rr * row_bytes;
        gemv::place_words<T>(r[j], (reinterpret_cast<uintptr_t>(block) & 2) != 0, block);
      }
      float df[NR];
#pragma unroll
      for (int j = 0; j < NR; ++j) df[j] = act_to_f(d[j]);
      add_step<T, NR>(r, df, ok, e0, e1, acc0, acc1, z0, z1);
    }
    if (more) {
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        d[j] = nd[j];
#pragma unroll
        for (int i = 0; i < RW; ++i) r[j][i] = nr[j][i];
      }
    }
  }
  store_partial<T>(red, acc0, acc1, z0, z1, partial, k);
}

// grad_kernel's sums with the rows brought in through shared memory: stages of kStageRows rows of the
// CTA's slice (its 32 units, whole blocks: 1024 elements of each row) copied by cp.async into a ring
// kStageDepth deep (each row's bytes keep their global address mod 16, so the units' aligned-word loads
// read them as they read global memory), while the warps decode the stage before. Warp w takes rows
// w + 8 j of a stage in steps of NR rows (kRingRows).
constexpr int kSliceK = 1024, kStageRows = 32, kStageDepth = 3;
// Rows a warp decodes per step from the ring: one set of words in registers (no next step's held), so
// four, the integer path, for every type whose four rows' words fit (grad_kernel: two or one for the
// K-quants, Q5_0, Q8_0), but two for the table types (kRowsInFlight's precision limit).
template <int T>
constexpr int kRingRows = Unpack<T>::kTableCodes ? 2 : gemv::kRoundWords<T> <= 13 ? 4 : 2;
template <int T> constexpr int staged_stage_bytes() { return kStageRows * staged::row_pitch<T, kSliceK>(); }
template <int T> constexpr size_t staged_smem() {
  return std::max<size_t>((size_t)kStageDepth * staged_stage_bytes<T>(), sizeof(float) * kWarps * 32 * 32);
}

template <int T, class ACT>
__global__ void __launch_bounds__(kThreads, 2) grad_staged_kernel(const ACT* __restrict__ dy,
                                                               const uint8_t* __restrict__ w,
                                                               float* __restrict__ partial, int n, int k,
                                                               int64_t row_bytes, int rows_per_group) {
  using U = Unpack<T>;
  using Un = gemv::Units<T>;
  constexpr int NR = kRingRows<T>, RW = gemv::kRoundWords<T>, R = kStageRows;
  constexpr int P = staged::row_pitch<T, kSliceK>(), SB = staged::seg_bytes<T, kSliceK>();
  constexpr int STAGE = staged_stage_bytes<T>(), STEPS = R / (kWarps * NR);
  static_assert(STEPS * kWarps * NR == R, "a stage is whole steps of the warps");
  extern __shared__ __align__(16) uint8_t smem[];
  const int units = k / 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int s = blockIdx.x;
  const bool on = 32 * s + lane < units;
  const int r0 = blockIdx.y * rows_per_group, r1 = min(n, r0 + rows_per_group), nst = (r1 - r0 + R - 1) / R;
  const int kb0 = 32 * s / Un::kPerBlock, jb = lane / Un::kPerBlock;  // the slice's first block, the lane's
  const int valid = staged::segment_valid<T, kSliceK>(kb0, k / U::kElems);
  const int e0 = Un::e0(lane % Un::kPerBlock), e1 = e0 + Un::kGap;
  const gemv::LaneUnits l{e0, e1, nullptr, nullptr};
  const uint32_t smem0 = smem_addr(smem);
  // Thread t copies row t / 8 of a stage, the 16-byte chunks t % 8, t % 8 + 8, ... of its segment (CH of
  // them cover it at any address mod 16), to its slot's row at the segment's address mod 16 (staged_block).
  // Full stages (whole segments, and rows of W after the stage) copy whole chunks: the bytes past a
  // segment belong to W. Else bytes past the segment, or rows past the group, are zero-filled and no byte
  // outside W is read. Rows past the group's end are never added (ok false).
  constexpr int CH = staged::seg_chunks<T, kSliceK>();
  static_assert(kThreads == 8 * R, "eight threads copy each row of a stage");
  auto issue = [&](int st) {
    const int lr = threadIdx.x >> 3, row0 = r0 + st * R, rr = row0 + lr;
    const int64_t a = (int64_t)rr * row_bytes + (int64_t)kb0 * U::kBytes;  // the row's segment in W
    const int lo = (int)(a & 15);
    const uint8_t* src = w + (a - lo);
    const uint32_t dst = smem0 + (st % kStageDepth) * STAGE + lr * P;
    const bool full = valid == SB && row0 + R < n;
#pragma unroll
    for (int q = 0; q < (CH + 7) / 8; ++q) {
      const int ch = 8 * q + (threadIdx.x & 7);
      if (ch >= CH) break;
      if (full) {
        cp_async16(dst + 16 * ch, src + 16 * ch, 16);
      } else {
        staged::copy_chunk16(dst + 16 * ch, src + 16 * ch, rr < r1 ? min(16, max(0, valid + lo - 16 * ch)) : 0, w);
      }
    }
  };
  // dy of the warp's rows of stage st (w + 8 j, j < STEPS NR) as loaded, rows past the group reading its
  // last row (never added): converted in the step that reads them. Converted beside their loads, each
  // stage waited there for dy's latency (a quarter of the kernel's stall samples, Nsight Compute's source
  // counters, Q4_K 14336x4096).
  auto load_dy = [&](int st, ACT (&d)[STEPS * NR]) {
#pragma unroll
    for (int j = 0; j < STEPS * NR; ++j) d[j] = dy[min(r0 + st * R + warp + kWarps * j, r1 - 1)];
  };
  float acc0[16], acc1[16], z0 = 0.0f, z1 = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) acc0[i] = acc1[i] = 0.0f;

  // the first stages of W (the previous kernel does not write it) before the wait for that kernel, after
  // the grid's copy (codes()), whose group the first stage's wait completes too
  gemv::stage_grid<T>();
#pragma unroll
  for (int st = 0; st < kStageDepth - 1; ++st) {
    if (st < nst) issue(st);
    cp_async_commit();
  }
  pdl_launch_dependents();
  pdl_wait();  // dy is the previous kernel's output; partial is written after this
  ACT d[STEPS * NR];
  load_dy(0, d);
#pragma unroll 1
  for (int st = 0; st < nst; ++st) {
    cp_async_wait<kStageDepth - 2>();
    __syncthreads();  // stage st visible to all; slot (st - 1) % depth free for reuse
    if (st + kStageDepth - 1 < nst) issue(st + kStageDepth - 1);
    cp_async_commit();
    ACT nd[STEPS * NR];
    if (st + 1 < nst) load_dy(st + 1, nd);  // in flight during this stage
    const uint8_t* slot = smem + (st % kStageDepth) * STAGE;
    if (on) {
#pragma unroll
      for (int t = 0; t < STEPS; ++t) {
        uint32_t r[NR][RW];
        float dd[NR];
        bool ok[NR];
#pragma unroll
        for (int j = 0; j < NR; ++j) {
          const int lr = warp + kWarps * (t * NR + j), rr = r0 + st * R + lr;
          ok[j] = rr < r1;
          dd[j] = act_to_f(d[t * NR + j]);
          const uint8_t* b = staged::staged_block<T>(slot + lr * P, rr, row_bytes, kb0, jb);
          gemv::round_load<T, 1, false>(b, 32 * s, units, l, *reinterpret_cast<uint32_t(*)[1][RW]>(&r[j]));
          gemv::place_words<T>(r[j], (reinterpret_cast<uintptr_t>(b) & 2) != 0, b);
        }
        add_step<T, NR>(r, dd, ok, e0, e1, acc0, acc1, z0, z1);
      }
    }
    if (st + 1 < nst) {
#pragma unroll
      for (int j = 0; j < STEPS * NR; ++j) d[j] = nd[j];
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the ring: the reduction reuses it
  store_partial<T>(reinterpret_cast<float*>(smem), acc0, acc1, z0, z1, partial, k);
}

// dx[i] = sum over the groups, in order, of partial[g K + i]: a CTA per 32 columns, its warp v
// summing groups v, v + 8, ... (a warp reads 128 contiguous bytes a group), the eight warps' sums
// then added in order
template <class ACT>
__global__ void __launch_bounds__(kThreads) finish_kernel(const float* __restrict__ partial, int groups, int k,
                                                          ACT* __restrict__ dx) {
  __shared__ float part[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, i = blockIdx.x * 32 + lane;
  pdl_launch_dependents();
  pdl_wait();  // partial is grad_kernel's output
  float sum = 0.0f;
  if (i < k) {
#pragma unroll 8
    for (int g = warp; g < groups; g += kWarps) sum += partial[(int64_t)g * k + i];
  }
  part[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && i < k) {
    float t = 0.0f;
#pragma unroll
    for (int v = 0; v < kWarps; ++v) t += part[v][lane];
    dx[i] = f_to_act<ACT>(t);
  }
}

}  // namespace gemv_grad

template <int T>
void launch_gemv_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int64_t n, int64_t k,
                            int64_t row_bytes, cudaStream_t stream) {
  if constexpr (!HasCodes<T>) {
    throw std::invalid_argument("gemv: this type has no codes kernel (cuda_policy::has_gemv)");
  } else {
    using namespace gemv_grad;
    const int64_t slices = (k / 32 + 31) / 32;
    const bool staged = cuda_policy::gemv_grad_staged(T);
    auto launch = [&](auto tag) {
      using ACT = decltype(tag);
      const size_t smem = staged ? staged_smem<T>() : 0;
      const int per_sm = staged ? kernel_ctas<grad_staged_kernel<T, ACT>>(smem, kThreads)
                                : kernel_ctas<grad_kernel<T, ACT>>(0, kThreads);
      if (per_sm < 1) throw std::runtime_error("gemv input grad: no CTA fits");
      // about two CTAs per multiprocessor (a CTA keeps ~8 rows x 32 units of loads in flight, enough
      // for its share of the bandwidth; more would add partial sums), and every warp of a row group at
      // least one round of rows
      const int64_t most = std::max<int64_t>(1, n / (kWarps * kRowsInFlight<T>));
      const int64_t want = std::clamp<int64_t>(std::min(2, per_sm) * (int64_t)sm_count() / slices, 1, most);
      const int64_t rows = (n + want - 1) / want, groups = (n + rows - 1) / rows;
      ScratchBuffer partial((size_t)(groups * k) * sizeof(float), stream);
      launch_pdl(staged ? grad_staged_kernel<T, ACT> : grad_kernel<T, ACT>, dim3((unsigned)slices, (unsigned)groups),
                 dim3(kThreads), smem, stream, static_cast<const ACT*>(dy), w, partial.as<float>(), (int)n, (int)k,
                 row_bytes, (int)rows);
      launch_pdl(finish_kernel<ACT>, dim3((unsigned)((k + 31) / 32)), dim3(kThreads), 0, stream,
                 partial.as<const float>(), (int)groups, (int)k, static_cast<ACT*>(dx));
    };
    if (dtype == D_BF16) launch(__nv_bfloat16{});
    else if (dtype == D_F16) launch(__half{});
    else throw std::invalid_argument("gemv takes bfloat16 or float16 activations");
    LT_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace lowtune::cuda
