// Fused attention core for CPU (ops.Custom aot): softmax(q k^T * D^-0.5 + bias) v with GQA,
// forward and backward, one task per (batch, kv head) so the G query heads sharing a kv head
// accumulate dk/dv without races.
//
// The composite path runs ~8 graph ops forward and ~12 backward over [B, N, S, T] tensors
// (scores, probs, their grads, reshape copies); here each head's [S, T] block is produced and
// consumed while still in cache. Same float32 order as the composite path: scores * scale, then
// + bias, then a max-subtracted softmax; exp is a vectorisable Cephes-style polynomial (rel.
// error < 1e-7, masked scores clamp to exp(-87) ~ 1e-38 instead of 0).
// Shapes: B batch, N query heads, K kv heads, G = N / K, S queries, T keys, D head_dim.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void cblas_sgemm64_(int order, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                               const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                               float *C, int64_t ldc);
extern "C" int openblas_get_num_threads64_();
extern "C" void openblas_set_num_threads64_(int);
static const int kRow = 101, kN = 111, kT = 112;

struct SerialBlas {
  int prev;
  SerialBlas() : prev(openblas_get_num_threads64_()) { openblas_set_num_threads64_(1); }
  ~SerialBlas() { openblas_set_num_threads64_(prev); }
};

// C[M,N] = op(A) op(B) + beta C, row-major
static void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float *C, int64_t ldc, float beta) {
  cblas_sgemm64_(kRow, ta ? kT : kN, tb ? kT : kN, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
}

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

struct Dims {
  int64_t B, N, K, G, S, T, D;
};

static Dims dims(int64_t **shapes) {
  Dims d;
  d.B = shapes[0][0], d.N = shapes[0][1], d.S = shapes[0][2], d.D = shapes[0][3];
  d.K = shapes[1][1], d.T = shapes[1][2], d.G = d.N / d.K;
  return d;
}

// p row i = softmax(p_i * scale + bias_i) in place. `omp simd` lets the max/sum reductions
// vectorise (a float sum is otherwise kept in source order, i.e. scalar).
static void softmax_rows(float *p, const float *bias, const Dims &d, float scale) {
  for (int64_t i = 0; i < d.S; ++i) {
    float *row = p + i * d.T;
    const float *br = bias + i * d.T;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < d.T; ++j) {
      row[j] = row[j] * scale + br[j];
      mx = row[j] > mx ? row[j] : mx;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < d.T; ++j) {
      row[j] = vexp(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < d.T; ++j) row[j] *= inv;
  }
}

// inputs: q [B,N,S,D], k [B,K,T,D], v [B,K,T,D], bias [B,1,S,T]; outputs: o [B,N,S,D], p [B,N,S,T]
extern "C" int AttnCoreFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *bias = static_cast<const float *>(params[3]);
  float *o = static_cast<float *>(params[4]);
  float *p = static_cast<float *>(params[5]);
  const Dims d = dims(shapes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  SerialBlas serial;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bn = 0; bn < d.B * d.N; ++bn) {
    const int64_t b = bn / d.N, n = bn % d.N, kv = b * d.K + n / d.G;
    const float *qh = q + bn * d.S * d.D, *kh = k + kv * d.T * d.D, *vh = v + kv * d.T * d.D;
    float *ph = p + bn * d.S * d.T;
    gemm(false, true, d.S, d.T, d.D, qh, d.D, kh, d.D, ph, d.T, 0.0f);
    softmax_rows(ph, bias + b * d.S * d.T, d, scale);
    gemm(false, false, d.S, d.D, d.T, ph, d.T, vh, d.D, o + bn * d.S * d.D, d.D, 0.0f);
  }
  return 0;
}

// inputs: q, k, v, bias, p, do [B,N,S,D]; outputs: dq [B,N,S,D], dk, dv [B,K,T,D]
extern "C" int AttnCoreBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *p = static_cast<const float *>(params[4]);
  const float *dout = static_cast<const float *>(params[5]);
  float *dq = static_cast<float *>(params[6]);
  float *dk = static_cast<float *>(params[7]);
  float *dv = static_cast<float *>(params[8]);
  const Dims d = dims(shapes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  SerialBlas serial;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bk = 0; bk < d.B * d.K; ++bk) {
    const int64_t b = bk / d.K, kvh = bk % d.K;
    const float *kh = k + bk * d.T * d.D, *vh = v + bk * d.T * d.D;
    float *dkh = dk + bk * d.T * d.D, *dvh = dv + bk * d.T * d.D;
    std::vector<float> ds(d.S * d.T);
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t bn = b * d.N + kvh * d.G + g;
      const float *ph = p + bn * d.S * d.T, *qh = q + bn * d.S * d.D, *doh = dout + bn * d.S * d.D;
      const float beta = g == 0 ? 0.0f : 1.0f;
      gemm(true, false, d.T, d.D, d.S, ph, d.T, doh, d.D, dvh, d.D, beta);            // dv += p^T do
      gemm(false, true, d.S, d.T, d.D, doh, d.D, vh, d.D, ds.data(), d.T, 0.0f);      // dp = do v^T
      for (int64_t i = 0; i < d.S; ++i) {  // ds = p * (dp - sum_j p dp) * scale
        float *r = ds.data() + i * d.T;
        const float *pr = ph + i * d.T;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d.T; ++j) dot += pr[j] * r[j];
#pragma omp simd
        for (int64_t j = 0; j < d.T; ++j) r[j] = pr[j] * (r[j] - dot) * scale;
      }
      gemm(false, false, d.S, d.D, d.T, ds.data(), d.T, kh, d.D, dq + bn * d.S * d.D, d.D, 0.0f);  // dq
      gemm(true, false, d.T, d.D, d.S, ds.data(), d.T, qh, d.D, dkh, d.D, beta);                  // dk
    }
  }
  return 0;
}
