// K-type quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): ggml's reference algorithms
// (quantize_row_q*_K_ref in ggml-quants.c, no importance matrix), so the bytes equal what
// llama.cpp writes for the same floats.
//
// Byte identity rests on float details kept here on purpose:
//   * every sum is a float accumulated left to right, in ggml's element order;
//   * products are grouped as ggml's C groups them ((w*x)*l, not w*(x*l)), and int
//     operands are converted to float first, as C does;
//   * the build uses -ffp-contract=off, so no multiply-add is fused behind our back;
//   * rounding is nearest_int's magic-number trick (round half to even);
//   * the final pass that picks each q divides by the fp16-rounded super-block scales.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../blocks.h"
#include "../fp16.h"
#include "../quantize.h"

namespace lowtune {
namespace {

constexpr float kGroupMaxEps = 1e-15f;  // a group whose largest |x| is below this is all zero

// Round to nearest, ties to even, for |f| < 2^22: adding 1.5*2^23 pushes the integer part into
// the low mantissa bits. Outside that range ggml gets garbage from the same bits; so do we.
inline int nearest_int(float f) {
  const float v = f + 12582912.0f;
  int32_t i;
  std::memcpy(&i, &v, sizeof i);
  return (i & 0x007fffff) - 0x00400000;
}

inline int clampi(int v, int lo, int hi) { return std::max(lo, std::min(hi, v)); }

// ggml's make_qkx2_quants: fit x ≈ scale·L + min with min <= 0 and L in [0, nmax]. Starts from
// the min-max fit, then tries nstep+1 scales (rmin + rdelta·is + nmax)/(max - min), solving the
// weighted least-squares scale and min for each rounding, and keeps the one with the least
// weighted error (|err| when mad, err² otherwise). Returns the scale; *neg_min = -min.
float fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                    float rmin, float rdelta, int nstep, bool mad) {
  float mn = x[0], mx = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < mn) mn = x[i];
    if (x[i] > mx) mx = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (mn > 0) mn = 0;
  if (mx == mn) {
    std::fill(L, L + n, 0);
    *neg_min = -mn;
    return 0.0f;
  }
  float iscale = (float)nmax / (mx - mn);
  float scale = 1.0f / iscale;
  float best_err = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = (uint8_t)clampi(nearest_int(iscale * (x[i] - mn)), 0, nmax);
    float diff = scale * (float)L[i] + mn - x[i];
    diff = mad ? std::fabs(diff) : diff * diff;
    best_err += w[i] * diff;
  }
  uint8_t Laux[32];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * (float)is + (float)nmax) / (mx - mn);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest_int(iscale * (x[i] - mn)), 0, nmax);
      Laux[i] = (uint8_t)l;
      const float fl = (float)l;
      sum_l += w[i] * fl;
      sum_l2 += w[i] * fl * fl;
      sum_xl += w[i] * fl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (!(D > 0)) continue;
    float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    if (this_min > 0) {  // a positive min is not representable: refit the scale alone
      this_min = 0;
      this_scale = sum_xl / sum_l2;
    }
    float err = 0;
    for (int i = 0; i < n; ++i) {
      float diff = this_scale * (float)Laux[i] + this_min - x[i];
      diff = mad ? std::fabs(diff) : diff * diff;
      err += w[i] * diff;
    }
    if (err < best_err) {
      std::copy(Laux, Laux + n, L);
      best_err = err;
      scale = this_scale;
      mn = this_min;
    }
  }
  *neg_min = -mn;
  return scale;
}

// ggml's make_qx_quants with rmse_type 1 and no importance weights: symmetric fit x ≈ scale·l,
// l in [-nmax, nmax-1], weights x². Tries the 19 scales -(nmax + 0.1·is)/max, is in [-9, 9],
// keeping the one with the largest (Σwxl)²/Σwl². Writes L = l + nmax; returns the scale.
float fit_symmetric(int n, int nmax, const float* x, int8_t* L) {
  const float mx = signed_absmax(x, n);
  if (std::fabs(mx) < kGroupMaxEps) {
    std::fill(L, L + n, 0);
    return 0.0f;
  }
  float iscale = (float)(-nmax) / mx;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
    L[i] = (int8_t)(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * (float)l;
    suml2 += w * (float)l * (float)l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -((float)nmax + 0.1f * (float)is) / mx;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * (float)l;
      suml2 += w * (float)l * (float)l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = (int8_t)(nmax + clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// ggml's make_q3_quants with do_rmse: symmetric fit like fit_symmetric, but from the single
// start -nmax/max it then moves one l at a time to the value that the current least-squares
// scale prefers, keeping a move only when it raises (Σwxl)²/Σwl² (weights x²); at most five
// sweeps, in element order. Writes L = l + nmax; returns Σwxl/Σwl².
float fit_symmetric_iterative(int n, int nmax, const float* x, int8_t* L) {
  const float mx = signed_absmax(x, n);
  if (std::fabs(mx) < kGroupMaxEps) {
    std::fill(L, L + n, 0);
    return 0.0f;
  }
  const float iscale = (float)(-nmax) / mx;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
    L[i] = (int8_t)l;
    const float w = x[i] * x[i];
    sumlx += w * x[i] * (float)l;
    suml2 += w * (float)l * (float)l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * (float)L[i];
      if (!(slx > 0)) continue;
      float sl2 = suml2 - w * (float)L[i] * (float)L[i];
      const int new_l = clampi(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
      if (new_l == L[i]) continue;
      slx += w * x[i] * (float)new_l;
      sl2 += w * (float)new_l * (float)new_l;
      if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = (int8_t)new_l;
        sumlx = slx;
        suml2 = sl2;
        ++n_changed;
      }
    }
    if (!n_changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins in 12 bytes. Sub-blocks 0-3 keep both in
// bytes 0-7; sub-blocks 4-7 keep their low nibbles in bytes 8-11 and their top two bits in the
// spare top bits of bytes 0-7.
void pack_scale_min_k4(const uint8_t* ls, const uint8_t* lm, uint8_t* q) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      q[j] = ls[j];
      q[j + 4] = lm[j];
    } else {
      q[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
      q[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
      q[j] |= (uint8_t)((lm[j] >> 4) << 6);
    }
  }
}

void unpack_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q2_K and Q3_K: four 2-bit values per byte; per 128 elements, byte l holds elements
// l, l+32, l+64, l+96 at shifts 0, 2, 4, 6.
template <class Int>
void pack_2bit(const Int* L, uint8_t* qs) {
  for (int j = 0; j < QK_K; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

// Q4_K and Q5_K share everything but the number of levels and the search grid.
template <int NMAX>
void fit_k4_superblock(const float* x, uint8_t* scales12, half_bits* d_out, half_bits* dmin_out,
                       uint8_t* L, float rmin, float rdelta, int nstep) {
  float scales[QK_K / 32], mins[QK_K / 32], weights[32];
  float max_scale = 0, max_min = 0;  // the min is subtracted, so scales are never negative
  for (int j = 0; j < QK_K / 32; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32.0f);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_min(32, NMAX, xs, weights, L + 32 * j, &mins[j], rmin, rdelta, nstep, false);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
  uint8_t ls[8], lm[8];
  for (int j = 0; j < QK_K / 32; ++j) {
    ls[j] = std::min<uint8_t>(63, (uint8_t)nearest_int(inv_scale * scales[j]));
    lm[j] = std::min<uint8_t>(63, (uint8_t)nearest_int(inv_min * mins[j]));
  }
  pack_scale_min_k4(ls, lm, scales12);
  *d_out = fp32_to_fp16(max_scale / 63.0f);
  *dmin_out = fp32_to_fp16(max_min / 63.0f);

  // Final pass against the stored (fp16, 6-bit) scales; a zero scale keeps the fitted L.
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t sc, m;
    unpack_scale_min_k4(j, scales12, &sc, &m);
    const float d = fp16_to_fp32(*d_out) * (float)sc;
    if (!d) continue;
    const float dm = fp16_to_fp32(*dmin_out) * (float)m;
    for (int ii = 0; ii < 32; ++ii)
      L[32 * j + ii] = (uint8_t)clampi(nearest_int((x[32 * j + ii] + dm) / d), 0, NMAX);
  }
}

}  // namespace

template <> void quantize_row<T_Q2_K>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q2_K*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    uint8_t L[QK_K];
    float scales[QK_K / 16], mins[QK_K / 16], weights[16];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] = fit_scale_min(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    // 4-bit scales and mins relative to the largest of each (the byte keeps the low 8 bits of
    // the int, as C's conversion does).
    if (max_scale > 0) {
      const float iscale = 15.0f / max_scale;
      for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] = (uint8_t)nearest_int(iscale * scales[j]);
      y[i].d = fp32_to_fp16(max_scale / 15.0f);
    } else {
      std::fill(y[i].scales, y[i].scales + QK_K / 16, 0);
      y[i].d = fp32_to_fp16(0.0f);
    }
    if (max_min > 0) {
      const float iscale = 15.0f / max_min;
      for (int j = 0; j < QK_K / 16; ++j) y[i].scales[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
      y[i].dmin = fp32_to_fp16(max_min / 15.0f);
    } else {
      y[i].dmin = fp32_to_fp16(0.0f);
    }
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = fp16_to_fp32(y[i].d) * (float)(y[i].scales[j] & 0xF);
      if (!d) continue;
      const float dm = fp16_to_fp32(y[i].dmin) * (float)(y[i].scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii)
        L[16 * j + ii] = (uint8_t)clampi(nearest_int((x[16 * j + ii] + dm) / d), 0, 3);
    }
    pack_2bit(L, y[i].qs);
  }
}

template <> void quantize_row<T_Q3_K>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q3_K*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int j = 0; j < QK_K / 16; ++j) scales[j] = fit_symmetric_iterative(16, 4, x + 16 * j, L + 16 * j);
    const float max_scale = signed_absmax(scales, QK_K / 16);
    // Signed 6-bit scales, stored +32: low nibbles in bytes 0-7 (sub-blocks 0-7 low nibble,
    // 8-15 high nibble), top two bits of sub-block j at bits 2*(j/4) of byte 8 + j%4.
    std::memset(y[i].scales, 0, sizeof y[i].scales);
    if (max_scale) {
      const float iscale = -32.0f / max_scale;
      for (int j = 0; j < QK_K / 16; ++j) {
        int8_t l = (int8_t)nearest_int(iscale * scales[j]);
        l = (int8_t)(std::max<int8_t>(-32, std::min<int8_t>(31, l)) + 32);
        if (j < 8) y[i].scales[j] = l & 0xF;
        else y[i].scales[j - 8] |= (uint8_t)((l & 0xF) << 4);
        l >>= 4;
        y[i].scales[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
      }
      y[i].d = fp32_to_fp16(1.0f / iscale);
    } else {
      y[i].d = fp32_to_fp16(0.0f);
    }
    for (int j = 0; j < QK_K / 16; ++j) {
      int8_t sc = j < 8 ? (y[i].scales[j] & 0xF) : (y[i].scales[j - 8] >> 4);
      sc = (int8_t)((sc | (((y[i].scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
      const float d = fp16_to_fp32(y[i].d) * (float)sc;
      if (!d) continue;
      for (int ii = 0; ii < 16; ++ii)
        L[16 * j + ii] = (int8_t)(clampi(nearest_int(x[16 * j + ii] / d), -4, 3) + 4);
    }
    // The third bit of element j lives in hmask byte j%32, bit j/32; a set bit means "no -4".
    std::memset(y[i].hmask, 0, sizeof y[i].hmask);
    for (int j = 0; j < QK_K; ++j) {
      if (L[j] > 3) {
        y[i].hmask[j % 32] |= (uint8_t)(1 << (j / 32));
        L[j] -= 4;
      }
    }
    pack_2bit(L, y[i].qs);
  }
}

template <> void quantize_row<T_Q4_K>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q4_K*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    uint8_t L[QK_K];
    fit_k4_superblock<15>(x, y[i].scales, &y[i].d, &y[i].dmin, L, -1.0f, 0.1f, 20);
    // Per 64 elements, 32 bytes: low nibble = first 32, high nibble = next 32.
    for (int j = 0; j < QK_K; j += 64)
      for (int l = 0; l < 32; ++l) y[i].qs[j / 2 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
  }
}

template <> void quantize_row<T_Q5_K>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q5_K*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    uint8_t L[QK_K];
    fit_k4_superblock<31>(x, y[i].scales, &y[i].d, &y[i].dmin, L, -0.5f, 0.1f, 15);
    // Low nibbles as Q4_K; the fifth bit of element n+l (64-chunk n/64 = c) is bit 2c of qh[l]
    // for the first 32 of the chunk and bit 2c+1 for the next 32.
    std::memset(y[i].qh, 0, sizeof y[i].qh);
    for (int n = 0, c = 0; n < QK_K; n += 64, ++c) {
      for (int l = 0; l < 32; ++l) {
        const int l1 = L[n + l], l2 = L[n + l + 32];
        y[i].qh[l] |= (uint8_t)(((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1)));
        y[i].qs[n / 2 + l] = (uint8_t)((l1 & 0xF) | ((l2 & 0xF) << 4));
      }
    }
  }
}

template <> void quantize_row<T_Q6_K>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_q6_K*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < QK_K / 16; ++ib) {
      scales[ib] = fit_symmetric(16, 32, x + 16 * ib, L + 16 * ib);
      const float a = std::fabs(scales[ib]);
      if (a > max_abs_scale) { max_abs_scale = a; max_scale = scales[ib]; }
    }
    if (max_abs_scale < kGroupMaxEps) {  // an all-zero super-block is all-zero bytes
      std::memset(&y[i], 0, sizeof y[i]);
      continue;
    }
    const float iscale = -128.0f / max_scale;
    y[i].d = fp32_to_fp16(1.0f / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) y[i].scales[ib] = (int8_t)std::min(127, nearest_int(iscale * scales[ib]));
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = fp16_to_fp32(y[i].d) * (float)y[i].scales[j];
      if (!d) continue;
      for (int ii = 0; ii < 16; ++ii)
        L[16 * j + ii] = (int8_t)(clampi(nearest_int(x[16 * j + ii] / d), -32, 31) + 32);
    }
    // Per 128 elements: ql[l] = elements l (low nibble) and l+64 (high), ql[l+32] = l+32 and
    // l+96; qh[l] holds the top two bits of l, l+32, l+64, l+96 at shifts 0, 2, 4, 6.
    uint8_t* ql = y[i].ql;
    uint8_t* qh = y[i].qh;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
      for (int l = 0; l < 32; ++l) {
        const int q1 = L[j + l], q2 = L[j + l + 32], q3 = L[j + l + 64], q4 = L[j + l + 96];
        ql[l] = (uint8_t)((q1 & 0xF) | ((q3 & 0xF) << 4));
        ql[l + 32] = (uint8_t)((q2 & 0xF) | ((q4 & 0xF) << 4));
        qh[l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
      }
    }
  }
}

}  // namespace lowtune
