// Which implementation computes a product on CUDA: the one place that chooses, for lowtune's
// quantized products (forward Y = X·deq(W)ᵀ, input gradient dX = dY·deq(W)) and for the
// adapter products (adapter_kernels.h). Plain C++ (no CUDA headers): the CUDA dispatch
// (cuda/qmatmul_cuda.cu) and the Python layer (through the bindings, lowtune.adapter_ops) ask it.
//
//   gemv       the M = 1 forward on CUDA cores (cuda/gemv.cuh) for the types that have one
//              (has_gemv), and its transpose, the M = 1 input gradient (cuda/gemv_grad.cuh), for the
//              types of gemv_grad_default or when forced (any has_gemv type): bf16/fp16,
//              operands 16-byte aligned
//   regs       the M <= 16 forward with W decoded straight into tensor-core fragments
//              (cuda/small_m_regs.cuh) for the types with codes: by default where it was timed
//              faster than staged (regs_default), any has_gemv type when forced
//   staged     the staged small-M kernels (cuda/staged_gemv.cuh): M <= 16, bf16/fp16, operands
//              16-byte aligned
//   direct     the first small-M kernels (cuda/small_m.cuh): forward M <= 32 (X aligned), input
//              gradient M <= 16
//   cublas     quantized products: W dequantized chunk by chunk into scratch, each chunk
//              multiplied by cuBLAS; adapter products: torch's matmul (cuBLAS)
//   fused      the adapter kernels (cuda/adapter_cuda.cu)
//   reference  the slow reference kernels, when no cuBLAS can be loaded
//
// Defaults: quantized products take gemv where it applies (M = 1; its input gradient for the types of
// gemv_grad_default), regs where regs_default says, staged for M <= 16, direct for a forward of 17..32 rows and
// cublas above (a benchmark run, tools/gpu/kernels.sh, times every path per shape; a rule that depends on
// the shape goes into choose() below); adapter products take cublas from kAdapterCublasMinRows rows on (there
// the rank-r products are skinny GEMMs that cuBLAS streams at memory speed) and fused below.
// Knobs, read on every call so that a benchmark or test can compare paths in one process:
//   LOWTUNE_CUDA_PATH      gemv | regs | staged | direct | cublas: force that path for the quantized products
//                          wherever its conditions hold (otherwise the default applies)
//   LOWTUNE_CUDA_SMALL_M   largest M for the small-M kernels (default 32, at most 32; 0 = never)
//   LOWTUNE_CUDA_STAGED_TWO_TILES  smallest M whose staged forward takes the 128-row, two-B-tile
//                          layout, for every type (1..9; default per type: staged_two_tiles_default)
//   LOWTUNE_CUDA_GEMV_ROWS 1 or 2: rows a warp of the M = 1 gemv, for every shape (default:
//                          gemv_rows_per_warp)
//   LOWTUNE_CUDA_GEMV_SPLIT 1 or 2: K split over a cluster of that many CTAs in the two-row gemv
//                          (gemv_split_k)
//   LOWTUNE_CUDA_GEMV_STREAM 0..3: CTAs an SM of the streamed M = 1 gemv, weights through bulk
//                          copies (0: the register kernels; default: gemv_stream_ctas)
//   LOWTUNE_CUDA_STAGED_WAVES  waves of resident CTAs the staged kernels' split reduction fills, 0: the
//                          splits rounded up (default per type and direction: staged_split_waves_default)
//   LOWTUNE_CUDA_STAGED_SPLITS  s > 0: s splits of the staged kernels' reduction (staged_stages_per_split)
//   LOWTUNE_CUDA_PDL       0: launch without programmatic dependent launch (internal.h: launch_pdl)
//   LOWTUNE_CUDA_EARLY_LOADS  bits of the loads issued before a PDL wait (default 3): 1 the one-row
//                          product's norm weights, 2 the decode attention's rows into L2 (pdl_early_loads)
//   LOWTUNE_CUDA_ATTN_POSITIONS  cached positions per split of a decode attention head (default 64:
//                          decode_attention_splits)
//   LOWTUNE_CUDA_ATTN_COMBINE  0: merge a head's splits in a kernel of its own, not in the split
//                          kernel's last CTA (decode_attention_merge_in_split)
// and those of the cublas path's scratch (plan_chunks below), which Python asks through
// cublas_scratch_bytes to budget GPU memory:
//   LOWTUNE_CUDA_CHUNK_MB     scratch per chunk in MiB (default 16)
//   LOWTUNE_CUDA_CHUNK_MIN    fewest rows or columns per chunk (default 1024: enough output tiles
//                             for cuBLAS to fill the GPU; rounded to 128)
//   LOWTUNE_CUDA_SCRATCH_MB   cap on all chunk buffers together in MiB (default 128)
//   LOWTUNE_CUDA_OVERLAP      0: one buffer, dequantize and multiply in turn on the caller's stream
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "blocks.h"  // the type ids

namespace lowtune::cuda_policy {

enum class Product : int { Forward, InputGrad, Adapter };
enum class Path : int { Staged, Direct, Cublas, Fused, Reference, Gemv, Regs };

constexpr int64_t kStagedMaxM = 16;
constexpr int64_t kDirectMaxM = 32, kDirectMaxGradM = 16;
constexpr int64_t kAdapterCublasMinRows = 64;
// The gemv kernel against the staged one (H200, BENCHMARKS.md "Aligned words for the 2-byte-aligned
// types"): faster at every measured type and shape since its L2 prefetch went (the last holdouts,
// N = 4096 at K = 14336: Q4_0 16.3 against 18.2 µs, INT4-g64 14.8 against 17.5), so M = 1 takes it
// wherever the type has one.
// The types with an M = 1 CUDA-core kernel (cuda/gemv.cuh): those whose values are an affine map
// of small codes that Unpack gives as codes. That is every type: the legacy, K-quant and INTb-gG types
// their codes as stored; the types with a table of 16 int8 levels (IQ4_NL, IQ4_XS, MXFP4, NVFP4) level +
// 128; the grid I-quants their grid values with the signs applied, plus an offset (IQ1_S and IQ1_M
// 8 (grid + delta) + 9); TQ1_0, TQ2_0, Q1_0 and Q2_0 their digits or bits. cuda/instantiate.cuh checks
// this against the kernels' types.
constexpr bool has_gemv(int qtype) {
  switch (qtype) {
#define LT_GEMV_CASE(T) case T:
    LT_TYPES(LT_GEMV_CASE) return true;
#undef LT_GEMV_CASE
    default: return false;
  }
}

// The types whose M = 1 input gradient takes gemv_grad.cuh unless forced otherwise. It ran
// faster than the staged kernel for some types over a 7B layer's seven products (H200, BENCHMARKS.md
// "The one-row input gradient": 2-14% less time); once both kernels launched programmatically the
// staged kernel won for every type timed (H100, "The small-M kernels on programmatic launch": 4-21%
// less time), and once its splits filled whole waves also for INT2-g64 and INT8-g32, the last two
// (H100, "How the staged kernels split their reduction": 10% and 6% less over the seven products).
// LOWTUNE_CUDA_PATH=gemv still takes it for any has_gemv type. The 4-bit table types (IQ4_NL, IQ4_XS,
// MXFP4) take it: the staged kernel decodes their levels one by one in fp32, and gemv_grad was 1.1-1.7x
// faster for all three at 4096x4096, 14336x4096 and 4096x14336 (H100, BENCHMARKS.md "The one-row
// kernels for the 4-bit table types"). So do Q2_K and Q5_K since their units load their words once
// (kSameWords): gemv_grad 0.80x the staged kernel's time for Q2_K at all three shapes, and for Q5_K
// 0.80x at 4096x4096 and 1.02-1.05x at the other two, 0.94x over a layer's seven products (H100,
// BENCHMARKS.md "Shared unit words for Q5_K, Q2_K and Q3_K"); Q3_K's staged kernel stayed faster then. With
// their rows through a shared-memory ring (gemv_grad_ring_default) Q3_K and Q4_K take it too. Of the types whose
// codes came last (H100, BENCHMARKS.md "One-row kernels for the grid I-quants, NVFP4 and the ternary types"),
// those it took 0.68-0.92x the staged kernel's time over a 7B layer's seven products: IQ2_XXS, IQ2_XS, IQ2_S,
// IQ3_XXS, IQ3_S, TQ1_0, TQ2_0 and NVFP4 (IQ1_S and IQ1_M 0.98x, Q1_0 1.00x, Q2_0 1.09x stayed staged). With
// the ternary/bit types' narrow codes in the staged kernels and the grids in shared memory (H100, BENCHMARKS.md
// "The grids in shared memory"), over a layer: TQ1_0 and TQ2_0 go back to staged (its time 0.95x and 0.70x
// gemv_grad's), Q1_0 and IQ1_M to gemv_grad (0.80x and 0.93x the staged kernel's).
constexpr bool gemv_grad_default(int qtype) {
  switch (qtype) {
    case T_IQ4_NL: case T_IQ4_XS: case T_MXFP4: case T_Q2_K: case T_Q3_K: case T_Q4_K: case T_Q5_K:
    case T_IQ2_XXS: case T_IQ2_XS: case T_IQ2_S: case T_IQ3_XXS: case T_IQ3_S: case T_IQ1_M: case T_Q1_0:
    case T_NVFP4:
      return true;
    default: return false;
  }
}

// The forwards that take the regs kernel unless forced otherwise: those it ran faster than the
// staged kernel at every 7B shape (H200, BENCHMARKS.md "The M <= 16 forward from registers"): Q6_K
// from M = 8 (1.13-2.13x at M = 8 and 16; at M = 2 and 4 it lost at 14336x4096). For the other
// types it was slower (its W loads are small and scattered: L1-bound) or even.
constexpr bool regs_default(int qtype, int64_t m) { return qtype == T_Q6_K && m >= 8; }
static_assert(has_gemv(T_Q6_K), "regs_default names only types the regs kernel takes (those with codes)");

inline const char* path_name(Path p) {
  switch (p) {
    case Path::Staged: return "staged";
    case Path::Direct: return "direct";
    case Path::Cublas: return "cublas";
    case Path::Fused: return "fused";
    case Path::Reference: return "reference";
    case Path::Gemv: return "gemv";
    case Path::Regs: return "regs";
  }
  return "?";
}

inline Product product_from_name(const std::string& s) {
  if (s == "forward") return Product::Forward;
  if (s == "input_grad") return Product::InputGrad;
  if (s == "adapter") return Product::Adapter;
  throw std::invalid_argument("unknown product '" + s + "' (forward, input_grad or adapter)");
}

struct Call {
  Product product;
  int64_t m;         // activation rows
  int64_t n, k;      // the weight's shape (a rule may depend on it; 0 where unknown)
  bool half;         // bf16/fp16 activations (the small-M kernels take no fp32)
  bool act_aligned;  // activation (x or dy) 16-byte aligned
  bool out_aligned;  // output (y or dx) 16-byte aligned (the packed weight always is: AlignedWeight)
  bool cublas;       // a cuBLAS could be loaded
  bool gemv = false; // the weight's type has an M = 1 CUDA-core kernel (has_gemv) that fits K
  bool gemv_grad = false;  // and its input gradient takes it by default (gemv_grad_default)
  bool regs = false;       // the forward takes the regs kernel by default at this M (regs_default)
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return (s && *s) ? std::atoll(s) : fallback;
}
// The smallest M whose staged forward takes the 128-row, two-B-tile layout instead of the 16-row,
// one-tile one (cuda/staged_gemv.cuh): per type, as timed at M = 5..8 over a 7B layer's seven
// products (H200, BENCHMARKS.md "The staged forward's layout at M = 5..8"). From 5 for Q3_K and Q5_K
// (6-18% less time), from 6 for Q4_0, Q4_K, Q8_0 and INT4-g64 (0-14% less); 9 (never below it) for
// Q2_K and IQ4_XS, which were 6-30% slower, and for every type not timed.
constexpr int64_t staged_two_tiles_default(int qtype) {
  switch (qtype) {
    case T_Q3_K: case T_Q5_K: return 5;
    case T_Q4_0: case T_Q4_K: case T_Q8_0: case int_type_id(4, 64): return 6;
    default: return 9;
  }
}
inline int64_t staged_two_tiles_from(int qtype) {
  return std::clamp<int64_t>(env_int("LOWTUNE_CUDA_STAGED_TWO_TILES", staged_two_tiles_default(qtype)), 1,
                             kStagedMaxM / 2 + 1);
}
// Rows a warp of the M = 1 gemv (cuda/gemv.cuh): two (gemv_rows_kernel, one read of x from shared
// memory for both; up to 36% less time than one at most timed types and shapes, H200, BENCHMARKS.md
// "Two rows a warp in the one-row gemv"), but one where the one-row kernel gives every warp a row of
// its own (one_row: N up to ~4k) and K > 4096 for the types whose two-row kernel took 6-42% more there
// (Q4_0, Q4_1, Q5_0, INT3-g128, INT4-g64 at 4096x11008 and 4096x14336: half the warps, and a
// register bound one CTA lower, keep fewer bytes in flight over a long row). Q5_1 and the other
// group sizes of INT3 and INT4 were not timed and follow their siblings.
constexpr bool gemv_one_row_at_long_k(int qtype) {
  if (qtype >= int_type_id(3, 32) && qtype <= int_type_id(4, 128)) return true;  // INT3-g*, INT4-g*
  return qtype == T_Q4_0 || qtype == T_Q4_1 || qtype == T_Q5_0 || qtype == T_Q5_1;
}
inline int gemv_rows_per_warp(int qtype, bool one_row, int64_t k) {
  const int64_t forced = env_int("LOWTUNE_CUDA_GEMV_ROWS", 0);
  if (forced == 1 || forced == 2) return (int)forced;
  return one_row && k > 4096 && gemv_one_row_at_long_k(qtype) ? 1 : 2;
}

// K split over a cluster of two CTAs in the two-row gemv (sm_90; cuda/gemv.cuh: gemv_rows_kernel<...,
// 2>): where every warp can take one task of the split (fits: twice the tasks fit at once) and rows
// are long (K > 4096: N = 4096 shapes leave half the resident warps idle, each walking a long row).
// LOWTUNE_CUDA_GEMV_SPLIT=1|2 sets it wherever it fits; LOWTUNE_CUDA_GEMV_ROWS=1 turns it off.
inline int gemv_split_k(int64_t k, bool fits) {
  const int64_t forced = env_int("LOWTUNE_CUDA_GEMV_SPLIT", 0);
  if (!fits || env_int("LOWTUNE_CUDA_GEMV_ROWS", 0) == 1) return 1;
  if (forced == 1 || forced == 2) return (int)forced;
  return k > 4096 ? 2 : 1;
}

// CTAs a multiprocessor of the streamed M = 1 gemv (cuda/gemv.cuh: gemv_stream_kernel, sm_90, rows
// and steps 16-byte aligned); 0: the register kernels. Where it was timed faster on an H100
// (BENCHMARKS.md, "The streamed gemv"): two CTAs for the long rows of 4096-row products (K >= 14336:
// 7-10% less time for Q4_0, Q4_1, INT4-g64, Q6_K, Q8_0, INT8-g32; the other group sizes follow their
// siblings), three for the 6- and 5-bit types' wide products (N > 4096, K <= 4096: Q6_K and Q5_K
// 15-18% less, Q5_0 5%). Elsewhere the register kernels won. LOWTUNE_CUDA_GEMV_STREAM=0..3 forces it.
constexpr int gemv_stream_default(int qtype, int64_t n, int64_t k) {
  const bool int4_8 = (qtype >= int_type_id(4, 32) && qtype <= int_type_id(4, 128)) ||
                      (qtype >= int_type_id(8, 32) && qtype <= int_type_id(8, 128));
  if (n <= 4096 && k >= 14336 && (int4_8 || qtype == T_Q4_0 || qtype == T_Q4_1 || qtype == T_Q5_K ||
                                  qtype == T_Q6_K || qtype == T_Q8_0))
    return 2;
  if (n > 4096 && k <= 4096 && (qtype == T_Q5_K || qtype == T_Q6_K || qtype == T_Q5_0)) return 3;
  return 0;
}
inline int gemv_stream_ctas(int qtype, int64_t n, int64_t k) {
  // (rows a warp or K's split forced: the register kernels they name, unless this knob is set too)
  const bool register_forced = env_int("LOWTUNE_CUDA_GEMV_ROWS", 0) || env_int("LOWTUNE_CUDA_GEMV_SPLIT", 0);
  const int fallback = register_forced ? 0 : gemv_stream_default(qtype, n, k);
  return (int)std::clamp<int64_t>(env_int("LOWTUNE_CUDA_GEMV_STREAM", fallback), 0, 3);
}

// How the M = 1 input gradient (cuda/gemv_grad.cuh) brings W's rows in: each warp's next step into
// registers (grad_kernel), or stages of 32 rows through a shared-memory ring by cp.async (grad_staged_kernel,
// four rows a step for more types). The ring for the types it was timed faster for than the kernel they took
// before (H100, BENCHMARKS.md "The one-row input gradient through a shared-memory ring"): Q3_K 0.82-0.89x the
// staged kernel's time, Q4_K 0.92-0.94x, Q5_K 0.87-0.96x the register kernel's at 4096x4096, 14336x4096 and
// 4096x14336. For Q2_K, Q6_K, Q8_0 and the 2-, 4- and 8-bit types with one scale a block it took 1.02-1.32x the time
// of the kernel they take by default (Q5_0 even). LOWTUNE_CUDA_GEMV_GRAD_STAGED=0|1 chooses for every type.
constexpr bool gemv_grad_ring_default(int qtype) { return qtype == T_Q3_K || qtype == T_Q4_K || qtype == T_Q5_K; }
inline bool gemv_grad_staged(int qtype) {
  return env_int("LOWTUNE_CUDA_GEMV_GRAD_STAGED", gemv_grad_ring_default(qtype)) != 0;
}

// Waves of resident CTAs the staged kernels (cuda/staged_gemv.cuh) split a product's reduction into
// when its tiles alone leave resident CTA slots empty. One for the input gradient and for most forward
// types: as many splits as every CTA resident at once (rounding the splits up left a partial second
// wave, 1.08-1.3x the time; H100, BENCHMARKS.md "How the staged kernels split their reduction"). Four
// for the forward of Q2_K, Q3_K and Q6_K, whose decoding (a scale per 16 elements), not the bytes,
// bounds them: many short CTAs balance better (Q2_K 14336x4096 at M = 16 0.88x the time of one wave).
// LOWTUNE_CUDA_STAGED_WAVES=1..8 sets it for every type, 0 the rule before (splits rounded up).
constexpr int staged_split_waves_default(int qtype, bool forward) {
  return forward && (qtype == T_Q2_K || qtype == T_Q3_K || qtype == T_Q6_K) ? 4 : 1;
}
inline int staged_split_waves(int qtype, bool forward) {
  return (int)std::clamp<int64_t>(env_int("LOWTUNE_CUDA_STAGED_WAVES", staged_split_waves_default(qtype, forward)),
                                  0, 8);
}
// Units of a reduction per split when `tiles` tiles split it into enough CTAs to fill `slots`
// resident ones, the splits rounded up (the direct and regs kernels' rule, small_m.cuh:
// units_per_split; the staged kernels' before whole waves).
inline int64_t per_split_rounded_up(int64_t tiles, int64_t units, int64_t slots) {
  return ceil_div(std::max<int64_t>(units, 1), ceil_div(std::max<int64_t>(slots, 1), std::max<int64_t>(tiles, 1)));
}
// Stages of the reduction a CTA takes when `tiles` tiles split their nst stages for `slots` resident
// CTAs (at most nst: no split): splits = waves x slots / tiles, each split at least min_per stages
// (the input gradient: its ring's depth; CTAs of 2 stages ran 1.1-1.3x the time of 4).
// LOWTUNE_CUDA_STAGED_SPLITS=s > 0 forces s splits, for measurements.
inline int64_t staged_stages_per_split(int64_t tiles, int64_t nst, int64_t slots, int waves, int64_t min_per) {
  tiles = std::max<int64_t>(tiles, 1), nst = std::max<int64_t>(nst, 1), slots = std::max<int64_t>(slots, 1);
  const int64_t forced = std::min(env_int("LOWTUNE_CUDA_STAGED_SPLITS", 0), nst);
  int64_t per;
  if (forced > 0) per = ceil_div(nst, forced);
  else if (waves <= 0) per = per_split_rounded_up(tiles, nst, slots);  // the rule before
  else per = std::max(ceil_div(nst, std::max<int64_t>(1, waves * slots / tiles)),
                      std::min(min_per, nst));
  return std::max(per, ceil_div(nst, 65535));  // gridDim.y's limit
}

// Splits of a decode attention head's positions: one per 64 cached positions, at most 32 (the grid
// is fixed when a graph is captured, so it follows the cache's length, not the filled positions;
// 16 or 32 positions a split were slower on an H100, BENCHMARKS.md "The decode attention's merge").
inline int64_t decode_attention_splits(int64_t cache_len) {
  const int64_t per = std::max<int64_t>(1, env_int("LOWTUNE_CUDA_ATTN_POSITIONS", 64));
  return std::min<int64_t>(ceil_div(cache_len, per), 32);
}
// Whether the last CTA of a head's splits merges their partials (one launch fewer a layer: 2.6%
// faster decoding at 1024 positions, 0.4% slower at 16 on an H100) rather than a merge kernel.
inline bool decode_attention_merge_in_split() { return env_int("LOWTUNE_CUDA_ATTN_COMBINE", 1) != 0; }
// Loads a kernel may issue before its PDL wait because their data is not the previous kernel's
// output, so that their memory round trip overlaps that kernel: bit 1, the norm weights of the
// one-row product's fused RMSNorm (a parameter); bit 2, an L2 prefetch of the decode attention's key
// and value rows (written by earlier steps; the newest row's line too, as a prefetch returns nothing).
// H100, 7B Q4_K decoding: 477 tokens/s without, 484 with bit 1, 495 with both (BENCHMARKS.md "Loads
// before the PDL wait").
inline int pdl_early_loads() { return env_int("LOWTUNE_CUDA_EARLY_LOADS", 3); }
inline bool early_norm_weights() { return (pdl_early_loads() & 1) != 0; }
inline bool early_attention_rows() { return (pdl_early_loads() & 2) != 0; }

inline int64_t small_m_max() { return std::min<int64_t>(env_int("LOWTUNE_CUDA_SMALL_M", kDirectMaxM), kDirectMaxM); }

inline Path choose(const Call& c) {
  if (c.product == Product::Adapter) return c.m >= kAdapterCublasMinRows ? Path::Cublas : Path::Fused;
  const int64_t small = small_m_max();
  const bool grad = c.product == Product::InputGrad;
  const bool staged_ok = c.half && c.act_aligned && c.out_aligned && c.m >= 1 && c.m <= std::min(small, kStagedMaxM);
  const bool direct_ok = c.half && c.m <= std::min(small, grad ? kDirectMaxGradM : kDirectMaxM) && (grad || c.act_aligned);
  const bool gemv_ok = c.gemv && c.m == 1 && staged_ok;  // the forward, or its transpose (gemv_grad.cuh)
  const bool gemv_default = gemv_ok && (!grad || c.gemv_grad);
  const bool regs_ok = !grad && staged_ok;  // the kernel takes what the staged forward takes
  const Path big = c.cublas ? Path::Cublas : Path::Reference;
  const char* forced = std::getenv("LOWTUNE_CUDA_PATH");
  if (forced && *forced) {
    if (!std::strcmp(forced, "gemv") && gemv_ok) return Path::Gemv;
    if (!std::strcmp(forced, "regs") && c.gemv && regs_ok) return Path::Regs;
    if (!std::strcmp(forced, "staged") && staged_ok) return Path::Staged;
    if (!std::strcmp(forced, "direct") && direct_ok) return Path::Direct;
    if (!std::strcmp(forced, "cublas")) return big;
  }
  if (gemv_default) return Path::Gemv;
  if (c.regs && regs_ok) return Path::Regs;
  if (staged_ok) return Path::Staged;
  if (direct_ok) return Path::Direct;
  return big;
}

// ---- the cublas path's scratch -------------------------------------------------------------------
// W is dequantized in chunks of rows (forward) or columns (input grad) into scratch in the
// activation dtype; two chunk buffers alternate when there is more than one chunk (a side stream
// dequantizes chunk i+1 while cuBLAS multiplies chunk i).
inline int64_t chunk_bytes() { return std::max<int64_t>(env_int("LOWTUNE_CUDA_CHUNK_MB", 16), 1) << 20; }
inline int64_t scratch_cap_bytes() { return std::max<int64_t>(env_int("LOWTUNE_CUDA_SCRATCH_MB", 128), 1) << 20; }
inline bool overlap_chunks() { return env_int("LOWTUNE_CUDA_OVERLAP", 1) != 0; }
inline int64_t chunk_min() { return std::max<int64_t>(env_int("LOWTUNE_CUDA_CHUNK_MIN", 1024) / 128 * 128, 128); }
// The adapter's pooling kernels: 16-byte vectors a thread, loaded before any is summed (4, or 1). Four took
// QA-HiRA's adapted step from 0.238 to 0.234 ms (H200, BENCHMARKS.md "Four vectors a thread in QA-HiRA's
// pooling, and the rank-r update after each chunk's GEMM timed").
inline int pool_vectors() { return env_int("LOWTUNE_CUDA_POOL_VECS", 4) == 1 ? 1 : 4; }
// The dual products' tile buffers (adapter_cuda.cu's dual_products_kernel): 2, the next tile's copies in flight
// during this tile's products, or 1 (copy, then products). Two were 1% and 5% faster (H100, BENCHMARKS.md "Two
// kernels of lowtune's own for the LoRA types' skinny passes"); the kernel itself is off by default.
inline int dual_stages() { return env_int("LOWTUNE_CUDA_DUAL_STAGES", 2) == 1 ? 1 : 2; }

// A rank-r update multiplied into each chunk's output (kernels.h's LowRankUpdate with left): after the
// chunk's GEMM (0: the update reads and writes the slice the GEMM left in L2) or before it (1: the update
// writes the slice, and the chunk's GEMM adds into it with beta = 1).
inline bool chunk_update_first() { return env_int("LOWTUNE_CUDA_UPDATE_FIRST", 0) != 0; }

struct ChunkPlan {
  int64_t size, chunks;  // rows or columns per chunk (a multiple of 128, or all of them); how many
  bool overlap;          // two buffers alternate
};
// `total` rows (forward) or columns (input grad) of W, each `other` elements of `es` bytes: chunks
// of chunk_bytes() of scratch, at least chunk_min() wide, at most all of them; the buffers
// together hold at most scratch_cap_bytes() unless chunk_min() needs more.
inline ChunkPlan plan_chunks(int64_t total, int64_t other, int es) {
  const bool overlap = overlap_chunks();
  const int64_t budget = std::min(chunk_bytes(), scratch_cap_bytes() / (overlap ? 2 : 1));
  int64_t size = budget / (other * es) / 128 * 128;
  size = std::min(std::max<int64_t>(size, chunk_min()), total);
  const int64_t chunks = (total + size - 1) / size;
  return {size, chunks, overlap && chunks > 1};
}

// Bytes of scratch one quantized product takes on the cublas path (0 on the other paths, whose
// split-reduction buffers are M x N floats for M <= 32): what the chunk buffers hold. The packed
// weight is assumed 16-byte aligned (an unaligned one is first copied into scratch as well).
inline int64_t cublas_scratch_bytes(Product product, int64_t m, int64_t n, int64_t k, int es) {
  if (product == Product::Adapter || m <= 0 || n <= 0 || k <= 0) return 0;
  if (choose({product, m, n, k, es != 4, true, true, true}) != Path::Cublas) return 0;
  const bool forward = product == Product::Forward;
  const ChunkPlan p = forward ? plan_chunks(n, k, es) : plan_chunks(k, n, es);
  return p.size * (forward ? k : n) * es * (p.overlap ? 2 : 1);
}

}  // namespace lowtune::cuda_policy
