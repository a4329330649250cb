// Weight rows stored as bfloat16 or weight-only int8 / int4 (group-wise, fp16 scales, uint8 zero
// points), dequantized while they stream and dotted with float32 activations (fp32 accumulation).
//
// Layout (the in-memory contract with the model side, docs/quantization.md): a projection
// W[O, I] with group size g (int8 per output channel: g = I), G = I / g groups per row:
//   qweight uint8 [O, I] (8 bits), [O, I/2] (4 bits: low nibble = even k, high nibble = odd k) or
//   [O, 3I/4] (6 bits, one group per row, the opt-in lm_head, I % 4 == 0: bytes [0, I/2) hold
//   u & 15 packed as 4 bits packs u; byte I/2 + m holds u[4m + t] >> 4 at bits 2t..2t+1; quant_q6.h),
//   scales float16 [O, G], qzeros uint8 [O, G];  W[o, k] = (u[o, k] - z[o, k/g]) * float(s[o, k/g]).
// bf16: the plain bfloat16 matrix. Fused experts stack E such matrices (leading dim).
// Each weight vector is dequantized to exactly that float32 value (u - z is an exact integer, one
// rounding in the multiply), so results differ from a NumPy dequant reference only by the fp32
// summation order (int8 / 6 bits with one group per row: the scale multiplies the row's finished dot
// product instead, qblock4's ROWSCALE: one rounding per product either way). AVX-512 code when the build has it, else (or after quant_set_portable(1)) the
// portable scalar loops, which the tests force to check them too.
// kernels/build.py hashes csrc/*.h into every kernel's cache key.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum WKind { kF32 = 0, kBF16 = 1, kQ8 = 2, kQ4 = 3, kQ6 = 4 };

// 64-byte aligned storage for the activation rows the row loops read 64 bytes at a time: with a
// std::vector's 16-byte alignment most such loads spanned two cache lines, and the loops that
// reload x per weight vector slowed by a third (int4 g128 rows: 21 vs 28 GB/s per core of CPU
// time, the same loop and data with x at offset 32 vs 0; bench/rows_bw.cc).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U> &) {}
  T *allocate(size_t n) {
    void *p = nullptr;
    if (posix_memalign(&p, 64, n * sizeof(T)) != 0) throw std::bad_alloc();
    return static_cast<T *>(p);
  }
  void deallocate(T *p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const Aligned64<U> &) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U> &) const { return false; }
};
template <class T>
using avec = std::vector<T, Aligned64<T>>;

// Runtime switch to the scalar loops (tests; QWEN3MOE_KERNEL_PORTABLE=1 at load sets it too).
static inline bool &quant_portable_flag() {
  static bool flag = [] {
    const char *e = std::getenv("QWEN3MOE_KERNEL_PORTABLE");
    return e != nullptr && e[0] == '1';
  }();
  return flag;
}

static inline bool quant_vector() {
#if defined(__AVX512F__)
  return !quant_portable_flag();
#else
  return false;
#endif
}

// IEEE half -> float (exact; subnormals and inf/nan included)
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

static inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The rows of one [O, I] weight (or a column slice of it) as a kernel reads them.
struct QMat {
  int kind = kF32;
  const uint8_t *w = nullptr;   // row o at w + o * ld bytes
  const uint16_t *s = nullptr;  // fp16 scales, row o at s + o * lds (quantized kinds)
  const uint8_t *z = nullptr;   // zero points, same indexing as s
  int64_t ld = 0, lds = 0, I = 0, g = 0;
  // input permutation (quant_perm.h) of leading index e (expert) at perm + e * lp, or nullptr; the
  // row loops ignore it (the ops gather x by it first), rows() / cols() leave it as it is
  const int32_t *perm = nullptr;
  int64_t lp = 0;
  const int32_t *perm_of(int64_t e) const { return perm ? perm + e * lp : nullptr; }

  static int64_t bytes_for(int kind, int64_t n) {
    return kind == kQ4 ? n / 2 : (kind == kQ8 ? n : (kind == kQ6 ? 3 * n / 4 : (kind == kBF16 ? 2 * n : 4 * n)));
  }
  bool quantized() const { return kind == kQ8 || kind == kQ4 || kind == kQ6; }
  QMat rows(int64_t o0) const {
    QMat m = *this;
    m.w += o0 * ld;
    if (quantized()) m.s += o0 * lds, m.z += o0 * lds;
    return m;
  }
  // columns [c0, c0 + n); for quantized kinds c0 and n must be multiples of g (6 bits: whole rows) (with a perm: of x
  // gathered whole, so the ops do not slice permuted weights' columns)
  QMat cols(int64_t c0, int64_t n) const {
    QMat m = *this;
    m.w += bytes_for(kind, c0);
    m.I = n;
    if (quantized()) m.s += c0 / g, m.z += c0 / g;
    return m;
  }
};

static inline int q6_value(const uint8_t *row, int64_t I, int64_t k);  // quant_q6.h

// w[0:I] = the float32 values of row o (scalar: the definition the vector code must match)
static inline void dequant_row_scalar(const QMat &W, int64_t o, float *out) {
  const uint8_t *p = W.w + o * W.ld;
  if (W.kind == kF32) {
    std::memcpy(out, p, W.I * sizeof(float));
  } else if (W.kind == kBF16) {
    const uint16_t *q = reinterpret_cast<const uint16_t *>(p);
    for (int64_t k = 0; k < W.I; ++k) out[k] = bf16_to_float(q[k]);
  } else {
    const uint16_t *s = W.s + o * W.lds;
    const uint8_t *z = W.z + o * W.lds;
    for (int64_t k = 0; k < W.I; ++k) {
      const int u = W.kind == kQ8 ? p[k] : (W.kind == kQ6 ? q6_value(p, W.I, k) : (k & 1 ? p[k / 2] >> 4 : p[k / 2] & 15));
      out[k] = static_cast<float>(u - z[k / W.g]) * half_to_float(s[k / W.g]);
    }
  }
}

#if defined(__AVX512F__)
// Per-group dequantization state of one row: for int8 the float zero point and scale, for int4
// a 16-entry table (u - z) * s that vpermps indexes by the nibble (only bits 3:0 of the index
// are used, so the low nibble needs no mask).
struct GroupQ {
  __m512 a, b;
  template <int KIND>
  inline void set(const QMat &W, int64_t o, int64_t gi) {
    const float s = half_to_float(W.s[o * W.lds + gi]), z = static_cast<float>(W.z[o * W.lds + gi]);
    if (KIND == kQ8) {
      a = _mm512_set1_ps(z), b = _mm512_set1_ps(s);
    } else {
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      a = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
    }
  }
};

// 32 bf16 weights (one 64-byte load) -> two float32 vectors in natural order: each word moved to
// the high half of its dword by one zero-masking vpermw (instead of a zero-extend and a shift per
// 16 weights: at 8 batch rows the bf16 loop ran 1.8x faster, bench/rows_bw.cc ROWS_BW_HOT)
static inline void bf16x32(const uint8_t *p, __m512 &lo, __m512 &hi) {
  const __m512i v = _mm512_loadu_si512(p);
  const __m512i ilo = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0,
                                       1, 0, 0, 0);
  const __m512i ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
  const __mmask32 odd = 0xAAAAAAAAu;
  lo = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, ilo, v));
  hi = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(odd, ihi, v));
}

// 16 bf16 weights -> float32
static inline __m512 bf16x16(const uint8_t *p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// 16 int8 weights of one group -> (u - z) * s
static inline __m512 q8x16(const uint8_t *p, const GroupQ &q) {
  const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  return _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(u), q.a), q.b);
}

// 16 int8 weights as u - z (the scale applied later, see qblock4's ROWSCALE)
static inline __m512 q8x16_unscaled(const uint8_t *p, const GroupQ &q) {
  const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  return _mm512_sub_ps(_mm512_cvtepi32_ps(u), q.a);
}

// 32 int4 weights (16 bytes) of one group -> even-k and odd-k vectors
static inline void q4x32(const uint8_t *p, const GroupQ &q, __m512 &even, __m512 &odd) {
  const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  even = _mm512_permutexvar_ps(u, q.a);
  odd = _mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), q.a);
}

// Software prefetch of the next rows block, `bytes` at a time, one cache line per 64 bytes, rows
// `len` bytes long and `ld` apart (see decode_layer.cc block4x for why a linear stream helps), into
// L1; and the same columns kFarBytes further on into L2. Why the second stream: one block ahead is
// too close to cover the memory latency at these rates, and L1 prefetches are capped by its few
// fill buffers, L2 ones are not; on the Intel 2-core VM the int4 expert rows of a decode step
// streamed 12-16% faster with it (bench/decode_step_rows.cc; bench/RESULTS.md "run 11: the decode
// step's costs"). The far stream may run past the last row: a prefetch never faults.
struct RowPrefetch {
  static constexpr int64_t kFarBytes = 8192;
  const char *row;
  int64_t col = 0, len, ld;
  int64_t far = 0;  // whole rows, >= kFarBytes of this block's columns ahead (set on the first step)
  inline void step(int64_t bytes) {
    if (far == 0) far = (kFarBytes + len - 1) / len * ld;
    for (; bytes > 0; bytes -= 64) {
      _mm_prefetch(row + col, _MM_HINT_T0);
      _mm_prefetch(row + far + col, _MM_HINT_T2);
      col += 64;
      if (col >= len) col = 0, row += ld;
    }
  }
};

// fn(std::integral_constant<int, NB>{}) with NB = min(n, 4): a batch-row count n >= 1 as the
// template argument the block kernels unroll over
template <class F>
__attribute__((always_inline)) static inline void with_nb(int64_t n, F &&fn) {
  switch (n) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    default: return fn(std::integral_constant<int, 4>{});
  }
}

// The row loops' driver: rows [o0, o1) (o1 - o0 >= R) in R-row blocks, batch rows 4 at a time.
// block(o, b, yb, ld, pf) computes rows o .. o + R - 1 for batch rows b .. min(b + 4, nb) - 1 into
// yb[(batch row - b) * ld + r], prefetching through pf unless it is null. Each block's first batch
// pass prefetches the next block (rows W.ld apart, pf_len bytes of each) if that one is still in
// [o0, o1). A tail of 1 .. R-1 rows recomputes the last R rows into a temporary and keeps its own,
// so no block reads rows past o1.
// always_inline (here and in with_nb): GCC's choice of which block kernels to inline depends on the
// driver's shape; without it GCC inlined every q4w_block into q4w_rows, and int4 g128 rows at 4
// batch rows ran at 5.2 instead of 6.1 GB/s (bench/rows_bw.cc ROWS_BW_HOT=3 with NB 4).
template <int R, class Block>
__attribute__((always_inline)) static inline void rows_in_blocks(const QMat &W, int64_t o0, int64_t o1, int64_t nb,
                                                                 float *y, int64_t ldy, int64_t pf_len, Block &&block) {
  const int64_t full = o0 + (o1 - o0) / R * R;
  for (int64_t o = o0; o < full; o += R)
    for (int64_t b = 0; b < nb; b += 4) {
      RowPrefetch pf{reinterpret_cast<const char *>(W.w + (o + R) * W.ld), 0, pf_len, W.ld};
      block(o, b, y + b * ldy + o, ldy, b == 0 && o + 2 * R <= o1 ? &pf : nullptr);
    }
  if (full == o1) return;
  float tmp[4 * R];
  for (int64_t b = 0; b < nb; b += 4) {
    block(o1 - R, b, tmp, R, nullptr);
    for (int64_t bb = 0; bb < 4 && b + bb < nb; ++bb)
      for (int64_t o = full; o < o1; ++o) y[(b + bb) * ldy + o] = tmp[bb * R + o - (o1 - R)];
  }
}

// Elements per inner step: int4 and bf16 widen 32 (two vectors), int8 16.
template <int KIND>
constexpr int64_t kStep = KIND == kQ8 ? 16 : 32;
// ... and per dequant_rows step / the shape rule of the vector paths: int4 and 6 bits 32, else 16
static inline int64_t step_of(int kind) { return kind == kQ4 || kind == kQ6 ? 32 : 16; }

// y[b * ldy + r] = W[o + r, :] . x[b, :] for 4 rows r and NB batch rows; x in the kernel order
// (for int4 each 32-block reordered to even k then odd k, see prep_x). I % kStep == 0,
// g % kStep == 0. ROWSCALE (int8 with one group per row, the per-channel layout and the lm_head):
// the row's scale
// multiplies the finished dot product instead of every weight, sum_k (u - z) x_k then * s (each
// product of an exact integer is rounded once, as before: same fp32 error bound, one multiply
// less per 16 weights in this memory-bound loop).
template <int KIND, int NB, bool ROWSCALE = false>
static inline void qblock4(const QMat &W, int64_t o, const float *x, int64_t ldx, float *y, int64_t ldy,
                           const RowPrefetch *next) {
  __m512 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  const int64_t g = KIND == kBF16 ? W.I : W.g, G = W.I / g;
  const int64_t step_bytes = QMat::bytes_for(KIND, kStep<KIND>);
  const uint8_t *w0 = W.w + o * W.ld;
  // a local copy: through the pointer, its position was stored and reloaded every step (a
  // store-to-load chain in the loop; perf annotate of the int8 decode)
  RowPrefetch pf = next ? *next : RowPrefetch{nullptr, 0, 0, 0};
  for (int64_t gi = 0; gi < G; ++gi) {
    GroupQ q[4];
    if (KIND != kBF16)
      for (int r = 0; r < 4; ++r) q[r].template set<KIND>(W, o + r, gi);
    for (int64_t h = gi * g; h < (gi + 1) * g; h += kStep<KIND>) {
      if (next) pf.step(4 * step_bytes);
      const int64_t off = QMat::bytes_for(KIND, h);
      if (KIND == kBF16 && h + 32 > W.I) {  // bf16 rows of 16 * odd: the last 16 alone
        __m512 xv[NB];
        for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + h);
        for (int r = 0; r < 4; ++r) {
          const __m512 wv = bf16x16(w0 + r * W.ld + off);
          for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
        }
      } else if (KIND != kQ8) {  // bf16: natural order (lo, hi), as the fp32 loop sums
        __m512 xe[NB], xo[NB];
        for (int b = 0; b < NB; ++b) xe[b] = _mm512_loadu_ps(x + b * ldx + h), xo[b] = _mm512_loadu_ps(x + b * ldx + h + 16);
        for (int r = 0; r < 4; ++r) {
          __m512 we, wo;
          if (KIND == kQ4)
            q4x32(w0 + r * W.ld + off, q[r], we, wo);
          else
            bf16x32(w0 + r * W.ld + off, we, wo);
          for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wo, xo[b], _mm512_fmadd_ps(we, xe[b], acc[r][b]));
        }
      } else {
        __m512 xv[NB];
        for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + h);
        for (int r = 0; r < 4; ++r) {
          const uint8_t *p = w0 + r * W.ld + off;
          const __m512 wv = ROWSCALE ? q8x16_unscaled(p, q[r]) : q8x16(p, q[r]);
          for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
        }
      }
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float sc = ROWSCALE ? half_to_float(W.s[(o + r) * W.lds]) : 1.0f;
    for (int b = 0; b < NB; ++b) y[b * ldy + r] = ROWSCALE ? _mm512_reduce_add_ps(acc[r][b]) * sc : _mm512_reduce_add_ps(acc[r][b]);
  }
}

// rows_dot_q's vector path for o1 - o0 >= 4; prefetches the W.I inputs' bytes of each row (fewer
// than W.ld in a column slice, QMat::cols)
template <int KIND, bool ROWSCALE = false>
static void qrows_vec(const QMat &W, int64_t o0, int64_t o1, const float *x, int64_t ldx, int64_t nb, float *y,
                      int64_t ldy) {
  auto block = [&](int64_t o, int64_t b, float *yb, int64_t ld, const RowPrefetch *pf) {
    with_nb(nb - b, [&](auto n) { qblock4<KIND, decltype(n)::value, ROWSCALE>(W, o, x + b * ldx, ldx, yb, ld, pf); });
  };
  rows_in_blocks<4>(W, o0, o1, nb, y, ldy, QMat::bytes_for(KIND, W.I), block);
}
#endif

// x rows in the order qblock4 reads them: int4 / 6 bits reorder each 32-block to (even k, odd k).
static inline const float *prep_x(int kind, const float *x, int64_t ldx, int64_t nb, int64_t I,
                                  avec<float> &buf, int64_t &ld_out) {
  ld_out = ldx;
  if (kind != kQ4 && kind != kQ6) return x;
  buf.resize(nb * I);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t h = 0; h < I; h += 32)
      for (int64_t j = 0; j < 16; ++j) {
        buf[b * I + h + j] = x[b * ldx + h + 2 * j];
        buf[b * I + h + 16 + j] = x[b * ldx + h + 2 * j + 1];
      }
  ld_out = I;
  return buf.data();
}

#include "quant_perm.h"
#include "quant_q4w.h"
#include "quant_q6.h"

// y[b * ldy + o] = W[o, :] . x[b, :] for o in [o0, o1), b in [0, nb); bf16 / int8 / int4 rows
// (fp32 rows go through decode_layer.cc's rows_dot_ld; int4 g128 through quant_q4w.h).
static void rows_dot_q(const QMat &W, int64_t o0, int64_t o1, const float *x, int64_t ldx, int64_t nb, float *y,
                       int64_t ldy) {
  if (o1 <= o0 || nb <= 0) return;
#if defined(__AVX512F__)
  if (quant_vector() && o1 - o0 >= 4 && q4w_fits(W)) {
    thread_local avec<float> xw;
    q4w_order_x(x, ldx, nb, W.I, xw);
    return q4w_rows(W, o0, o1, xw.data(), nb, y, ldy);
  }
  const int64_t step = step_of(W.kind);
  const int64_t g = W.kind == kBF16 ? W.I : W.g;
  if (quant_vector() && o1 - o0 >= 4 && W.I % step == 0 && g % step == 0) {
    thread_local avec<float> buf;
    int64_t ld;
    const float *xp = prep_x(W.kind, x, ldx, nb, W.I, buf, ld);
    switch (W.kind) {
      case kBF16: return qrows_vec<kBF16>(W, o0, o1, xp, ld, nb, y, ldy);
      case kQ8:
        if (W.g == W.I) return qrows_vec<kQ8, true>(W, o0, o1, xp, ld, nb, y, ldy);
        return qrows_vec<kQ8>(W, o0, o1, xp, ld, nb, y, ldy);
      case kQ4: return qrows_vec<kQ4>(W, o0, o1, xp, ld, nb, y, ldy);
      case kQ6:
        if (W.I % 128 == 0) return q6_rows(W, o0, o1, xp, ld, nb, y, ldy);  // g == I (parse_weight)
        break;
      default: break;
    }
  }
#endif
  thread_local std::vector<float> row;
  row.resize(W.I);
  for (int64_t o = o0; o < o1; ++o) {
    dequant_row_scalar(W, o, row.data());
    for (int64_t b = 0; b < nb; ++b) {
      const float *xb = x + b * ldx;
      float a = 0.f;
      for (int64_t k = 0; k < W.I; ++k) a += row[k] * xb[k];
      y[b * ldy + o] = a;
    }
  }
}

// out[r * ldo + k] = W[o0 + r, k] as float32 for r in [0, n): a tile for a GEMM
static void dequant_rows(const QMat &W, int64_t o0, int64_t n, float *out, int64_t ldo) {
#if defined(__AVX512F__)
  const int64_t step = step_of(W.kind);
  const int64_t g = W.kind == kBF16 || W.kind == kF32 ? W.I : W.g;
  if (quant_vector() && W.kind != kF32 && W.I % step == 0 && g % step == 0) {
    const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t o = o0 + r;
      const uint8_t *p = W.w + o * W.ld;
      float *dst = out + r * ldo;
      for (int64_t gi = 0; gi < W.I / g; ++gi) {
        GroupQ q;
        if (W.kind == kQ8 || W.kind == kQ6) q.set<kQ8>(W, o, gi);  // 6 bits: z and s as int8's
        if (W.kind == kQ4) q.set<kQ4>(W, o, gi);
        for (int64_t h = gi * g; h < (gi + 1) * g; h += step) {
          if (W.kind == kBF16) {
            _mm512_storeu_ps(dst + h, bf16x16(p + 2 * h));
          } else if (W.kind == kQ8) {
            _mm512_storeu_ps(dst + h, q8x16(p + h, q));
          } else {  // interleave (even, odd) back to natural order
            __m512 e, od;
            if (W.kind == kQ6) {
              q6x32(p, W.I, h, q.a, e, od);
              e = _mm512_mul_ps(e, q.b), od = _mm512_mul_ps(od, q.b);
            } else {
              q4x32(p + h / 2, q, e, od);
            }
            _mm512_storeu_ps(dst + h, _mm512_permutex2var_ps(e, even, od));
            _mm512_storeu_ps(dst + h + 16, _mm512_permutex2var_ps(e, odd, od));
          }
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < n; ++r) dequant_row_scalar(W, o0 + r, out + r * ldo);
}

// One weight as the aot calling convention hands it over: a float32 / bfloat16 (or uint16 bf16
// bits) matrix (one param) or qweight uint8, scales float16, qzeros uint8 (three params),
// optionally followed by perm int32 lead + [I] (quant_perm.h; taken when a param has exactly that
// dtype and shape, which no op's next param has). `I` is the input width (the caller knows it
// from the activations); int8 / int4 / 6 bits (one group per row, no lead) follows from qweight's last dim. A perm of a single matrix
// (lead 0) is range-checked here; stacked experts' perms by the ops, for the experts they run.
// Returns false (and leaves *m untouched) on a shape or dtype that does not fit.
static inline bool dtype_is(const char *dt, const char *want) { return dt != nullptr && std::strcmp(dt, want) == 0; }
// bf16 arrives as bfloat16 or as its uint16 bit pattern (how the model holds gathered bf16 weights)
static inline bool is_bf16(const char *dt) { return dtype_is(dt, "bfloat16") || dtype_is(dt, "uint16"); }

// whether param i is a perm int32 lead + [I] for a weight of shape wshape (lead leading dims)
static inline bool is_perm(int i, int nparam, int *ndims, int64_t **shapes, const char **dtypes, const int64_t *wshape,
                           int lead, int64_t I) {
  if (i >= nparam || ndims[i] != lead + 1 || !dtype_is(dtypes[i], "int32") || shapes[i][lead] != I) return false;
  for (int d = 0; d < lead; ++d)
    if (shapes[i][d] != wshape[d]) return false;
  return true;
}

static bool parse_weight(int &i, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         int64_t I, int lead, QMat *m) {
  if (i >= nparam) return false;
  const int nd = ndims[i];
  if (nd != 2 + lead || shapes[i][nd - 1] <= 0) return false;
  QMat q;
  q.w = static_cast<const uint8_t *>(params[i]);
  q.I = I;
  if (dtype_is(dtypes[i], "uint8")) {
    if (i + 2 >= nparam) return false;
    const int64_t last = shapes[i][nd - 1];
    q.kind = last == I ? kQ8 : (2 * last == I ? kQ4 : (4 * last == 3 * I ? kQ6 : -1));
    const int64_t G = shapes[i + 1][ndims[i + 1] - 1];
    if (q.kind < 0 || G <= 0 || I % G != 0 || ndims[i + 1] != nd || ndims[i + 2] != nd) return false;
    if (q.kind == kQ6 && (G != 1 || lead != 0 || I % 4 != 0)) return false;
    for (int d = 0; d + 1 < nd; ++d)
      if (shapes[i + 1][d] != shapes[i][d] || shapes[i + 2][d] != shapes[i][d]) return false;
    if (shapes[i + 2][nd - 1] != G || !dtype_is(dtypes[i + 2], "uint8")) return false;
    q.g = I / G;
    if (q.kind == kQ4 && q.g % 2 != 0) return false;
    q.ld = last, q.lds = G;
    q.s = static_cast<const uint16_t *>(params[i + 1]);
    q.z = static_cast<const uint8_t *>(params[i + 2]);
    i += 3;
    if (is_perm(i, nparam, ndims, shapes, dtypes, shapes[i - 3], lead, I)) {
      q.perm = static_cast<const int32_t *>(params[i]), q.lp = I;
      if (lead == 0 && !perm_in_range(q.perm, I)) return false;
      i += 1;
    }
  } else {
    if (shapes[i][nd - 1] != I || !(is_bf16(dtypes[i]) || dtype_is(dtypes[i], "float32"))) return false;
    q.kind = is_bf16(dtypes[i]) ? kBF16 : kF32;
    q.ld = QMat::bytes_for(q.kind, I);
    i += 1;
  }
  *m = q;
  return true;
}

// A vector param (norm weight) as float32: bf16 widened into buf, fp32 passed through, other
// dtypes nullptr.
static inline const float *vec_f32(void *p, const char *dtype, int64_t n, std::vector<float> &buf) {
  if (dtype_is(dtype, "float32")) return static_cast<const float *>(p);
  if (!is_bf16(dtype)) return nullptr;
  buf.resize(n);
  const uint16_t *q = static_cast<const uint16_t *>(p);
  for (int64_t k = 0; k < n; ++k) buf[k] = bf16_to_float(q[k]);
  return buf.data();
}
