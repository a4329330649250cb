// Bias-free linear layers for CPU (ops.Custom aot): y_i = x @ W_i^T for n weights sharing one
// input x, forward and backward, through common.h's `gemm` (oneDNN's dnnl_sgemm or OpenBLAS).
//
// Why (measured, bench/linear_micro.py): with oneDNN's sgemm the backward shapes run 1.4-1.5x
// MindSpore 2.10's CPU MatMul (the forward ~1.0x); layers/linear.py uses it for fp32. One op with n
// weights also serves q/k/v from one input (3 GEMMs, one graph op each way, no concatenated
// parameter) and sums the three dX contributions in place (beta = 1) instead of two AddN ops.
// Shapes: T rows (all leading dims of x), I in-features, O_i out-features of weight i.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include <omp.h>

#include "common.h"

// [a, b) = part t of p of the range [0, n), cut at multiples of 16 columns (whole SIMD panels)
static void part(int64_t n, int p, int t, int64_t &a, int64_t &b) {
  const int64_t step = ((n + p - 1) / p + 15) / 16 * 16;
  a = std::min<int64_t>(n, step * t);
  b = std::min<int64_t>(n, a + step);
}

// threads for a GEMM of m*n*k MACs: one below ~0.5M MACs, where a fork costs more than it saves
static int threads_for(int64_t m, int64_t n, int64_t k) {
  return m * n * k < (int64_t(1) << 19) ? 1 : omp_get_max_threads();
}

static int64_t rows_of(int nd, const int64_t *shape) {
  int64_t r = 1;
  for (int i = 0; i + 1 < nd; ++i) r *= shape[i];
  return r;
}

// inputs: x [..., I], w_1 [O_1, I] .. w_n [O_n, I]; outputs: y_i [..., O_i]   (nparam = 1 + 2n)
// Thread t computes the columns [o0, o1) of every y_i: x @ W_i[o0:o1]^T.
extern "C" int LinearFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  const int n = (nparam - 1) / 2;
  if (n < 1 || nparam != 1 + 2 * n) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int64_t I = shapes[0][ndims[0] - 1], T = rows_of(ndims[0], shapes[0]);
  int64_t maxO = 0;
  for (int i = 0; i < n; ++i) {
    if (ndims[1 + i] != 2 || shapes[1 + i][1] != I) return 1;
    maxO = std::max(maxO, shapes[1 + i][0]);
  }
  SerialBlas serial;
#pragma omp parallel num_threads(threads_for(T, maxO, I))
  for (int i = 0; i < n; ++i) {
    const int64_t O = shapes[1 + i][0];
    int64_t o0, o1;
    part(O, omp_get_num_threads(), omp_get_thread_num(), o0, o1);
    gemm(false, true, T, o1 - o0, I, x, I, static_cast<const float *>(params[1 + i]) + o0 * I, I,
         static_cast<float *>(params[1 + n + i]) + o0, O, 0.0f);
  }
  return 0;
}

// inputs: x, w_1..w_n, dy_1..dy_n; outputs: dx [..., I], dw_1..dw_n   (nparam = 2 + 3n)
//   dx = sum_i dy_i @ W_i (accumulated in place),  dW_i = dy_i^T @ x
// Thread t computes the columns [c0, c1) of dx (dy_i @ W_i[:, c0:c1]) and the rows [o0, o1) of
// every dW_i (dy_i[:, o0:o1]^T @ x): disjoint outputs, no reduction between threads.
extern "C" int LinearBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  const int n = (nparam - 2) / 3;
  if (n < 1 || nparam != 2 + 3 * n) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *dx = static_cast<float *>(params[1 + 2 * n]);
  const int64_t I = shapes[0][ndims[0] - 1], T = rows_of(ndims[0], shapes[0]);
  int64_t maxO = 0;
  for (int i = 0; i < n; ++i) maxO = std::max(maxO, shapes[1 + i][0]);
  SerialBlas serial;
#pragma omp parallel num_threads(threads_for(T, maxO, I))
  {
    const int p = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t c0, c1;
    part(I, p, t, c0, c1);
    for (int i = 0; i < n; ++i) {
      const int64_t O = shapes[1 + i][0];
      const float *w = static_cast<const float *>(params[1 + i]);
      const float *dy = static_cast<const float *>(params[1 + n + i]);
      int64_t o0, o1;
      part(O, p, t, o0, o1);
      gemm(false, false, T, c1 - c0, O, dy, O, w + c0, I, dx + c0, I, i == 0 ? 0.0f : 1.0f);
      gemm(true, false, o1 - o0, I, T, dy + o0, O, x, I, static_cast<float *>(params[2 + 2 * n + i]) + o0 * I,
           I, 0.0f);
    }
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
