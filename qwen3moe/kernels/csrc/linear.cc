// Bias-free linear layers for CPU (ops.Custom aot): y_i = x @ W_i^T for n weights sharing one
// input x, forward and backward, through numpy's OpenBLAS sgemm.
//
// Why: MindSpore 2.10's CPU MatMul reaches ~0.6x of OpenBLAS's GFLOP/s on the dense projection
// shapes (q/k/v/o, router, lm_head); the backward dX / dW matmuls are as slow. One op with n
// weights also serves q/k/v from one input (3 GEMMs, one graph op each way, no concatenated
// parameter) and sums the three dX contributions in place (beta = 1) instead of two AddN ops.
// Shapes: T rows (all leading dims of x), I in-features, O_i out-features of weight i.
#include <cstdint>
#include <cstring>

extern "C" void cblas_sgemm64_(int order, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                               const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                               float *C, int64_t ldc);
static const int kRow = 101, kN = 111, kT = 112;

// C[M,N] = op(A) op(B) + beta C, row-major; K == 0 gives beta C (zeros when beta == 0)
static void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float *C, int64_t ldc, float beta) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, N * sizeof(float));
    return;
  }
  cblas_sgemm64_(kRow, ta ? kT : kN, tb ? kT : kN, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

static int64_t rows_of(int nd, const int64_t *shape) {
  int64_t r = 1;
  for (int i = 0; i + 1 < nd; ++i) r *= shape[i];
  return r;
}

// inputs: x [..., I], w_1 [O_1, I] .. w_n [O_n, I]; outputs: y_i [..., O_i]   (nparam = 1 + 2n)
extern "C" int LinearFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  const int n = (nparam - 1) / 2;
  if (n < 1 || nparam != 1 + 2 * n) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int64_t I = shapes[0][ndims[0] - 1], T = rows_of(ndims[0], shapes[0]);
  for (int i = 0; i < n; ++i) {
    if (ndims[1 + i] != 2 || shapes[1 + i][1] != I) return 1;
    const int64_t O = shapes[1 + i][0];
    gemm(false, true, T, O, I, x, I, static_cast<const float *>(params[1 + i]), I,
         static_cast<float *>(params[1 + n + i]), O, 0.0f);
  }
  return 0;
}

// inputs: x, w_1..w_n, dy_1..dy_n; outputs: dx [..., I], dw_1..dw_n   (nparam = 2 + 3n)
//   dx = sum_i dy_i @ W_i (accumulated in place),  dW_i = dy_i^T @ x
extern "C" int LinearBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  const int n = (nparam - 2) / 3;
  if (n < 1 || nparam != 2 + 3 * n) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *dx = static_cast<float *>(params[1 + 2 * n]);
  const int64_t I = shapes[0][ndims[0] - 1], T = rows_of(ndims[0], shapes[0]);
  for (int i = 0; i < n; ++i) {
    const int64_t O = shapes[1 + i][0];
    const float *w = static_cast<const float *>(params[1 + i]);
    const float *dy = static_cast<const float *>(params[1 + n + i]);
    gemm(false, false, T, I, O, dy, O, w, I, dx, I, i == 0 ? 0.0f : 1.0f);
    gemm(true, false, O, I, T, dy, O, x, I, static_cast<float *>(params[2 + 2 * n + i]), I, 0.0f);
  }
  return 0;
}

// Same kernels under a second name: MindSpore keys a Custom op's bprop by its function name, so the
// three-weight op (kernels/linear.py linear3) needs a symbol of its own.
extern "C" int Linear3Fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  return LinearFwd(nparam, params, ndims, shapes, dtypes, stream, extra);
}

extern "C" int Linear3Bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  return LinearBwd(nparam, params, ndims, shapes, dtypes, stream, extra);
}
