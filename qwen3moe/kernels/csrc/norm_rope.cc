// Per-head RMSNorm + rotary embedding + [B,S,H,D] -> [B,H,S,D] transpose for CPU (ops.Custom
// aot), forward and backward: Qwen3's q/k path between the projection and the attention core.
//
// The composite path is the norm, a Transpose, and RoPE as Mul, StridedSlice x2, Neg, Concat,
// Mul, Add (each a pass over [B,H,S,D]), and twice that backward; per decoder layer it runs for
// q and for k. Same float32 formulas as layers/norm.py and layers/rope.py (rotate-half layout):
//   z = w * (x * r),  r = 1 / sqrt(mean(x^2) + eps)
//   y[j] = z[j] cos[j] - z[j+D/2] sin[j]          (j <  D/2)
//   y[j] = z[j] cos[j] + z[j-D/2] sin[j]          (j >= D/2)
// backward: dz[j] = dy[j] cos[j] + dy[j+D/2] sin[j+D/2]  (j < D/2),
//           dz[j] = dy[j] cos[j] - dy[j-D/2] sin[j-D/2]  (j >= D/2), then the RMSNorm backward.
// Shapes: B batch, S sequence, H heads, D head_dim (even); cos/sin [B,S,D]; w [D]; eps [1].
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

struct Dims {
  int64_t B, S, H, D;
};

static Dims dims(int64_t **shapes) { return {shapes[0][0], shapes[0][1], shapes[0][2], shapes[0][3]}; }

// inputs: x [B,S,H,D], w [D], eps [1], cos [B,S,D], sin [B,S,D]; outputs: y [B,H,S,D], r [B,S,H]
extern "C" int NormRopeFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[2])[0];
  const float *cs = static_cast<const float *>(params[3]);
  const float *sn = static_cast<const float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  float *rr = static_cast<float *>(params[6]);
  const Dims d = dims(shapes);
  if (d.D % 2) return 1;
  const int64_t h2 = d.D / 2;
#pragma omp parallel for schedule(static) if (d.B * d.S * d.H * d.D > 32768)
  for (int64_t bs = 0; bs < d.B * d.S; ++bs) {
    const int64_t b = bs / d.S, s = bs % d.S;
    const float *c = cs + bs * d.D, *sv = sn + bs * d.D;
    std::vector<float> z(d.D);
    for (int64_t h = 0; h < d.H; ++h) {
      const float *xi = x + (bs * d.H + h) * d.D;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d.D; ++j) ss += xi[j] * xi[j];
      const float r = 1.0f / std::sqrt(ss / static_cast<float>(d.D) + eps);
      rr[bs * d.H + h] = r;
      for (int64_t j = 0; j < d.D; ++j) z[j] = w[j] * (xi[j] * r);
      float *yo = y + ((b * d.H + h) * d.S + s) * d.D;
#pragma omp simd
      for (int64_t j = 0; j < h2; ++j) {
        yo[j] = z[j] * c[j] - z[j + h2] * sv[j];
        yo[j + h2] = z[j + h2] * c[j + h2] + z[j] * sv[j + h2];
      }
    }
  }
  return 0;
}

// inputs: x, w, cos, sin, r [B,S,H], dy [B,H,S,D]; outputs: dx [B,S,H,D], dw [D]
extern "C" int NormRopeBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *cs = static_cast<const float *>(params[2]);
  const float *sn = static_cast<const float *>(params[3]);
  const float *rr = static_cast<const float *>(params[4]);
  const float *dy = static_cast<const float *>(params[5]);
  float *dx = static_cast<float *>(params[6]);
  float *dw = static_cast<float *>(params[7]);
  const Dims d = dims(shapes);
  const int64_t h2 = d.D / 2;
  const int nt = (d.B * d.S * d.H * d.D > 32768) ? omp_get_max_threads() : 1;
  std::vector<double> part(static_cast<size_t>(nt) * d.D, 0.0);  // per-thread dw partials
#pragma omp parallel num_threads(nt)
  {
    double *pw = part.data() + static_cast<int64_t>(omp_get_thread_num()) * d.D;
    std::vector<float> dz(d.D);
#pragma omp for schedule(static)
    for (int64_t bs = 0; bs < d.B * d.S; ++bs) {
      const int64_t b = bs / d.S, s = bs % d.S;
      const float *c = cs + bs * d.D, *sv = sn + bs * d.D;
      for (int64_t h = 0; h < d.H; ++h) {
        const float *g = dy + ((b * d.H + h) * d.S + s) * d.D;
        for (int64_t j = 0; j < h2; ++j) {
          dz[j] = g[j] * c[j] + g[j + h2] * sv[j + h2];
          dz[j + h2] = g[j + h2] * c[j + h2] - g[j] * sv[j];
        }
        const float *xi = x + (bs * d.H + h) * d.D;
        float *di = dx + (bs * d.H + h) * d.D;
        const float r = rr[bs * d.H + h];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d.D; ++j) dot += dz[j] * w[j] * (xi[j] * r);
        const float cc = dot / static_cast<float>(d.D);
        for (int64_t j = 0; j < d.D; ++j) {
          const float xh = xi[j] * r;
          di[j] = r * (dz[j] * w[j] - xh * cc);
          pw[j] += static_cast<double>(dz[j] * xh);
        }
      }
    }
  }
  for (int64_t j = 0; j < d.D; ++j) {
    double acc = 0.0;
    for (int t = 0; t < nt; ++t) acc += part[static_cast<size_t>(t) * d.D + j];
    dw[j] = static_cast<float>(acc);
  }
  return 0;
}

// Axes 1 and 2 swapped by a copy: x [B,A,C,D] -> y [B,C,A,D] (e.g. [B,S,K,D] <-> [B,K,S,D]).
// Why a kernel: in a MindSpore 2.10 CPU graph a Transpose keeps its input (and what is computed
// from its output) allocated until the graph ends, so a 48-layer prefill graph held every layer's
// activations (bench/RESULTS.md); a custom op's buffers are reused like any other op's.
extern "C" int SwapAxes12(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 2 || ndims[0] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t B = shapes[0][0], A = shapes[0][1], C = shapes[0][2], D = shapes[0][3];
#pragma omp parallel for schedule(static) if (B * A * C * D > 65536)
  for (int64_t ba = 0; ba < B * A; ++ba) {
    const int64_t b = ba / A, a = ba % A;
    for (int64_t c = 0; c < C; ++c)
      std::memcpy(y + ((b * C + c) * A + a) * D, x + (ba * C + c) * D, D * sizeof(float));
  }
  return 0;
}
