// The attention phase of the fused decode step (included by decode_layer.cc): RMSNorm, RoPE and
// one task per (row, kv head) that writes the step's keys/values into the KV cache and attends
// its query heads over it. The cache element type E is float32, bf16 or fp16 (kv_cache.h): 16-bit
// values are rounded when written and widened when read, the math is float32.
// kernels/build.py hashes csrc/*.h into every kernel's cache key.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"  // exp_shift
#include "kv_cache.h"

// Keys whose additive bias is at or below this are masked (the engine uses float32 min): their
// probability is exactly 0 in float32 in the composite softmax too, so they are skipped.
static const float kMasked = -1e6f;

// out = w * (x * rsqrt(mean(x^2) + eps)), HF Qwen3 RMSNorm in float32
static void rms(const float *x, const float *w, int64_t n, float eps, float *out) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// x = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2])
static void rope(float *x, const float *cos, const float *sin, int64_t D) {
  const int64_t h = D / 2;
  float tmp[1024];
  for (int64_t i = 0; i < h; ++i) tmp[i] = x[i] * cos[i] + (-x[i + h]) * sin[i];
  for (int64_t i = h; i < D; ++i) tmp[i] = x[i] * cos[i] + x[i - h] * sin[i];
  std::memcpy(x, tmp, D * sizeof(float));
}

struct AttnDims {
  int64_t B, S, H, N, K, G, D, T;
};

#ifdef __AVX512F__
// The G query heads that share one kv head (GQA), attending together for D = 16 * NV with the
// dots and the probability-weighted sums in vector registers: each key and value row is read once
// for all G heads (one query at a time re-read the kv head's rows G times; at 8K keys that was
// the whole decode attention cost, memory-bound). Per (query, key) the arithmetic and its order
// are those of one query alone, so the result does not depend on G.
// q: G rows of D; p: G rows of T (scores, then probabilities); out: G rows of D. G is a template
// argument (1, 2, 4 or 8) so that the accumulators stay in registers.
// E: the cache element type (kv_cache.h), widened exactly as it is loaded.

// Value tiles of 16 KB (at most 64 rows): a tile is read once per pass of values_vec while the
// next one is prefetched, and both stay in L1 (48 KB); 32 KB float32 tiles (64 rows of D = 128)
// did not, and the passes after the first went to L2.
static const int64_t kTileBytes = 16384, kTileMax = 64;

// The horizontal sums of 16 vectors as one vector, in 4 add stages (one _mm512_reduce_add_ps per
// vector costs 4 stages each): out[i] = sum(v[kSlot[i]]), the slots as the stages pair lanes.
static const int kSlot[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
static inline __m512 sum16(const __m512 *v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lanes 0,1: v[i]'s halves folded; 2,3: v[i + 8]'s
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // lanes: w[i] (v[i], v[i + 8]), w[i + 4] (v[i + 4], v[i + 12]), 4 floats each
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // in each lane: elements 0, 2 of x[i]'s vector, 1, 3 of x[i + 2]'s
    y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[i], x[i + 2]), _mm512_unpackhi_ps(x[i], x[i + 2]));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x44), _mm512_shuffle_ps(y[0], y[1], 0xEE));
}

// The 16 key rows from t0 as float32: the float32 cache's own rows, 16-bit rows widened once into
// buf[16 D] (L1) for all G heads: widened per head, the widening (a zero-extending shuffle and a
// shift per 16 values) was twice the dots' FMAs. Exact: the scores are those of the float32 cache
// on the widened values.
template <int NV>
static inline const float *key_block(const float *kc, int64_t t0, float *) { return kc + t0 * 16 * NV; }
template <int NV, typename E>
static inline const float *key_block(const E *kc, int64_t t0, float *buf) {
  const E *rows = kc + t0 * 16 * NV;
  for (int i = 0; i < 16 * NV; ++i) _mm512_store_ps(buf + 16 * i, load16(rows + 16 * i));
  return buf;
}

// p[g][t] = q[g] . k[t] * scale + bias[t] (masked keys: -inf, which exp_shift takes to ~1e-38,
// nothing against a sum >= 1), mx[g] = max_t p[g][t]. Blocks of 16 keys: each key row is loaded
// from memory once (then from L1 for the other heads: key_block) and the 16 dots of a head are
// reduced together by sum16; a block with every key masked (the cache's unwritten tail) is skipped.
template <int NV, int G, typename E>
static void scores_vec(const float *q, const E *kc, const float *bias, int64_t T, int64_t n, bool any,
                       float scale, float *p, float *mx) {
  const int64_t D = 16 * NV;
  const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
  alignas(64) float buf[16 * D];
  __m512 mxv[G];  // running maxima per lane, reduced once at the end (max is exact in any order)
  for (int g = 0; g < G; ++g) mxv[g] = ninf;
  int64_t t0 = 0;
  for (; t0 + 16 <= n; t0 += 16) {
    const __m512 b = _mm512_loadu_ps(bias + t0);
    const __mmask16 masked = any ? _mm512_cmp_ps_mask(b, _mm512_set1_ps(kMasked), _CMP_LE_OQ) : 0;
    for (int g = 0; g < G && masked == 0xFFFF; ++g) _mm512_storeu_ps(p + g * T + t0, ninf);
    if (masked == 0xFFFF) continue;
    if (t0 + 80 <= n) {  // the block four ahead (16 or 32 KB): its rows arrive while these are scored
      const char *ahead = reinterpret_cast<const char *>(kc + (t0 + 64) * D);
      for (int64_t b = 0; b < 16 * D * static_cast<int64_t>(sizeof(E)); b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    const float *rows = key_block<NV>(kc, t0, buf);
    for (int g = 0; g < G; ++g) {
      const float *qg = q + g * D;
      __m512 qv[NV], acc[16];
      for (int j = 0; j < NV; ++j) qv[j] = _mm512_loadu_ps(qg + 16 * j);
      // The 16 dots advance together, one FMA each per step of j: a dot alone is a chain of NV
      // dependent FMAs, and with the rows one after another too few of them were in flight to
      // fill the FMA pipes. Each dot still adds its products in order j = 0, 1, ...
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(rows + kSlot[i] * D));
      for (int j = 1; j < NV; ++j)
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          acc[i] = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(rows + kSlot[i] * D + 16 * j), acc[i]);
      const __m512 sc = _mm512_mask_blend_ps(masked, _mm512_fmadd_ps(sum16(acc), vscale, b), ninf);
      _mm512_storeu_ps(p + g * T + t0, sc);
      mxv[g] = _mm512_max_ps(mxv[g], sc);
    }
  }
  for (int g = 0; g < G; ++g) mx[g] = _mm512_reduce_max_ps(mxv[g]);
  for (int64_t t = t0; t < n; ++t)  // the last n % 16 keys one at a time
    for (int g = 0; g < G; ++g) {
      float pt = -INFINITY;
      if (!any || bias[t] > kMasked) {
        const float *qg = q + g * D;
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qg), load16(kc + t * D));
        for (int j = 1; j < NV; ++j) s = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), load16(kc + t * D + 16 * j), s);
        pt = _mm512_reduce_add_ps(s) * scale + bias[t];
      }
      p[g * T + t] = pt;
      mx[g] = pt > mx[g] ? pt : mx[g];
    }
}

// out[g] = sum_t p[g][t] v[t], keys in order: value tiles of `tile` rows, W vectors of each row per
// pass over a tile, so every value row comes from memory once; partial sums wait in `out` (exact).
template <int NV, int G, typename E>
static void values_vec(const float *p, const E *vc, const float *bias, int64_t T, int64_t n, bool any, float *out) {
  constexpr int64_t D = 16 * NV;
  constexpr int W = NV < 2 ? NV : 2;  // G x W accumulators + W values: <= 18 of the 32 registers
  for (int64_t i = 0; i < G * D; ++i) out[i] = 0.f;
  constexpr int64_t fit = kTileBytes / (D * static_cast<int64_t>(sizeof(E)));
  constexpr int64_t tile = fit < kTileMax ? fit : kTileMax;
  for (int64_t t0 = 0; t0 < n; t0 += tile) {
    const int64_t t1 = t0 + tile < n ? t0 + tile : n;
    for (int j = 0; j < NV; j += W) {
      __m512 acc[G][W];
      for (int g = 0; g < G; ++g)
        for (int u = 0; u < W; ++u) acc[g][u] = _mm512_loadu_ps(out + g * D + 16 * (j + u));
      for (int64_t t = t0; t < t1; ++t) {
        if (t + tile < n)  // this pass's lines of the next tile: that tile's first pass then hits
          for (int u = 0; u < W; ++u) _mm_prefetch(reinterpret_cast<const char *>(vc + (t + tile) * D + 16 * (j + u)),
                                                   _MM_HINT_T0);
        if (any && bias[t] <= kMasked) continue;
        __m512 v[W];
        for (int u = 0; u < W; ++u) v[u] = load16(vc + t * D + 16 * (j + u));
        for (int g = 0; g < G; ++g) {
          const __m512 pt = _mm512_set1_ps(p[g * T + t]);
          for (int u = 0; u < W; ++u) acc[g][u] = _mm512_fmadd_ps(pt, v[u], acc[g][u]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int u = 0; u < W; ++u) _mm512_storeu_ps(out + g * D + 16 * (j + u), acc[g][u]);
    }
  }
}

template <int NV, int G, typename E>
static void attend_group_vec(const float *q, const E *kc, const E *vc, const float *bias, int64_t T, int64_t n,
                             bool any, float scale, float *p, float *out) {
  float mx[G];
  scores_vec<NV, G>(q, kc, bias, T, n, any, scale, p, mx);
  for (int g = 0; g < G; ++g) {
    float *pg = p + g * T;
    const float sum = exp_shift(pg, pg, n, mx[g]);
    for (int64_t t = 0; t < n; ++t) pg[t] = pg[t] / sum;
  }
  values_vec<NV, G>(p, vc, bias, T, n, any, out);
}

// Up to 8 query heads with the NV of the head dim; returns the heads done (0: no vector path)
template <int G, typename E>
static int attend_heads(const float *q, const E *kc, const E *vc, const float *bias, int64_t T, int64_t n, int64_t D,
                        bool any, float scale, float *p, float *out) {
  switch (D % 16 == 0 ? D / 16 : 0) {
    case 1: attend_group_vec<1, G>(q, kc, vc, bias, T, n, any, scale, p, out); return G;
    case 2: attend_group_vec<2, G>(q, kc, vc, bias, T, n, any, scale, p, out); return G;
    case 4: attend_group_vec<4, G>(q, kc, vc, bias, T, n, any, scale, p, out); return G;
    case 8: attend_group_vec<8, G>(q, kc, vc, bias, T, n, any, scale, p, out); return G;
    default: return 0;  // other head dims: the scalar loops
  }
}
#endif

// The scalar loops' row operations, one definition for every cache type (attend widens 16-bit
// rows into a float buffer first): `omp simd` reductions may be ordered differently in each
// inlined copy, and a 16-bit cache must give the float32 cache's bits on the widened values.
__attribute__((noinline)) static float dot_row(const float *q, const float *k, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < D; ++i) s += q[i] * k[i];
  return s;
}

__attribute__((noinline)) static void axpy_row(float a, const float *v, float *out, int64_t D) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) out[i] += a * v[i];
}

// A cache row as float32: the row itself, or widened into buf[D]
static inline const float *float_row(const float *row, float *, int64_t) { return row; }
template <typename E>
static inline const float *float_row(const E *row, float *buf, int64_t D) {
  load_row(row, buf, D);
  return buf;
}

// One query against the cache with the scalar loops: softmax(q k^T * scale + bias) v -> out[D]
template <typename E>
static void attend_one(const float *q, const E *kc, const E *vc, const float *bias, const AttnDims &d, bool any,
                       float scale, float *p, float *out) {
  float buf[1024];  // D <= 1024 (DecodeAttn checks)
  float mx = -INFINITY;
  for (int64_t t = 0; t < d.T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    p[t] = dot_row(q, float_row(kc + t * d.D, buf, d.D), d.D) * scale + bias[t];
    mx = p[t] > mx ? p[t] : mx;
  }
  float sum = 0.f;
  for (int64_t t = 0; t < d.T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    p[t] = std::exp(p[t] - mx);
    sum += p[t];
  }
  for (int64_t i = 0; i < d.D; ++i) out[i] = 0.f;
  for (int64_t t = 0; t < d.T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    axpy_row(p[t] / sum, float_row(vc + t * d.D, buf, d.D), out, d.D);
  }
}

// The G query heads of one kv head (rows of D in q and out, of T in p) against its cache rows
template <typename E>
static void attend(const float *q, int64_t G, const E *kc, const E *vc, const float *bias, const AttnDims &d,
                   float scale, float *p, float *out) {
  int64_t end = d.T;  // keys past the last unmasked one (the cache's unwritten tail) are not read
  while (end > 0 && bias[end - 1] <= kMasked) --end;
  const bool any = end > 0;
  if (!any) end = d.T;
  int64_t h = 0;
#ifdef __AVX512F__
  while (h < G) {  // heads in passes of 8, then 4, 2, 1
    const int64_t left = G - h;
    const float *qh = q + h * d.D;
    float *ph = p + h * d.T, *oh = out + h * d.D;
    const int done = left >= 8 ? attend_heads<8>(qh, kc, vc, bias, d.T, end, d.D, any, scale, ph, oh)
                     : left >= 4 ? attend_heads<4>(qh, kc, vc, bias, d.T, end, d.D, any, scale, ph, oh)
                     : left >= 2 ? attend_heads<2>(qh, kc, vc, bias, d.T, end, d.D, any, scale, ph, oh)
                                 : attend_heads<1>(qh, kc, vc, bias, d.T, end, d.D, any, scale, ph, oh);
    if (done == 0) break;
    h += done;
  }
#endif
  for (; h < G; ++h) attend_one(q + h * d.D, kc, vc, bias, d, any, scale, p + h * d.T, out + h * d.D);
}

// The attention phase of DecodeAttn for one (row b, kv head k): its S keys/values are normed,
// rotated and written (rounded to E) to the cache first, then its G query heads of every query
// attend (no other task touches them).
struct AttnStep {
  AttnDims d;
  float *qkv;
  int64_t QKV, ND, KD, slot0;
  const float *qn, *kn, *cos, *sin, *bias;
  float eps, scale;
  float *p, *o;
};

template <typename E>
static void attn_task(const AttnStep &a, E *kc, E *vc, int64_t bk) {
  const AttnDims &d = a.d;
  const int64_t b = bk / d.K, k = bk % d.K, cache = bk * d.T * d.D;
  for (int64_t s = 0; s < d.S; ++s) {
    const int64_t r = b * d.S + s;
    float *kh = a.qkv + r * a.QKV + a.ND + k * d.D;
    rms(kh, a.kn, d.D, a.eps, kh);
    rope(kh, a.cos + r * d.D, a.sin + r * d.D, d.D);
    store_row(kh, kc + cache + (a.slot0 + s) * d.D, d.D);
    store_row(kh + a.KD, vc + cache + (a.slot0 + s) * d.D, d.D);
  }
  for (int64_t s = 0; s < d.S; ++s) {
    const int64_t r = b * d.S + s;
    for (int64_t n = k * d.G; n < (k + 1) * d.G; ++n) {
      float *qh = a.qkv + r * a.QKV + n * d.D;
      rms(qh, a.qn, d.D, a.eps, qh);
      rope(qh, a.cos + r * d.D, a.sin + r * d.D, d.D);
    }
    const int64_t n0 = k * d.G;  // the kv head's query heads are consecutive rows
    attend(a.qkv + r * a.QKV + n0 * d.D, d.G, kc + cache, vc + cache, a.bias + r * d.T, d, a.scale,
           a.p + (r * d.N + n0) * d.T, a.o + r * a.ND + n0 * d.D);
  }
}
