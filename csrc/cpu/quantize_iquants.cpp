// I-quant quantizers.
//
// IQ4_NL, IQ4_XS: ggml's quantize_iq4_nl / quantize_iq4_xs without an importance matrix (what
// llama-quantize runs), so the bytes equal llama.cpp's. Per 32 inputs: weights x², a scale
// chosen among max/127 and (t - 127)/max, t = -7..7, by weighted least squares over IQ4_NL's 16
// non-linear levels; IQ4_XS then stores the 8 scales as 6-bit multiples of max|scale|/32.
// Float details kept on purpose (see quantize_kquants.cpp): float sums left to right, ggml's
// grouping of products, no FMA contraction (-ffp-contract=off), nearest_int's rounding.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../block_math.h"
#include "../quantize.h"

namespace lowtune {
namespace {

constexpr float kGroupMaxEps = 1e-15f;

inline int nearest_int(float f) {
  const float v = f + 12582912.0f;
  int32_t i;
  std::memcpy(&i, &v, sizeof i);
  return (i & 0x007fffff) - 0x00400000;
}

// The IQ4_NL level nearest to x (ggml's best_index_int8: the upper one on a tie).
inline int iq4_level_index(float x) {
  const int8_t* v = k_kvalues_iq4nl;
  if (x <= v[0]) return 0;
  if (x >= v[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (x < v[mid]) hi = mid; else lo = mid;
  }
  return x - v[hi - 1] < v[hi] - x ? hi - 1 : hi;
}

// Weighted least-squares scale of 32 inputs over IQ4_NL's levels, codes rounded from 1/scale.
// Returns 0 for a group whose largest |x| is below kGroupMaxEps.
float iq4_fit_scale(const float* x) {
  constexpr int kTries = 7;
  const int8_t* values = k_kvalues_iq4nl;
  float w[32];
  for (int j = 0; j < 32; ++j) w[j] = x[j] * x[j];
  const float max = signed_absmax(x, 32);
  if (std::fabs(max) < kGroupMaxEps) return 0.0f;
  auto sums = [&](float id, float* sumqx, float* sumq2) {
    float sqx = 0, sq2 = 0;
    for (int j = 0; j < 32; ++j) {
      const float q = values[iq4_level_index(id * x[j])];
      sqx += w[j] * q * x[j];
      sq2 += w[j] * q * q;
    }
    *sumqx = sqx; *sumq2 = sq2;
  };
  float d = -max / values[0];
  float sumqx, sumq2;
  sums(1 / d, &sumqx, &sumq2);
  d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
  float best = d * sumqx;
  for (int itry = -kTries; itry <= kTries; ++itry) {
    sums((itry + values[0]) / max, &sumqx, &sumq2);
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      d = sumqx / sumq2;
      best = d * sumqx;
    }
  }
  return d;
}

// 32 codes of x / dl (dl = 0: code of 0) packed as IQ4_NL nibbles (byte j: j low, j + 16 high).
void iq4_pack(const float* x, float dl, uint8_t* qs) {
  const float idl = dl ? 1 / dl : 0.0f;
  uint8_t L[32];
  for (int j = 0; j < 32; ++j) L[j] = (uint8_t)iq4_level_index(idl * x[j]);
  for (int j = 0; j < 16; ++j) qs[j] = (uint8_t)(L[j] | (L[j + 16] << 4));
}

}  // namespace

template <> void quantize_row<T_IQ4_NL>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_iq4_nl*>(vy);
  for (int64_t i = 0; i < k / QK; ++i, x += QK) {
    const float d = iq4_fit_scale(x);
    y[i].d = fp32_to_fp16(d);
    iq4_pack(x, d, y[i].qs);
  }
}

template <> void quantize_row<T_IQ4_XS>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_iq4_xs*>(vy);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    float scales[8];
    for (int ib = 0; ib < 8; ++ib) scales[ib] = iq4_fit_scale(x + 32 * ib);
    const float max_scale = signed_absmax(scales, 8);
    const float d = -max_scale / 32;
    const float id = d ? 1 / d : 0.0f;
    y[i].d = fp32_to_fp16(d);
    y[i].scales_h = 0;
    std::memset(y[i].scales_l, 0, sizeof y[i].scales_l);
    for (int ib = 0; ib < 8; ++ib) {
      int l = nearest_int(id * scales[ib]);
      l = l < -32 ? -32 : l > 31 ? 31 : l;
      iq4_pack(x + 32 * ib, d * l, y[i].qs + 16 * ib);
      l += 32;
      y[i].scales_l[ib / 2] |= (uint8_t)((l & 0xF) << (4 * (ib % 2)));
      y[i].scales_h |= (uint16_t)((l >> 4) << (2 * ib));
    }
  }
}


// ---- IQ3_XXS, IQ3_S ------------------------------------------------------------------------------
// ggml's quantize_iq3_xxs / quantize_iq3_s without an importance matrix (weights x²). Per 32
// inputs: signs are split off (IQ3_XXS keeps an even number of minus signs per 8 by flipping the
// least important element), then for each of 31 (IQ3_XXS) or 19 (IQ3_S) trial scales every 4
// magnitudes are rounded to levels 0..7 (values 2l+1) and, where that code is not a grid point,
// replaced by the nearest grid point among its precomputed neighbours; the trial with the best
// weighted least-squares fit wins, off-grid groups are re-searched once at its scale, and the 8
// scales are stored as 4-bit odd multiples of max/31 (times ggml's fudge factor).
//
// One deliberate difference: ggml's IQ3_S skips an all-zero 32-group without advancing its code
// and sign pointers, so the codes of the groups after it land one group early. lowtune writes
// every group in place; only super-blocks holding an all-zero group (and not wholly zero) differ.
namespace {

struct Iq3Grid {
  int size = 0;
  std::vector<uint32_t> points;     // per grid point, four int8 positions 2l+1
  std::vector<int> index_of;        // 12-bit code (3 bits per level) -> point, or -(offset+1)
  std::vector<uint16_t> neighbours; // at offset: count, then the nearest points' indices

  explicit Iq3Grid(int grid_size) : size(grid_size), points(grid_size), index_of(4096, -1) {
    static constexpr uint8_t kXxsBytes[8] = {0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3e};
    for (int i = 0; i < size; ++i) {
      const uint32_t g = size == 256 ? iq3xxs_grid(i) : iq3s_grid(i);
      int code = 0;
      uint32_t pos = 0;
      for (int e = 0; e < 4; ++e) {
        const uint8_t b = (uint8_t)(g >> (8 * e));
        int l = 0;
        if (size == 256) { while (kXxsBytes[l] != b) ++l; } else { l = (b - 1) / 2; }
        code |= l << (3 * e);
        pos |= (uint32_t)(2 * l + 1) << (8 * e);
      }
      points[i] = pos;
      index_of[code] = i;
    }
    // Off-grid codes: every point within the nwant smallest distinct squared distances, in
    // order of (distance, index).
    const int nwant = size == 256 ? 2 : 3;
    std::vector<std::pair<int, int>> dist(size);
    for (int u = 0; u < 4096; ++u) {
      if (index_of[u] >= 0) continue;
      for (int j = 0; j < size; ++j) {
        int d2 = 0;
        for (int e = 0; e < 4; ++e) {
          const int diff = (int)(int8_t)(points[j] >> (8 * e)) - (2 * ((u >> (3 * e)) & 7) + 1);
          d2 += diff * diff;
        }
        dist[j] = {d2, j};
      }
      std::sort(dist.begin(), dist.end());
      index_of[u] = -((int)neighbours.size() + 1);
      const size_t count_at = neighbours.size();
      neighbours.push_back(0);
      int d2 = dist[0].first, nhave = 1;
      for (int j = 0; j < size; ++j) {
        if (dist[j].first > d2) {
          if (nhave == nwant) break;
          d2 = dist[j].first;
          ++nhave;
        }
        neighbours.push_back((uint16_t)dist[j].second);
      }
      neighbours[count_at] = (uint16_t)(neighbours.size() - count_at - 1);
    }
  }

  int8_t position(int point, int e) const { return (int8_t)(points[point] >> (8 * e)); }

  // The neighbour of off-grid code u nearest to xval (weights w) at `scale`; writes its levels.
  int best_neighbour(int u, const float* xval, const float* w, float scale, int8_t* L) const {
    const uint16_t* nb = neighbours.data() + (-index_of[u] - 1);
    float best_d2 = FLT_MAX;
    int best = -1;
    for (int j = 1; j <= nb[0]; ++j) {
      float d2 = 0;
      for (int e = 0; e < 4; ++e) {
        const float q = position(nb[j], e);
        const float diff = scale * q - xval[e];
        d2 += w[e] * diff * diff;
      }
      if (d2 < best_d2) { best_d2 = d2; best = nb[j]; }
    }
    for (int e = 0; e < 4; ++e) L[e] = (int8_t)((position(best, e) - 1) / 2);
    return best;
  }

  int code_of(const int8_t* L) const {
    int u = 0;
    for (int e = 0; e < 4; ++e) u |= L[e] << (3 * e);
    return u;
  }
};

const Iq3Grid& iq3_grid(int size) {
  static const Iq3Grid xxs(256), s(512);  // built once, thread-safe
  return size == 256 ? xxs : s;
}

// One 32-group: grid indices idx[8], sign bytes signs[4]; returns the scale, 0 exactly for an
// all-zero group (below 1e-8 for IQ3_XXS) and positive otherwise (some xval > 0 has q >= 1).
// xxs: IQ3_XXS's rules (even sign parity, 31 trials, on-grid groups kept in the re-search).
float iq3_fit_group(const Iq3Grid& g, bool xxs, const float* xb, int* idx, uint8_t* signs) {
  constexpr int kMaxQ = 8;
  float weight[32], waux[32], xval[32];
  int8_t L[32] = {}, Laux[32];
  bool on_grid[8], on_grid_aux[8];
  for (int i = 0; i < 32; ++i) weight[i] = xb[i] * xb[i];
  for (int i = 0; i < 32; ++i) waux[i] = std::sqrt(weight[i]);
  for (int k = 0; k < 4; ++k) {
    int nflip = 0;
    uint8_t s = 0;
    for (int i = 0; i < 8; ++i) {
      if (xb[8 * k + i] >= 0) {
        xval[8 * k + i] = xb[8 * k + i];
      } else {
        xval[8 * k + i] = -xb[8 * k + i];
        ++nflip;
        s |= (uint8_t)(1 << i);
      }
    }
    if (xxs && nflip % 2) {
      int imin = 0;
      float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
      for (int i = 1; i < 8; ++i) {
        const float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
        if (ax < min) { min = ax; imin = i; }
      }
      xval[8 * k + imin] = -xval[8 * k + imin];
      s ^= (uint8_t)(1 << imin);
    }
    signs[k] = xxs ? (uint8_t)(s & 127) : s;
  }
  float max = xval[0];
  for (int i = 1; i < 32; ++i) max = max > xval[i] ? max : xval[i];
  if (xxs ? max < 1e-8f : !max) return 0.0f;
  auto fit = [&](const int8_t* Lq, float* sumqx, float* sumq2) {
    float sqx = 0, sq2 = 0;
    for (int i = 0; i < 32; ++i) {
      const float w = weight[i], q = (float)(2 * Lq[i] + 1);
      sqx += w * xval[i] * q;
      sq2 += w * q * q;
    }
    *sumqx = sqx; *sumq2 = sq2;
  };
  auto round_group = [&](float id, int k, int8_t* Lk) {
    for (int i = 0; i < 4; ++i) {
      const int l = nearest_int(0.5f * (id * xval[4 * k + i] - 1));
      Lk[i] = (int8_t)(l < 0 ? 0 : l > kMaxQ - 1 ? kMaxQ - 1 : l);
    }
  };
  float best = 0, scale = max / (2 * kMaxQ - 1);
  for (int k = 0; k < 8; ++k) on_grid[k] = xxs;
  const int ntry = xxs ? 15 : 9;
  for (int is = -ntry; is <= ntry; ++is) {
    const float id = (2 * kMaxQ - 1 + is * 0.2f) / max;
    const float this_scale = 1 / id;
    for (int k = 0; k < 8; ++k) {
      round_group(id, k, Laux + 4 * k);
      const int u = g.code_of(Laux + 4 * k);
      on_grid_aux[k] = g.index_of[u] >= 0;
      if (!on_grid_aux[k]) g.best_neighbour(u, xval + 4 * k, waux + 4 * k, this_scale, Laux + 4 * k);
    }
    float sumqx, sumq2;
    fit(Laux, &sumqx, &sumq2);
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      scale = sumqx / sumq2;
      best = scale * sumqx;
      std::memcpy(L, Laux, 32);
      std::memcpy(on_grid, on_grid_aux, sizeof on_grid);
    }
  }
  int off_grid = 0;
  for (int k = 0; k < 8; ++k) off_grid += !on_grid[k];
  if (off_grid > 0 && scale > 0) {
    const float id = 1 / scale;
    for (int k = 0; k < 8; ++k) {
      if (xxs && on_grid[k]) continue;
      int8_t Lk[4];
      round_group(id, k, Lk);
      const int u = g.code_of(Lk);
      int point = g.index_of[u];
      if (point < 0) point = g.best_neighbour(u, xval + 4 * k, waux + 4 * k, scale, L + 4 * k);
      for (int i = 0; i < 4; ++i) L[4 * k + i] = (int8_t)((g.position(point, i) - 1) / 2);
    }
    float sumqx, sumq2;
    fit(L, &sumqx, &sumq2);
    if (sumq2 > 0) scale = sumqx / sumq2;
  }
  if (scale < 0) {  // cannot happen (xval >= 0), kept as ggml has it
    scale = -scale;
    for (int k = 0; k < 4; ++k) signs[k] = xxs ? (uint8_t)(~signs[k] & 127) : (uint8_t)~signs[k];
  }
  for (int k = 0; k < 8; ++k) {
    idx[k] = g.index_of[g.code_of(L + 4 * k)];
    if (idx[k] < 0) throw std::logic_error("IQ3 quantizer: a group ended off the grid");
  }
  return scale;
}

// The 4-bit code of a group scale: the odd multiple 2l+1 of d nearest to it.
inline uint8_t iq3_scale_code(float id, float scale) {
  const int l = nearest_int(0.5f * (id * scale - 1));
  return (uint8_t)(l < 0 ? 0 : l > 15 ? 15 : l);
}

}  // namespace

template <> void quantize_row<T_IQ3_XXS>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_iq3_xxs*>(vy);
  const Iq3Grid& g = iq3_grid(256);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    std::memset(&y[i], 0, sizeof y[i]);
    float scales[8], max_scale = 0;
    uint32_t aux[8];
    for (int ib = 0; ib < 8; ++ib) {
      int idx[8];
      uint8_t signs[4];
      scales[ib] = iq3_fit_group(g, true, x + 32 * ib, idx, signs);
      aux[ib] = 0;
      if (scales[ib] == 0) continue;  // an all-zero group: zero bytes
      for (int kk = 0; kk < 8; ++kk) y[i].qs[8 * ib + kk] = (uint8_t)idx[kk];
      aux[ib] = signs[0] | (signs[1] << 7) | (signs[2] << 14) | ((uint32_t)signs[3] << 21);
      max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
    }
    if (!max_scale) {
      std::memset(&y[i], 0, sizeof y[i]);
      continue;
    }
    const float d = max_scale / 31;
    y[i].d = fp32_to_fp16(d * 1.0125f);
    const float id = 1 / d;
    for (int ib = 0; ib < 8; ++ib) {
      aux[ib] |= (uint32_t)iq3_scale_code(id, scales[ib]) << 28;
      std::memcpy(y[i].qs + QK_K / 4 + 4 * ib, &aux[ib], 4);
    }
  }
}

template <> void quantize_row<T_IQ3_S>(const float* x, void* vy, int64_t k) {
  auto* y = static_cast<block_iq3_s*>(vy);
  const Iq3Grid& g = iq3_grid(512);
  for (int64_t i = 0; i < k / QK_K; ++i, x += QK_K) {
    std::memset(&y[i], 0, sizeof y[i]);
    float scales[8], max_scale = 0;
    for (int ib = 0; ib < 8; ++ib) {
      int idx[8];
      uint8_t signs[4];
      scales[ib] = iq3_fit_group(g, false, x + 32 * ib, idx, signs);
      if (scales[ib] == 0) continue;  // an all-zero group: zero bytes
      for (int kk = 0; kk < 8; ++kk) {
        y[i].qs[8 * ib + kk] = (uint8_t)(idx[kk] & 255);
        y[i].qh[ib] |= (uint8_t)((idx[kk] >> 8) << kk);
      }
      std::memcpy(y[i].signs + 4 * ib, signs, 4);
      max_scale = max_scale > scales[ib] ? max_scale : scales[ib];
    }
    if (!max_scale) continue;
    const float d = max_scale / 31;
    y[i].d = fp32_to_fp16(d * 1.033f);
    const float id = 1 / d;
    for (int ib = 0; ib < 8; ib += 2)
      y[i].scales[ib / 2] = (uint8_t)(iq3_scale_code(id, scales[ib]) | (iq3_scale_code(id, scales[ib + 1]) << 4));
  }
}

// ---- types quantized only with an importance matrix ----------------------------------------------
// ggml refuses these without one (llama-quantize asks for --imatrix); lowtune computes none, so
// it refuses too and names the types it can write. Their blocks still load, dequantize and train.
namespace {
[[noreturn]] void needs_imatrix(const char* name) {
  throw std::invalid_argument(std::string(name) +
                              " needs an importance matrix (llama.cpp's llama-imatrix), which lowtune does not "
                              "compute; quantize to IQ4_XS, IQ4_NL, IQ3_S, Q2_K or INT2-g64 instead, or load a GGUF "
                              "that llama.cpp quantized to " + name);
}
}  // namespace

#define LT_NEEDS_IMATRIX(T, NAME) \
  template <> void quantize_row<T>(const float*, void*, int64_t) { needs_imatrix(NAME); }
LT_NEEDS_IMATRIX(T_IQ2_XXS, "IQ2_XXS")
LT_NEEDS_IMATRIX(T_IQ2_XS, "IQ2_XS")
LT_NEEDS_IMATRIX(T_IQ2_S, "IQ2_S")
LT_NEEDS_IMATRIX(T_IQ1_S, "IQ1_S")
LT_NEEDS_IMATRIX(T_IQ1_M, "IQ1_M")
#undef LT_NEEDS_IMATRIX

}  // namespace lowtune
