// Fused MoE experts for CPU: dispatch + grouped SwiGLU + weighted combine in one custom op.
//
// The router (logits, fp32 softmax, top-k, renorm) stays in MindSpore so its autodiff and the
// load-balancing statistics are untouched; this op replaces the ~12 graph ops of sort-based
// dispatch, gathers, grouped GEMMs and combine (each op costs dispatch time plus a pass over
// memory). Assignments a = t*K + j are bucketed by expert with a stable counting sort (token
// order inside an expert), each expert's rows go through two sequential GEMMs (common.h `gemm`: oneDNN or OpenBLAS), and
// y_t = sum_j w_tj * Expert_{idx_tj}(x_t) is summed in j order, as the composite path does.
// Shapes: T tokens, K top-k, A = T*K assignments (sorted rows), H hidden, I expert ffn, E experts.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"

// Uninitialised float scratch: every element is written before it is read, and zero-filling the
// ~32 MB of backward scratch per layer (std::vector) cost a pass over memory for nothing.
// Kept per calling thread in numbered slots and reused across calls (grown to the largest call,
// ~44 MB at bench-mini's T = 1024): fresh 4-8 MB buffers per call were page-faulted in again
// on every layer (A/B on the bench-mini train step: 1.03x).
static float *scratch(int slot, int64_t n) {
  struct Buf { std::unique_ptr<float[]> p; int64_t cap = 0; };
  thread_local Buf pool[5];
  Buf &b = pool[slot];
  if (b.cap < n) {
    b.p.reset(new float[n + 1]);
    b.cap = n;
  }
  return b.p.get();
}

struct Dims {
  int64_t T, K, A, H, E, I2, I;
};

static Dims dims(int64_t **shapes) {
  Dims d;
  d.T = shapes[0][0], d.H = shapes[0][1], d.K = shapes[1][1], d.A = d.T * d.K;
  d.E = shapes[3][0], d.I2 = shapes[3][1], d.I = d.I2 / 2;
  return d;
}

// Stable counting sort of assignments by expert: row[a] = sorted row of a, off[e] = first row
// of expert e. Returns false on an expert id outside [0, E).
static bool bucket(const int32_t *idx, const Dims &d, int32_t *row, int32_t *off) {
  std::vector<int64_t> cur(d.E + 1, 0);
  for (int64_t a = 0; a < d.A; ++a) {
    if (idx[a] < 0 || idx[a] >= d.E) return false;
    ++cur[idx[a] + 1];
  }
  for (int64_t e = 0; e < d.E; ++e) cur[e + 1] += cur[e];
  for (int64_t e = 0; e <= d.E; ++e) off[e] = static_cast<int32_t>(cur[e]);
  for (int64_t a = 0; a < d.A; ++a) row[a] = static_cast<int32_t>(cur[idx[a]]++);
  return true;
}

// xs[row[a]] = x[a / K]: token rows in expert order (contiguous per expert for the GEMMs)
static void gather_rows(const float *x, const int32_t *row, const Dims &d, float *xs) {
#pragma omp parallel for schedule(static)
  for (int64_t a = 0; a < d.A; ++a) std::memcpy(xs + row[a] * d.H, x + (a / d.K) * d.H, d.H * sizeof(float));
}

// inputs: x [T,H], idx [T,K] int32, w [T,K], wgu [E,2I,H], wd [E,H,I]
// outputs: y [T,H], gu [A,2I], ye [A,H] (expert outputs, sorted rows), row [A] int32, off [E+1] int32
extern "C" int MoeFusedFwd(int nparam, void **params, int *ndims, int64_t **shapes,
                           const char **dtypes, void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *idx = static_cast<const int32_t *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float *wgu = static_cast<const float *>(params[3]);
  const float *wd = static_cast<const float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  float *gu = static_cast<float *>(params[6]);
  float *ye = static_cast<float *>(params[7]);
  int32_t *row = static_cast<int32_t *>(params[8]);
  int32_t *off = static_cast<int32_t *>(params[9]);
  const Dims d = dims(shapes);
  if (!bucket(idx, d, row, off)) return 1;
  float *xs = scratch(0, d.A * d.H), *act = scratch(1, d.A * d.I);
  gather_rows(x, row, d, xs);
  {
    SerialBlas serial;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < d.E; ++e) {
      const int64_t r0 = off[e], n = off[e + 1] - off[e];
      if (n <= 0) continue;
      gemm(false, true, n, d.I2, d.H, xs + r0 * d.H, d.H, wgu + e * d.I2 * d.H, d.H, gu + r0 * d.I2, d.I2);
      for (int64_t r = r0; r < r0 + n; ++r) silu_mul(gu + r * d.I2, gu + r * d.I2 + d.I, act + r * d.I, d.I);
      gemm(false, true, n, d.H, d.I, act + r0 * d.I, d.I, wd + e * d.H * d.I, d.I, ye + r0 * d.H, d.H);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < d.T; ++t) {
    float *yt = y + t * d.H;
    std::memset(yt, 0, d.H * sizeof(float));
    for (int64_t j = 0; j < d.K; ++j) {
      const float wt = w[t * d.K + j];
      const float *src = ye + row[t * d.K + j] * d.H;
      for (int64_t c = 0; c < d.H; ++c) yt[c] += wt * src[c];
    }
  }
  return 0;
}

// One expert's backward on its rows [r0, r0+n): dye rows in, dxs rows out (overwrites dye).
static void expert_bwd(int64_t e, int64_t r0, int64_t n, const Dims &d, const float *wgu, const float *wd,
                       const float *gu, const float *xs, float *dye, float *act, float *dact, float *dgu,
                       float *dwgu_e, float *dwd_e) {
  for (int64_t r = r0; r < r0 + n; ++r) silu_mul(gu + r * d.I2, gu + r * d.I2 + d.I, act + r * d.I, d.I);
  gemm(true, false, d.H, d.I, n, dye + r0 * d.H, d.H, act + r0 * d.I, d.I, dwd_e, d.I);            // dWd = dye^T act
  gemm(false, false, n, d.I, d.H, dye + r0 * d.H, d.H, wd + e * d.H * d.I, d.I, dact + r0 * d.I, d.I);  // dact = dye Wd
  for (int64_t r = r0; r < r0 + n; ++r)
    silu_mul_grad(gu + r * d.I2, gu + r * d.I2 + d.I, dact + r * d.I, dgu + r * d.I2, dgu + r * d.I2 + d.I, d.I);
  gemm(true, false, d.I2, d.H, n, dgu + r0 * d.I2, d.I2, xs + r0 * d.H, d.H, dwgu_e, d.H);         // dWgu = dgu^T xs
  gemm(false, false, n, d.H, d.I2, dgu + r0 * d.I2, d.I2, wgu + e * d.I2 * d.H, d.H, dye + r0 * d.H, d.H);  // dxs
}

// inputs: x, idx, w, wgu, wd, gu, ye, row, off, dy [T,H]
// outputs: dx [T,H], dw [T,K], dwgu [E,2I,H], dwd [E,H,I]
extern "C" int MoeFusedBwd(int nparam, void **params, int *ndims, int64_t **shapes,
                           const char **dtypes, void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[2]);
  const float *wgu = static_cast<const float *>(params[3]);
  const float *wd = static_cast<const float *>(params[4]);
  const float *gu = static_cast<const float *>(params[5]);
  const float *ye = static_cast<const float *>(params[6]);
  const int32_t *row = static_cast<const int32_t *>(params[7]);
  const int32_t *off = static_cast<const int32_t *>(params[8]);
  const float *dy = static_cast<const float *>(params[9]);
  float *dx = static_cast<float *>(params[10]);
  float *dw = static_cast<float *>(params[11]);
  float *dwgu = static_cast<float *>(params[12]);
  float *dwd = static_cast<float *>(params[13]);
  const Dims d = dims(shapes);
  float *xs = scratch(0, d.A * d.H), *dye = scratch(1, d.A * d.H), *act = scratch(2, d.A * d.I),
        *dact = scratch(3, d.A * d.I), *dgu = scratch(4, d.A * d.I2);
  gather_rows(x, row, d, xs);
  // dw_tj = <dy_t, ye_row(tj)>; dye_row(tj) = w_tj dy_t
#pragma omp parallel for schedule(static)
  for (int64_t a = 0; a < d.A; ++a) {
    const float *g = dy + (a / d.K) * d.H, *src = ye + row[a] * d.H;
    float *dst = dye + row[a] * d.H;
    const float wa = w[a];
    float acc = 0.0f;
    for (int64_t c = 0; c < d.H; ++c) {
      acc += g[c] * src[c];
      dst[c] = wa * g[c];
    }
    dw[a] = acc;
  }
  {
    SerialBlas serial;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t e = 0; e < d.E; ++e) {
      const int64_t r0 = off[e], n = off[e + 1] - off[e];
      float *dwgu_e = dwgu + e * d.I2 * d.H, *dwd_e = dwd + e * d.H * d.I;
      if (n <= 0) {
        std::memset(dwgu_e, 0, d.I2 * d.H * sizeof(float));
        std::memset(dwd_e, 0, d.H * d.I * sizeof(float));
        continue;
      }
      expert_bwd(e, r0, n, d, wgu, wd, gu, xs, dye, act, dact, dgu,
                 dwgu_e, dwd_e);
    }
  }
  // dx_t = sum_j dxs_row(tj) (dxs now lives in dye)
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < d.T; ++t) {
    float *dxt = dx + t * d.H;
    std::memset(dxt, 0, d.H * sizeof(float));
    for (int64_t j = 0; j < d.K; ++j) {
      const float *src = dye + row[t * d.K + j] * d.H;
      for (int64_t c = 0; c < d.H; ++c) dxt[c] += src[c];
    }
  }
  return 0;
}
