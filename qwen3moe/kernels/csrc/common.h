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

extern "C" void cblas_sgemm64_(int order, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                               const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                               float *C, int64_t ldc);
extern "C" int openblas_get_num_threads64_();
extern "C" void openblas_set_num_threads64_(int);
static const int kRow = 101, kN = 111, kT = 112;
#ifdef QWEN3MOE_DNNL
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
