// The attention phase of the fused decode step (included by decode_layer.cc): RMSNorm, RoPE and
// one task per (row, kv head) that writes the step's keys/values into the KV cache and attends
// its query heads over it. The cache element type E is float32, bf16 or fp16 (kv_cache.h): 16-bit
// values are rounded when written and widened when read, the math is float32.
// kernels/build.py hashes csrc/*.h into every kernel's cache key.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

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
// attend() for D = 16 * NV with the score dots and the probability-weighted sum of values in vector
// registers: the scalar loops' reductions spill to the stack and their output row makes a
// store-to-load chain per key (the attention phase was ~20% of the block at B=8, perf).
// E: the cache element type (kv_cache.h), widened exactly as it is loaded.
template <int NV, typename E>
static void attend_vec(const float *q, const E *kc, const E *vc, const float *bias, int64_t T, bool any,
                       float scale, float *p, float *out) {
  const int64_t D = 16 * NV;
  __m512 qv[NV], acc[NV];
  for (int j = 0; j < NV; ++j) qv[j] = _mm512_loadu_ps(q + 16 * j), acc[j] = _mm512_setzero_ps();
  float mx = -INFINITY, sum = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    __m512 s = _mm512_mul_ps(qv[0], load16(kc + t * D));
    for (int j = 1; j < NV; ++j) s = _mm512_fmadd_ps(qv[j], load16(kc + t * D + 16 * j), s);
    p[t] = _mm512_reduce_add_ps(s) * scale + bias[t];
    mx = p[t] > mx ? p[t] : mx;
  }
  for (int64_t t = 0; t < T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    p[t] = std::exp(p[t] - mx);
    sum += p[t];
  }
  for (int64_t t = 0; t < T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    const __m512 pt = _mm512_set1_ps(p[t] / sum);
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(pt, load16(vc + t * D + 16 * j), acc[j]);
  }
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
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

// One query (row b, head n) against the cache: softmax(q k^T * scale + bias) v -> out[D]
template <typename E>
static void attend(const float *q, const E *kc, const E *vc, const float *bias, const AttnDims &d,
                   float scale, float *p, float *out) {
  bool any = false;
  for (int64_t t = 0; t < d.T; ++t) any = any || bias[t] > kMasked;
#ifdef __AVX512F__
  switch (d.D % 16 == 0 ? d.D / 16 : 0) {
    case 1: return attend_vec<1>(q, kc, vc, bias, d.T, any, scale, p, out);
    case 2: return attend_vec<2>(q, kc, vc, bias, d.T, any, scale, p, out);
    case 4: return attend_vec<4>(q, kc, vc, bias, d.T, any, scale, p, out);
    case 8: return attend_vec<8>(q, kc, vc, bias, d.T, any, scale, p, out);
    default: break;  // other head dims: the scalar loops below
  }
#endif
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
      attend(qh, kc + cache, vc + cache, a.bias + r * d.T, d, a.scale, a.p + (r * d.N + n) * d.T,
             a.o + r * a.ND + n * d.D);
    }
  }
}
