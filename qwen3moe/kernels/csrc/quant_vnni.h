// The opt-in int8-activation mode of the decode kernels (QuantizationConfig(activations="int8"),
// docs/quantization.md): int8 / int4 weight rows dotted with activations quantized to int8 on the
// fly, integer products summed exactly in int32 (AVX512-VNNI vpdpbusd: 64 u8 x s8 products per
// instruction; the default fp32-activation loops widen every weight to float and are compute-bound
// on this machine's 2 cores, bench/RESULTS.md).
//
// Arithmetic (the definition the tests' NumPy reference implements): per batch row, each block of
// kActBlock = 16 consecutive inputs has sx = max|x| / 127 and q_k = rint(x_k * (127 / max|x|)) in
// [-127, 127] (all zero for an all-zero block), symmetric, float32 math. Then
//   y[o] = sum over blocks and weight groups of  s_w(group) * sx(block) * sum_k (u_k - z(group)) q_k
// with the inner sums exact (int32). Kernel order: a "chunk" is the inputs one 64-byte weight
// vector covers (64 for int8, 128 for int4 and for 6 bits, whose chunk is unpacked to two vectors of
// u8 in int4's even / odd order, quant_q6.h); the 16 int32 lanes of a chunk each cover 4 (int8) or 8
// (int4, 6 bits) consecutive inputs of one activation block and one weight group (act8_fits), so each
// lane's exact sum is turned to float once and multiplied by its own sx * s_w, summed over chunks
// in float32, lanes reduced last (int8 / 6 bits per channel: s_w multiplies the finished sum).
// Rows whose shape does not fit (act8_fits) use the fp32-activation loops. Blocks of 16 rather
// than llama.cpp's 32: mean KL vs fp32 on the quality fixture 0.00028 instead of 0.00044
// (llama.cpp Q8_0: 0.00034; bench/RESULTS.md), at no cost in the loop (a scale per lane anyway).
// Without AVX512-VNNI in the build (or after quant_set_portable(1)) a scalar loop does the same
// arithmetic lane by lane.
#pragma once
#include <cmath>
#include <cstring>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "quant_common.h"

static const int64_t kActBlock = 16;

// inputs per 64 weight bytes, and per int32 lane
static inline int64_t chunk_inputs(int kind) { return kind == kQ8 ? 64 : 128; }
static inline int64_t lane_inputs(int kind) { return kind == kQ8 ? 4 : 8; }

// Whether W's rows can take int8 activations (else the fp32-activation loops run)
// (a lane then lies in one activation block and one weight group, and a chunk in one group or a
// whole number of them)
static inline bool act8_fits(const QMat &W) {
  if (!W.quantized()) return false;
  const int64_t CW = chunk_inputs(W.kind);
  return W.I % CW == 0 && W.g % lane_inputs(W.kind) == 0 && (W.g % CW == 0 || CW % W.g == 0);
}

// Activation rows quantized for one weight kind's chunk layout: q in kernel order (int4, 6 bits: per
// 128-input chunk, the 64 even inputs, then the 64 odd ones, as the low / high nibbles hold them),
// per-lane activation scales sv, per-lane sums of q (ls) and -zd * ls for the default zero point zd.
// For int4 g128 rows with float32 activations it holds x in quant_q4w.h's order instead (xw).
struct ActQ {
  int kind = -1;
  int64_t nb = 0, I = 0, C = 0;  // rows, inputs, chunks per row
  avec<int8_t> q;                // [nb, I]
  avec<float> sv;                // [nb, C, 16]
  avec<int32_t> ls, zl;          // [nb, C, 16]
  avec<float> xw;                // q4w_order_x's [wnb, wI] when wnb >= 0
  int64_t wnb = -1, wI = 0;
  // empty again for the next op's rows (prepare_x fills an empty one), its buffers kept
  void reset() { kind = -1, nb = I = C = 0, wnb = -1, wI = 0; }
};

// A view of rows [b0, ...) of an ActQ (or none: q == nullptr, xw == nullptr)
struct ActView {
  int kind = -1;  // the weight kind q was made for (its layout and zero point)
  const int8_t *q = nullptr;
  const float *sv = nullptr;
  const int32_t *ls = nullptr, *zl = nullptr;
  int64_t I = 0, C = 0;
  const float *xw = nullptr;
  int64_t wI = 0;
  ActView rows(int64_t b0) const {
    ActView v = *this;
    if (q) v.q += b0 * I, v.sv += b0 * C * 16, v.ls += b0 * C * 16, v.zl += b0 * C * 16;
    if (xw) v.xw += b0 * wI;
    return v;
  }
};

static inline int32_t default_zero(int kind) { return kind == kQ4 ? 8 : (kind == kQ6 ? 32 : 128); }

// One 16-input block of x quantized: q[0:16] = rint(x * (127 / max|x|)) in [-127, 127] (all zero
// for an all-zero block), returns sx = max|x| / 127; float32 math, the vector form the same ops.
static inline float quantize_block16(const float *x, int8_t *q) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (quant_vector()) {
    const __m512 v = _mm512_loadu_ps(x);
    const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
    const float inv = amax > 0.f ? 127.0f / amax : 0.f;
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv)));  // MXCSR: round half to even
    r = _mm512_max_epi32(_mm512_min_epi32(r, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(q), _mm512_cvtepi32_epi8(r));
    return amax / 127.0f;
  }
#endif
  float amax = 0.f;
  for (int k = 0; k < kActBlock; ++k) amax = std::fmax(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.0f / amax : 0.f;
  for (int k = 0; k < kActBlock; ++k) {
    const float v = std::nearbyint(x[k] * inv);  // round half to even, as np.rint
    q[k] = static_cast<int8_t>(v > 127.f ? 127.f : (v < -127.f ? -127.f : v));
  }
  return amax / 127.0f;
}

// x [nb, I] (rows ldx apart) -> a in `kind`'s layout (I % chunk_inputs(kind) == 0)
static void act_quantize(int kind, const float *x, int64_t ldx, int64_t nb, int64_t I, ActQ &a) {
  const int64_t CW = chunk_inputs(kind), LW = lane_inputs(kind), C = I / CW, zd = default_zero(kind);
  a.kind = kind, a.nb = nb, a.I = I, a.C = C;
  a.q.resize(nb * I), a.sv.resize(nb * C * 16), a.ls.resize(nb * C * 16), a.zl.resize(nb * C * 16);
  // per-thread scratch, and no division by the runtime chunk width in the per-input loops: this
  // runs once per op and batch row (for a batch-8 MoE step, 64 rows per layer)
  thread_local std::vector<int8_t> qn;
  thread_local std::vector<float> sx;
  qn.resize(I), sx.resize(I / kActBlock);
  for (int64_t b = 0; b < nb; ++b) {
    const float *xb = x + b * ldx;
    for (int64_t k0 = 0; k0 < I; k0 += kActBlock) sx[k0 / kActBlock] = quantize_block16(xb + k0, qn.data() + k0);
    int8_t *qb = a.q.data() + b * I;
    if (kind == kQ8) {
      std::memcpy(qb, qn.data(), I);
    } else {  // each 128-input chunk: its 64 even inputs, then its 64 odd ones
      for (int64_t c0 = 0; c0 < I; c0 += 128)
        for (int64_t j = 0; j < 64; ++j) qb[c0 + j] = qn[c0 + 2 * j], qb[c0 + 64 + j] = qn[c0 + 2 * j + 1];
    }
    const int8_t *qk = qn.data();
    for (int64_t at = b * C * 16; at < (b + 1) * C * 16; ++at, qk += LW) {
      int32_t s = 0;
      for (int64_t k = 0; k < LW; ++k) s += qk[k];
      a.ls[at] = s, a.zl[at] = -zd * s, a.sv[at] = sx[(qk - qn.data()) / kActBlock];
    }
  }
}

// dst shaped like src (empty src: empty dst) with nb rows, for act_copy_row
static inline void act_rows_like(const ActQ &src, int64_t nb, ActQ &dst) {
  dst.reset();
  if (src.kind >= 0) {
    dst.kind = src.kind, dst.nb = nb, dst.I = src.I, dst.C = src.C;
    dst.q.resize(nb * src.I), dst.sv.resize(nb * src.C * 16), dst.ls.resize(nb * src.C * 16), dst.zl.resize(nb * src.C * 16);
  }
  if (src.wnb >= 0) dst.wnb = nb, dst.wI = src.wI, dst.xw.resize(nb * src.wI);
}

// Row `to` of dst (act_rows_like) = row `from` of src: a copy of a quantized / reordered row
static inline void act_copy_row(const ActQ &src, int64_t from, ActQ &dst, int64_t to) {
  const int64_t L = src.C * 16;
  if (src.kind >= 0) {
    std::memcpy(dst.q.data() + to * src.I, src.q.data() + from * src.I, src.I);
    std::memcpy(dst.sv.data() + to * L, src.sv.data() + from * L, L * sizeof(float));
    std::memcpy(dst.ls.data() + to * L, src.ls.data() + from * L, L * sizeof(int32_t));
    std::memcpy(dst.zl.data() + to * L, src.zl.data() + from * L, L * sizeof(int32_t));
  }
  if (src.wnb >= 0) std::memcpy(dst.xw.data() + to * src.wI, src.xw.data() + from * src.wI, src.wI * sizeof(float));
}

static inline ActView act_view(const ActQ &a) {
  ActView v;
  if (a.kind >= 0) v = ActView{a.kind, a.q.data(), a.sv.data(), a.ls.data(), a.zl.data(), a.I, a.C};
  if (a.wnb >= 0) v.xw = a.xw.data(), v.wI = a.wI;
  return v;
}

// Per-lane weight scale and zero point of chunk c of row o (act8_fits: a lane is in one group)
static inline void lane_group(const QMat &W, int64_t o, int64_t c, int64_t l, float *s, int32_t *z) {
  const int64_t k = c * chunk_inputs(W.kind) + l * lane_inputs(W.kind), gi = k / W.g;
  *s = half_to_float(W.s[o * W.lds + gi]);
  *z = W.z[o * W.lds + gi];
}

// Scalar definition: y[b * ldy + o] for rows [o0, o1), batch rows [0, nb), lane by lane
static void act8_rows_scalar(const QMat &W, int64_t o0, int64_t o1, const ActView &a, int64_t nb, float *y,
                             int64_t ldy) {
  const int64_t C = a.C;
  const bool rowscale = (W.kind == kQ8 || W.kind == kQ6) && W.g == W.I;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t *w = W.w + o * W.ld;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t *q = a.q + b * a.I;
      float acc[16] = {0.f};
      for (int64_t c = 0; c < C; ++c)
        for (int64_t l = 0; l < 16; ++l) {
          float s;
          int32_t z, d = 0;
          lane_group(W, o, c, l, &s, &z);
          for (int64_t t = 0; t < 4; ++t) {
            const int64_t j = c * 64 + 4 * l + t;  // weight byte
            if (W.kind == kQ8) {
              d += (w[j] - z) * q[j];
            } else if (W.kind == kQ6) {  // inputs 2j' and 2j' + 1 of the chunk, j' = 4l + t
              const int64_t k = c * 128 + 2 * (4 * l + t);
              d += (q6_value(w, W.I, k) - z) * q[c * 128 + 4 * l + t] + (q6_value(w, W.I, k + 1) - z) * q[c * 128 + 64 + 4 * l + t];
            } else {  // low nibble: even input (q's first 64 of the chunk), high: odd
              d += ((w[j] & 15) - z) * q[c * 128 + 4 * l + t] + ((w[j] >> 4) - z) * q[c * 128 + 64 + 4 * l + t];
            }
          }
          const float sv = a.sv[(b * C + c) * 16 + l];
          acc[l] = std::fma(static_cast<float>(d), rowscale ? sv : sv * s, acc[l]);
        }
      float sum = 0.f;
      for (int64_t l = 0; l < 16; ++l) sum += acc[l];
      y[b * ldy + o] = rowscale ? sum * half_to_float(W.s[o * W.lds]) : sum;
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Chunk c's per-lane weight scales / zero-point terms for a row. One group per chunk (g >= chunk
// inputs): broadcasts, and the precomputed -zd * ls when the row's zero point is the default;
// several (int4 g32 / g64, int8 g32): the chunk's group values spread to their lanes.
struct LaneGroups {
  __m512i idx;  // lane -> group within the chunk
  int64_t per;  // groups per chunk (1 when g >= chunk inputs)
  explicit LaneGroups(const QMat &W) {
    const int64_t CW = chunk_inputs(W.kind);
    per = W.g >= CW ? 1 : CW / W.g;
    alignas(64) int32_t t[16];
    for (int l = 0; l < 16; ++l) t[l] = per == 1 ? 0 : static_cast<int32_t>(l * lane_inputs(W.kind) / W.g);
    idx = _mm512_load_si512(t);
  }
};

// zero-point term -z * ls for one batch row's chunk, and the weight scale vector
static inline void chunk_terms(const QMat &W, const LaneGroups &lg, int64_t o, int64_t c, __m512 &s, bool &zdef,
                               __m512i &zneg) {
  const int64_t gi = c * chunk_inputs(W.kind) / W.g;
  const uint16_t *sp = W.s + o * W.lds + gi;
  const uint8_t *zp = W.z + o * W.lds + gi;
  if (lg.per == 1) {
    s = _mm512_set1_ps(half_to_float(*sp));
    zdef = *zp == default_zero(W.kind);
    zneg = _mm512_set1_epi32(-static_cast<int32_t>(*zp));
    return;
  }
  const __mmask16 m = static_cast<__mmask16>((1u << lg.per) - 1);
  const __m256i h = _mm256_maskz_loadu_epi16(m, sp);
  s = _mm512_permutexvar_ps(lg.idx, _mm512_cvtph_ps(h));
  const __m128i zb = _mm_maskz_loadu_epi8(m, zp);
  zneg = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_permutexvar_epi32(lg.idx, _mm512_cvtepu8_epi32(zb)));
  zdef = false;
}

// How a row's weight scales / zero points meet the chunks: one per row (int8 per channel, 6 bits: the
// scale multiplies the finished sum), one group per chunk (int4 g128: 16 groups' scales read and
// checked at once), anything else (chunk_terms per chunk).
enum ScaleMode { kRowScale, kGroupPerChunk, kGeneral };

template <int KIND, int NB, int SM>
static inline void act8_block4(const QMat &W, const LaneGroups &lg, int64_t o, const ActView &a, float *y,
                               int64_t ldy, const RowPrefetch *next) {
  __m512 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  const uint8_t *w0 = W.w + o * W.ld;
  const int64_t CW = chunk_inputs(KIND), bstride = a.C * 16;
  const uint8_t zd = static_cast<uint8_t>(default_zero(KIND));
  RowPrefetch pf = next ? *next : RowPrefetch{nullptr, 0, 0, 0};
  alignas(64) float s16[4][16];  // kGroupPerChunk: scales of chunks c .. c + 15 (read as broadcasts)
  __mmask16 zoff16[4];   // ... and which of them have a zero point other than the default
  bool zdef_row[4];      // kRowScale
  for (int r = 0; r < 4; ++r) {
    zdef_row[r] = W.z[(o + r) * W.lds] == zd;
    zoff16[r] = 0;
  }
  for (int64_t c = 0; c < a.C; ++c) {
    if (next) pf.step(4 * (KIND == kQ6 ? 96 : 64));
    if (SM == kGroupPerChunk && c % 16 == 0) {
      const __mmask16 m = a.C - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (a.C - c)) - 1);
      for (int r = 0; r < 4; ++r) {
        _mm512_store_ps(s16[r], _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, W.s + (o + r) * W.lds + c)));
        zoff16[r] = _mm_mask_cmpneq_epu8_mask(m, _mm_maskz_loadu_epi8(m, W.z + (o + r) * W.lds + c), _mm_set1_epi8(zd));
      }
    }
    __m512i xe[NB], xo[NB];
    __m512 sv[NB];
    for (int b = 0; b < NB; ++b) {
      xe[b] = _mm512_loadu_si512(a.q + b * a.I + c * CW);
      if (KIND != kQ8) xo[b] = _mm512_loadu_si512(a.q + b * a.I + c * CW + 64);
      sv[b] = _mm512_loadu_ps(a.sv + b * bstride + c * 16);
    }
    for (int r = 0; r < 4; ++r) {
      __m512i lo, hi;
      if (KIND == kQ6) {
        q6x128_u8(w0 + r * W.ld, W.I, c, lo, hi);
      } else {
        const __m512i wv = _mm512_loadu_si512(w0 + r * W.ld + c * 64);
        lo = KIND == kQ4 ? _mm512_and_si512(wv, lo4) : wv;
        hi = KIND == kQ4 ? _mm512_and_si512(_mm512_srli_epi16(wv, 4), lo4) : wv;
      }
      __m512 s = _mm512_setzero_ps();
      bool zdef;
      __m512i zneg = _mm512_setzero_si512();  // read only when !zdef
      if (SM == kRowScale) {
        zdef = zdef_row[r];
        if (!zdef) zneg = _mm512_set1_epi32(-static_cast<int32_t>(W.z[(o + r) * W.lds]));
      } else if (SM == kGroupPerChunk) {
        s = _mm512_set1_ps(s16[r][c % 16]);  // a broadcast load, not a vpermps on the busy shuffle port
        zdef = !((zoff16[r] >> (c % 16)) & 1);
        if (!zdef) zneg = _mm512_set1_epi32(-static_cast<int32_t>(W.z[(o + r) * W.lds + c]));
      } else {
        chunk_terms(W, lg, o + r, c, s, zdef, zneg);
      }
      for (int b = 0; b < NB; ++b) {
        const int64_t at = b * bstride + c * 16;
        __m512i d = zdef ? _mm512_loadu_si512(a.zl + at) : _mm512_mullo_epi32(_mm512_loadu_si512(a.ls + at), zneg);
        d = _mm512_dpbusd_epi32(d, lo, xe[b]);
        if (KIND != kQ8) d = _mm512_dpbusd_epi32(d, hi, xo[b]);
        acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), SM == kRowScale ? sv[b] : _mm512_mul_ps(sv[b], s), acc[r][b]);
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float sc = SM == kRowScale ? half_to_float(W.s[(o + r) * W.lds]) : 1.0f;
    for (int b = 0; b < NB; ++b) y[b * ldy + r] = _mm512_reduce_add_ps(acc[r][b]) * sc;
  }
}

template <int KIND, int SM>
static void act8_rows_vec(const QMat &W, int64_t o0, int64_t o1, const ActView &a, int64_t nb, float *y, int64_t ldy) {
  const LaneGroups lg(W);
  const int64_t full = o0 + (o1 - o0) / 4 * 4;
  auto call = [&](int64_t o, int64_t b, float *yb, int64_t ld, const RowPrefetch *pf) {
    const ActView ab = a.rows(b);
    switch (nb - b) {
      case 1: return act8_block4<KIND, 1, SM>(W, lg, o, ab, yb, ld, pf);
      case 2: return act8_block4<KIND, 2, SM>(W, lg, o, ab, yb, ld, pf);
      case 3: return act8_block4<KIND, 3, SM>(W, lg, o, ab, yb, ld, pf);
      default: return act8_block4<KIND, 4, SM>(W, lg, o, ab, yb, ld, pf);
    }
  };
  for (int64_t o = o0; o < full; o += 4)
    for (int64_t b = 0; b < nb; b += 4) {
      RowPrefetch pf{reinterpret_cast<const char *>(W.w + (o + 4) * W.ld), 0, W.ld, W.ld};
      call(o, b, y + b * ldy + o, ldy, b == 0 && o + 8 <= o1 ? &pf : nullptr);
    }
  if (full == o1) return;
  float tmp[4 * 4];
  for (int64_t b = 0; b < nb; b += 4) {
    call(o1 - 4, b, tmp, 4, nullptr);
    for (int64_t bb = 0; bb < 4 && b + bb < nb; ++bb)
      for (int64_t o = full; o < o1; ++o) y[(b + bb) * ldy + o] = tmp[bb * 4 + o - (o1 - 4)];
  }
}
#endif

// y[b * ldy + o] = W[o, :] . x[b, :] in the int8-activation arithmetic, rows [o0, o1), batch rows
// [0, nb); a holds x quantized in W.kind's layout (act8_fits(W)).
static void act8_rows(const QMat &W, int64_t o0, int64_t o1, const ActView &a, int64_t nb, float *y, int64_t ldy) {
  if (o1 <= o0 || nb <= 0) return;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (quant_vector() && o1 - o0 >= 4) {
    const bool per_chunk = W.g == chunk_inputs(W.kind);
    if (W.kind == kQ6) return act8_rows_vec<kQ6, kRowScale>(W, o0, o1, a, nb, y, ldy);  // g == I (parse_weight)
    if (W.kind == kQ8 && W.g == W.I) return act8_rows_vec<kQ8, kRowScale>(W, o0, o1, a, nb, y, ldy);
    if (W.kind == kQ8)
      return per_chunk ? act8_rows_vec<kQ8, kGroupPerChunk>(W, o0, o1, a, nb, y, ldy)
                       : act8_rows_vec<kQ8, kGeneral>(W, o0, o1, a, nb, y, ldy);
    return per_chunk ? act8_rows_vec<kQ4, kGroupPerChunk>(W, o0, o1, a, nb, y, ldy)
                     : act8_rows_vec<kQ4, kGeneral>(W, o0, o1, a, nb, y, ldy);
  }
#endif
  act8_rows_scalar(W, o0, o1, a, nb, y, ldy);
}

// The activation rows of one product as the row kernels take them: float32 rows, plus (int8
// mode) the quantized rows for int8 and for int4 weights when an op's weights need them.
struct XIn {
  const float *x = nullptr;
  int64_t ldx = 0, nb = 0;
  ActView q8, q4;  // empty unless prepared
  XIn rows(int64_t b0, int64_t n) const {
    XIn v = *this;
    v.x += b0 * ldx, v.nb = n;
    v.q8 = q8.rows(b0), v.q4 = q4.rows(b0);
    return v;
  }
  const ActView &for_kind(int kind) const { return kind == kQ8 ? q8 : q4; }  // 6 bits: int4's layout
};

// x rows [nb, I] for the weights `ws` (int8 mode when act8; nullptr entries skipped): quantizes
// once per weight kind that takes int8 activations, and for int4 g128 weights read with float32
// activations puts x once into quant_q4w.h's order; buffers in bq8 / bq4 (which must outlive the
// returned XIn). x as given: a permuted weight's caller gathers it first (decode_rows.h prepare_each).
static inline XIn prepare_x(const float *x, int64_t ldx, int64_t nb, int64_t I, bool act8,
                            std::initializer_list<const QMat *> ws, ActQ &bq8, ActQ &bq4) {
  XIn in;
  in.x = x, in.ldx = ldx, in.nb = nb;
  for (const QMat *w : ws) {
    if (w == nullptr || !w->quantized() || w->I != I) continue;
    ActQ &b = w->kind == kQ8 ? bq8 : bq4;
    if (act8 && act8_fits(*w)) {
      if (b.kind != w->kind || b.nb != nb || b.I != I) act_quantize(w->kind, x, ldx, nb, I, b);
    } else if (q4w_fits(*w) && b.wnb < 0) {  // once per op, not per row chunk
      q4w_order_x(x, ldx, nb, I, b.xw);
      b.wnb = nb, b.wI = I;
    }
  }
  in.q8 = act_view(bq8), in.q4 = act_view(bq4);
  return in;
}
