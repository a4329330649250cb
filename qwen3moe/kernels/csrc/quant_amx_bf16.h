// The float32-activation GEMM (quant_ops.cc qlinear, >= 16 x rows) on AMX-BF16 tiles, for bf16,
// int8 and int4 weights. TDPBF16PS multiplies bf16 pairs exactly and sums them in float32, so:
//   - each x is split into three bf16 parts, x = h + m + l + e with |e| <= 2^-27 |x| (h = bf16(x),
//     m = bf16(x - h), l = bf16(x - h - m); each difference exact in float32), below float32's own
//     rounding of x;
//   - a quantized weight enters as u - z (|u - z| <= 255: exact in bf16) and its scale multiplies
//     the group's sum after, y = sum over groups of s_w * sum_k (u - z) x (bf16 weights: as stored).
// So y is the float32-activation product summed in another order (three planes and groups of 32
// inputs per tile step), within float32 summation error of the row loops (tests/test_quant_kernel.py
// bounds both against NumPy). Why: the row-block micro-kernel runs at the float32 FMA rate
// (16 products per instruction); one TDPBF16PS does 16 x 16 x 32, i.e. 8192 products at 3 per x,
// on its own unit.
// Tiles: C0-C2 the three planes' sums (16 weight rows x 16 tokens, float32), A the 16 weight rows'
// 32 bf16 of one step, B0-B2 the planes' 16 input pairs x 16 tokens.
#pragma once
#include <cstdint>

#include "quant_amx.h"
#include "quant_common.h"

#if defined(QWEN3MOE_HAVE_AMX) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define QWEN3MOE_HAVE_AMX_BF16 1

// x rows split and packed as TDPBF16PS's B operand, one 1 KB tile per (plane, token vector, step of
// 32 inputs): dword (kp, t) of tile(p, v, c) = plane p of x[16 v + t, 32 c + 2 kp .. + 1]
struct XSplit {
  int64_t V = 0, C = 0;
  avec<uint32_t> b;
  // sized for T rows; xsplit_row fills each row's lanes, so only the lanes past T are zeroed here
  // (not the whole buffer: 6 MB per op at 512 rows and I = 2048)
  void reset(int64_t T, int64_t I) {
    V = (T + 15) / 16, C = I / 32;
    b.resize(3 * V * C * 256);
    for (int p = 0; p < 3; ++p)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t kp = 0; kp < 16; ++kp)
          for (int64_t t = T - 16 * (V - 1); t < 16; ++t) tile(p, V - 1, c)[kp * 16 + t] = 0u;
  }
  const uint32_t *tile(int p, int64_t v, int64_t c) const { return b.data() + ((p * V + v) * C + c) * 256; }
  uint32_t *tile(int p, int64_t v, int64_t c) { return b.data() + ((p * V + v) * C + c) * 256; }
};

// bf16 values held in the low halves of dwords, as float32
static inline __m512 bf16_lo_widen(__m512i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)); }

// Row t of x into the three planes
static void xsplit_row(const float *xr, int64_t t, XSplit &p) {
  const int64_t v = t / 16, tl = t % 16;
  const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32(16));
  const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
  for (int64_t c = 0; c < p.C; ++c) {
    // dword kp holds inputs 2kp (low half) and 2kp + 1 (high half): even / odd inputs deinterleaved
    const __m512 a = _mm512_loadu_ps(xr + 32 * c), b = _mm512_loadu_ps(xr + 32 * c + 16);
    __m512 e = _mm512_permutex2var_ps(a, ev, b), o = _mm512_permutex2var_ps(a, od, b);
    for (int pl = 0; pl < 3; ++pl) {
      // bf16(e) in the low half of each dword, bf16(o) in the high half
      const __m512i he = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(e));
      const __m512i ho = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(o));
      const __m512i d = _mm512_or_si512(he, _mm512_slli_epi32(ho, 16));
      _mm512_i32scatter_epi32(p.tile(pl, v, c) + tl, at, d, 4);
      e = _mm512_sub_ps(e, bf16_lo_widen(he));  // the part not yet represented, exact
      o = _mm512_sub_ps(o, bf16_lo_widen(ho));
    }
  }
}

// 16 weight rows from o as bf16 (u - z), natural order, into wa [16, I]
static void amx_bf16_weights(const QMat &W, int64_t o, uint32_t *wa) {
  const int64_t C = W.I / 32;
  for (int64_t r = 0; r < 16; ++r) {
    const uint8_t *p = W.w + (o + r) * W.ld, *zr = W.z + (o + r) * W.lds;
    uint32_t *dst = wa + r * (W.I / 2);
    for (int64_t c = 0; c < C; ++c) {
      __m512i lo, hi;  // dword i: inputs 32c + 2i, 32c + 2i + 1 as integers
      if (W.kind == kQ4) {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p + 16 * c)));
        lo = _mm512_and_si512(b, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(b, 4);
      } else {
        const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + 32 * c)));
        lo = _mm512_and_si512(b, _mm512_set1_epi32(255)), hi = _mm512_srli_epi32(b, 8);
      }
      const __m512i z = _mm512_set1_epi32(zr[32 * c / W.g]);
      const __m512i fl = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, z)));
      const __m512i fh = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, z)));
      // small integers are exact in bf16: the top halves of their floats
      _mm512_storeu_si512(dst + 16 * c, _mm512_or_si512(_mm512_srli_epi32(fl, 16),
                                                        _mm512_and_si512(fh, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))));
    }
  }
}

struct alignas(64) AmxBf16Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16};
};

static inline void amx_bf16_begin() {
  static const AmxBf16Config cfg;
  _tile_loadconfig(&cfg);
}

// y[j, o + r] for 16 weight rows (wa: bf16 rows lda bytes apart) x token vector v of xs; sw [G][16]
// the rows' group scales (nullptr: bf16 weights, one group of I), cpg steps of 32 per group
static void amx_bf16_tile(const uint32_t *wa, int64_t lda, const XSplit &xs, int64_t v, const float *sw, int64_t G,
                          int64_t cpg, float *y, int64_t ldy, int64_t valid) {
  __m512 out[16];
  for (int r = 0; r < 16; ++r) out[r] = _mm512_setzero_ps();
  alignas(64) float cb[3][256];
  for (int64_t gi = 0; gi < G; ++gi) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t c = gi * cpg; c < (gi + 1) * cpg; ++c) {
      _tile_loadd(3, reinterpret_cast<const char *>(wa) + 64 * c, lda);
      _tile_loadd(4, xs.tile(0, v, c), 64);
      _tile_loadd(5, xs.tile(1, v, c), 64);
      _tile_loadd(6, xs.tile(2, v, c), 64);
      _tile_dpbf16ps(0, 3, 4);
      _tile_dpbf16ps(1, 3, 5);
      _tile_dpbf16ps(2, 3, 6);
    }
    _tile_stored(0, cb[0], 64);
    _tile_stored(1, cb[1], 64);
    _tile_stored(2, cb[2], 64);
    for (int r = 0; r < 16; ++r) {
      const __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(cb[0] + 16 * r), _mm512_load_ps(cb[1] + 16 * r)),
                                     _mm512_load_ps(cb[2] + 16 * r));
      out[r] = sw ? _mm512_fmadd_ps(_mm512_set1_ps(sw[gi * 16 + r]), t, out[r]) : _mm512_add_ps(out[r], t);
    }
  }
  alignas(64) float ob[16][16];
  for (int r = 0; r < 16; ++r) _mm512_store_ps(ob[r], out[r]);
  for (int64_t j = 0; j < valid; ++j)
    for (int r = 0; r < 16; ++r) y[j * ldy + r] = ob[r][j];
}
#endif

// Whether qlinear may run W's O rows on AMX-BF16: bf16 / int8 / int4 rows in whole 16-row tiles,
// steps of 32 inputs inside one group
static inline bool amx_bf16_fits(const QMat &W, int64_t O) {
#if defined(QWEN3MOE_HAVE_AMX_BF16)
  const bool kind = W.kind == kBF16 || ((W.kind == kQ8 || W.kind == kQ4) && W.g % 32 == 0);
  return kind && quant_amx() && O % 16 == 0 && W.I % 32 == 0;
#else
  return false;
#endif
}
