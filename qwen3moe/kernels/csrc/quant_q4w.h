// int4 decode rows with float32 activations for groups of 128 inputs or multiples (int4 g128, the
// default), read 64 bytes at a time (included by quant_common.h after QMat and RowPrefetch;
// rows_dot_q and decode_rows.h's mat_dot choose it when q4w_fits).
//
// Why: qblock4's int4 loop widens each 16 bytes with a vpmovzxbd and a shift before its two vpermps
// table lookups, and rebuilds four tables per group from scalar loads; it computed at ~21 GB/s of
// weight bytes per core of CPU time (bench/rows_bw.cc ROWS_BW_HOT), below one core's share of the
// memory bandwidth, so the int4 decode was compute-bound (on this machine every such loop runs at
// ~3-3.5 vector ops per cycle, so the count of ops per weight is what matters). Here a 64-byte
// load holds 128 weights, 8 nibbles per dword: vpermps reads only bits 3:0 of each dword's index,
// so nibble j of every dword is looked up after one shift by 4j (none for j = 0): 8 lookups, 7
// shifts and 8 FMAs per 64 bytes and row, no widening. Lane l of vector j is input 8l + j of the
// 128-input chunk; x is put into that order once per op (q4w_order_x). The table is the group's
// (i - z) * s as before (scales converted 16 groups at a time), so each weight is the same float32
// value and only the fp32 summation order differs from qblock4 and the NumPy reference.
#pragma once
#include <cstdint>
#include <vector>

static inline bool q4w_fits(const QMat &W) { return W.kind == kQ4 && W.I % 128 == 0 && W.g % 128 == 0; }

// out[b * I + c + 16 j + l] = x[b * ldx + c + 8 l + j] for every 128-input chunk c
static inline void q4w_order_x(const float *x, int64_t ldx, int64_t nb, int64_t I, avec<float> &out) {
  out.resize(nb * I);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t c = 0; c < I; c += 128)
      for (int64_t j = 0; j < 8; ++j)
        for (int64_t l = 0; l < 16; ++l) out[b * I + c + 16 * j + l] = x[b * ldx + c + 8 * l + j];
}

#if defined(__AVX512F__)
#include <immintrin.h>

// y[b * ldy + r] = W[o + r, :] . x[b, :] for R rows and NB batch rows (x in q4w order, rows I apart).
// NB <= 2: even and odd j sum into separate chains (the FMA latency).
template <int NB, int R>
static inline void q4w_block(const QMat &W, int64_t o, const float *x, float *y, int64_t ldy, const RowPrefetch *next) {
  const int64_t I = W.I, G = W.I / W.g;
  constexpr bool SPLIT = NB <= 2;
  __m512 acc[R][NB], acc2[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps(), acc2[r][b] = _mm512_setzero_ps();
  alignas(64) float sc[R][16];  // scales of groups gi - gi % 16 .. + 15
  alignas(64) float iz[R][16];  // i - z for the row's current zero point zl
  int zl[R];
  for (int r = 0; r < R; ++r) zl[r] = -1;
  const uint8_t *w0 = W.w + o * W.ld;
  RowPrefetch pf = next ? *next : RowPrefetch{nullptr, 0, 0, 0};  // a local copy: see qblock4
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512 t[R];
    for (int r = 0; r < R; ++r) {
      const int64_t at = (o + r) * W.lds + gi;
      if (gi % 16 == 0) {
        const __mmask16 m = G - gi >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (G - gi)) - 1);
        _mm512_store_ps(sc[r], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, W.s + at)));
      }
      if (W.z[at] != zl[r]) {
        zl[r] = W.z[at];
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        _mm512_store_ps(iz[r], _mm512_sub_ps(iota, _mm512_set1_ps(static_cast<float>(zl[r]))));
      }
      t[r] = _mm512_mul_ps(_mm512_load_ps(iz[r]), _mm512_set1_ps(sc[r][gi % 16]));  // as GroupQ::set<kQ4>
    }
    for (int64_t c = gi * W.g; c < (gi + 1) * W.g; c += 128) {
      if (next) pf.step(R * 64);
      __m512i u[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) u[r] = _mm512_loadu_si512(w0 + r * W.ld + c / 2);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        __m512 xv[NB];
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + b * I + c + 16 * j);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m512 w = _mm512_permutexvar_ps(j ? _mm512_srli_epi32(u[r], 4 * j) : u[r], t[r]);
#pragma GCC unroll 4
          for (int b = 0; b < NB; ++b) {
            if (SPLIT && j % 2)
              acc2[r][b] = _mm512_fmadd_ps(w, xv[b], acc2[r][b]);
            else
              acc[r][b] = _mm512_fmadd_ps(w, xv[b], acc[r][b]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b)
      y[b * ldy + r] = _mm512_reduce_add_ps(SPLIT ? _mm512_add_ps(acc[r][b], acc2[r][b]) : acc[r][b]);
}

// rows [o0, o1) (o1 - o0 >= R) in R-row blocks (rows_in_blocks), x rows W.I apart
template <int R>
static void q4w_rows_r(const QMat &W, int64_t o0, int64_t o1, const float *x, int64_t nb, float *y, int64_t ldy) {
  auto block = [&](int64_t o, int64_t b, float *yb, int64_t ld, const RowPrefetch *pf) {
    with_nb(nb - b, [&](auto n) { q4w_block<decltype(n)::value, R>(W, o, x + b * W.I, yb, ld, pf); });
  };
  rows_in_blocks<R>(W, o0, o1, nb, y, ldy, W.ld, block);
}

// y[b * ldy + o] = W[o, :] . x[b, :], rows [o0, o1) (o1 - o0 >= 4), x in q4w order (rows W.I
// apart). One batch row: 2-row blocks (4 rows' 16 accumulators, tables and loads spilled to the
// stack: 21 vs 28 GB/s per core), else 4-row blocks.
static void q4w_rows(const QMat &W, int64_t o0, int64_t o1, const float *x, int64_t nb, float *y, int64_t ldy) {
  if (nb == 1) return q4w_rows_r<2>(W, o0, o1, x, nb, y, ldy);
  q4w_rows_r<4>(W, o0, o1, x, nb, y, ldy);
}
#endif
