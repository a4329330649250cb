// Shared by the CPU kernels: numpy's 64-bit OpenBLAS entry points, a guard that makes BLAS
// single-threaded inside OpenMP regions, a row-major GEMM wrapper and a fast float exp.
// With QWEN3MOE_DNNL (kernels/build.py sets it when MindSpore ships libdnnl) `gemm` calls oneDNN's
// sequential dnnl_sgemm instead of OpenBLAS: on the expert GEMM shapes (128 x 512 x 512 and
// 128 x 512 x 256, 32 experts, weights cold in cache, 2 threads each running one expert) it ran
// 190 GFLOP/s against OpenBLAS's 167 (bench/gemm_micro.cc).
// kernels/build.py hashes this header with each source, so editing it rebuilds every kernel.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

extern "C" void cblas_sgemm64_(int order, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                               const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                               float *C, int64_t ldc);
extern "C" int openblas_get_num_threads64_();
extern "C" void openblas_set_num_threads64_(int);
static const int kRow = 101, kN = 111, kT = 112;
#if defined(QWEN3MOE_DNNL) && !defined(ONEAPI_DNNL_DNNL_H)  // (bench/dnnl_decompress.cc has dnnl.h)
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                          int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
#endif

// Experts (or column blocks) run in parallel under OpenMP with single-threaded BLAS inside: many
// small GEMMs scale better this way than one threaded GEMM after another (measured: 4096x512 rows
// over 32 experts 72 -> 64 ms, decode-sized 3.9 -> 2.6 ms).
struct SerialBlas {
  int prev;
  SerialBlas() : prev(openblas_get_num_threads64_()) { openblas_set_num_threads64_(1); }
  ~SerialBlas() { openblas_set_num_threads64_(prev); }
};

// This thread's float results below FLT_MIN flushed to zero and such inputs read as zero (MXCSR
// FTZ | DAZ) while in scope, restored after. Why: the attention's masked probabilities (exp clamped
// at -87.3, then times 1 / sum) land in the subnormal range, and every product with a subnormal
// operand takes a microcode assist; the 512-token prefill attention ran 9x slower for it
// (bench/RESULTS.md). Flushed, they are the exact zeros the composite path gives.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// C[M,N] = op(A) op(B) + beta C, row-major; K == 0 gives beta C (zeros when beta == 0), which
// BLAS would reject, e.g. for an expert that received no tokens.
static inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                        const float *B, int64_t ldb, float *C, int64_t ldc, float beta = 0.0f) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
    return;
  }
#ifdef QWEN3MOE_DNNL
  dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
#else
  cblas_sgemm64_(kRow, ta ? kT : kN, tb ? kT : kN, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
#endif
}

// exp with a degree-6 polynomial after range reduction (Cephes expf constants), clamped to the
// float range: relative error < 1e-7, vectorisable, unlike std::exp in these loops.
static inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return p * s;
}

// The loops below are written with AVX-512 intrinsics where the build has it: GCC 12 keeps every
// loop that calls vexp scalar ("control flow in loop" / floorf without -ffast-math), which made
// the SwiGLU, softmax and cross-entropy loops run one float at a time (perf: vmulss/vdivss).
// Same polynomial as vexp; results may differ from it in the last bit (FMA contraction).
#if defined(__AVX512F__)
static inline __m512 vexp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

static inline __m512 vsigmoid16(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, vexp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}
#endif

static inline float vsigmoid(float v) { return 1.0f / (1.0f + vexp(-v)); }

// out[j] = scale * exp(in[j] - shift) (out may be in, or null to only sum); returns sum_j exp(in[j] - shift)
static inline float exp_shift(const float *in, float *out, int64_t n, float shift, float scale = 1.0f) {
  int64_t j = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 vs = _mm512_set1_ps(shift), vc = _mm512_set1_ps(scale);
  for (; j + 16 <= n; j += 16) {
    const __m512 e = vexp16(_mm512_sub_ps(_mm512_loadu_ps(in + j), vs));
    acc = _mm512_add_ps(acc, e);
    if (out) _mm512_storeu_ps(out + j, _mm512_mul_ps(e, vc));
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    const float e = vexp(in[j] - shift);
    sum += e;
    if (out) out[j] = scale * e;
  }
  return sum;
}

// h[j] = silu(g[j]) * u[j]   (SwiGLU activation)
static inline void silu_mul(const float *g, const float *u, float *h, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    const __m512 gv = _mm512_loadu_ps(g + j);
    _mm512_storeu_ps(h + j, _mm512_mul_ps(_mm512_mul_ps(gv, vsigmoid16(gv)), _mm512_loadu_ps(u + j)));
  }
#endif
  for (; j < n; ++j) h[j] = g[j] * vsigmoid(g[j]) * u[j];
}

// SwiGLU backward: du = da * silu(g), dg = da * u * s * (1 + g (1 - s)) with s = sigmoid(g)
static inline void silu_mul_grad(const float *g, const float *u, const float *da, float *dg, float *du, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; j + 16 <= n; j += 16) {
    const __m512 gv = _mm512_loadu_ps(g + j), uv = _mm512_loadu_ps(u + j), av = _mm512_loadu_ps(da + j);
    const __m512 sv = vsigmoid16(gv);
    _mm512_storeu_ps(du + j, _mm512_mul_ps(_mm512_mul_ps(av, gv), sv));
    const __m512 t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, sv), one);
    _mm512_storeu_ps(dg + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(av, uv), sv), t));
  }
#endif
  for (; j < n; ++j) {
    const float s = vsigmoid(g[j]);
    du[j] = da[j] * g[j] * s;
    dg[j] = da[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
  }
}
