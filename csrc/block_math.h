// Per-block dequantization, one function per type, written from ggml's reference
// (ggml-quants.c dequantize_row_*). Shared by the CPU kernels and the CUDA kernels: the CUDA
// code may unpack differently for speed but must agree with these to the bit.
//
// Each Traits<T> gives: block (the struct), kElems (elements per block), and
// dequant(const block*, float* y) writing kElems floats in logical order.
#pragma once
#include "blocks.h"
#include "fp16.h"
#include "iq_grids.h"

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

// ---- I-quants ----------------------------------------------------------------------------------
// Each grid element times its sign, as ggml: (scale * grid) * ±1, the sign flip exact.
LT_HD float iq_sign(uint8_t signs, int j) { return (signs >> j) & 1 ? -1.0f : 1.0f; }
LT_HD uint8_t byte_at(uint64_t v, int j) { return (uint8_t)(v >> (8 * j)); }

template <> struct Traits<T_IQ4_NL> {
  using block = block_iq4_nl; static constexpr int kElems = QK;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int j = 0; j < QK / 2; ++j) {
      y[j] = d * (float)kvalues_iq4nl(b->qs[j] & 0xF);
      y[j + QK / 2] = d * (float)kvalues_iq4nl(b->qs[j] >> 4);
    }
  }
};

template <> struct Traits<T_IQ4_XS> {
  using block = block_iq4_xs; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const int ls = ((b->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((b->scales_h >> (2 * ib)) & 3) << 4);
      const float dl = d * (float)(ls - 32);
      const uint8_t* qs = b->qs + 16 * ib;
      for (int j = 0; j < 16; ++j) {
        y[32 * ib + j] = dl * (float)kvalues_iq4nl(qs[j] & 0xF);
        y[32 * ib + j + 16] = dl * (float)kvalues_iq4nl(qs[j] >> 4);
      }
    }
  }
};

template <> struct Traits<T_IQ3_XXS> {
  using block = block_iq3_xxs; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const uint8_t* qs = b->qs + 8 * ib;
      const uint32_t aux = load_u32_le(b->qs + QK_K / 4 + 4 * ib);
      const float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l) {
        const uint8_t signs = ksigns_iq2xs((aux >> (7 * l)) & 127);
        const uint32_t g1 = iq3xxs_grid(qs[2 * l]), g2 = iq3xxs_grid(qs[2 * l + 1]);
        for (int j = 0; j < 4; ++j) {
          y[8 * l + j] = db * (float)byte_at(g1, j) * iq_sign(signs, j);
          y[8 * l + j + 4] = db * (float)byte_at(g2, j) * iq_sign(signs, j + 4);
        }
      }
      y += 32;
    }
  }
};

template <> struct Traits<T_IQ3_S> {
  using block = block_iq3_s; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const float db = d * (float)(1 + 2 * ((b->scales[ib / 2] >> (4 * (ib % 2))) & 0xF));
      const uint8_t* qs = b->qs + 8 * ib;
      const uint8_t* signs = b->signs + 4 * ib;
      const int qh = b->qh[ib];
      for (int l = 0; l < 4; ++l) {
        const uint32_t g1 = iq3s_grid(qs[2 * l] | ((qh << (8 - 2 * l)) & 256));
        const uint32_t g2 = iq3s_grid(qs[2 * l + 1] | ((qh << (7 - 2 * l)) & 256));
        for (int j = 0; j < 4; ++j) {
          y[8 * l + j] = db * (float)byte_at(g1, j) * iq_sign(signs[l], j);
          y[8 * l + j + 4] = db * (float)byte_at(g2, j) * iq_sign(signs[l], j + 4);
        }
      }
      y += 32;
    }
  }
};

template <> struct Traits<T_IQ2_XXS> {
  using block = block_iq2_xxs; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    const uint8_t* q = reinterpret_cast<const uint8_t*>(b->qs);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const uint32_t aux = load_u32_le(q + 8 * ib + 4);
      const float db = d * (0.5f + (float)(aux >> 28)) * 0.25f;
      for (int l = 0; l < 4; ++l) {
        const uint64_t g = iq2xxs_grid(q[8 * ib + l]);
        const uint8_t signs = ksigns_iq2xs((aux >> (7 * l)) & 127);
        for (int j = 0; j < 8; ++j) y[8 * l + j] = db * (float)byte_at(g, j) * iq_sign(signs, j);
      }
      y += 32;
    }
  }
};

template <> struct Traits<T_IQ2_XS> {
  using block = block_iq2_xs; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const float db[2] = {d * (0.5f + (float)(b->scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + (float)(b->scales[ib] >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l) {
        const uint16_t q = b->qs[4 * ib + l];
        const uint64_t g = iq2xs_grid(q & 511);
        const uint8_t signs = ksigns_iq2xs(q >> 9);
        for (int j = 0; j < 8; ++j) y[8 * l + j] = db[l / 2] * (float)byte_at(g, j) * iq_sign(signs, j);
      }
      y += 32;
    }
  }
};

template <> struct Traits<T_IQ2_S> {
  using block = block_iq2_s; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const float db[2] = {d * (0.5f + (float)(b->scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + (float)(b->scales[ib] >> 4)) * 0.25f};
      const uint8_t* qs = b->qs + 4 * ib;
      const uint8_t* signs = b->qs + QK_K / 8 + 4 * ib;
      for (int l = 0; l < 4; ++l) {
        const uint64_t g = iq2s_grid(qs[l] | ((b->qh[ib] << (8 - 2 * l)) & 0x300));
        for (int j = 0; j < 8; ++j) y[8 * l + j] = db[l / 2] * (float)byte_at(g, j) * iq_sign(signs[l], j);
      }
      y += 32;
    }
  }
};

// IQ1 grid values are int8 (-1, 0, 1): byte j of the entry as signed.
LT_HD float iq1_value(uint64_t g, int j) { return (float)(int8_t)byte_at(g, j); }
constexpr float kIq1Delta = 0.125f;

template <> struct Traits<T_IQ1_S> {
  using block = block_iq1_s; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const int qh = b->qh[ib];
      const float dl = d * (float)(2 * ((qh >> 12) & 7) + 1);
      const float delta = (qh & 0x8000) ? -kIq1Delta : kIq1Delta;
      for (int l = 0; l < 4; ++l) {
        const uint64_t g = iq1s_grid(b->qs[4 * ib + l] | (((qh >> (3 * l)) & 7) << 8));
        for (int j = 0; j < 8; ++j) y[8 * l + j] = dl * (iq1_value(g, j) + delta);
      }
      y += 32;
    }
  }
};

// IQ1_M's fp16 d: the top nibble of each of its four scale words, lowest word first.
LT_HD uint16_t iq1m_d_bits(const block_iq1_m* b) {
  uint16_t sc[4];
  for (int i = 0; i < 4; ++i) sc[i] = (uint16_t)(b->scales[2 * i] | (b->scales[2 * i + 1] << 8));
  return (uint16_t)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000));
}

template <> struct Traits<T_IQ1_M> {
  using block = block_iq1_m; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(iq1m_d_bits(b));
    for (int ib = 0; ib < QK_K / 32; ++ib) {
      const int sc = b->scales[2 * (ib / 2)] | (b->scales[2 * (ib / 2) + 1] << 8);
      const float dl[2] = {d * (float)(2 * ((sc >> (6 * (ib % 2))) & 7) + 1),
                           d * (float)(2 * ((sc >> (6 * (ib % 2) + 3)) & 7) + 1)};
      const uint8_t* qs = b->qs + 4 * ib;
      const uint8_t* qh = b->qh + 2 * ib;
      for (int l = 0; l < 4; ++l) {
        const int h = qh[l / 2] >> (4 * (l % 2));  // index bits 8-10, then the delta sign
        const uint64_t g = iq1s_grid(qs[l] | ((h & 7) << 8));
        const float delta = (h & 8) ? -kIq1Delta : kIq1Delta;
        for (int j = 0; j < 8; ++j) y[8 * l + j] = dl[l / 2] * (iq1_value(g, j) + delta);
      }
      y += 32;
    }
  }
};

// ---- MXFP4 ----------------------------------------------------------------------------------------
// IQ4_NL's nibble layout with E2M1 levels and a power-of-two scale: one product per value, exact
// (subnormals included) up to overflow, which only e >= 253 reaches.
template <> struct Traits<T_MXFP4> {
  using block = block_mxfp4; static constexpr int kElems = QK;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = e8m0_to_fp32_half(b->e);
    for (int j = 0; j < QK / 2; ++j) {
      y[j] = (float)kvalues_mxfp4(b->qs[j] & 0xF) * d;
      y[j + QK / 2] = (float)kvalues_mxfp4(b->qs[j] >> 4) * d;
    }
  }
};

// ---- NVFP4 ----------------------------------------------------------------------------------------
// MXFP4's levels, a UE4M3 scale per 16 elements; within a sub-block, byte j holds elements j and j + 8.
template <> struct Traits<T_NVFP4> {
  using block = block_nvfp4; static constexpr int kElems = 64;
  LT_HD static void dequant(const block* b, float* y) {
    for (int s = 0; s < 4; ++s) {
      const float d = ue4m3_to_fp32_half(b->d[s]);
      for (int j = 0; j < 8; ++j) {
        y[16 * s + j] = (float)kvalues_mxfp4(b->qs[8 * s + j] & 0xF) * d;
        y[16 * s + j + 8] = (float)kvalues_mxfp4(b->qs[8 * s + j] >> 4) * d;
      }
    }
  }
};

// ---- TQ1_0, TQ2_0, Q1_0, Q2_0 ----------------------------------------------------------------------
// One fp16 scale times a small integer, (float)(code - 1) * d as ggml writes it (Q1_0: ±d).
// Digit n (0 the most significant) of a TQ1_0 byte holding base-3 digits as a fraction of 256.
LT_HD int tq1_digit(uint8_t q, int n) {
  const uint8_t shifted = (uint8_t)(q * (uint8_t)(0x00F3511B090301ull >> (8 * n)));  // q * 3^n mod 256
  return ((int)shifted * 3) >> 8;
}

template <> struct Traits<T_TQ1_0> {
  using block = block_tq1_0; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int n = 0; n < 5; ++n)
      for (int m = 0; m < 32; ++m) y[32 * n + m] = (float)(tq1_digit(b->qs[m], n) - 1) * d;
    for (int n = 0; n < 5; ++n)
      for (int m = 0; m < 16; ++m) y[160 + 16 * n + m] = (float)(tq1_digit(b->qs[32 + m], n) - 1) * d;
    for (int n = 0; n < 4; ++n)
      for (int j = 0; j < 4; ++j) y[240 + 4 * n + j] = (float)(tq1_digit(b->qh[j], n) - 1) * d;
  }
};

template <> struct Traits<T_TQ2_0> {
  using block = block_tq2_0; static constexpr int kElems = QK_K;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int c = 0; c < 2; ++c)
      for (int l = 0; l < 4; ++l)
        for (int m = 0; m < 32; ++m) y[128 * c + 32 * l + m] = (float)(((b->qs[32 * c + m] >> (2 * l)) & 3) - 1) * d;
  }
};

template <> struct Traits<T_Q1_0> {
  using block = block_q1_0; static constexpr int kElems = 128;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d), neg_d = -d;
    for (int j = 0; j < 128; ++j) y[j] = (b->qs[j / 8] >> (j % 8)) & 1 ? d : neg_d;
  }
};

template <> struct Traits<T_Q2_0> {
  using block = block_q2_0; static constexpr int kElems = 64;
  LT_HD static void dequant(const block* b, float* y) {
    const float d = fp16_to_fp32(b->d);
    for (int j = 0; j < 64; ++j) y[j] = (float)(((b->qs[j / 4] >> (2 * (j % 4))) & 3) - 1) * d;
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
