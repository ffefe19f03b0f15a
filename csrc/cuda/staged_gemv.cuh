// Small-M kernels that stream the packed weight through shared memory ("staged"): M <= 16
// activation rows in bf16/fp16, forward Y = X·deq(W)ᵀ and input gradient dX = dY·deq(W), every
// type through Unpack<T>.
//
// At M <= 16 the product is a read of the packed weight: its floor is the weight's bytes over the
// memory bandwidth. Three things keep the kernels at that floor:
//   - bytes in flight: a CTA copies its tile of W in stages (whole blocks of 16 or 128 rows) with
//     16-byte cp.async, 3-4 stages deep, so the loads of two or three stages are in flight while one
//     is decoded, and whole warps copy contiguous row segments (coalesced, few requests per byte);
//   - decode cost: the codes of a 16-element span are turned into 16-bit pairs with one byte
//     permute (bytes [u, m, u', m] are the exact pair (M + u, M + u') for the magic exponent byte m),
//     one exact subtraction of M and one fused multiply-add with the span's scale and offset
//     (1.5 instructions per weight; types whose codes do not fit the magic, or that have no
//     codes, take decode_fast and a conversion instead; decode_pairs.cuh);
//   - no shared-memory round trip of decoded values: a thread decodes straight into the
//     registers of a tensor-core fragment (mma.m16n8k16, fp32 accumulation).
// The weight is the 16-row A operand and the activations the 8-column B operand (Yᵀ = W·Xᵀ),
// so M <= 8 can use one B tile and M <= 16 uses two.
//
// Forward: a warp owns 16 rows of W and a 256-element slice of each stage of K (the reduction):
//   one B tile (M < cuda_policy::staged_two_tiles_from, at most 8): CTA = 16 rows, 4 warps on the
//   four slices of a 1024-element stage, added through shared memory at the end; two tiles (from
//   there to M = 16): CTA = 128 rows, 8 warps on one 256-element stage. Lane (g, c) owns
//   elements [64c, 64c+64) of its slice; per 16-element span of them it loads rows g and g+8 of
//   its 16-row tile from shared memory, decodes both and issues 4 MMAs: in MMA u the lane's
//   k-slots 2c, 2c+1 hold span elements 4u, 4u+1 and slots 2c+8, 2c+9 elements 4u+2, 4u+3 (any
//   bijection of the reduction index gives the same sum), and the B fragment is the matching
//   16 elements of X row g (staged with W). In the 4-bit types a lane's four spans are the low
//   and high nibbles of the same bytes, so it loads them once.
// Input gradient: CTA = 256 columns of W (= of dX) and one range of stages of N (the reduction);
//   warp (h, p) owns columns [128h, 128h+128) and the 16-row groups p, p+2 of every 64-row stage.
//   Lane (g, c) decodes columns [128h+16g, +16) of rows 2c, 2c+1, 2c+8, 2c+9 of a group; one
//   byte permute per pair turns two rows' same-column values into the A fragment (A = Wᵀ: the
//   reduction index is W's row), 8 MMAs cover the warp's 128 columns, and the B fragment is dY
//   at those 16 rows. The two row-phase warps add their sums through shared memory at the end.
// Both split the reduction over gridDim.y when the tiles alone would not fill the GPU; the
// splits write fp32 partial sums that reduce_splits_kernel adds in a fixed order
// (deterministic results, like the direct kernels of small_m.cuh). Both launch with programmatic
// dependent launch (launch_pdl): a CTA requests its first stages of W before it waits for the
// kernel that wrote X or dY (but the forward's clusters, launched plainly).
//
// Requirements (checked by the launchers' caller): w, x/dy and y/dx 16-byte aligned; K a
// multiple of the block size (so of 32). Rows past N and blocks past K are zero-filled in
// shared memory, and zero bytes decode to zeros in every type.
#pragma once
#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include <cooperative_groups.h>

#include "../cuda_policy.h"
#include "common.cuh"
#include "cp_async.cuh"
#include "decode_pairs.cuh"
#include "internal.h"
#include "mma.cuh"
#include "pdl.cuh"
#include "small_m.cuh"
#include "unpack.cuh"

namespace lowtune::cuda {

using cuda_policy::kStagedMaxM;  // two 8-column B tiles
static_assert(kStagedMaxM == 16, "the staged kernels hold M in at most two 8-column tiles");

namespace staged {
namespace cg = cooperative_groups;

constexpr int kStageK = 256;   // elements of a row per stage: whole blocks of every type
constexpr int kStageRows = 64; // rows of W per input-gradient stage (four 16-row groups)
constexpr int kIgThreads = 128;
constexpr int kStages = 4;     // depth of the shared-memory ring
constexpr int kMaxClusterSplit = 4;  // CTAs of one cluster that split an M <= 8 tile's reduction

// One row's segment of a stage in bytes, the 16-byte chunks that cover it at any offset mod 16,
// and its pitch in shared memory: an odd number of 16-byte units, so that the eight rows a warp
// reads at once start in different banks.
// (SK: elements of a row per stage.)
template <int T, int SK = kStageK> constexpr int seg_bytes() { return SK / Unpack<T>::kElems * Unpack<T>::kBytes; }
template <int T, int SK = kStageK> constexpr int seg_chunks() { return (seg_bytes<T, SK>() + 30) / 16; }
template <int T, int SK = kStageK> constexpr int row_pitch() { return 16 * (seg_chunks<T, SK>() | 1); }

// The first `bytes` (1..15) of a 16-byte chunk, zero-filled, by plain loads: a partial cp.async
// still addresses all 16 bytes, which may lie past the end of the weight's allocation (the last
// row's last segment), and compute-sanitizer rightly counts that as an out-of-bounds read. Only
// the edge stages take this path.
__device__ __forceinline__ void copy_partial16(uint32_t smem, const uint8_t* gmem, int bytes) {
  uint32_t v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int b = 0; b < 16; ++b)
    if (b < bytes) v[b >> 2] |= (uint32_t)gmem[b] << (8 * (b & 3));
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
               : "memory");
}
// `bytes` (0..16) of a 16-byte chunk from gmem, zero-filled past them: whole and empty chunks by cp.async (an
// empty one reads nothing; `any` is a valid address to name), partial ones by copy_partial16.
__device__ __forceinline__ void copy_chunk16(uint32_t smem, const uint8_t* gmem, int bytes, const uint8_t* any) {
  if (bytes == 16 || bytes == 0) cp_async16(smem, bytes ? gmem : any, bytes);
  else copy_partial16(smem, gmem, bytes);
}

// Copies stages of R rows (SK/elems blocks of each) into slots of shared memory (pitch
// row_pitch<T, SK>()): a row's bytes land at r*pitch + (the segment's global address % 16), so every
// block keeps its global alignment mod 16 (Unpack<T>::load relies on it). Blocks past the row's
// end and rows past N are zero-filled; nothing outside the weight is read. A thread owns the same
// 16-byte chunks (row r, chunk ch) of every stage, so their addresses are set up once and each
// stage costs a few 32-bit operations per chunk: stage s is the first stage's segments moved by
// s*step bytes (forward: along the row; input gradient: R rows down).
template <int T, int R, int THREADS, int SK = kStageK>
struct WeightStager {
  static constexpr int CH = seg_chunks<T, SK>(), P = row_pitch<T, SK>();
  static constexpr int SLOTS = (R * CH + THREADS - 1) / THREADS;
  const uint8_t* src[SLOTS];  // the slot's chunk of the first stage, from its row's aligned start
  int dst[SLOTS];             // offset in a stage slot | first segment's address % 16; -1: no chunk
  int rowch[SLOTS];           // row << 16 | 16*chunk

  __device__ __forceinline__ WeightStager(const uint8_t* w, int64_t row_bytes, int64_t first) {
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
      const int i = (int)threadIdx.x + j * THREADS, r = i / CH, ch = i - r * CH;
      const int64_t a = first + (int64_t)r * row_bytes;
      src[j] = w + (a & ~(int64_t)15) + 16 * ch;
      dst[j] = i < R * CH ? (r * P + 16 * ch) | (int)(a & 15) : -1;
      rowch[j] = r << 16 | 16 * ch;
    }
  }
  // The stage `shift` bytes after the first (sh = shift % 16): valid = bytes of real blocks in
  // each row's segment, rows_left = rows of this stage that exist (rows at or past it are
  // zero-filled). full: every row's segment is whole and more rows follow the stage, so every
  // chunk may copy all its 16 bytes (the bytes past a segment belong to the weight and are unused).
  __device__ __forceinline__ void issue(uint32_t slot, const uint8_t* w, int64_t shift, int sh, int valid,
                                        int rows_left, bool full) const {
    if (full) {
#pragma unroll
      for (int j = 0; j < SLOTS; ++j) {
        if ((j + 1) * THREADS > R * CH && dst[j] < 0) continue;  // only the last slot can be empty
        const int lo0 = dst[j] & 15, lo = (lo0 + sh) & 15;  // this stage's segment address % 16
        cp_async16(slot + (dst[j] & ~15), src[j] + (shift + lo0 - lo), 16);
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
      if ((j + 1) * THREADS > R * CH && dst[j] < 0) continue;
      const int lo0 = dst[j] & 15, lo = (lo0 + sh) & 15;
      const int left = (rowch[j] >> 16) < rows_left ? valid + lo - (rowch[j] & 0xFFFF) : 0;
      copy_chunk16(slot + (dst[j] & ~15), src[j] + (shift + lo0 - lo), min(16, max(0, left)), w);
    }
  }
};
// Bytes of real blocks in a stage's row segment (SK elements) that starts at block kb0.
template <int T, int SK = kStageK> __device__ __forceinline__ int segment_valid(int kb0, int nblk) {
  return max(0, min(nblk - kb0, SK / Unpack<T>::kElems)) * Unpack<T>::kBytes;
}

// Where block jb of row n's segment of a stage starting at block kb0 sits in its staged row.
template <int T>
__device__ __forceinline__ const uint8_t* staged_block(const uint8_t* srow, int64_t n, int64_t row_bytes, int kb0,
                                                       int jb) {
  using U = Unpack<T>;
  return srow + (int)((n * row_bytes + (int64_t)kb0 * U::kBytes) & 15) + jb * U::kBytes;
}

// Forward CTA configurations. M <= 8 (NT = 1): 4 warps that split a 1024-element stage of 16
// rows along K (each warp a 256-element slice), summed through shared memory at the end: 16-row
// tiles give N/16 CTAs, so a 4096-row weight fills the GPU without splitting the reduction over
// CTAs (and without a second kernel to add the splits). M <= 16 (NT = 2): 8 warps of 16 rows on
// one 256-element stage, so that each staged slice of X (16 rows now) serves 128 rows of W.
template <int NT> constexpr int fwd_warps_k() { return NT == 1 ? 4 : 1; }
template <int NT> constexpr int fwd_warps_n() { return NT == 1 ? 1 : 8; }
template <int NT> constexpr int fwd_threads() { return 32 * fwd_warps_k<NT>() * fwd_warps_n<NT>(); }
template <int NT> constexpr int fwd_rows() { return 16 * fwd_warps_n<NT>(); }
template <int NT> constexpr int fwd_stage_k() { return kStageK * fwd_warps_k<NT>(); }
// M <= 8 in the types whose spans share words (Unpack::kSameWords: the 4-bit types, Q2_K-Q5_K):
// lane c owns 64 consecutive elements of its slice, so it loads the bytes of its spans once (2-7%
// faster than 16c-spans for the 4-bit types on an H200), and the types with one scale word per
// block (Q4_0, Q4_1, INT4) also run one stage shallower with registers capped, for five resident
// CTAs instead of four (a further 1-8%; Q4_K spills there).
// tools/results/small_m_variants_h200_2026-12-03/ has the measurements.
template <int T, int NT> constexpr bool fwd_lane_owns_64() { return NT == 1 && Unpack<T>::kSameWords > 0; }
template <int T, int NT> constexpr bool fwd_five_ctas() {
  return fwd_lane_owns_64<T, NT>() && Unpack<T>::kHeadWords == 1;
}
constexpr int fwd_x_pitch(int sk) { return 2 * sk + 16; }
// Bytes of one stage: the weight tile, then X rows < M.
template <int T, int NT> constexpr int fwd_stage_bytes(int m) {
  return fwd_rows<NT>() * row_pitch<T, fwd_stage_k<NT>()>() + m * fwd_x_pitch(fwd_stage_k<NT>());
}
// The forward's shared memory with `stages` stages: the ring, then (M <= 16) one zeroed X row
template <int T, int NT> constexpr size_t fwd_ring_smem(int stages, int m) {
  return (size_t)stages * fwd_stage_bytes<T, NT>(m) + (NT == 2 ? fwd_x_pitch(fwd_stage_k<NT>()) : 0);
}
// M <= 16 (NT = 2) for Q2_K and Q3_K: two stages and three resident CTAs (registers capped at 80; three
// fit the 228 KiB of an sm_90 multiprocessor, 1 KiB a CTA reserved), as many stages in flight as two CTAs
// of three and half as many warps again for their long decoding: 0.88-0.94x the time on an H100. The
// 4-bit types, Q5_K and IQ4_XS ran 1.05-1.64x slower so (fewer stages a CTA; Q5_K spills): BENCHMARKS.md
// "Three resident CTAs for the small-M kernels".
template <int T, int NT> constexpr bool fwd_three_ctas() {
  return NT == 2 && (T == T_Q2_K || T == T_Q3_K) && 3 * (fwd_ring_smem<T, NT>(2, 16) + 1024) <= 228 * 1024;
}
template <int T, int NT> constexpr int fwd_stages() {
  return NT == 1 && !fwd_five_ctas<T, NT>() ? kStages : fwd_three_ctas<T, NT>() ? 2 : kStages - 1;
}
template <int T, int NT> constexpr int fwd_min_ctas() {  // 0: the compiler's choice
  return fwd_five_ctas<T, NT>() ? 5 : fwd_three_ctas<T, NT>() ? 3 : 0;
}
template <int T, int NT> constexpr size_t fwd_smem(int m) { return fwd_ring_smem<T, NT>(fwd_stages<T, NT>(), m); }
template <int T, int NT> constexpr int ig_stage_bytes() {
  return kStageRows * row_pitch<T>() + 8 * NT * (2 * kStageRows + 16);
}

// ---- forward -----------------------------------------------------------------------------------
template <int T, class ACT, int NT>
__global__ void __launch_bounds__(fwd_threads<NT>(), fwd_min_ctas<T, NT>()) staged_forward_kernel(const ACT* __restrict__ x,
                                                                           const uint8_t* __restrict__ w,
                                                                           ACT* __restrict__ y, float* __restrict__ part,
                                                                           int M, int N, int K, int64_t row_bytes,
                                                                           int stages_per_split, bool w_early) {
  using U = Unpack<T>;
  constexpr int SK = fwd_stage_k<NT>(), WK = fwd_warps_k<NT>(), R = fwd_rows<NT>();
  constexpr int P = row_pitch<T, SK>(), PX = fwd_x_pitch(SK), SB = seg_bytes<T, SK>();
  constexpr int THREADS = fwd_threads<NT>(), NS = fwd_stages<T, NT>();
  constexpr int WD = U::template Words<kSpan>::value;
  extern __shared__ __align__(16) uint8_t smem[];
  const int stage_bytes = fwd_stage_bytes<T, NT>(M);
  // M <= 16: X's rows past M read a zeroed row after the ring (fwd_smem), so the loads need no predicate
  // and no zeroed registers (32 CS2R in the Q4_K loop's 638 instructions). M <= 8 keeps its predicate and
  // its shared memory (five CTAs a multiprocessor for some types).
  // (zeroed through its own address expression: through a non-const zero_row every M <= 16 kernel's SASS changed)
  const uint8_t* zero_row = smem + NS * stage_bytes;
  if constexpr (NT == 2)
    for (int i = threadIdx.x; i < PX / 16; i += THREADS) reinterpret_cast<uint4*>(smem + NS * stage_bytes)[i] = uint4{};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int wn = warp / WK, wk = warp % WK;  // this warp's 16 rows, and its 256-element slice of a stage
  const int nblk = K / U::kElems, nst = (K + SK - 1) / SK;
  const int st0 = blockIdx.y * stages_per_split, st1 = min(nst, st0 + stages_per_split);
  const int n0 = blockIdx.x * R;

  const WeightStager<T, R, THREADS, SK> stager(w, row_bytes, (int64_t)n0 * row_bytes + (int64_t)st0 * SB);
  const uint32_t smem0 = smem_addr(smem);
  auto issue_w = [&](int st) {
    const int valid = segment_valid<T, SK>(st * (SK / U::kElems), nblk);
    stager.issue(smem0 + (st % NS) * stage_bytes, w, (int64_t)(st - st0) * SB, ((st - st0) * (SB & 15)) & 15,
                 valid, N - n0, valid == SB && n0 + R < N);
  };
  auto issue_x = [&](int st) {
    const uint32_t sw = smem0 + (st % NS) * stage_bytes;
    // X rows < M of the stage's columns (zeros past K): chunk i = (row i / (SK/8), columns 8*(i % (SK/8)) ..)
    const int k0 = st * SK;
#pragma unroll
    for (int j = 0; j < (8 * NT * (SK / 8) + THREADS - 1) / THREADS; ++j) {
      const int i = (int)threadIdx.x + j * THREADS, m = i / (SK / 8), col = 8 * (i % (SK / 8));
      if (m >= M) break;
      const bool in = k0 + col < K;
      cp_async16(sw + R * P + m * PX + 2 * col, in ? x + (int64_t)m * K + k0 + col : x, in ? 16 : 0);
    }
  };
  auto issue = [&](int st) {
    issue_w(st);
    issue_x(st);
  };

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;

  // Launched programmatically (w_early), the ring's first stages of W (the previous kernel does not
  // write it) are requested before the wait for that kernel, X's after it, the first commit group
  // holding them all; launched plainly, stage by stage.
  if (w_early) {
#pragma unroll
    for (int s = 0; s < NS - 1; ++s)
      if (st0 + s < st1) issue_w(st0 + s);
  }
  pdl_launch_dependents();
  pdl_wait();  // X is the previous kernel's output; y and part are written after this
#pragma unroll
  for (int s = 0; s < NS - 1; ++s) {
    if (st0 + s < st1) {
      if (!w_early) issue_w(st0 + s);
      issue_x(st0 + s);
    }
    cp_async_commit();
  }
#pragma unroll 1
  for (int st = st0; st < st1; ++st) {
    cp_async_wait<NS - 2>();
    __syncthreads();  // stage st visible to all; slot (st - 1) % NS free for reuse
    if (st + NS - 1 < st1) issue(st + NS - 1);
    cp_async_commit();

    const uint8_t* sw = smem + (st % NS) * stage_bytes;
    const uint8_t* sx = sw + R * P;
    const int kb0 = st * (SK / U::kElems);
    const int kv = min(SK, K - st * SK);
    if constexpr (!fwd_lane_owns_64<T, NT>()) {
#pragma unroll
      for (int q = 0; q < kStageK / 64; ++q) {
        const int e = kStageK * wk + q * 64 + 16 * c;  // element within the stage segment
        if (kStageK * wk + q * 64 >= kv) break;        // the same for the whole warp
        const int jb = e / U::kElems, ee = e % U::kElems;
        uint32_t xf[NT][8];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int m = g + 8 * nt;
          uint4 a = make_uint4(0, 0, 0, 0), b = a;
          if (NT == 2 || m < M) {
            const uint4* p = reinterpret_cast<const uint4*>((NT == 1 || m < M ? sx + m * PX : zero_row) + 2 * e);
            a = p[0];
            b = p[1];
          }
          xf[nt][0] = a.x; xf[nt][1] = a.y; xf[nt][2] = a.z; xf[nt][3] = a.w;
          xf[nt][4] = b.x; xf[nt][5] = b.y; xf[nt][6] = b.z; xf[nt][7] = b.w;
        }
        const int ra = wn * 16 + g, rb = ra + 8;
        uint32_t wa[WD], wb[WD];
        U::template load<kSpan>(staged_block<T>(sw + ra * P, n0 + ra, row_bytes, kb0, jb), ee, wa);
        U::template load<kSpan>(staged_block<T>(sw + rb * P, n0 + rb, row_bytes, kb0, jb), ee, wb);
        uint32_t pa[8], pb[8];
        decode_pairs<T, ACT>(wa, ee, pa);
        decode_pairs<T, ACT>(wb, ee, pb);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const uint32_t a[4] = {pa[2 * u], pb[2 * u], pa[2 * u + 1], pb[2 * u + 1]};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816<ACT>(acc[nt], a, xf[nt][2 * u], xf[nt][2 * u + 1]);
        }
      }
    } else {
      if (kStageK * wk >= kv) continue;  // this warp's slice lies past K (the same for the whole warp)
      // Lane c owns the 64 elements [64c, 64c+64) of the warp's slice, as four 16-element spans. In
      // the types with Unpack::kSameWords two spans read the same words (e.g. the low and high
      // nibbles of the same bytes), which are loaded once. Elements past K (a partial last slice) are
      // zero-filled in W and X.
      constexpr int NQ = kStageK / 64, SHARE = U::kSameWords / kSpan;  // 0, or the span bit to drop
      static_assert(SHARE == 0 || SHARE == 1 || SHARE == 2, "spans of one lane share words");
      const int ra = wn * 16 + g, rb = ra + 8;
      uint32_t wa[NQ][WD], wb[NQ][WD];
#pragma unroll
      for (int q = 0; q < NQ; ++q) {
        const unsigned e = (unsigned)(kStageK * wk + 64 * c) + 16u * q;  // element within the stage segment
        const int jb = (int)(e / U::kElems), ee = (int)(e % U::kElems), wq = q & ~SHARE;
        if (wq == q) {
          U::template load<kSpan>(staged_block<T>(sw + ra * P, n0 + ra, row_bytes, kb0, jb), ee, wa[q]);
          U::template load<kSpan>(staged_block<T>(sw + rb * P, n0 + rb, row_bytes, kb0, jb), ee, wb[q]);
          // A later span of the same block takes the block's scale words from its first span, so the
          // compiler decodes the scales once per block (and drops the second load of them).
          const int qb = q - q % std::min(std::max(U::kElems / kSpan, 1), NQ);
#pragma unroll
          for (int h = 0; h < U::kHeadWords; ++h)
            if (qb != q) wa[q][h] = wa[qb][h], wb[q][h] = wb[qb][h];
        }
        uint32_t xf[NT][8];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int m = g + 8 * nt;
          uint4 a = make_uint4(0, 0, 0, 0), b = a;
          if (NT == 2 || m < M) {
            const uint4* p = reinterpret_cast<const uint4*>((NT == 1 || m < M ? sx + m * PX : zero_row) + 2 * e);
            a = p[0];
            b = p[1];
          }
          xf[nt][0] = a.x; xf[nt][1] = a.y; xf[nt][2] = a.z; xf[nt][3] = a.w;
          xf[nt][4] = b.x; xf[nt][5] = b.y; xf[nt][6] = b.z; xf[nt][7] = b.w;
        }
        uint32_t pa[8], pb[8];
        decode_pairs<T, ACT>(wa[wq], ee, pa);
        decode_pairs<T, ACT>(wb[wq], ee, pb);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const uint32_t a[4] = {pa[2 * u], pb[2 * u], pa[2 * u + 1], pb[2 * u + 1]};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816<ACT>(acc[nt], a, xf[nt][2 * u], xf[nt][2 * u + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (WK > 1) {  // the K-slice warps add into warp 0, in a fixed order
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem);  // [WK - 1][32 lanes][NT * 4]
    if (wk > 0) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[((wk - 1) * 32 + lane) * NT * 4 + nt * 4 + i] = acc[nt][i];
    }
    __syncthreads();
    if (wk == 0) {
#pragma unroll
      for (int j = 0; j < WK - 1; ++j)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[nt][i] += red[(j * 32 + lane) * NT * 4 + nt * 4 + i];
    }
  }
  if constexpr (NT == 1) {
    // Split over a cluster (sm_90, part == nullptr, gridDim.y > 1): the CTAs of one tile add into
    // rank 0's shared memory, in rank order, instead of through global partial sums and a second
    // kernel. Every thread reaches the cluster barrier.
    if (part == nullptr && gridDim.y > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      __shared__ float cluster_red[kMaxClusterSplit - 1][32][4];
      cg::cluster_group cl = cg::this_cluster();
      const unsigned rank = cl.block_rank();
      if (wk == 0 && rank > 0) {
        float* dst = cl.map_shared_rank(&cluster_red[rank - 1][lane][0], 0);
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = acc[0][i];
      }
      cl.sync();
      if (rank > 0) return;
      if (wk == 0) {
        for (unsigned j = 0; j + 1 < cl.num_blocks(); ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[0][i] += cluster_red[j][lane][i];
      }
#endif
    }
  }
  if (wk > 0) return;

  // C fragment: c0, c1 = (W row g, X rows 2c, 2c+1), c2, c3 = (W row g+8, same X rows).
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + wn * 16 + g + 8 * (i >> 1), m = 8 * nt + 2 * c + (i & 1);
      if (m < M && n < N) {
        if (part) part[((int64_t)blockIdx.y * M + m) * N + n] = acc[nt][i];
        else y[(int64_t)m * N + n] = f_to_act<ACT>(acc[nt][i]);
      }
    }
}

// ---- input gradient ----------------------------------------------------------------------------
// Two rows' pairs (a[2t], a[2t+1]) and (b[2t], b[2t+1]) -> (a[2t], b[2t]) and (a[2t+1], b[2t+1]).
__device__ __forceinline__ uint32_t pair_lo(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x5410); }
__device__ __forceinline__ uint32_t pair_hi(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x7632); }

template <int T, class ACT, int NT>
__global__ void __launch_bounds__(kIgThreads) staged_input_grad_kernel(const ACT* __restrict__ dy,
                                                                     const uint8_t* __restrict__ w,
                                                                     ACT* __restrict__ dx, float* __restrict__ part,
                                                                     int M, int N, int K, int64_t row_bytes,
                                                                     int stages_per_split) {
  using U = Unpack<T>;
  constexpr int R = kStageRows, P = row_pitch<T>(), PD = 2 * R + 16;
  constexpr int STAGE = ig_stage_bytes<T, NT>();
  constexpr int WD = U::template Words<kSpan>::value;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int h = warp & 1, phase = warp >> 1;
  const int nblk = K / U::kElems, nst = (N + R - 1) / R;
  const int st0 = blockIdx.y * stages_per_split, st1 = min(nst, st0 + stages_per_split);
  const int kb0 = blockIdx.x * (kStageK / U::kElems);
  const bool dy_vec = (N & 7) == 0;  // dY rows 16-byte aligned: copy asynchronously

  const WeightStager<T, R, kIgThreads> stager(w, row_bytes, (int64_t)st0 * R * row_bytes + (int64_t)kb0 * U::kBytes);
  const int valid = segment_valid<T>(kb0, nblk);
  const uint32_t smem0 = smem_addr(smem);
  auto issue_w = [&](int st) {
    const int64_t shift = (int64_t)(st - st0) * R * row_bytes;
    stager.issue(smem0 + (st % kStages) * STAGE, w, shift, (int)(shift & 15), valid, N - st * R,
                 valid == seg_bytes<T>() && st * R + R < N);
  };
  auto issue_dy = [&](int st) {
    const int slot = st % kStages;
    const int r0 = st * R;
    // dY[m, r0 .. r0+R) for m < M; zeros past N. 16-byte chunk i = (row i/8, rows 8*(i%8)..)
    if (dy_vec) {
      if ((int)threadIdx.x < M * (R / 8)) {
        const int m = threadIdx.x / (R / 8), n = r0 + 8 * (threadIdx.x % (R / 8));
        const int bytes = 2 * max(0, min(8, N - n));
        cp_async16(smem0 + slot * STAGE + R * P + m * PD + 16 * (threadIdx.x % (R / 8)),
                   bytes ? dy + (int64_t)m * N + n : dy, bytes);
      }
    } else {  // rare shapes: plain loads (waits for them here)
      uint8_t* sd = smem + slot * STAGE + R * P;
      for (int i = threadIdx.x; i < M * R; i += kIgThreads) {
        const int m = i / R, j = i % R, n = r0 + j;
        reinterpret_cast<uint16_t*>(sd + m * PD)[j] =
            n < N ? reinterpret_cast<const uint16_t*>(dy)[(int64_t)m * N + n] : (uint16_t)0;
      }
    }
  };
  auto issue = [&](int st) {
    issue_w(st);
    issue_dy(st);
  };

  float acc[8][NT][4];
#pragma unroll
  for (int t = 0; t < 8; ++t)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][nt][i] = 0.0f;

  const int e = 128 * h + 16 * g;  // this lane's 16 columns, within the CTA's 256
  const int jb = e / U::kElems, ee = e % U::kElems;
  // Columns past K (the last CTA of a K that is not a multiple of 256) decode zero-filled blocks
  // and are not stored; every lane takes part in the warp's MMAs.
  const bool cols_in = (int64_t)kb0 * U::kElems + e < K;

  // W's first stages before the wait for the previous kernel, dY's after it (as in the forward)
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (st0 + s < st1) issue_w(st0 + s);
  pdl_launch_dependents();
  pdl_wait();  // dY is the previous kernel's output; dx and part are written after this
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (st0 + s < st1) issue_dy(st0 + s);
    cp_async_commit();
  }
#pragma unroll 1
  for (int st = st0; st < st1; ++st) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (st + kStages - 1 < st1) issue(st + kStages - 1);
    cp_async_commit();

    const uint8_t* sw = smem + (st % kStages) * STAGE;
    const uint8_t* sd = sw + R * P;
    const int r0 = st * R;
#pragma unroll
    for (int gi = 0; gi < 2; ++gi) {
      const int grp = phase + 2 * gi;
      if (r0 + 16 * grp >= N) continue;  // the same for the whole warp
      const int rows[4] = {16 * grp + 2 * c, 16 * grp + 2 * c + 1, 16 * grp + 2 * c + 8, 16 * grp + 2 * c + 9};
      uint32_t pw[4][8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t wr[WD];
        U::template load<kSpan>(staged_block<T>(sw + rows[i] * P, r0 + rows[i], row_bytes, kb0, jb), ee, wr);
        decode_pairs<T, ACT>(wr, ee, pw[i]);
      }
      uint32_t bf[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int m = g + 8 * nt;
        bf[nt][0] = bf[nt][1] = 0;
        if (m < M) {
          bf[nt][0] = *reinterpret_cast<const uint32_t*>(sd + m * PD + 2 * rows[0]);
          bf[nt][1] = *reinterpret_cast<const uint32_t*>(sd + m * PD + 2 * rows[2]);
        }
      }
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        // A = Wᵀ: rows g and g+8 of the tile are columns e+2t and e+2t+1; k-slots are W rows.
        const uint32_t a[4] = {pair_lo(pw[0][t], pw[1][t]), pair_hi(pw[0][t], pw[1][t]),
                               pair_lo(pw[2][t], pw[3][t]), pair_hi(pw[2][t], pw[3][t])};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma16816<ACT>(acc[t][nt], a, bf[nt][0], bf[nt][1]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Phase-1 warps hand their sums to the phase-0 warp of the same columns.
  float* red = reinterpret_cast<float*>(smem);  // [2 halves][32 lanes][8*NT*4]
  constexpr int PER = 8 * NT * 4;
  if (phase == 1) {
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[(h * 32 + lane) * PER + (t * NT + nt) * 4 + i] = acc[t][nt][i];
  }
  __syncthreads();
  if (phase == 1 || !cols_in) return;
#pragma unroll
  for (int t = 0; t < 8; ++t)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][nt][i] += red[(h * 32 + lane) * PER + (t * NT + nt) * 4 + i];

  // C fragment of tile t: c0, c1 = (column e+2t, dX rows 2c, 2c+1), c2, c3 = (column e+2t+1, same).
  const int64_t col0 = (int64_t)kb0 * U::kElems + e;  // 16 columns, all inside K (K % 32 == 0)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int m = 8 * nt + 2 * c + b;
      if (m >= M) continue;
      float v[16];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        v[2 * t] = acc[t][nt][b];
        v[2 * t + 1] = acc[t][nt][2 + b];
      }
      if (part) {
        float4* p = reinterpret_cast<float4*>(part + ((int64_t)blockIdx.y * M + m) * K + col0);
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
      } else {
        uint32_t pk[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) pk[i] = pack2<ACT>(v[2 * i], v[2 * i + 1]);
        uint4* p = reinterpret_cast<uint4*>(dx + (int64_t)m * K + col0);
        p[0] = make_uint4(pk[0], pk[1], pk[2], pk[3]);
        p[1] = make_uint4(pk[4], pk[5], pk[6], pk[7]);
      }
    }
}

// ---- launchers ---------------------------------------------------------------------------------
// Resident CTAs per multiprocessor the split heuristic aims for (0: as many as fit).
inline int target_ctas_per_sm(int fit) {
  const char* s = std::getenv("LOWTUNE_CUDA_STAGED_CTAS_PER_SM");
  const int want = (s && *s) ? std::atoi(s) : 0;
  return want > 0 ? std::min(want, fit) : fit;
}

// CTAs per cluster that split an M <= 8 tile's reduction (1: none), where the kernel was built for
// sm_90 (thread block clusters). Automatic for the 4-bit types (those timed): the largest c in
// {1, 2, 4} whose c x tiles CTAs are all resident at once and leave each CTA at least a ring's
// depth of stages. On an H200 (tools/results/cluster_split_h200_2026-12-03/) c = 2 made
// 4096x14336 at M = 1 11-14% faster for Q4_0, Q4_1 and INT4-g64 (Q4_K 1-2%), and 4096x4096
// (2 stages per CTA) up to 5% slower, hence the depth rule. LOWTUNE_CUDA_STAGED_CLUSTER=1|2|4 sets
// c for any type (1: off), for measurements.
template <bool kAuto, auto Kernel>
int cluster_split(int tiles, int nst, int fit) {
  if (!built_for_sm90<Kernel>()) return 1;
  const char* s = std::getenv("LOWTUNE_CUDA_STAGED_CLUSTER");
  if (s && *s) return std::max(1, std::min({std::atoi(s), kMaxClusterSplit, nst}));
  if (!kAuto) return 1;
  int c = 1;
  while (2 * c <= kMaxClusterSplit && 2 * c * kStages <= nst && (int64_t)tiles * 2 * c <= (int64_t)fit * sm_count())
    c *= 2;
  return c;
}

template <int T, class ACT, int NT>
void forward_typed(const void* x, const uint8_t* w, void* y, int m, int n, int k, int64_t row_bytes,
                   cudaStream_t stream) {
  constexpr int threads = fwd_threads<NT>();
  constexpr auto kernel = staged_forward_kernel<T, ACT, NT>;
  const size_t smem = fwd_smem<T, NT>(m);
  const int fit = std::max(kernel_ctas<kernel>(smem, threads), 1);  // resident CTAs
  const int tiles = (n + fwd_rows<NT>() - 1) / fwd_rows<NT>();
  const int nst = (k + fwd_stage_k<NT>() - 1) / fwd_stage_k<NT>();
  if constexpr (NT == 1) {
    // Tiles that leave resident CTA slots empty (N = 4096: 256 tiles for 528-660 slots) split
    // their reduction over a cluster, added in shared memory (no partial sums, no second kernel).
    const int cluster = cluster_split<fwd_lane_owns_64<T, NT>(), kernel>(tiles, nst, fit);
    if (cluster > 1) {
      const int per = (nst + cluster - 1) / cluster;
      // launched plainly: with programmatic launch the clusters ran 1.1-1.3x slower at 4096x4096
      // (H100, BENCHMARKS.md "The small-M kernels on programmatic launch")
      launch_cluster(kernel, dim3((unsigned)tiles, (unsigned)cluster), dim3(1, (unsigned)cluster),
                     dim3((unsigned)threads), smem, stream, false, static_cast<const ACT*>(x), w,
                     static_cast<ACT*>(y), static_cast<float*>(nullptr), m, n, k, row_bytes, per, false);
      return;
    }
  }
  // Split the reduction only when the tiles leave multiprocessors idle (M <= 8: its 16-row tiles
  // keep each CTA's three stages in flight, which suffices), or into the waves of resident CTAs
  // cuda_policy::staged_split_waves asks for (M <= 16).
  // (Splitting M <= 8 whenever its tiles fill less than one wave of resident CTAs was measured
  // slower: Q4_K 4096x4096 9.9 µs against 7.6, the second kernel costs more than the CTAs gain.)
  const bool split = !(NT == 1 && tiles >= sm_count());  // (one slot, one wave: no split unless forced)
  const int slots = split ? target_ctas_per_sm(fit) * sm_count() : 1;
  const int per = (int)cuda_policy::staged_stages_per_split(tiles, nst, slots,
                                                            split ? cuda_policy::staged_split_waves(T, true) : 1, 1);
  const int splits = (nst + per - 1) / per;
  ScratchBuffer part(splits > 1 ? (size_t)splits * m * n * sizeof(float) : 0, stream);
  launch_pdl(kernel, dim3((unsigned)tiles, (unsigned)splits), dim3(threads), smem, stream, static_cast<const ACT*>(x),
             w, static_cast<ACT*>(y), part.as<float>(), m, n, k, row_bytes, per, pdl_supported());
  if (splits > 1) launch_reduce<ACT>(part.as<float>(), splits, (int64_t)m * n, y, stream);
}

template <int T, class ACT, int NT>
void input_grad_typed(const void* dy, const uint8_t* w, void* dx, int m, int n, int k, int64_t row_bytes,
                      cudaStream_t stream) {
  constexpr size_t smem = (size_t)kStages * ig_stage_bytes<T, NT>();
  static_assert(smem >= 2 * 32 * 8 * NT * 4 * sizeof(float), "room for the phase reduction");
  constexpr auto kernel = staged_input_grad_kernel<T, ACT, NT>;
  const int fit = std::max(kernel_ctas<kernel>(smem, kIgThreads), 1);
  const int tiles = (k + kStageK - 1) / kStageK, nst = (n + kStageRows - 1) / kStageRows;
  const int per = (int)cuda_policy::staged_stages_per_split(tiles, nst, target_ctas_per_sm(fit) * sm_count(),
                                                            cuda_policy::staged_split_waves(T, false), kStages);
  const int splits = (nst + per - 1) / per;
  ScratchBuffer part(splits > 1 ? (size_t)splits * m * k * sizeof(float) : 0, stream);
  launch_pdl(kernel, dim3((unsigned)tiles, (unsigned)splits), dim3(kIgThreads), smem, stream,
             static_cast<const ACT*>(dy), w, static_cast<ACT*>(dx), part.as<float>(), m, n, k, row_bytes, per);
  if (splits > 1) launch_reduce<ACT>(part.as<float>(), splits, (int64_t)m * k, dx, stream);
}

}  // namespace staged

// f(ACT{}, std::integral_constant<int, NT>{}) for the activation dtype and the B tiles: one below
// M = two_from (at most 9: one tile holds 8 rows), two from it.
template <class F> void staged_dispatch(int dtype, int m, int two_from, F&& f) {
  if (m < 1 || m > kStagedMaxM) throw std::invalid_argument("the staged kernels take 1 <= M <= 16");
  auto tiles = [&](auto act) {
    if (m < std::min(two_from, 9)) f(act, std::integral_constant<int, 1>{});
    else f(act, std::integral_constant<int, 2>{});
  };
  if (dtype == D_BF16) tiles(__nv_bfloat16{});
  else if (dtype == D_F16) tiles(__half{});
  else throw std::invalid_argument("the staged kernels take bf16 or fp16 activations");
}

template <int T>
void launch_staged_forward(const void* x, int dtype, const uint8_t* w, void* y, int m, int n, int k,
                           int64_t row_bytes, cudaStream_t stream) {
  staged_dispatch(dtype, m, (int)cuda_policy::staged_two_tiles_from(T), [&](auto act, auto nt) {
    staged::forward_typed<T, decltype(act), decltype(nt)::value>(x, w, y, m, n, k, row_bytes, stream);
  });
}

template <int T>
void launch_staged_input_grad(const void* dy, int dtype, const uint8_t* w, void* dx, int m, int n, int k,
                              int64_t row_bytes, cudaStream_t stream) {
  staged_dispatch(dtype, m, 9, [&](auto act, auto nt) {
    staged::input_grad_typed<T, decltype(act), decltype(nt)::value>(dy, w, dx, m, n, k, row_bytes, stream);
  });
}

}  // namespace lowtune::cuda
