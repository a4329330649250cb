// Sum of squares of one fp32 tensor (ops.Custom aot), for the global gradient norm.
//
// The composite `(g * g).sum()` is two graph ops per parameter with a parameter-sized temporary,
// and MindSpore's CPU ReduceSum ran at ~0.1 GFLOP/s on the 8M-element expert gradients
// (bench-mini train step profile: ~1.7 s of ReduceSum per step). This is one vectorised pass,
// accumulated in double (more accurate than the fp32 composite sum; torch's clip_grad_norm_
// reference is compared with a tolerance).
// Shapes: g any shape (N elements) -> out [1].
#include <cstdint>

extern "C" int SumSquares(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  const float *g = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  double total = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : total) if (n > 262144)
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(g[i]) * static_cast<double>(g[i]);
  out[0] = static_cast<float>(total);
  return 0;
}
