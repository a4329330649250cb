// Fused attention core for CPU (ops.Custom aot): softmax(q k^T * D^-0.5 + bias) v with GQA.
// AttnCoreFwd also returns the probabilities p for AttnCoreBwd (training); AttnCoreInfer
// (generation's prefill) computes the same o without them. The backward runs one task per
// (batch, kv head) so the G query heads sharing a kv head accumulate dk/dv without races.
//
// The composite path runs ~8 graph ops forward and ~12 backward over [B, N, S, T] tensors
// (scores, probs, their grads, reshape copies); here each head's [S, T] block is produced and
// consumed while still in cache. Same float32 order as the composite path: scores * scale, then
// + bias, then a max-subtracted softmax; exp is a vectorisable Cephes-style polynomial (rel.
// error < 1e-7, masked scores clamp to exp(-87) ~ 1e-38 instead of 0).
// Shapes: B batch, N query heads, K kv heads, G = N / K, S queries, T keys, D head_dim.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kv_cache.h"

struct Dims {
  int64_t B, N, K, G, S, T, D;
};

static Dims dims(int64_t **shapes) {
  Dims d;
  d.B = shapes[0][0], d.N = shapes[0][1], d.S = shapes[0][2], d.D = shapes[0][3];
  d.K = shapes[1][1], d.T = shapes[1][2], d.G = d.N / d.K;
  return d;
}

// Causal skipping: keys whose bias is <= kMasked contribute exp(-huge) = 0 in float32, so each
// block of kRows queries only needs the keys up to the last unmasked one of its rows (a row with
// every key masked keeps all T, where the softmax is uniform as in the composite path). For a
// causal 256-token prefill this does ~60% of the full [S, T] work. Probabilities past a block's
// cut are stored as exact zeros.
static const float kMasked = -1e6f;
static const int64_t kRows = 64;

// cut[b * nblk + blk] = number of keys block blk of batch b needs
static std::vector<int64_t> key_cuts(const float *bias, const Dims &d) {
  const int64_t nblk = (d.S + kRows - 1) / kRows;
  std::vector<int64_t> cut(d.B * nblk, 0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t i = 0; i < d.S; ++i) {
      const float *br = bias + (b * d.S + i) * d.T;
      int64_t last = d.T - 1;
      while (last >= 0 && br[last] <= kMasked) --last;
      const int64_t need = last < 0 ? d.T : last + 1;
      int64_t &c = cut[b * nblk + i / kRows];
      c = need > c ? need : c;
    }
  return cut;
}

// rows [0, R) of p (leading dim ldp), first tc columns: softmax(p * scale + bias) in place, the
// columns [tc, ldp) zeroed (the backward reads the full stored rows). `omp simd` lets the max/sum
// reductions vectorise (a float sum is otherwise kept in order).
static void softmax_rows(float *p, int64_t ldp, const float *bias, int64_t R, int64_t tc, const Dims &d,
                         float scale) {
  for (int64_t i = 0; i < R; ++i) {
    float *row = p + i * ldp;
    const float *br = bias + i * d.T;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < tc; ++j) {
      row[j] = row[j] * scale + br[j];
      mx = row[j] > mx ? row[j] : mx;
    }
    const float sum = exp_shift(row, row, tc, mx);
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < tc; ++j) row[j] *= inv;
    if (tc < ldp) std::memset(row + tc, 0, (ldp - tc) * sizeof(float));
  }
}

// q k^T runs kKeyChunk keys per GEMM so one 64 x 1024 score tile plus its 1024 x 128 key rows
// (768 KB) fit a core's 1 MB L2: oneDNN sgemm, one thread, 8192 keys: one call 126 GFLOP/s,
// 1024-key chunks 228, 2048-key chunks (1.5 MB) 166 (bench/attention_gemm_micro.cc). Each score
// is still one D-long dot product, so the chunks give the same bits as one call (checked there).
static const int64_t kKeyChunk = 1024;

// One block of R query rows of one head against its first tc keys: p = softmax(q k^T * scale +
// bias) with leading dim ldp, then o = p v. The forward stores p for the backward (ldp = T); the
// inference op passes a per-thread scratch (ldp = tc), the same arithmetic in the same order.
static void attend_block(const float *qb, const float *kh, const float *vh, const float *bb, float *pb,
                         int64_t ldp, float *ob, int64_t R, int64_t tc, const Dims &d, float scale) {
  for (int64_t j = 0; j < tc; j += kKeyChunk)
    gemm(false, true, R, std::min(kKeyChunk, tc - j), d.D, qb, d.D, kh + j * d.D, d.D, pb + j, ldp, 0.0f);
  softmax_rows(pb, ldp, bb, R, tc, d, scale);
  gemm(false, false, R, d.D, tc, pb, ldp, vh, d.D, ob, d.D, 0.0f);
}

// o [B,N,S,D] for all heads, one task per (batch, query head); p [B,N,S,T] is written when given
// (training), else each block's probabilities live in a kRows x tc per-thread scratch, so a long
// prompt never allocates the [B,N,S,T] buffer (32 heads x 8192^2 floats = 8.6 GB).
// E: the k/v element type (kv_cache.h). A 16-bit cache (generation's prefill) has the head's key
// and value rows up to its widest block cut widened into a per-thread float32 scratch (once per kv
// head a thread meets in a row: its G query heads are consecutive tasks), then the same GEMMs.
template <typename E>
static void attend(const float *q, const E *k, const E *v, const float *bias, float *o, float *p, const Dims &d) {
  constexpr bool wide = !std::is_same<E, float>::value;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  const std::vector<int64_t> cut = key_cuts(bias, d);
  const int64_t nblk = (d.S + kRows - 1) / kRows;
  std::vector<int64_t> bcut(d.B, 0);  // keys any block of batch b needs
  for (int64_t i = 0; i < d.B * nblk; ++i) bcut[i / nblk] = std::max(bcut[i / nblk], cut[i]);
  const int64_t widest = *std::max_element(bcut.begin(), bcut.end());
  SerialBlas serial;
#pragma omp parallel
  {
    FlushDenormals ftz;  // per thread (common.h)
    std::vector<float> scratch(p ? 0 : kRows * widest), kvf(wide ? 2 * widest * d.D : 0);
    int64_t widened = -1;  // the kv head kvf holds
#pragma omp for schedule(dynamic, 1)
    for (int64_t bn = 0; bn < d.B * d.N; ++bn) {
      const int64_t b = bn / d.N, n = bn % d.N, kv = b * d.K + n / d.G;
      const float *kh, *vh;
      if constexpr (wide) {
        if (kv != widened) {
          load_row(k + kv * d.T * d.D, kvf.data(), bcut[b] * d.D);
          load_row(v + kv * d.T * d.D, kvf.data() + widest * d.D, bcut[b] * d.D);
          widened = kv;
        }
        kh = kvf.data(), vh = kvf.data() + widest * d.D;
      } else {
        kh = k + kv * d.T * d.D, vh = v + kv * d.T * d.D;
      }
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t i0 = blk * kRows, R = std::min(kRows, d.S - i0), tc = cut[b * nblk + blk];
        float *pb = p ? p + (bn * d.S + i0) * d.T : scratch.data();
        attend_block(q + (bn * d.S + i0) * d.D, kh, vh, bias + (b * d.S + i0) * d.T, pb, p ? d.T : tc,
                     o + (bn * d.S + i0) * d.D, R, tc, d, scale);
      }
    }
  }
}

// inputs: q [B,N,S,D], k [B,K,T,D], v [B,K,T,D], bias [B,1,S,T]; outputs: o [B,N,S,D], p [B,N,S,T]
extern "C" int AttnCoreFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  attend(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
         static_cast<const float *>(params[2]), static_cast<const float *>(params[3]),
         static_cast<float *>(params[4]), static_cast<float *>(params[5]), dims(shapes));
  return 0;
}

// Forward only (generation): the same inputs, one output o [B,N,S,D], equal to AttnCoreFwd's o bit
// for bit; no p, so memory stays O(threads x kRows x T) instead of O(N x S x T). k and v may be
// a 16-bit KV cache (bfloat16 / its uint16 bits, or float16; both the same): the o AttnCoreFwd
// gives on their float32 widening.
extern "C" int AttnCoreInfer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  const int kind = kv_kind(dtypes[1]);
  if (nparam != 5 || kind < 0 || kv_kind(dtypes[2]) != kind) return 1;
  const float *q = static_cast<const float *>(params[0]), *bias = static_cast<const float *>(params[3]);
  float *o = static_cast<float *>(params[4]);
  if (kind == kKvBf16)
    attend(q, static_cast<const Bf16 *>(params[1]), static_cast<const Bf16 *>(params[2]), bias, o, nullptr,
           dims(shapes));
  else if (kind == kKvF16)
    attend(q, static_cast<const Half *>(params[1]), static_cast<const Half *>(params[2]), bias, o, nullptr,
           dims(shapes));
  else
    attend(q, static_cast<const float *>(params[1]), static_cast<const float *>(params[2]), bias, o, nullptr,
           dims(shapes));
  return 0;
}

// inputs: q, k, v, bias, p, do [B,N,S,D]; outputs: dq [B,N,S,D], dk, dv [B,K,T,D]
extern "C" int AttnCoreBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *bias = static_cast<const float *>(params[3]);
  const float *p = static_cast<const float *>(params[4]);
  const float *dout = static_cast<const float *>(params[5]);
  float *dq = static_cast<float *>(params[6]);
  float *dk = static_cast<float *>(params[7]);
  float *dv = static_cast<float *>(params[8]);
  const Dims d = dims(shapes);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  const std::vector<int64_t> cut = key_cuts(bias, d);
  const int64_t nblk = (d.S + kRows - 1) / kRows;
  SerialBlas serial;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bk = 0; bk < d.B * d.K; ++bk) {
    FlushDenormals ftz;  // per task: the thread's own MXCSR (common.h)
    const int64_t b = bk / d.K, kvh = bk % d.K;
    const float *kh = k + bk * d.T * d.D, *vh = v + bk * d.T * d.D;
    float *dkh = dk + bk * d.T * d.D, *dvh = dv + bk * d.T * d.D;
    std::memset(dkh, 0, d.T * d.D * sizeof(float));
    std::memset(dvh, 0, d.T * d.D * sizeof(float));
    std::vector<float> ds(kRows * d.T);
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t bn = b * d.N + kvh * d.G + g;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t i0 = blk * kRows, R = std::min(kRows, d.S - i0), tc = cut[b * nblk + blk];
        const float *pb = p + (bn * d.S + i0) * d.T, *qb = q + (bn * d.S + i0) * d.D;
        const float *dob = dout + (bn * d.S + i0) * d.D;
        gemm(true, false, tc, d.D, R, pb, d.T, dob, d.D, dvh, d.D, 1.0f);          // dv += p^T do
        gemm(false, true, R, tc, d.D, dob, d.D, vh, d.D, ds.data(), d.T, 0.0f);    // dp = do v^T
        for (int64_t i = 0; i < R; ++i) {  // ds = p * (dp - sum_j p dp) * scale
          float *r = ds.data() + i * d.T;
          const float *pr = pb + i * d.T;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < tc; ++j) dot += pr[j] * r[j];
#pragma omp simd
          for (int64_t j = 0; j < tc; ++j) r[j] = pr[j] * (r[j] - dot) * scale;
        }
        gemm(false, false, R, d.D, tc, ds.data(), d.T, kh, d.D, dq + (bn * d.S + i0) * d.D, d.D, 0.0f);
        gemm(true, false, tc, d.D, R, ds.data(), d.T, qb, d.D, dkh, d.D, 1.0f);    // dk += ds^T q
      }
    }
  }
  return 0;
}
