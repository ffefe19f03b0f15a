"""GGUF K-quant formats (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

NumPy references written from the format specification (ggml-common.h layouts) and ggml's
reference quantization algorithms (ggml-quants.c quantize_row_q*_K_ref, no importance matrix).
They are vectorised over sub-blocks but keep ggml's float semantics exactly, so their bytes
equal ggml's (and our C++'s):

* all arithmetic is float32, with ggml's grouping of products ((w*x)*l) and int->float casts;
* every sum is accumulated left to right over the elements of a sub-block (`_sum`), never
  with numpy's pairwise summation;
* rounding is ggml's nearest_int: add 1.5*2^23 and read the mantissa bits (ties to even);
* the last pass that picks each q divides by the fp16-rounded super-block scales.

Data-dependent loops (ggml stops a search early, or skips a sub-block whose scale is zero)
become masks over all sub-blocks at once.

Arrays inside the fitting helpers are laid out [n, M]: n elements of a sub-block by M
sub-blocks, so that "element i of every sub-block" is one contiguous row.
"""
from __future__ import annotations

import numpy as np

from . import BlockwiseFormat, register

F32 = np.float32
QK_K = 256
_GROUP_MAX_EPS = F32(1e-15)  # a group whose largest |x| is below this is all zero


# ---- float helpers ------------------------------------------------------------------------------

def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int on float32: round half to even for |v| < 2^22, as int32."""
    bits = (np.asarray(v, F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _sum(terms: np.ndarray) -> np.ndarray:
    """Σ over axis 0 as ggml's loop does it: float acc = 0; acc += t[0]; acc += t[1]; ..."""
    acc = np.zeros(terms.shape[1:], F32)
    for t in terms:
        acc = acc + t
    return acc


def _sum_from_first(terms: np.ndarray) -> np.ndarray:
    """Like _sum but the accumulator starts at t[0] (ggml's `float s = t[0]; for i >= 1`)."""
    acc = terms[0].copy()
    for t in terms[1:]:
        acc = acc + t
    return acc


def _fp16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 (round to nearest even) as raw uint16."""
    return np.asarray(v, F32).astype(np.float16).view(np.uint16)


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(F32)


def _half_at(b: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of every block b [B, bytes], as float32 [B]."""
    return _fp16_value(np.ascontiguousarray(b[:, offset:offset + 2]).view(np.uint16)[:, 0])


def _max_positive(a: np.ndarray) -> np.ndarray:
    """ggml's `float m = 0; if (a[j] > m) m = a[j];` over the last axis: the largest positive
    value, else +0 (a NaN never wins the comparison)."""
    m = np.where(np.isnan(a), F32(0), a).max(axis=-1)
    return np.where(m > 0, m, F32(0))


def _first_absmax(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `float amax = 0, v = 0; if (|a[j]| > amax) { amax = |a[j]|; v = a[j]; }` along
    axis: (amax, v), the first element of largest magnitude (NaNs never win; all zero -> 0, 0)."""
    mag = np.abs(a)
    mag = np.where(np.isnan(mag), F32(-1), mag)
    idx = np.expand_dims(mag.argmax(axis=axis), axis)
    amax = np.take_along_axis(mag, idx, axis=axis).squeeze(axis)
    val = np.take_along_axis(a, idx, axis=axis).squeeze(axis)
    found = amax > 0
    return np.where(found, amax, F32(0)), np.where(found, val, F32(0))


# ---- sub-block fits (ggml's make_qkx2_quants, make_qx_quants, make_q3_quants) -----------------

def _fit_scale_min(x, w, nmax, rmin, rdelta, nstep, mad):
    """x ≈ scale·L + min, min <= 0, L in [0, nmax], for every column of x [n, M] with weights
    w [n, M]. Starts from the min-max fit, then tries nstep+1 scales
    (rmin + rdelta·is + nmax)/(max - min), solving weighted least squares for scale and min at
    each rounding, and keeps the lowest weighted error (|err| when mad, err² otherwise).
    Returns (scale [M], L int32 [n, M], -min [M])."""
    fnmax = F32(nmax)
    mn = x.min(axis=0)
    mx = x.max(axis=0)
    mn = np.where(mn > 0, F32(0), mn)
    flat = mx == mn  # answered at the end (scale 0, L 0, -min); keep their lanes finite here
    neg_min_flat = -mn
    mx = np.where(flat, F32(1), mx)
    mn = np.where(flat, F32(0), mn)
    sum_w = _sum_from_first(w)
    sum_x = _sum_from_first(w * x)

    def err_of(scale, L, mn_):
        diff = scale * L.astype(F32) + mn_ - x
        diff = np.abs(diff) if mad else diff * diff
        return _sum(w * diff)

    iscale = fnmax / (mx - mn)
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
    best = err_of(scale, L, mn)
    for step in range(nstep + 1):
        # ggml divides by (max - min) with the best min so far, not the first one.
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + fnmax) / (mx - mn)
        Laux = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        fl = Laux.astype(F32)
        wl = w * fl
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * fl), _sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        solvable = D > 0
        D = np.where(solvable, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0  # a positive min is not representable: refit the scale alone
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / np.where(sum_l2 != 0, sum_l2, F32(1)), this_scale)
        err = err_of(this_scale, Laux, this_min)
        better = solvable & (err < best)
        L = np.where(better, Laux, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, F32(0), scale)
    L = np.where(flat, 0, L)
    return scale, L, np.where(flat, neg_min_flat, -mn)


def _fit_symmetric(x, nmax):
    """ggml's make_qx_quants (rmse_type 1, no importance): x ≈ scale·l, l in [-nmax, nmax-1],
    weights x². Tries -(nmax + 0.1·is)/max for is in [-9, 9] after the start -nmax/max and keeps
    the largest (Σwxl)²/Σwl². Returns (scale [M], L = l + nmax int32 [n, M]); an all-zero
    column gives scale 0 and L 0."""
    amax, mx = _first_absmax(x, axis=0)
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x

    def try_scale(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        fl = l.astype(F32)
        return l, _sum(wx * fl), _sum(w * fl * fl)

    l, sumlx, suml2 = try_scale(F32(-nmax) / mx)
    L = l + nmax
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = try_scale(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / np.where(suml2 > 0, suml2, F32(1))
        L = np.where(better, l + nmax, L)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero, 0, L)


def _fit_symmetric_iterative(x, nmax):
    """ggml's make_q3_quants (do_rmse): from the start -nmax/max, sweep the elements in order
    (at most five sweeps, stopping after one without change) and move each l to the value the
    least-squares scale of the others prefers, when that raises (Σwxl)²/Σwl² (weights x²).
    Returns (Σwxl/Σwl² [M], L = l + nmax int32 [n, M]); all-zero columns give 0 and L 0."""
    amax, mx = _first_absmax(x, axis=0)
    zero = amax < _GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x
    L = np.clip(_nearest_int((F32(-nmax) / mx) * x), -nmax, nmax - 1)
    fl = L.astype(F32)
    sumlx, suml2 = _sum(wx * fl), _sum(w * fl * fl)
    active = ~zero
    for _ in range(5):
        changed = np.zeros_like(active)
        for i in range(x.shape[0]):
            li = L[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            movable = active & (slx > 0)
            new_l = np.clip(_nearest_int(x[i] * sl2 / np.where(movable, slx, F32(1))), -nmax, nmax - 1)
            fn = new_l.astype(F32)
            slx_new = slx + wx[i] * fn
            sl2_new = sl2 + w[i] * fn * fn
            take = movable & (new_l != L[i]) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[i] = np.where(take, new_l, L[i])
            sumlx = np.where(take, slx_new, sumlx)
            suml2 = np.where(take, sl2_new, suml2)
            changed |= take
        active &= changed
        if not active.any():
            break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, 0, L + nmax)


# ---- packing helpers ----------------------------------------------------------------------------

def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """L [B, 256] with values in [0, 3] -> qs [B, 64]: per 128 elements, byte l holds
    elements l, l+32, l+64, l+96 at shifts 0, 2, 4, 6."""
    q = L.reshape(-1, 2, 4, 32).astype(np.uint8) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """qs [B, 64] -> [B, 256] values in [0, 3] (inverse of _pack_2bit)."""
    q = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, QK_K)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 6-bit scales and mins [B, 8] -> 12 bytes. Sub-blocks 0-3 sit in bytes 0-3
    (scale) and 4-7 (min); sub-blocks 4-7 keep their low nibbles in bytes 8-11 (scale low,
    min high) and their top two bits in the spare bits 6-7 of bytes 0-3 (scale) / 4-7 (min)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _unpack_scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes [B, 12] -> (scales [B, 8], mins [B, 8]) as uint8 (inverse of the packing)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """Q3_K: 6-bit scales (stored +32) [B, 16] -> 12 bytes. Low nibbles in bytes 0-7
    (sub-blocks 0-7 low nibble, 8-15 high nibble); top two bits of sub-block j at bits
    2*(j//4) of byte 8 + j%4."""
    l6 = l6.astype(np.uint8)
    out = np.zeros((l6.shape[0], 12), np.uint8)
    out[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = (l6 >> 4).reshape(-1, 4, 4) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)
    out[:, 8:12] = np.bitwise_or.reduce(hi, axis=1)
    return out


def _unpack_q3_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes [B, 12] -> the 16 stored 6-bit values [B, 16] (still +32)."""
    low = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    hi = (s[:, 8:12].reshape(-1, 1, 4) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 4, 1)) & 3
    return low | (hi.reshape(-1, 16) << 4)


# ---- the formats ---------------------------------------------------------------------------------

class Q2_K(BlockwiseFormat):
    """scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin; x = d*sc*q - dmin*mn."""
    name, type_id, block_elems, block_bytes, scale_group = "Q2_K", 10, 256, 84, 16
    min_group = 16  # quantized sub-block mins

    def _quantize_blocks(self, x):
        nb = x.shape[0]
        xt = x.reshape(nb * 16, 16).T
        scales, L, mins = _fit_scale_min(xt, np.abs(xt), 3, -0.5, 0.1, 15, mad=True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        L = L.T.reshape(nb, 16, 16)
        # 4-bit scales and mins relative to the largest of each; a byte keeps the int's low bits.
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        has_scale, has_min = max_scale > 0, max_min > 0
        ms = np.where(has_scale, max_scale, F32(1))[:, None]
        mm = np.where(has_min, max_min, F32(1))[:, None]
        sc = np.where(has_scale[:, None], _nearest_int((F32(15) / ms) * scales) & 0xFF, 0)
        sc |= np.where(has_min[:, None], (_nearest_int((F32(15) / mm) * mins) << 4) & 0xFF, 0)
        sc = sc.astype(np.uint8)
        d = np.where(has_scale, _fp16_bits(ms[:, 0] / F32(15)), np.uint16(0)).astype(np.uint16)
        dmin = np.where(has_min, _fp16_bits(mm[:, 0] / F32(15)), np.uint16(0)).astype(np.uint16)
        # Final pass against the stored scales; a zero scale keeps the fitted L.
        dq = (_fp16_value(d)[:, None] * (sc & 0xF).astype(F32))[..., None]
        dm = (_fp16_value(dmin)[:, None] * (sc >> 4).astype(F32))[..., None]
        xs = x.reshape(nb, 16, 16)
        L = np.where(dq != 0, np.clip(_nearest_int((xs + dm) / np.where(dq != 0, dq, F32(1))), 0, 3), L)
        return np.concatenate([sc, _pack_2bit(L.reshape(nb, QK_K)), d.view(np.uint8).reshape(nb, 2),
                               dmin.view(np.uint8).reshape(nb, 2)], axis=1)

    def _dequantize_blocks(self, b):
        sc, qs = b[:, 0:16], b[:, 16:80]
        d, dmin = _half_at(b, 80)[:, None], _half_at(b, 82)[:, None]
        dl = (d * (sc & 0xF).astype(F32))[..., None]
        ml = (dmin * (sc >> 4).astype(F32))[..., None]
        q = _unpack_2bit(qs).reshape(-1, 16, 16).astype(F32)
        return (dl * q - ml).reshape(-1, QK_K)


class Q3_K(BlockwiseFormat):
    """hmask[32], qs[64], scales[12] (6-bit, +32), d; x = d*(sc-32)*(q-4*(1-h))."""
    name, type_id, block_elems, block_bytes, scale_group = "Q3_K", 11, 256, 110, 16

    def _quantize_blocks(self, x):
        nb = x.shape[0]
        xt = x.reshape(nb * 16, 16).T
        scales, L = _fit_symmetric_iterative(xt, 4)
        scales = scales.reshape(nb, 16)
        L = L.T.reshape(nb, 16, 16)
        _, max_scale = _first_absmax(scales, axis=1)
        has = max_scale != 0
        iscale = (F32(-32) / np.where(has, max_scale, F32(1)))[:, None]
        l = _nearest_int(iscale * scales)
        l = ((l + 128) & 0xFF) - 128  # C's int -> int8_t
        l6 = np.where(has[:, None], np.clip(l, -32, 31) + 32, 0)
        sc_bytes = np.where(has[:, None], _pack_q3_scales(l6), np.uint8(0)).astype(np.uint8)
        d = np.where(has, _fp16_bits(F32(1) / iscale[:, 0]), np.uint16(0)).astype(np.uint16)
        # Final pass against the stored scales (from the stored bytes: zero bytes read as -32).
        dq = (_fp16_value(d)[:, None] * (_unpack_q3_scales(sc_bytes).astype(np.int32) - 32).astype(F32))[..., None]
        xs = x.reshape(nb, 16, 16)
        L = np.where(dq != 0, np.clip(_nearest_int(xs / np.where(dq != 0, dq, F32(1))), -4, 3) + 4, L)
        L = L.reshape(nb, QK_K)
        # The third bit of element j lives in hmask byte j%32, bit j//32; set means "no -4".
        high = (L > 3).astype(np.uint8).reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        hmask = np.bitwise_or.reduce(high, axis=1)
        L = np.where(L > 3, L - 4, L)
        return np.concatenate([hmask, _pack_2bit(L), sc_bytes, d.view(np.uint8).reshape(nb, 2)], axis=1)

    def _dequantize_blocks(self, b):
        hmask, qs, s = b[:, 0:32], b[:, 32:96], b[:, 96:108]
        d = _half_at(b, 108)
        sc = _unpack_q3_scales(s).astype(np.int32) - 32
        dl = (d[:, None] * sc.astype(F32))[..., None]
        high = (hmask.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = _unpack_2bit(qs).astype(np.int32) - 4 * (1 - high.reshape(-1, QK_K).astype(np.int32))
        return (dl * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


class _K4(BlockwiseFormat):
    """Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; x = d*sc*q - dmin*mn."""
    nmax: int
    search: tuple[float, float, int]  # rmin, rdelta, nstep of the scale search

    def _fit(self, x):
        """-> (d, dmin uint16 [B], packed scales uint8 [B, 12], L int32 [B, 256])."""
        nb = x.shape[0]
        xt = x.reshape(nb * 8, 32).T
        av_x = np.sqrt(_sum(xt * xt) / F32(32))
        rmin, rdelta, nstep = self.search
        scales, L, mins = _fit_scale_min(xt, av_x + np.abs(xt), self.nmax, rmin, rdelta, nstep, mad=False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        L = L.T.reshape(nb, 8, 32)
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))[:, None]
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))[:, None]
        ls = np.minimum(63, _nearest_int(inv_scale * scales) & 0xFF)
        lm = np.minimum(63, _nearest_int(inv_min * mins) & 0xFF)
        d, dmin = _fp16_bits(max_scale / F32(63)), _fp16_bits(max_min / F32(63))
        # Final pass against the stored (fp16, 6-bit) scales; a zero scale keeps the fitted L.
        dq = (_fp16_value(d)[:, None] * ls.astype(F32))[..., None]
        dm = (_fp16_value(dmin)[:, None] * lm.astype(F32))[..., None]
        xs = x.reshape(nb, 8, 32)
        L = np.where(dq != 0, np.clip(_nearest_int((xs + dm) / np.where(dq != 0, dq, F32(1))), 0, self.nmax), L)
        return d, dmin, _pack_scale_min_k4(ls, lm), L.reshape(nb, QK_K)

    @staticmethod
    def _head(b):
        d, dmin = _half_at(b, 0), _half_at(b, 2)
        sc, mn = _unpack_scale_min_k4(b[:, 4:16])
        return (d[:, None] * sc.astype(F32))[..., None], (dmin[:, None] * mn.astype(F32))[..., None]

    @staticmethod
    def _pack_low_nibbles(L):
        """Per 64 elements, 32 bytes: low nibble = first 32, high nibble = next 32."""
        L = (L & 0xF).astype(np.uint8).reshape(-1, 4, 2, 32)
        return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)

    @staticmethod
    def _unpack_low_nibbles(qs):
        q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        return (q & 0xF).reshape(-1, QK_K)


class Q4_K(_K4):
    """d, dmin, scales[12] (6-bit scale and min per 32), qs[128]; x = d*sc*q - dmin*mn."""
    name, type_id, block_elems, block_bytes, scale_group = "Q4_K", 12, 256, 144, 32
    min_group = 32  # quantized sub-block mins
    nmax, search = 15, (-1.0, 0.1, 20)

    def _quantize_blocks(self, x):
        d, dmin, sc, L = self._fit(x)
        nb = x.shape[0]
        return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), sc,
                               self._pack_low_nibbles(L)], axis=1)

    def _dequantize_blocks(self, b):
        dl, ml = self._head(b)
        q = self._unpack_low_nibbles(b[:, 16:144]).reshape(-1, 8, 32).astype(F32)
        return (dl * q - ml).reshape(-1, QK_K)


class Q5_K(_K4):
    """d, dmin, scales[12], qh[32], qs[128]; x = d*sc*q - dmin*mn, q in [0, 31]."""
    name, type_id, block_elems, block_bytes, scale_group = "Q5_K", 13, 256, 176, 32
    min_group = 32  # quantized sub-block mins
    nmax, search = 31, (-0.5, 0.1, 15)

    def _quantize_blocks(self, x):
        d, dmin, sc, L = self._fit(x)
        nb = x.shape[0]
        # Fifth bit of element 32*s + l (s = 0..7 the 32-run) is bit s of qh[l].
        high = (L >> 4).astype(np.uint8).reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        qh = np.bitwise_or.reduce(high, axis=1)
        return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), sc, qh,
                               self._pack_low_nibbles(L)], axis=1)

    def _dequantize_blocks(self, b):
        dl, ml = self._head(b)
        qh = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = self._unpack_low_nibbles(b[:, 48:176]) | (qh.reshape(-1, QK_K) << 4)
        return (dl * q.reshape(-1, 8, 32).astype(F32) - ml).reshape(-1, QK_K)


class Q6_K(BlockwiseFormat):
    """ql[128], qh[64], scales[16] int8, d; x = d*sc*(q-32)."""
    name, type_id, block_elems, block_bytes, scale_group = "Q6_K", 14, 256, 210, 16

    def _quantize_blocks(self, x):
        nb = x.shape[0]
        xt = x.reshape(nb * 16, 16).T
        scales, L = _fit_symmetric(xt, 32)
        scales = scales.reshape(nb, 16)
        L = L.T.reshape(nb, 16, 16)
        max_abs, max_scale = _first_absmax(scales, axis=1)
        zero = max_abs < _GROUP_MAX_EPS  # the whole super-block is written as zero bytes
        iscale = (F32(-128) / np.where(zero, F32(1), max_scale))[:, None]
        d = _fp16_bits(F32(1) / iscale[:, 0])
        sc = np.minimum(127, _nearest_int(iscale * scales))
        sc = (((sc + 128) & 0xFF) - 128).astype(np.int8)  # C's int -> int8_t
        dq = (_fp16_value(d)[:, None] * sc.astype(F32))[..., None]
        xs = x.reshape(nb, 16, 16)
        L = np.where(dq != 0, np.clip(_nearest_int(xs / np.where(dq != 0, dq, F32(1))), -32, 31) + 32, L)
        L = L.reshape(nb, 2, 4, 32).astype(np.uint8)  # [half, quarter, l]
        # Per 128 elements: ql[l] = elements l (low nibble) and l+64 (high); ql[l+32] = l+32 and
        # l+96; qh[l] = top two bits of l, l+32, l+64, l+96 at shifts 0, 2, 4, 6.
        lo = L & 0xF
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        qh = np.bitwise_or.reduce((L >> 4) << (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1), axis=2)
        out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                              d.view(np.uint8).reshape(nb, 2)], axis=1)
        out[zero] = 0
        return out

    def _dequantize_blocks(self, b):
        ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
        sc = b[:, 192:208].copy().view(np.int8)
        d = _half_at(b, 208)
        low = np.concatenate([ql[:, :, 0:32] & 0xF, ql[:, :, 32:64] & 0xF, ql[:, :, 0:32] >> 4, ql[:, :, 32:64] >> 4],
                             axis=2).reshape(-1, 2, 4, 32)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = (low | (high << 4)).astype(np.int32) - 32
        dl = (d[:, None] * sc.astype(F32))[..., None]
        return (dl * q.reshape(-1, 16, 16).astype(F32)).reshape(-1, QK_K)


for _cls in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K):
    register(_cls())
