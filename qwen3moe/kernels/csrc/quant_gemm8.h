// The prefill (many-row) GEMM of the opt-in int8-activation mode (docs/quantization.md): the same
// arithmetic as quant_vnni.h's decode rows, laid out for many x rows.
//
//   y[t, o] = sum over weight groups gi of  s_w(gi) * (sum over 16-input blocks b of gi of
//             sx(t, b) * sum_{k in b} u[o, k] q[t, k]  -  z(gi) * zs(t, gi))
//   zs(t, gi) = sum over blocks b of gi of sx(t, b) * sum_{k in b} q[t, k]
//
// which is quant_vnni.h's sum of s_w * sx * sum_k (u - z) q regrouped (the integer sums exact in
// int32, the float terms summed in another order). Why this layout: the decode rows put 4 inputs of
// one x row in each int32 lane, so every 64 products need a float conversion and a scale; here the
// 16 lanes are 16 x rows (tokens) and each lane's vpdpbusd sums 4 inputs of its token, so a 16-input
// block of one weight row against 16 tokens is 4 vpdpbusd, then one conversion and one FMA with the
// tokens' block scales: 6 instructions for 256 products, where the fp32-activation micro-kernel
// (quant_ops.cc) needs 16 FMAs. Weight bytes are broadcast 4 at a time (u8, as stored for int8;
// int4 rows unpacked to one byte per input once per block of rows); the zero point is applied once
// per group through zs, which depends on the tokens only.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_amx.h"
#include "quant_vnni.h"

static const int64_t kLanes = 16;  // x rows per vector

// Whether W takes int8 activations in the prefill GEMM: the decode rule (act8_fits) and whole
// 16-input blocks per group (all real group sizes).
static inline bool gemm8_fits(const QMat &W) { return act8_fits(W) && W.g % kActBlock == 0; }

// x rows of one product, quantized and packed: rows in vectors of 16 (the last padded with zeros),
//   q  int32 [V, I/4, 16]: dword (v, j, l) = q[16v + l, 4j .. 4j + 3]
//   sx float [V, I/16, 16], zs float [V, G, 16] (G = I / g weight groups)
struct XPack8 {
  int64_t V = 0, I = 0, G = 0, g = 0;
  std::vector<int32_t> q;
  std::vector<float> sx, zs;
  void reset(int64_t T, int64_t I_, int64_t g_) {
    V = (T + kLanes - 1) / kLanes, I = I_, g = g_, G = I_ / g_;
    q.assign(V * (I / 4) * kLanes, 0), sx.assign(V * (I / kActBlock) * kLanes, 0.f), zs.assign(V * G * kLanes, 0.f);
  }
};

// Row t of x into p (x rows quantized block by block; t's lane of its vector)
static void pack_row8(const float *xr, int64_t t, XPack8 &p) {
  const int64_t v = t / kLanes, l = t % kLanes, J = p.I / 4, NB = p.I / kActBlock, bpg = p.g / kActBlock;
  alignas(64) int8_t qb[kActBlock];
  for (int64_t b = 0; b < NB; ++b) {
    const float s = quantize_block16(xr + b * kActBlock, qb);
    int32_t sum = 0;
    for (int k = 0; k < kActBlock; ++k) sum += qb[k];
    int32_t *dst = p.q.data() + (v * J + b * 4) * kLanes + l;
    for (int j = 0; j < 4; ++j) std::memcpy(dst + j * kLanes, qb + 4 * j, 4);
    p.sx[(v * NB + b) * kLanes + l] = s;
    p.zs[(v * p.G + b / bpg) * kLanes + l] += s * static_cast<float>(sum);  // blocks in order
  }
}

// int4 rows [o0, o0 + n) unpacked to one byte per input (natural order) into out [n, I]
static void unpack_q4_rows(const QMat &W, int64_t o0, int64_t n, uint8_t *out) {
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t *p = W.w + (o0 + r) * W.ld;
    uint8_t *d = out + r * W.I;
    int64_t h = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (quant_vector())
      for (; h + 64 <= W.I; h += 64) {  // byte b -> word (b & 15) | (b >> 4) << 8: (low, high) in memory
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + h / 2)));
        const __m512i lo = _mm512_and_si512(w, _mm512_set1_epi16(0x0F));
        const __m512i hi = _mm512_slli_epi16(_mm512_and_si512(w, _mm512_set1_epi16(0xF0)), 4);
        _mm512_storeu_si512(d + h, _mm512_or_si512(lo, hi));
      }
#endif
    for (; h < W.I; h += 2) d[h] = p[h / 2] & 15, d[h + 1] = p[h / 2] >> 4;
  }
}

// Scalar definition of one output: row o's bytes w (natural order) against lane l of vector v
static float gemm8_dot_scalar(const QMat &W, int64_t o, const uint8_t *w, const XPack8 &p, int64_t v, int64_t l) {
  const int64_t J = p.I / 4, NB = p.I / kActBlock, bpg = p.g / kActBlock;
  float y = 0.f;
  for (int64_t gi = 0; gi < p.G; ++gi) {
    float acc = 0.f;
    for (int64_t b = gi * bpg; b < (gi + 1) * bpg; ++b) {
      int32_t d = 0;
      for (int64_t k = b * kActBlock; k < (b + 1) * kActBlock; ++k) {
        const int32_t dw = p.q[(v * J + k / 4) * kLanes + l];
        d += w[k] * static_cast<int8_t>(dw >> (8 * (k % 4)));
      }
      acc = std::fma(static_cast<float>(d), p.sx[(v * NB + b) * kLanes + l], acc);
    }
    const float zf = static_cast<float>(W.z[o * W.lds + gi]);
    y = std::fma(half_to_float(W.s[o * W.lds + gi]), std::fma(-zf, p.zs[(v * p.G + gi) * kLanes + l], acc), y);
  }
  return y;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// y[16 (v0 + z) + j, o + r] for NR weight rows (bytes w, rows ldw apart) x NZ token vectors,
// valid rows of y from v0's first; NR x NZ int32 block sums and NR x NZ float group sums in zmm.
template <int NR, int NZ>
static void gemm8_micro(const QMat &W, int64_t o, const uint8_t *w, int64_t ldw, const XPack8 &p, int64_t v0,
                        float *y, int64_t ldy, int64_t valid) {
  const int64_t J = p.I / 4, NB = p.I / kActBlock, bpg = p.g / kActBlock;
  alignas(64) float out[NR][NZ * kLanes];
  for (int64_t gi = 0; gi < p.G; ++gi) {
    __m512 acc[NR][NZ];
    for (int r = 0; r < NR; ++r)
      for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_setzero_ps();
    for (int64_t b = gi * bpg; b < (gi + 1) * bpg; ++b) {
      __m512i d[NR][NZ];
      for (int r = 0; r < NR; ++r)
        for (int z = 0; z < NZ; ++z) d[r][z] = _mm512_setzero_si512();
      for (int64_t j = 4 * b; j < 4 * b + 4; ++j) {
        __m512i xv[NZ];
        for (int z = 0; z < NZ; ++z) xv[z] = _mm512_loadu_si512(p.q.data() + ((v0 + z) * J + j) * kLanes);
        for (int r = 0; r < NR; ++r) {
          int32_t wd;
          std::memcpy(&wd, w + r * ldw + 4 * j, 4);
          const __m512i wb = _mm512_set1_epi32(wd);
          for (int z = 0; z < NZ; ++z) d[r][z] = _mm512_dpbusd_epi32(d[r][z], wb, xv[z]);
        }
      }
      for (int z = 0; z < NZ; ++z) {
        const __m512 s = _mm512_loadu_ps(p.sx.data() + ((v0 + z) * NB + b) * kLanes);
        for (int r = 0; r < NR; ++r) acc[r][z] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r][z]), s, acc[r][z]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 sw = _mm512_set1_ps(half_to_float(W.s[(o + r) * W.lds + gi]));
      const __m512 zf = _mm512_set1_ps(static_cast<float>(W.z[(o + r) * W.lds + gi]));
      for (int z = 0; z < NZ; ++z) {
        const __m512 t = _mm512_fnmadd_ps(zf, _mm512_loadu_ps(p.zs.data() + ((v0 + z) * p.G + gi) * kLanes), acc[r][z]);
        float *dst = out[r] + z * kLanes;
        _mm512_store_ps(dst, gi == 0 ? _mm512_mul_ps(sw, t) : _mm512_fmadd_ps(sw, t, _mm512_load_ps(dst)));
      }
    }
  }
  for (int64_t j = 0; j < valid; ++j)
    for (int r = 0; r < NR; ++r) y[j * ldy + r] = out[r][j];
}

// Weight rows per micro-kernel call for NZ token vectors (2 x NR x NZ accumulators + NZ x vectors).
// At most 2 vectors: 6 rows x 2 vectors ran 1.2-1.35x the rate of 3 x 4 on q_proj at 512 rows
// (more products per x load did not pay for fewer broadcasts per vpdpbusd; bench/gemm8_micro.cc).
template <int NZ>
constexpr int kGemm8Rows = NZ == 1 ? 12 : 6;

template <int NZ>
static void gemm8_rows(const QMat &W, int64_t o0, int64_t n, const uint8_t *w, int64_t ldw, const XPack8 &p,
                       int64_t v0, float *y, int64_t ldy, int64_t valid) {
  constexpr int NR = kGemm8Rows<NZ>;
  int64_t r = 0;
  for (; r + NR <= n; r += NR) gemm8_micro<NR, NZ>(W, o0 + r, w + r * ldw, ldw, p, v0, y + r, ldy, valid);
  for (; r < n; ++r) gemm8_micro<1, NZ>(W, o0 + r, w + r * ldw, ldw, p, v0, y + r, ldy, valid);
}
#endif

// y[t, o0 + r] for all T rows of p and weight rows [o0, o0 + n): int4 / 6-bit rows unpacked into `buf`
// (n * I bytes), int8 rows read in place; token vectors in pairs.
static void gemm8_block(const QMat &W, int64_t o0, int64_t n, const XPack8 &p, int64_t T, float *y, int64_t ldy,
                        uint8_t *buf) {
  const uint8_t *w = W.w + o0 * W.ld;
  int64_t ldw = W.ld;
  if (W.kind == kQ4) unpack_q4_rows(W, o0, n, buf), w = buf, ldw = W.I;
  if (W.kind == kQ6) {  // 6 bits: likewise (quant_q6.h)
    for (int64_t r = 0; r < n; ++r) q6_unpack_row(W.w + (o0 + r) * W.ld, W.I, buf + r * W.I);
    w = buf, ldw = W.I;
  }
#if defined(QWEN3MOE_HAVE_AMX)
  if (n >= 16 && amx_fits(W)) {  // whole 16-row tiles on AMX, the rest below
    const int64_t done = n / 16 * 16, J = p.I / 4, NB = p.I / kActBlock;
    amx_begin();
    for (int64_t r = 0; r < done; r += 16)
      for (int64_t v = 0; v < p.V; ++v)
        gemm8_amx_tile(W, o0 + r, w + r * ldw, ldw, p.q.data() + v * J * kLanes, p.sx.data() + v * NB * kLanes,
                       p.zs.data() + v * p.G * kLanes, NB, p.g / kActBlock, y + v * kLanes * ldy + o0 + r, ldy,
                       std::min(kLanes, T - v * kLanes));
    amx_end();
    if (done == n) return;
    o0 += done, n -= done, w += done * ldw;
  }
#endif
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (quant_vector()) {
    for (int64_t v0 = 0; v0 < p.V; v0 += 2) {
      float *yg = y + v0 * kLanes * ldy + o0;
      if (v0 + 1 < p.V)
        gemm8_rows<2>(W, o0, n, w, ldw, p, v0, yg, ldy, std::min(2 * kLanes, T - v0 * kLanes));
      else
        gemm8_rows<1>(W, o0, n, w, ldw, p, v0, yg, ldy, T - v0 * kLanes);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < n; ++r)
      y[t * ldy + o0 + r] = gemm8_dot_scalar(W, o0 + r, w + r * ldw, p, t / kLanes, t % kLanes);
}
