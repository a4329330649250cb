// Grouped SwiGLU experts for CPU, called by MindSpore as ops.Custom(func_type="aot").
//
// Rows of x are sorted by expert; expert e owns rows [off[e], off[e+1]). Each expert's rows go
// through two GEMMs (common.h `gemm`: MindSpore's oneDNN or numpy's OpenBLAS), so every expert's
// weights are read once and compute scales with the assignments, never with T * E.
// Shapes: A assignments (rows), H hidden, I expert ffn, E experts.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

// inputs: x [A,H], off [E+1] int32, wgu [E,2I,H], wd [E,H,I]; outputs: y [A,H], gu [A,2I]
extern "C" int GroupedSwigluFwd(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *off = static_cast<const int32_t *>(params[1]);
  const float *wgu = static_cast<const float *>(params[2]);
  const float *wd = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  float *gu = static_cast<float *>(params[5]);
  const int64_t A = shapes[0][0], H = shapes[0][1], E = shapes[2][0], I2 = shapes[2][1], I = I2 / 2;
  float *act = new float[A * I > 0 ? A * I : 1];
  {
  SerialBlas serial;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    if (n <= 0) continue;
    gemm(false, true, n, I2, H, x + r0 * H, H, wgu + e * I2 * H, H, gu + r0 * I2, I2);
    for (int64_t r = r0; r < r0 + n; ++r) silu_mul(gu + r * I2, gu + r * I2 + I, act + r * I, I);
    gemm(false, true, n, H, I, act + r0 * I, I, wd + e * H * I, I, y + r0 * H, H);
  }
  }
  for (int64_t r = off[E]; r < A; ++r) {  // rows past the last group (none when off[E] == A)
    std::memset(y + r * H, 0, H * sizeof(float));
    std::memset(gu + r * I2, 0, I2 * sizeof(float));
  }
  delete[] act;
  return 0;
}

// inputs: x [A,H], off [E+1], wgu [E,2I,H], wd [E,H,I], gu [A,2I], dy [A,H]
// outputs: dx [A,H], dwgu [E,2I,H], dwd [E,H,I]
extern "C" int GroupedSwigluBwd(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *off = static_cast<const int32_t *>(params[1]);
  const float *wgu = static_cast<const float *>(params[2]);
  const float *wd = static_cast<const float *>(params[3]);
  const float *gu = static_cast<const float *>(params[4]);
  const float *dy = static_cast<const float *>(params[5]);
  float *dx = static_cast<float *>(params[6]);
  float *dwgu = static_cast<float *>(params[7]);
  float *dwd = static_cast<float *>(params[8]);
  const int64_t A = shapes[0][0], H = shapes[0][1], E = shapes[2][0], I2 = shapes[2][1], I = I2 / 2;
  const int64_t rows = A * I > 0 ? A * I : 1;
  float *act = new float[rows], *dgu = new float[A * I2 > 0 ? A * I2 : 1], *dact = new float[rows];
  std::memset(dx, 0, A * H * sizeof(float));
  SerialBlas serial;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    float *dwgu_e = dwgu + e * I2 * H, *dwd_e = dwd + e * H * I;
    if (n <= 0) {
      std::memset(dwgu_e, 0, I2 * H * sizeof(float));
      std::memset(dwd_e, 0, H * I * sizeof(float));
      continue;
    }
    for (int64_t r = r0; r < r0 + n; ++r) silu_mul(gu + r * I2, gu + r * I2 + I, act + r * I, I);
    gemm(true, false, H, I, n, dy + r0 * H, H, act + r0 * I, I, dwd_e, I);              // dWd = dy^T act
    gemm(false, false, n, I, H, dy + r0 * H, H, wd + e * H * I, I, dact + r0 * I, I);   // dact = dy Wd
    for (int64_t r = r0; r < r0 + n; ++r)
      silu_mul_grad(gu + r * I2, gu + r * I2 + I, dact + r * I, dgu + r * I2, dgu + r * I2 + I, I);
    gemm(true, false, I2, H, n, dgu + r0 * I2, I2, x + r0 * H, H, dwgu_e, H);            // dWgu = dgu^T x
    gemm(false, false, n, H, I2, dgu + r0 * I2, I2, wgu + e * I2 * H, H, dx + r0 * H, H);  // dx = dgu Wgu
  }
  delete[] act;
  delete[] dgu;
  delete[] dact;
  return 0;
}
