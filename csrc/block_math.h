// Per-block dequantization, one function per type, written from ggml's reference
// (ggml-quants.c dequantize_row_*). Shared by the CPU kernels and the CUDA kernels: the CUDA
// code may unpack differently for speed but must agree with these to the bit.
//
// Each Traits<T> gives: block (the struct), kElems (elements per block), and
// dequant(const block*, float* y) writing kElems floats in logical order.
#pragma once
#include "blocks.h"
#include "fp16.h"

namespace lowtune {

template <int T> struct Traits;

// ---- legacy -------------------------------------------------------------------------------
template <> struct Traits<T_Q4_0> {
  using block = block_q4_0; static constexpr int kElems = QK;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int j = 0; j < QK / 2; ++j) {
      y[j] = (float)((b->qs[j] & 0x0F) - 8) * d;
      y[j + QK / 2] = (float)((b->qs[j] >> 4) - 8) * d;
    }
  }
};

template <> struct Traits<T_Q4_1> {
  using block = block_q4_1; static constexpr int kElems = QK;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d), m = fp16_to_fp32(b->m);
    for (int j = 0; j < QK / 2; ++j) {
      y[j] = (float)(b->qs[j] & 0x0F) * d + m;
      y[j + QK / 2] = (float)(b->qs[j] >> 4) * d + m;
    }
  }
};

LT_HD uint32_t load_u32_le(const uint8_t* p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

template <> struct Traits<T_Q5_0> {
  using block = block_q5_0; static constexpr int kElems = QK;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    const uint32_t qh = load_u32_le(b->qh);
    for (int j = 0; j < QK / 2; ++j) {
      const int h0 = ((qh >> j) << 4) & 0x10;
      const int h1 = (qh >> (j + 12)) & 0x10;
      y[j] = (float)(((b->qs[j] & 0x0F) | h0) - 16) * d;
      y[j + QK / 2] = (float)(((b->qs[j] >> 4) | h1) - 16) * d;
    }
  }
};

template <> struct Traits<T_Q5_1> {
  using block = block_q5_1; static constexpr int kElems = QK;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d), m = fp16_to_fp32(b->m);
    const uint32_t qh = load_u32_le(b->qh);
    for (int j = 0; j < QK / 2; ++j) {
      const int h0 = ((qh >> j) << 4) & 0x10;
      const int h1 = (qh >> (j + 12)) & 0x10;
      y[j] = (float)((b->qs[j] & 0x0F) | h0) * d + m;
      y[j + QK / 2] = (float)((b->qs[j] >> 4) | h1) * d + m;
    }
  }
};

template <> struct Traits<T_Q8_0> {
  using block = block_q8_0; static constexpr int kElems = QK;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int j = 0; j < QK; ++j) y[j] = (float)b->qs[j] * d;
  }
};

// ---- K-types --------------------------------------------------------------------------------
template <> struct Traits<T_Q2_K> {
  using block = block_q2_K; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d), dmin = fp16_to_fp32(b->dmin);
    const uint8_t* q = b->qs;
    int is = 0;
    for (int n = 0; n < QK_K; n += 128) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int half = 0; half < 2; ++half) {
          const uint8_t sc = b->scales[is++];
          const float dl = d * (float)(sc & 0xF), ml = dmin * (float)(sc >> 4);
          for (int l = 0; l < 16; ++l) *y++ = dl * (float)((q[l + 16 * half] >> shift) & 3) - ml;
        }
      }
      q += 32;
    }
  }
};

// Q3_K's 16 six-bit scales: low 4 bits in bytes 0..7, high 2 bits in bytes 8..11.
LT_HD void q3_K_scales(const uint8_t* s, int8_t* out) {
  for (int i = 0; i < 16; ++i) {
    const int low = (i < 8) ? (s[i] & 0xF) : (s[i - 8] >> 4);
    const int high = (s[8 + (i % 4)] >> (2 * (i / 4))) & 3;
    out[i] = (int8_t)((low | (high << 4)) - 32);
  }
}

template <> struct Traits<T_Q3_K> {
  using block = block_q3_K; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d_all = fp16_to_fp32(b->d);
    int8_t sc[16];
    q3_K_scales(b->scales, sc);
    const uint8_t* q = b->qs;
    uint8_t m = 1;
    int is = 0;
    for (int n = 0; n < QK_K; n += 128) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int half = 0; half < 2; ++half) {
          const float dl = d_all * (float)sc[is++];
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int v = ((q[l] >> shift) & 3) - ((b->hmask[l] & m) ? 0 : 4);
            *y++ = dl * (float)v;
          }
        }
        m <<= 1;
      }
      q += 32;
    }
  }
};

// Q4_K / Q5_K: scale and min of sub-block j (0..7), 6 bits each, from the 12 packed bytes.
LT_HD void get_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  if (j < 4) {
    *sc = q[j] & 63; *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

template <> struct Traits<T_Q4_K> {
  using block = block_q4_K; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d), dmin = fp16_to_fp32(b->dmin);
    const uint8_t* q = b->qs;
    for (int is = 0; is < 8; is += 2) {
      uint8_t sc, mn;
      get_scale_min_k4(is, b->scales, &sc, &mn);
      const float d1 = d * sc, m1 = dmin * mn;
      get_scale_min_k4(is + 1, b->scales, &sc, &mn);
      const float d2 = d * sc, m2 = dmin * mn;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (float)(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (float)(q[l] >> 4) - m2;
      q += 32;
    }
  }
};

template <> struct Traits<T_Q5_K> {
  using block = block_q5_K; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d), dmin = fp16_to_fp32(b->dmin);
    const uint8_t* ql = b->qs;
    uint8_t u1 = 1, u2 = 2;
    for (int is = 0; is < 8; is += 2) {
      uint8_t sc, mn;
      get_scale_min_k4(is, b->scales, &sc, &mn);
      const float d1 = d * sc, m1 = dmin * mn;
      get_scale_min_k4(is + 1, b->scales, &sc, &mn);
      const float d2 = d * sc, m2 = dmin * mn;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (float)((ql[l] & 0xF) + ((b->qh[l] & u1) ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (float)((ql[l] >> 4) + ((b->qh[l] & u2) ? 16 : 0)) - m2;
      ql += 32; u1 <<= 2; u2 <<= 2;
    }
  }
};

template <> struct Traits<T_Q6_K> {
  using block = block_q6_K; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    const uint8_t* ql = b->ql;
    const uint8_t* qh = b->qh;
    const int8_t* sc = b->scales;
    for (int n = 0; n < QK_K; n += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * (float)sc[is + 0] * (float)q1;
        y[l + 32] = d * (float)sc[is + 2] * (float)q2;
        y[l + 64] = d * (float)sc[is + 4] * (float)q3;
        y[l + 96] = d * (float)sc[is + 6] * (float)q4;
      }
      y += 128; ql += 64; qh += 32; sc += 8;
    }
  }
};

// ---- INTb-gG ----------------------------------------------------------------------------------
// Code of element e (0 <= e < G) of an INTb-gG block; see the layout in blocks.h.
template <int B, int G>
LT_HD int int_code(const block_int<B, G>* b, int e) {
  using blk = block_int<B, G>;
  const uint8_t* high = b->planes;
  const uint8_t* low = b->planes + G * blk::high_bits / 8;
  const int c = e / 32, j = e % 32;
  int q;
  if (blk::low_bits == 8) {
    q = low[e];
  } else if (blk::low_bits == 4) {
    const uint8_t byte = low[16 * c + (j % 16)];
    q = (j < 16) ? (byte & 0xF) : (byte >> 4);
  } else {  // 2-bit low plane
    q = (low[8 * c + (j % 8)] >> (2 * (j / 8))) & 3;
  }
  if (blk::high_bits == 1) {
    q |= ((high[e / 8] >> (e % 8)) & 1) << blk::low_bits;
  } else if (blk::high_bits == 2) {
    q |= ((high[8 * c + (j % 8)] >> (2 * (j / 8))) & 3) << blk::low_bits;
  }
  return q;
}

template <int B, int G>
struct IntTraits {
  using block = block_int<B, G>; static constexpr int kElems = G;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d), m = fp16_to_fp32(b->m);
    for (int e = 0; e < G; ++e) y[e] = (float)int_code<B, G>(b, e) * d + m;
  }
};

#define LT_INT_TRAITS(T) \
  template <> struct Traits<T> : IntTraits<int_type_bits(T), int_type_group(T)> {};
LT_TYPES_INT(LT_INT_TRAITS)
#undef LT_INT_TRAITS

// Calls f.template operator()<T>() with the compile-time type id matching `qtype`;
// returns false for an unknown id. The one switch over types in the C++ code.
template <class F>
bool dispatch_qtype(int qtype, F&& f) {
  switch (qtype) {
#define LT_CASE(T) case T: f.template operator()<T>(); return true;
    LT_TYPES(LT_CASE)
#undef LT_CASE
    default: return false;
  }
}

}  // namespace lowtune
