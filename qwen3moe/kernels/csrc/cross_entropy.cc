// Per-token cross-entropy over the vocabulary for CPU (ops.Custom aot), forward and backward.
//
// The composite `ops.cross_entropy(logits, labels, reduction="none")` runs ReduceMax, Sub, Exp,
// ReduceSum, Log, a gather and, backward, an Equal/one-hot mask for the max plus the softmax
// grad, each a full pass over the [T, V] logits (bench-mini: 1024 x 8192); MindSpore's CPU
// reductions were the slow part (~0.1 s per step). Here one row is reduced while it is in cache.
//   lse_t = m_t + log(sum_v exp(x_tv - m_t)),  m_t = max_v x_tv;   ce_t = lse_t - x_t,label_t
//   dx_tv = (dce_t + dlse_t) * exp(x_tv - lse_t) - dce_t * [v == label_t]
// exp is the vectorisable Cephes-style polynomial (rel. error < 1e-7) of the other kernels.
// Shapes: T rows, V classes.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

static bool labels_ok(const int32_t *label, int64_t T, int64_t V) {
  for (int64_t t = 0; t < T; ++t)
    if (label[t] < 0 || label[t] >= V) return false;
  return true;
}

// inputs: x [T,V] f32, label [T] int32 in [0, V); outputs: ce [T], lse [T]
extern "C" int CrossEntropyFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *label = static_cast<const int32_t *>(params[1]);
  float *ce = static_cast<float *>(params[2]);
  float *lse = static_cast<float *>(params[3]);
  const int64_t T = shapes[0][0], V = shapes[0][1];
  if (!labels_ok(label, T, V)) return 1;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float *xt = x + t * V;
    float m = xt[0];
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) m = xt[v] > m ? xt[v] : m;
    const float s = exp_shift(xt, nullptr, V, m);
    lse[t] = m + std::log(s);
    ce[t] = lse[t] - xt[label[t]];
  }
  return 0;
}

// inputs: x [T,V], label [T], lse [T], dce [T], dlse [T]; output: dx [T,V]
extern "C" int CrossEntropyBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *label = static_cast<const int32_t *>(params[1]);
  const float *lse = static_cast<const float *>(params[2]);
  const float *dce = static_cast<const float *>(params[3]);
  const float *dlse = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  const int64_t T = shapes[0][0], V = shapes[0][1];
  if (!labels_ok(label, T, V)) return 1;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float *xt = x + t * V;
    float *dt = dx + t * V;
    const float g = dce[t] + dlse[t], l = lse[t];
    exp_shift(xt, dt, V, l, g);
    dt[label[t]] -= dce[t];
  }
  return 0;
}
