// RMSNorm over the last dimension for CPU (ops.Custom aot), forward and backward.
//
// The composite HF-exact form `w * (x * rsqrt(mean(x*x) + eps))` is ~6 graph ops forward and
// ~10 backward (broadcast grads, Tile/RealDiv/AddN), each a pass over the activations; a decoder
// layer has four norms (input, post-attention, per-head q and k). Here one row is normalised
// while it is in cache. Same float32 formula: r = 1 / sqrt(mean(x^2) + eps), y = w * (x * r).
//   backward: xh = x r, gw = dy w;  dx = r (gw - xh mean(gw xh));  dw = sum_rows dy xh
// Shapes: R rows (all leading dims), D features; w [D]; eps [1].
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

static int64_t rows_of(int nd, const int64_t *shape) {
  int64_t r = 1;
  for (int i = 0; i + 1 < nd; ++i) r *= shape[i];
  return r;
}

// inputs: x [..., D], w [D], eps [1]; outputs: y [..., D], r [R]
extern "C" int RmsNormFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[2])[0];
  float *y = static_cast<float *>(params[3]);
  float *rr = static_cast<float *>(params[4]);
  const int64_t D = shapes[0][ndims[0] - 1], R = rows_of(ndims[0], shapes[0]);
#pragma omp parallel for schedule(static) if (R * D > 32768)
  for (int64_t i = 0; i < R; ++i) {
    const float *xi = x + i * D;
    float *yi = y + i * D;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < D; ++j) ss += xi[j] * xi[j];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    rr[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) yi[j] = w[j] * (xi[j] * r);
  }
  return 0;
}

// inputs: x, w, r [R], dy; outputs: dx [..., D], dw [D]
extern "C" int RmsNormBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *rr = static_cast<const float *>(params[2]);
  const float *dy = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  const int64_t D = shapes[0][ndims[0] - 1], R = rows_of(ndims[0], shapes[0]);
  const int nt = (R * D > 32768) ? omp_get_max_threads() : 1;
  std::vector<double> part(static_cast<size_t>(nt) * D, 0.0);  // per-thread dw partials
#pragma omp parallel num_threads(nt)
  {
    double *pw = part.data() + static_cast<int64_t>(omp_get_thread_num()) * D;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < R; ++i) {
      const float *xi = x + i * D, *gi = dy + i * D;
      float *di = dx + i * D;
      const float r = rr[i];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < D; ++j) dot += gi[j] * w[j] * (xi[j] * r);
      const float c = dot / static_cast<float>(D);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) {
        const float xh = xi[j] * r;
        di[j] = r * (gi[j] * w[j] - xh * c);
        pw[j] += static_cast<double>(gi[j] * xh);
      }
    }
  }
  for (int64_t j = 0; j < D; ++j) {
    double s = 0.0;
    for (int t = 0; t < nt; ++t) s += part[static_cast<size_t>(t) * D + j];
    dw[j] = static_cast<float>(s);
  }
  return 0;
}
