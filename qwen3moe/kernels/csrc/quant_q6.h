// 6-bit weight rows: the opt-in lm_head (QuantizationConfig(lm_head_bits=6), docs/quantization.md;
// included by quant_common.h). One group per row (g = I, I % 4 == 0), u in 0..63, symmetric z = 32,
// row o's 3I/4 bytes in two planes (llama.cpp Q6_K's ql / qh split):
//   bytes [0, I/2):    the low 4 bits of u packed as int4 packs u: byte j = (u[2j] & 15) | (u[2j+1] & 15) << 4
//   bytes [I/2, 3I/4): the high 2 bits: byte I/2 + m holds u[4m + t] >> 4 at bits 2t .. 2t + 1 (t = 0..3)
// So nibble j of the high plane (bits 4 (j % 2) .. of its byte j / 2) holds the high bits of inputs
// 2j (its bits 0-1) and 2j + 1 (bits 2-3): the same pairing as low-plane byte j, which the vector
// loops exploit (one nibble per 32-bit lane here, one per byte for the int8-activation loop).
// Values are exact integers, so dequantized weights are exactly (u - z) * s as for int8 / int4.
// Included by quant_common.h after QMat / RowPrefetch (q6_value is declared before them).
#pragma once
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// u[k] of a 6-bit row (scalar: the definition the vector code must match)
static inline int q6_value(const uint8_t *row, int64_t I, int64_t k) {
  const int lo = (row[k / 2] >> (4 * (k & 1))) & 15;
  const int hi = (row[I / 2 + k / 4] >> (2 * (k & 3))) & 3;
  return lo | hi << 4;
}

#if defined(__AVX512F__)
// a | (b & c) in one vpternlogd
static inline __m512i or_masked(__m512i a, __m512i b, __m512i c) { return _mm512_ternarylogic_epi32(a, b, c, 0xF8); }

// u of inputs h .. h + 31 (h % 32 == 0) as int32: even k in `even`, odd k in `odd` (lane j: inputs
// h + 2j and h + 2j + 1, q4x32's order)
static inline void q6x32_int(const uint8_t *row, int64_t I, int64_t h, __m512i &even, __m512i &odd) {
  const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + h / 2)));
  // qword m = high-plane byte m; its high nibble shifted into bits 0-3 of dword 2m + 1, so dword j
  // holds nibble j in bits 0-3 (dword 2m's other bits are junk the 0x30 mask drops)
  const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(row + I / 2 + h / 4)));
  const __m512i n = _mm512_or_si512(b, _mm512_slli_epi64(b, 28)), m30 = _mm512_set1_epi32(0x30);
  even = or_masked(_mm512_and_si512(u, _mm512_set1_epi32(15)), _mm512_slli_epi32(n, 4), m30);
  odd = or_masked(_mm512_srli_epi32(u, 4), _mm512_slli_epi32(n, 2), m30);
}

// the same as float32 u - z (exact)
static inline void q6x32(const uint8_t *row, int64_t I, int64_t h, __m512 z, __m512 &even, __m512 &odd) {
  __m512i e, o;
  q6x32_int(row, I, h, e, o);
  even = _mm512_sub_ps(_mm512_cvtepi32_ps(e), z);
  odd = _mm512_sub_ps(_mm512_cvtepi32_ps(o), z);
}

#if defined(__AVX512BW__)
// u of the 128 inputs of chunk c as bytes: byte j of `even` = u[128c + 2j], of `odd` = u[128c + 2j + 1]
// (the int8-activation loop's int4 chunk order)
static inline void q6x128_u8(const uint8_t *row, int64_t I, int64_t c, __m512i &even, __m512i &odd) {
  const __m512i wv = _mm512_loadu_si512(row + c * 64);
  // word m = high-plane byte m; byte j of n then holds nibble j in bits 0-3 (bits 4-7: junk)
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(row + I / 2 + c * 32)));
  const __m512i n = _mm512_or_si512(w, _mm512_slli_epi16(w, 4));
  const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  even = or_masked(_mm512_and_si512(wv, m0f), _mm512_slli_epi16(n, 4), m30);
  odd = or_masked(_mm512_and_si512(_mm512_srli_epi16(wv, 4), m0f), _mm512_slli_epi16(n, 2), m30);
}
// y[b * ldy + r] = W[o + r, :] . x[b, :] for 4 rows and NB batch rows, x in prep_x's int4 order
// (each 32-block: 16 even inputs, then 16 odd), I % 128 == 0. Per 128-input chunk each row is
// unpacked to bytes once (q6x128_u8) and u - z taken in int8 (exact: |u - z| <= 63), then widened
// 16 at a time as the int8 loop widens its bytes: about int8 per channel's ops per weight plus the
// unpack per 128, where widening each 32 from the packed planes (q6x32) took ~1.7x int8's ops and
// ran the lm_head slower than int8 (bench/RESULTS.md "A 6-bit lm_head"). The row scale multiplies
// the finished dot (ROWSCALE).
template <int NB>
static inline void q6block4(const QMat &W, int64_t o, const float *x, int64_t ldx, float *y, int64_t ldy,
                            const RowPrefetch *next) {
  __m512 acc[4][NB];
  __m512i zb[4];
  for (int r = 0; r < 4; ++r) {
    zb[r] = _mm512_set1_epi8(static_cast<char>(W.z[(o + r) * W.lds]));
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  }
  const uint8_t *w0 = W.w + o * W.ld;
  RowPrefetch pf = next ? *next : RowPrefetch{nullptr, 0, 0, 0};
  alignas(64) int8_t t[4][128];
  for (int64_t c = 0; c < W.I / 128; ++c) {
    if (next) pf.step(4 * 96);
    for (int r = 0; r < 4; ++r) {
      __m512i e, od;
      q6x128_u8(w0 + r * W.ld, W.I, c, e, od);
      _mm512_store_si512(t[r], _mm512_sub_epi8(e, zb[r]));
      _mm512_store_si512(t[r] + 64, _mm512_sub_epi8(od, zb[r]));
    }
    for (int i = 0; i < 4; ++i) {
      const int64_t h = c * 128 + 32 * i;
      __m512 xe[NB], xo[NB];
      for (int b = 0; b < NB; ++b) xe[b] = _mm512_loadu_ps(x + b * ldx + h), xo[b] = _mm512_loadu_ps(x + b * ldx + h + 16);
      for (int r = 0; r < 4; ++r) {
        const __m512 we = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i *>(t[r] + 16 * i))));
        const __m512 wo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i *>(t[r] + 64 + 16 * i))));
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wo, xo[b], _mm512_fmadd_ps(we, xe[b], acc[r][b]));
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float sc = half_to_float(W.s[(o + r) * W.lds]);
    for (int b = 0; b < NB; ++b) y[b * ldy + r] = _mm512_reduce_add_ps(acc[r][b]) * sc;
  }
}

// rows_dot_q's vector path for 6-bit rows (o1 - o0 >= 4, I % 128 == 0)
static void q6_rows(const QMat &W, int64_t o0, int64_t o1, const float *x, int64_t ldx, int64_t nb, float *y,
                    int64_t ldy) {
  auto block = [&](int64_t o, int64_t b, float *yb, int64_t ld, const RowPrefetch *pf) {
    with_nb(nb - b, [&](auto n) { q6block4<decltype(n)::value>(W, o, x + b * ldx, ldx, yb, ld, pf); });
  };
  rows_in_blocks<4>(W, o0, o1, nb, y, ldy, W.ld, block);
}
#endif
#endif

// 6-bit row `row` unpacked to one byte per input (natural order) into out [I]
static void q6_unpack_row(const uint8_t *row, int64_t I, uint8_t *out) {
  int64_t h = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (quant_vector()) {
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (; h + 128 <= I; h += 128) {  // unpack interleaves within 16-byte lanes; the qword permutes restore order
      __m512i e, o;
      q6x128_u8(row, I, h / 128, e, o);
      const __m512i lo = _mm512_unpacklo_epi8(e, o), hi = _mm512_unpackhi_epi8(e, o);
      _mm512_storeu_si512(out + h, _mm512_permutex2var_epi64(lo, first, hi));
      _mm512_storeu_si512(out + h + 64, _mm512_permutex2var_epi64(lo, second, hi));
    }
  }
#endif
  for (; h < I; ++h) out[h] = static_cast<uint8_t>(q6_value(row, I, h));
}
