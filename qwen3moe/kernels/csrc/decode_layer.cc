// Fused decode-step kernels for CPU (ops.Custom aot): one op for a decoder layer's attention
// block (norm, q/k/v projections, q/k norms, RoPE, KV-cache write, GQA attention over the cache,
// output projection, residual) and one for its MoE block (norm, router, top-k, experts, combine,
// residual), for a few query tokens (decode: one per row).
//
// Why: the composite decode graph is ~45 graph ops per layer at ~6-11 us dispatch each, and
// MindSpore's scatter_nd_update copies the whole cache Parameter every step. Here the weights
// are streamed once per step (decode is memory bound: each weight row is dotted with every
// row of the batch while it is in L1) and the KV cache is written in place: the cache inputs
// are the engine's Parameters, whose buffers MindSpore hands to the kernel (tests check two
// consecutive steps against NumPy and the composite path).
// Same float32 math as the composite path (HF Qwen3-MoE); only summation orders differ.
// Shapes: B rows, H hidden, N query heads, K kv heads, G = N / K, D head_dim, T cache slots,
// E experts, I expert ffn, A = B * top_k assignments.
// The thread pool splitting each phase over the cores is in decode_pool.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_pool.h"

// Keys whose additive bias is at or below this are masked (the engine uses float32 min): their
// probability is exactly 0 in float32 in the composite softmax too, so they are skipped.
static const float kMasked = -1e6f;

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

static inline void rows_dot(const float *W, int64_t H, int64_t o0, int64_t o1, const float *x, int64_t ldx,
                            int64_t nb, float *y, int64_t ldy) {
  rows_dot_ld(W, H, H, o0, o1, x, ldx, nb, y, ldy);
}

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

// Rows [0, rows) split into chunks of kChunk for the parallel loops over weight rows: a chunk's
// first 4-row block is read without software prefetch, so chunks of 16 rows left a quarter of the
// weights to the slow interleaved pattern (B=1 is memory bound); 64 rows still give 8-16 chunks.
static const int64_t kChunk = 64;
static inline int64_t nchunks(int64_t rows) { return (rows + kChunk - 1) / kChunk; }

struct AttnDims {
  int64_t B, S, H, N, K, G, D, T;
};

#ifdef __AVX512F__
// attend() for D = 16 * NV with the score dots and the probability-weighted sum of values in vector
// registers: the scalar loops' reductions spill to the stack and their output row makes a
// store-to-load chain per key (the attention phase was ~20% of the block at B=8, perf).
template <int NV>
static void attend_vec(const float *q, const float *kc, const float *vc, const float *bias, int64_t T, bool any,
                       float scale, float *p, float *out) {
  const int64_t D = 16 * NV;
  __m512 qv[NV], acc[NV];
  for (int j = 0; j < NV; ++j) qv[j] = _mm512_loadu_ps(q + 16 * j), acc[j] = _mm512_setzero_ps();
  float mx = -INFINITY, sum = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kc + t * D));
    for (int j = 1; j < NV; ++j) s = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(kc + t * D + 16 * j), s);
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
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vc + t * D + 16 * j), acc[j]);
  }
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(out + 16 * j, acc[j]);
}
#endif

// One query (row b, head n) against the cache: softmax(q k^T * scale + bias) v -> out[D]
static void attend(const float *q, const float *kc, const float *vc, const float *bias, const AttnDims &d,
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
  float mx = -INFINITY;
  for (int64_t t = 0; t < d.T; ++t) {
    if (any && bias[t] <= kMasked) continue;
    const float *k = kc + t * d.D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d.D; ++i) s += q[i] * k[i];
    p[t] = s * scale + bias[t];
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
    const float pt = p[t] / sum;
    const float *v = vc + t * d.D;
#pragma omp simd
    for (int64_t i = 0; i < d.D; ++i) out[i] += pt * v[i];
  }
}

// inputs: 0 x [B,S,H]  1 ln1 [H]  2 wq [N*D,H]  3 wk [K*D,H]  4 wv [K*D,H]  5 q_norm [D]  6 k_norm [D]
//         7 wo [H,N*D]  8 k_cache [B,K,T,D]  9 v_cache [B,K,T,D]  10 cos [B,S,D]  11 sin [B,S,D]
//         12 bias [B,S,T]  13 meta int32 [4] (first slot written, top_k, norm_topk_prob, unused)
//         14 fcfg float32 [2] (rms eps, attention scale)
// output: 15 y [B,S,H] = x + o_proj(attention(rms(x)))
// Query s of row b is written to slot meta[0] + s and sees the keys its bias row allows.
extern "C" int DecodeAttn(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 16) return 1;
  const float *x = static_cast<const float *>(params[0]), *ln1 = static_cast<const float *>(params[1]);
  const float *wq = static_cast<const float *>(params[2]), *wk = static_cast<const float *>(params[3]);
  const float *wv = static_cast<const float *>(params[4]), *qn = static_cast<const float *>(params[5]);
  const float *kn = static_cast<const float *>(params[6]), *wo = static_cast<const float *>(params[7]);
  float *kc = static_cast<float *>(params[8]), *vc = static_cast<float *>(params[9]);
  const float *cos = static_cast<const float *>(params[10]), *sin = static_cast<const float *>(params[11]);
  const float *bias = static_cast<const float *>(params[12]);
  const int32_t *meta = static_cast<const int32_t *>(params[13]);
  const float *fcfg = static_cast<const float *>(params[14]);
  float *y = static_cast<float *>(params[15]);
  AttnDims d;
  d.B = shapes[0][0], d.S = shapes[0][1], d.H = shapes[0][2], d.D = shapes[5][0];
  d.N = shapes[2][0] / d.D, d.K = shapes[3][0] / d.D, d.G = d.N / d.K, d.T = shapes[8][2];
  const int64_t slot0 = meta[0];
  if (ndims[0] != 3 || ndims[8] != 4 || d.D > 1024 || slot0 < 0 || slot0 + d.S > d.T) return 1;
  const float eps = fcfg[0], scale = fcfg[1];
  const int64_t R = d.B * d.S, ND = d.N * d.D, KD = d.K * d.D, QKV = ND + 2 * KD;
  std::vector<float> xn(R * d.H), qkv(R * QKV), o(R * ND), p(R * d.N * d.T);
  for (int64_t r = 0; r < R; ++r) rms(x + r * d.H, ln1, d.H, eps, xn.data() + r * d.H);
  Pool &pool = Pool::get();
  // q | k | v projections as one row range over the three weights
  const int64_t cq = nchunks(ND), ck = nchunks(KD);
  pool.run(cq + 2 * ck, [&](int64_t c) {
    const float *W = c < cq ? wq : (c < cq + ck ? wk : wv);
    const int64_t rows = c < cq ? ND : KD, base = c < cq ? 0 : (c < cq + ck ? ND : ND + KD);
    const int64_t cc = c < cq ? c : (c < cq + ck ? c - cq : c - cq - ck);
    const int64_t o0 = cc * kChunk, o1 = o0 + kChunk < rows ? o0 + kChunk : rows;
    rows_dot(W, d.H, o0, o1, xn.data(), d.H, R, qkv.data() + base, QKV);
  });
  // one task per (row b, kv head k): its S keys/values are normed, rotated and written to the
  // cache first, then its G query heads of every query attend (no other task touches them)
  pool.run(d.B * d.K, [&](int64_t bk) {
    const int64_t b = bk / d.K, k = bk % d.K, cache = bk * d.T * d.D;
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t r = b * d.S + s;
      float *kh = qkv.data() + r * QKV + ND + k * d.D;
      rms(kh, kn, d.D, eps, kh);
      rope(kh, cos + r * d.D, sin + r * d.D, d.D);
      std::memcpy(kc + cache + (slot0 + s) * d.D, kh, d.D * sizeof(float));
      std::memcpy(vc + cache + (slot0 + s) * d.D, kh + KD, d.D * sizeof(float));
    }
    for (int64_t s = 0; s < d.S; ++s) {
      const int64_t r = b * d.S + s;
      for (int64_t n = k * d.G; n < (k + 1) * d.G; ++n) {
        float *qh = qkv.data() + r * QKV + n * d.D;
        rms(qh, qn, d.D, eps, qh);
        rope(qh, cos + r * d.D, sin + r * d.D, d.D);
        attend(qh, kc + cache, vc + cache, bias + r * d.T, d, scale, p.data() + (r * d.N + n) * d.T,
               o.data() + r * ND + n * d.D);
      }
    }
  });
  pool.run(nchunks(d.H), [&](int64_t c) {
    const int64_t o0 = c * kChunk, o1 = o0 + kChunk < d.H ? o0 + kChunk : d.H;
    rows_dot(wo, ND, o0, o1, o.data(), ND, R, y, d.H);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = o0; i < o1; ++i) y[r * d.H + i] = x[r * d.H + i] + y[r * d.H + i];
  });
  return 0;
}

struct MoeDims {
  int64_t R, H, E, I, I2, K;
};

// probs = softmax(logits); top-k (largest first, lower expert id on ties); optional renorm
static void route(const float *logits, const MoeDims &d, bool norm, int32_t *idx, float *w) {
  std::vector<float> pr(d.E);
  float mx = -INFINITY, sum = 0.f;
  for (int64_t e = 0; e < d.E; ++e) mx = logits[e] > mx ? logits[e] : mx;
  for (int64_t e = 0; e < d.E; ++e) sum += (pr[e] = std::exp(logits[e] - mx));
  for (int64_t e = 0; e < d.E; ++e) pr[e] /= sum;
  std::vector<char> used(d.E, 0);
  float tot = 0.f;
  for (int64_t j = 0; j < d.K; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < d.E; ++e)
      if (!used[e] && (best < 0 || pr[e] > pr[best])) best = e;
    used[best] = 1;
    idx[j] = static_cast<int32_t>(best);
    tot += (w[j] = pr[best]);
  }
  if (norm)
    for (int64_t j = 0; j < d.K; ++j) w[j] /= tot;
}

// inputs: 0 h [R,H]  1 ln2 [H]  2 router [E,H]  3 gate_up [E,2I,H]  4 down [E,H,I]
//         5 meta int32 [4] (unused, top_k, norm_topk_prob, unused)  6 fcfg float32 [2] (rms eps, unused)
// output: 7 y [R,H] = h + sum_j w_j SwiGLU_{e_j}(rms(h))
extern "C" int DecodeMoe(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  if (nparam != 8) return 1;
  const float *h = static_cast<const float *>(params[0]), *ln2 = static_cast<const float *>(params[1]);
  const float *wr = static_cast<const float *>(params[2]), *wgu = static_cast<const float *>(params[3]);
  const float *wd = static_cast<const float *>(params[4]);
  const int32_t *meta = static_cast<const int32_t *>(params[5]);
  const float *fcfg = static_cast<const float *>(params[6]);
  float *y = static_cast<float *>(params[7]);
  MoeDims d;
  d.R = 1, d.H = shapes[0][ndims[0] - 1];
  for (int i = 0; i + 1 < ndims[0]; ++i) d.R *= shapes[0][i];
  d.E = shapes[3][0], d.I2 = shapes[3][1], d.I = d.I2 / 2, d.K = meta[1];
  if (d.K < 1 || d.K > d.E) return 1;
  const int64_t A = d.R * d.K;
  std::vector<float> z(d.R * d.H), logits(d.R * d.E), w(A);
  std::vector<int32_t> idx(A);
  for (int64_t r = 0; r < d.R; ++r) rms(h + r * d.H, ln2, d.H, fcfg[0], z.data() + r * d.H);
  rows_dot(wr, d.H, 0, d.E, z.data(), d.H, d.R, logits.data(), d.E);
  for (int64_t r = 0; r < d.R; ++r) route(logits.data() + r * d.E, d, meta[2] != 0, idx.data() + r * d.K, w.data() + r * d.K);
  // stable counting sort of assignments by expert; zs holds the rows in expert order
  std::vector<int64_t> off(d.E + 1, 0), row(A);
  for (int64_t a = 0; a < A; ++a) ++off[idx[a] + 1];
  for (int64_t e = 0; e < d.E; ++e) off[e + 1] += off[e];
  std::vector<int64_t> cur(off.begin(), off.end() - 1);
  for (int64_t a = 0; a < A; ++a) row[a] = cur[idx[a]]++;
  std::vector<float> zs(A * d.H);
  for (int64_t a = 0; a < A; ++a) std::memcpy(zs.data() + row[a] * d.H, z.data() + (a / d.K) * d.H, d.H * sizeof(float));
  std::vector<int64_t> active;
  for (int64_t e = 0; e < d.E; ++e)
    if (off[e + 1] > off[e]) active.push_back(e);
  // Tasks: (active expert, slice of its ffn width). Each task runs gate/up rows, SwiGLU and its
  // slice of the down projection without a barrier; slices split an expert only when there are
  // fewer experts than ~2 tasks per thread (batch 1), and their partial outputs are summed last.
  const int64_t na = static_cast<int64_t>(active.size());
  const int64_t threads = Pool::get().threads();
  int64_t P = na >= 2 * threads ? 1 : (2 * threads + na - 1) / na;
  int64_t Is = ((d.I + P - 1) / P + 15) / 16 * 16;
  if (Is > d.I) Is = d.I;
  P = (d.I + Is - 1) / Is;
  std::vector<float> gu(A * 2 * Is * P), ye(P * A * d.H);
  Pool &pool = Pool::get();
  pool.run(na * P, [&](int64_t task) {
    const int64_t e = active[task / P], part = task % P, i0 = part * Is;
    const int64_t ni = i0 + Is < d.I ? Is : d.I - i0, r0 = off[e], n = off[e + 1] - off[e];
    const float *wg = wgu + e * d.I2 * d.H;
    float *g = gu.data() + part * A * 2 * Is + r0 * 2 * Is, *u = g + n * Is;  // [n, Is] each
    rows_dot(wg + i0 * d.H, d.H, 0, ni, zs.data() + r0 * d.H, d.H, n, g, Is);
    rows_dot(wg + (d.I + i0) * d.H, d.H, 0, ni, zs.data() + r0 * d.H, d.H, n, u, Is);
    for (int64_t a = 0; a < n; ++a)
      for (int64_t i = 0; i < ni; ++i) {
        const float gv = g[a * Is + i];
        g[a * Is + i] = gv / (1.0f + std::exp(-gv)) * u[a * Is + i];
      }
    // down slice: ye[part][r0 + a][h] = wd[e][h, i0:i0+ni] . act[a, :ni]
    rows_dot_ld(wd + e * d.H * d.I + i0, d.I, ni, 0, d.H, g, Is, n, ye.data() + (part * A + r0) * d.H, d.H);
  });
  pool.run(d.R, [&](int64_t r) {
    float *yr = y + r * d.H;
    for (int64_t i = 0; i < d.H; ++i) yr[i] = 0.f;
    for (int64_t j = 0; j < d.K; ++j) {
      const float wj = w[r * d.K + j];
      for (int64_t part = 0; part < P; ++part) {
        const float *src = ye.data() + (part * A + row[r * d.K + j]) * d.H;
        for (int64_t i = 0; i < d.H; ++i) yr[i] += wj * src[i];
      }
    }
    for (int64_t i = 0; i < d.H; ++i) yr[i] = h[r * d.H + i] + yr[i];
  });
  return 0;
}

// inputs: 0 k [B,K,S,D]  1 v [B,K,S,D]  2 k_cache [B,K,T,D]  3 v_cache [B,K,T,D]  4 meta int32 [4]
// output: 5 done float32 [1]
// Copies a prefill's keys/values into cache slots meta[0] .. meta[0] + S - 1 in place (the
// engine's prefill runs the forward path's attention and hands its k/v here).
extern "C" int CacheWrite(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 6 || ndims[0] != 4 || ndims[2] != 4) return 1;
  const float *k = static_cast<const float *>(params[0]), *v = static_cast<const float *>(params[1]);
  float *kc = static_cast<float *>(params[2]), *vc = static_cast<float *>(params[3]);
  const int64_t slot0 = static_cast<const int32_t *>(params[4])[0];
  const int64_t BK = shapes[0][0] * shapes[0][1], S = shapes[0][2], D = shapes[0][3], T = shapes[2][2];
  if (slot0 < 0 || slot0 + S > T || shapes[2][3] != D) return 1;
  for (int64_t i = 0; i < BK; ++i) {  // a plain copy: may run next to other kernels in a prefill
    std::memcpy(kc + (i * T + slot0) * D, k + i * S * D, S * D * sizeof(float));
    std::memcpy(vc + (i * T + slot0) * D, v + i * S * D, S * D * sizeof(float));
  }
  static_cast<float *>(params[5])[0] = 1.0f;
  return 0;
}

// inputs: 0 x [B,S,H]  1 norm [H]  2 lm_head [V,H]  3 fcfg float32 [2] (rms eps, unused)
// output: 4 logits [B,V] of the last position: lm_head(rms(x[:, S-1]))
extern "C" int DecodeHead(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 5 || ndims[0] != 3 || ndims[2] != 2) return 1;
  const float *x = static_cast<const float *>(params[0]), *nw = static_cast<const float *>(params[1]);
  const float *W = static_cast<const float *>(params[2]), *fcfg = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t B = shapes[0][0], S = shapes[0][1], H = shapes[0][2], V = shapes[2][0];
  std::vector<float> z(B * H);
  for (int64_t b = 0; b < B; ++b) rms(x + (b * S + S - 1) * H, nw, H, fcfg[0], z.data() + b * H);
  const int64_t chunk = 256, nc = (V + chunk - 1) / chunk;  // see kChunk
  Pool::get().run(nc, [&](int64_t c) {
    const int64_t o1 = (c + 1) * chunk < V ? (c + 1) * chunk : V;
    rows_dot(W, H, c * chunk, o1, z.data(), H, B, y, V);
  });
  return 0;
}
