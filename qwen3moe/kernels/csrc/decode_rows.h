// Weight-row dot products of the fused decode kernels (included by decode_layer.cc): float32 rows
// here, bf16 / int8 / int4 rows in quant_common.h, and `mat_dot` choosing between them.
#pragma once
#include <cstdint>

#include "quant_common.h"
#include "quant_vnni.h"

#ifdef __AVX512F__
#include <immintrin.h>

// 4 weight rows x NB batch rows in 4 * NB vector accumulators: each loaded weight vector feeds
// NB FMAs, each loaded x vector 4 (H % 16 == 0). `next` is the next 4-row block (rows ldw apart),
// prefetched in row-major order, 4 cache lines per step: on this machine one core streams 4 rows
// read interleaved at 11-17 GB/s, and at 23-31 GB/s (near a plain sum's rate) with this one linear
// software-prefetch stream (bench/stream_dot.cc; op A/B: bench/decode_ops.py). Pass w0 itself when
// there is no next block.
template <int NB>
static inline void block4x(const float *w0, int64_t ldw, int64_t H, const float *x, int64_t ldx, float *y,
                           int64_t ldy, const float *next) {
  __m512 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  int64_t col = 0;
  for (int64_t h = 0; h < H; h += 16) {
    for (int q = 0; q < 4; ++q) {
      _mm_prefetch(reinterpret_cast<const char *>(next + col), _MM_HINT_T0);
      col += 16;
      if (col == H) col = 0, next += ldw;
    }
    __m512 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + h);
    for (int r = 0; r < 4; ++r) {
      const __m512 wv = _mm512_loadu_ps(w0 + r * ldw + h);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) y[b * ldy + r] = _mm512_reduce_add_ps(acc[r][b]);
}
#endif

// y[b * ldy + o] = W[o, :H] . x[b, :H] for o in [o0, o1), b in [0, nb), W rows ldw apart. Four
// weight rows at a time (independent FMA chains; the rows stay in L1 while every batch row uses them).
static void rows_dot_ld(const float *W, int64_t ldw, int64_t H, int64_t o0, int64_t o1, const float *x,
                        int64_t ldx, int64_t nb, float *y, int64_t ldy) {
  int64_t o = o0;
#ifdef __AVX512F__
  if (H % 16 == 0) {
    for (; o + 4 <= o1; o += 4)
      for (int64_t b = 0; b < nb; b += 4) {
        const float *w = W + o * ldw, *xb = x + b * ldx;
        // prefetch once per block (first batch pass), only rows inside [o0, o1)
        const float *next = b == 0 && o + 8 <= o1 ? w + 4 * ldw : w;
        float *yb = y + b * ldy + o;
        switch (nb - b) {
          case 1: block4x<1>(w, ldw, H, xb, ldx, yb, ldy, next); break;
          case 2: block4x<2>(w, ldw, H, xb, ldx, yb, ldy, next); break;
          case 3: block4x<3>(w, ldw, H, xb, ldx, yb, ldy, next); break;
          default: block4x<4>(w, ldw, H, xb, ldx, yb, ldy, next);
        }
      }
  }
#endif
  for (; o + 4 <= o1; o += 4) {
    const float *w0 = W + o * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    for (int64_t b = 0; b < nb; ++b) {
      const float *xb = x + b * ldx;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t h = 0; h < H; ++h) {
        const float v = xb[h];
        a0 += w0[h] * v;
        a1 += w1[h] * v;
        a2 += w2[h] * v;
        a3 += w3[h] * v;
      }
      float *yb = y + b * ldy + o;
      yb[0] = a0, yb[1] = a1, yb[2] = a2, yb[3] = a3;
    }
  }
  for (; o < o1; ++o) {
    const float *w0 = W + o * ldw;
    for (int64_t b = 0; b < nb; ++b) {
      const float *xb = x + b * ldx;
      float a0 = 0.f;
#pragma omp simd reduction(+ : a0)
      for (int64_t h = 0; h < H; ++h) a0 += w0[h] * xb[h];
      y[b * ldy + o] = a0;
    }
  }
}

// y[b * ldy + o] = W[o, :] . x[b, :] for o in [o0, o1), b in [0, nb), whatever W's storage
static inline void mat_dot(const QMat &W, int64_t o0, int64_t o1, const float *x, int64_t ldx, int64_t nb, float *y,
                           int64_t ldy) {
  if (W.kind == kF32)
    rows_dot_ld(reinterpret_cast<const float *>(W.w), W.ld / 4, W.I, o0, o1, x, ldx, nb, y, ldy);
  else
    rows_dot_q(W, o0, o1, x, ldx, nb, y, ldy);
}

// The same with activations from prepare_x: int8 / int4 rows whose kind has quantized
// activations there take the int8-activation arithmetic (quant_vnni.h)
// (int4 g128 rows with float32 activations: x in quant_q4w.h's order, made once per op by prepare_x)
static inline void mat_dot(const QMat &W, int64_t o0, int64_t o1, const XIn &in, float *y, int64_t ldy) {
  const ActView &a = in.for_kind(W.kind);
  if (W.quantized() && a.q != nullptr && a.kind == W.kind && a.I == W.I && act8_fits(W)) {
    act8_rows(W, o0, o1, a, in.nb, y, ldy);
    return;
  }
#if defined(__AVX512F__)
  if (W.kind == kQ4 && a.xw != nullptr && a.wI == W.I && o1 - o0 >= 4 && quant_vector() && q4w_fits(W)) {
    q4w_rows(W, o0, o1, a.xw, in.nb, y, ldy);
    return;
  }
#endif
  mat_dot(W, o0, o1, in.x, in.ldx, in.nb, y, ldy);
}

// Buffers behind one prepared input: x gathered by a weight's perm, and prepare_x's rows
struct XBuf {
  avec<float> xg;
  ActQ q8, q4;
  void reset() { q8.reset(), q4.reset(); }
};

// The x rows [nb, I] as each of n <= 3 weights reads them (in[j] for *ws[j], buffers in buf[j]):
// one prepare_x per distinct input permutation (quant_perm.h), x gathered by it first, so weights
// without one (and q / k / v sharing act-order's) share one prepared input as before. The perms
// were range-checked (parse_weight, for these single matrices).
static void prepare_each(const QMat *const *ws, int n, const float *x, int64_t ldx, int64_t nb, int64_t I, bool act8,
                         XBuf *buf, XIn *in) {
  for (int j = 0; j < n; ++j) {
    int first = 0;  // an earlier weight with the same permutation prepared it already
    while (first < j && !same_perm(ws[first]->perm, ws[j]->perm, I)) ++first;
    if (first < j) {
      in[j] = in[first];
      continue;
    }
    const QMat *group[3] = {nullptr, nullptr, nullptr};
    for (int k = j; k < n; ++k) group[k] = same_perm(ws[k]->perm, ws[j]->perm, I) ? ws[k] : nullptr;
    const float *xp = x;
    int64_t ld = ldx;
    if (ws[j]->perm) {
      buf[j].xg.resize(nb * I);
      gather_rows(ws[j]->perm, I, x, ldx, nb, buf[j].xg.data(), I);
      xp = buf[j].xg.data(), ld = I;
    }
    in[j] = prepare_x(xp, ld, nb, I, act8, {group[0], group[1], group[2]}, buf[j].q8, buf[j].q4);
  }
}
