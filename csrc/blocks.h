// Block layouts: the binary contract with GGUF (ggml-common.h) and the papers' INTb-gG format.
// One struct per type, a static size check, and the dequantization formula beside it.
// Everything here is plain data, shared by the CPU and CUDA code.
#pragma once
#include <cstdint>
#include <cstddef>

namespace lowtune {

using half_bits = uint16_t;  // IEEE fp16, stored as raw bits

// ---- GGUF legacy types: 32 elements per block --------------------------------------------
// Nibble order (Q4_x, Q5_x): byte j holds element j in its low nibble and element j+16 in its high.
// Q5_x: the fifth bit of element j is bit j of the little-endian u32 qh.
constexpr int QK = 32;

struct block_q4_0 { half_bits d; uint8_t qs[QK / 2]; };               // x = (q - 8) * d
struct block_q4_1 { half_bits d, m; uint8_t qs[QK / 2]; };            // x = q * d + m
struct block_q5_0 { half_bits d; uint8_t qh[4]; uint8_t qs[QK / 2]; }; // x = (q - 16) * d
struct block_q5_1 { half_bits d, m; uint8_t qh[4]; uint8_t qs[QK / 2]; }; // x = q * d + m
struct block_q8_0 { half_bits d; int8_t qs[QK]; };                    // x = q * d
static_assert(sizeof(block_q4_0) == 18, "Q4_0 block is 18 bytes");
static_assert(sizeof(block_q4_1) == 20, "Q4_1 block is 20 bytes");
static_assert(sizeof(block_q5_0) == 22, "Q5_0 block is 22 bytes");
static_assert(sizeof(block_q5_1) == 24, "Q5_1 block is 24 bytes");
static_assert(sizeof(block_q8_0) == 34, "Q8_0 block is 34 bytes");

// ---- GGUF K-types: 256-element super-blocks -----------------------------------------------
constexpr int QK_K = 256;
constexpr int K_SCALE_SIZE = 12;

// 16 sub-blocks of 16; scales[i]: low nibble = scale, high nibble = min.
struct block_q2_K { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; half_bits d, dmin; };  // x = d*sc*q - dmin*mn
// 16 sub-blocks of 16, signed 6-bit scales (+32); q = low 2 bits (qs) - 4 unless the hmask bit is set.
struct block_q3_K { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; half_bits d; };  // x = d*(sc-32)*q
// 8 sub-blocks of 32 with 6-bit scale and 6-bit min packed in 12 bytes (get_scale_min_k4).
struct block_q4_K { half_bits d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qs[QK_K / 2]; };  // x = d*sc*q - dmin*mn
struct block_q5_K { half_bits d, dmin; uint8_t scales[K_SCALE_SIZE]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; };  // q in [0,31]
// 16 sub-blocks of 16, int8 scales; q = 4 low bits (ql) | 2 high bits (qh), in [0,63].
struct block_q6_K { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; half_bits d; };  // x = d*sc*(q-32)
static_assert(sizeof(block_q2_K) == 84, "Q2_K block is 84 bytes");
static_assert(sizeof(block_q3_K) == 110, "Q3_K block is 110 bytes");
static_assert(sizeof(block_q4_K) == 144, "Q4_K block is 144 bytes");
static_assert(sizeof(block_q5_K) == 176, "Q5_K block is 176 bytes");
static_assert(sizeof(block_q6_K) == 210, "Q6_K block is 210 bytes");

// ---- GGUF I-quants: codes index fixed tables (iq_grids.h) -----------------------------------
// No min anywhere; every type but IQ4_NL has 256-element super-blocks. grid(i)[j] is byte j of
// table entry i; sign bit j of a sign byte s set means element j is negated. ksigns_iq2xs maps 7
// stored bits to 8 (the eighth makes the number of minus signs even).
// IQ4_NL: byte j holds element j (low nibble) and j+16 (high), as Q4_0.
struct block_iq4_nl { half_bits d; uint8_t qs[QK / 2]; };  // x = d * kvalues_iq4nl[q]
// IQ4_XS: 8 sub-blocks of 32, each as IQ4_NL's nibbles; 6-bit scale ls: low 4 bits in nibble ib%2
// of scales_l[ib/2], high 2 bits at bit 2*ib of scales_h.
struct block_iq4_xs { half_bits d; uint16_t scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2]; };  // x = d*(ls-32)*kvalues_iq4nl[q]
// IQ3_XXS: qs[0..64): one iq3xxs_grid index (4 elements) per byte; then per 32 elements a u32:
// four 7-bit sign indices (ksigns_iq2xs), one per 8 elements, and the 4-bit scale s at bit 28.
struct block_iq3_xxs { half_bits d; uint8_t qs[3 * QK_K / 8]; };  // x = d*(0.5+s)*0.5 * grid * sign
// IQ3_S: 9-bit iq3s_grid indices (4 elements): low 8 bits in qs, bit 8 in qh (bit l of qh[ib32]
// for index l of 32 elements ib32); one sign bit per element; 4-bit scale s per 32 (nibbles).
struct block_iq3_s { half_bits d; uint8_t qs[QK_K / 4]; uint8_t qh[QK_K / 32]; uint8_t signs[QK_K / 8]; uint8_t scales[QK_K / 64]; };  // x = d*(1+2s) * grid * sign
// IQ2_XXS: per 32 elements two u32: four iq2xxs_grid indices (8 elements each) as bytes, then four
// 7-bit sign indices and the 4-bit scale s at bit 28.
struct block_iq2_xxs { half_bits d; uint16_t qs[QK_K / 8]; };  // x = d*(0.5+s)*0.25 * grid * sign
// IQ2_XS: per 8 elements a u16: 9-bit iq2xs_grid index, 7-bit sign index; 4-bit scale per 16.
struct block_iq2_xs { half_bits d; uint16_t qs[QK_K / 8]; uint8_t scales[QK_K / 32]; };  // x = d*(0.5+s)*0.25 * grid * sign
// IQ2_S: qs[0..32) low 8 bits of 10-bit iq2s_grid indices (8 elements), qs[32..64) the sign bits
// (a byte per 8 elements); bits 8-9 of index l of 32 elements ib32 at bit 2l of qh[ib32]; 4-bit
// scale per 16.
struct block_iq2_s { half_bits d; uint8_t qs[QK_K / 4]; uint8_t qh[QK_K / 32]; uint8_t scales[QK_K / 32]; };  // x = d*(0.5+s)*0.25 * grid * sign
// IQ1_S: 11-bit iq1s_grid indices (8 values in {-1, 0, 1}): low 8 bits in qs, high 3 at bit 3l of
// qh[ib32], whose bits 12-14 are the scale s and bit 15 the sign of delta = ±1/8.
struct block_iq1_s { half_bits d; uint8_t qs[QK_K / 8]; uint16_t qh[QK_K / 32]; };  // x = d*(2s+1) * (grid + delta)
// IQ1_M: no d field: d's fp16 bits are the top nibbles of the four u16 of scales (lowest first);
// 3-bit scales s per 16 elements in the other 12 bits; per 8 elements a qh nibble: bits 8-10 of
// the iq1s_grid index and the sign of delta (bit 3).
struct block_iq1_m { uint8_t qs[QK_K / 8]; uint8_t qh[QK_K / 16]; uint8_t scales[QK_K / 32]; };  // x = d*(2s+1) * (grid + delta)
static_assert(sizeof(block_iq4_nl) == 18, "IQ4_NL block is 18 bytes");
static_assert(sizeof(block_iq4_xs) == 136, "IQ4_XS block is 136 bytes");
static_assert(sizeof(block_iq3_xxs) == 98, "IQ3_XXS block is 98 bytes");
static_assert(sizeof(block_iq3_s) == 110, "IQ3_S block is 110 bytes");
static_assert(sizeof(block_iq2_xxs) == 66, "IQ2_XXS block is 66 bytes");
static_assert(sizeof(block_iq2_xs) == 74, "IQ2_XS block is 74 bytes");
static_assert(sizeof(block_iq2_s) == 82, "IQ2_S block is 82 bytes");
static_assert(sizeof(block_iq1_s) == 50, "IQ1_S block is 50 bytes");
static_assert(sizeof(block_iq1_m) == 56, "IQ1_M block is 56 bytes");

// ---- GGUF MXFP4 (OCP microscaling FP4; gpt-oss's MoE experts): 32 elements per block -----------
// e: an E8M0 power-of-two scale, taken at half (e8m0_to_fp32_half in fp16.h) because the 16 levels
// kvalues_mxfp4 (iq_grids.h) are the E2M1 values doubled; codes as IQ4_NL's nibbles. Every field is
// a byte: 17-byte blocks, byte-aligned, so a block may start at any address.
struct block_mxfp4 { uint8_t e; uint8_t qs[QK / 2]; };  // x = e8m0_to_fp32_half(e) * kvalues_mxfp4[q]
static_assert(sizeof(block_mxfp4) == 17, "MXFP4 block is 17 bytes");

// ---- GGUF NVFP4 (NVIDIA's FP4 checkpoints): 64 elements per block, four sub-blocks of 16 -------
// d[s]: an unsigned E4M3 scale per 16 elements, taken at half (ue4m3_to_fp32_half in fp16.h) for the
// same doubled E2M1 levels as MXFP4's; qs: 8 bytes per sub-block, byte j of sub-block s holding
// element 16s + j (low nibble) and 16s + j + 8 (high nibble). 36 bytes, 4-byte aligned.
struct block_nvfp4 { uint8_t d[4]; uint8_t qs[32]; };  // x = ue4m3_to_fp32_half(d[s]) * kvalues_mxfp4[q]
static_assert(sizeof(block_nvfp4) == 36, "NVFP4 block is 36 bytes");

// ---- GGUF ternary (BitNet b1.58, TriLM) and 1-/2-bit types: one fp16 scale d, small integer codes --
// TQ1_0: 256 elements; five base-3 digits t in {0, 1, 2} per qs byte and four per qh byte, stored as
// the fraction ceil(sum t_n 3^(4-n) * 256 / 243): digit n of byte q is ((uint8_t)(q * 3^n) * 3) >> 8.
// Digit n of qs[m] is element 32n + m (m < 32), of qs[32 + m] element 160 + 16n + m (m < 16), and
// of qh[j] element 240 + 4n + j.
struct block_tq1_0 { uint8_t qs[48]; uint8_t qh[4]; half_bits d; };  // x = (t - 1) * d
// TQ2_0: 256 elements; byte 32c + m of qs holds element 128c + 32l + m at bit 2l (codes 0..2 are
// ternary; 3, never written, reads as 2d as in ggml).
struct block_tq2_0 { uint8_t qs[QK_K / 4]; half_bits d; };  // x = (q - 1) * d
// Q1_0: 128 elements; bit j%8 of qs[j/8] is element j's sign.
struct block_q1_0 { half_bits d; uint8_t qs[16]; };  // x = bit ? d : -d
// Q2_0: 64 elements; element j at bit 2(j%4) of qs[j/4].
struct block_q2_0 { half_bits d; uint8_t qs[16]; };  // x = (q - 1) * d, q in 0..3
static_assert(sizeof(block_tq1_0) == 54, "TQ1_0 block is 54 bytes");
static_assert(sizeof(block_tq2_0) == 66, "TQ2_0 block is 66 bytes");
static_assert(sizeof(block_q1_0) == 18, "Q1_0 block is 18 bytes");
static_assert(sizeof(block_q2_0) == 18, "Q2_0 block is 18 bytes");

// ---- INTb-gG: uniform asymmetric, one block per G consecutive inputs of one output row ----
// x = d * q + m, q in [0, 2^b - 1], d and m fp16.  Layout, per block:
//   d, m, then (b in {3,5,6}) the high-bit plane, then the low-bit plane.
//   low plane of 4 bits (b = 4, 5, 6): per 32-element chunk c, 16 bytes; byte j holds element
//     32c+j (low nibble) and 32c+j+16 (high nibble)  -- Q4_1's order, so INT4-g32 == Q4_1.
//   low plane of 2 bits (b = 2, 3): per 32-element chunk c, 8 bytes; byte j holds element
//     32c+j+8s at bit shift 2s, s = 0..3.
//   high plane of 1 bit (b = 3, 5): bit e of the plane (byte e/8, bit e%8) is the top bit of
//     element e -- Q5_1's qh, so INT5-g32 == Q5_1.
//   high plane of 2 bits (b = 6): 2-bit plane order as above; holds bits 4..5.
//   b = 8: G bytes, q = byte.
template <int B, int G>
struct block_int {
  static constexpr int high_bits = (B == 3 || B == 5) ? 1 : (B == 6 ? 2 : 0);
  static constexpr int low_bits = B - high_bits;
  half_bits d, m;
  uint8_t planes[G * B / 8];  // high plane (G*high_bits/8 bytes) then low plane (G*low_bits/8 bytes)
};
static_assert(sizeof(block_int<4, 32>) == sizeof(block_q4_1), "INT4-g32 is Q4_1");
static_assert(sizeof(block_int<5, 32>) == sizeof(block_q5_1), "INT5-g32 is Q5_1");
static_assert(sizeof(block_int<2, 64>) == 4 + 16, "INT2-g64 block is 20 bytes");
static_assert(sizeof(block_int<3, 128>) == 4 + 48, "INT3-g128 block is 52 bytes");
static_assert(sizeof(block_int<8, 32>) == 4 + 32, "INT8-g32 block is 36 bytes");

// ---- Type ids ---------------------------------------------------------------------------------
// GGUF's ggml_type ids for GGUF types; INTb-gG ids are lowtune's own (never written to a GGUF
// file as such): 1000 + 10*b + {0: g32, 1: g64, 2: g128}.
enum QType : int {
  T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
  T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14,
  T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ3_XXS = 18, T_IQ1_S = 19, T_IQ4_NL = 20, T_IQ3_S = 21, T_IQ2_S = 22,
  T_IQ4_XS = 23, T_IQ1_M = 29, T_BF16 = 30, T_TQ1_0 = 34, T_TQ2_0 = 35, T_MXFP4 = 39, T_NVFP4 = 40,
  T_Q1_0 = 41, T_Q2_0 = 42,
};
constexpr int int_type_id(int bits, int group) {
  return 1000 + 10 * bits + (group == 32 ? 0 : group == 64 ? 1 : 2);
}
constexpr int int_type_bits(int id) { return (id - 1000) / 10; }
constexpr int int_type_group(int id) { return 32 << ((id - 1000) % 10); }

// ---- The type list ------------------------------------------------------------------------------
// Every quantized type, once. LT_TYPES(X) expands X(id) for each: the one switch over types
// (dispatch_qtype in block_math.h), the quantizer declarations (quantize.h), the INTb-gG
// specializations of every per-type layer (LT_TYPES_INT) and the CUDA kernels' explicit
// instantiations all expand these lists. A new type is a line here plus its per-type layers:
// struct above, Traits<T> (block_math.h), Unpack<T> (cuda/unpack.cuh), quantize_row<T>.
// The groups are the units the CUDA kernels compile in (one cuda/inst_*.cu each, in parallel).
#define LT_TYPES_LEGACY(X) X(T_Q4_0) X(T_Q4_1) X(T_Q5_0) X(T_Q5_1) X(T_Q8_0)
#define LT_TYPES_KQUANTS(X) X(T_Q2_K) X(T_Q3_K) X(T_Q4_K) X(T_Q5_K) X(T_Q6_K)
#define LT_TYPES_IQ43(X) X(T_IQ4_NL) X(T_IQ4_XS) X(T_IQ3_XXS) X(T_IQ3_S)
#define LT_TYPES_IQ21(X) X(T_IQ2_XXS) X(T_IQ2_XS) X(T_IQ2_S) X(T_IQ1_S) X(T_IQ1_M)
#define LT_TYPES_MX(X) X(T_MXFP4) X(T_NVFP4)
#define LT_TYPES_LOWBIT(X) X(T_TQ1_0) X(T_TQ2_0) X(T_Q1_0) X(T_Q2_0)
#define LT_INT_GROUPS(X, B) X(int_type_id(B, 32)) X(int_type_id(B, 64)) X(int_type_id(B, 128))
#define LT_TYPES_INT23(X) LT_INT_GROUPS(X, 2) LT_INT_GROUPS(X, 3)
#define LT_TYPES_INT45(X) LT_INT_GROUPS(X, 4) LT_INT_GROUPS(X, 5)
#define LT_TYPES_INT68(X) LT_INT_GROUPS(X, 6) LT_INT_GROUPS(X, 8)
#define LT_TYPES_INT(X) LT_TYPES_INT23(X) LT_TYPES_INT45(X) LT_TYPES_INT68(X)
#define LT_TYPES(X) \
  LT_TYPES_LEGACY(X) LT_TYPES_KQUANTS(X) LT_TYPES_IQ43(X) LT_TYPES_IQ21(X) LT_TYPES_MX(X) LT_TYPES_LOWBIT(X) \
  LT_TYPES_INT(X)

// Activation dtypes accepted by the kernels.
enum DType : int { D_F32 = 0, D_F16 = 1, D_BF16 = 2 };

}  // namespace lowtune
