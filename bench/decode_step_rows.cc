// The row products of a Qwen3-30B-A3B decode step at batch 1, int4 g128, outside MindSpore: per
// layer the q/k/v projections as one row range (as DecodeAttn), the o projection, and 8 experts'
// gate/up rows + SwiGLU + down rows as one task each (as DecodeMoe at batch 1), on the decode pool,
// each layer on distinct weights. Prints GB/s of weight bytes for the attention and MoE parts with
// float32 and with int8 activations, and the ratio to a plain 2-thread sum over the same buffers
// measured in the same run (the memory's rate).
//   g++ -O3 -march=native -fopenmp -std=c++17 -Iqwen3moe/kernels/csrc bench/decode_step_rows.cc -o /tmp/step_rows
//   /tmp/step_rows [layers=120] [reps=9]
// 120 layers hold ~2.4 GB of expert rows and 120 x 9.9 MB of attention rows: more than any share of
// the L3 a VM gets, so each pass streams from memory (48 layers, ~1 GB, read faster on the Intel VM
// with its 480 MB L3).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "decode_pool.h"
#include "decode_rows.h"

static const int64_t H = 2048, ND = 4096, KD = 512, FF = 768, TOPK = 8, kChunk = 64;

struct Mat {
  avec<uint8_t> w, z;
  avec<uint16_t> s;
  QMat q;
  Mat(int64_t O, int64_t I, unsigned seed) {  // int4 g128, symmetric, small scales
    q.kind = kQ4, q.I = I, q.g = 128, q.ld = I / 2, q.lds = I / 128;
    w.resize(O * q.ld);
    for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<uint8_t>(((i + seed) * 2654435761u) >> 13);
    s.assign(O * q.lds, 0x1400), z.assign(O * q.lds, 8);
    q.w = w.data(), q.s = s.data(), q.z = z.data();
  }
  double bytes() const { return w.size() + 3.0 * s.size(); }
};

struct Layer {
  Mat q, k, v, o;
  std::vector<Mat> gu, dn;
  explicit Layer(unsigned l) : q(ND, H, l), k(KD, H, l + 1), v(KD, H, l + 2), o(H, ND, l + 3) {
    for (int e = 0; e < TOPK; ++e) gu.emplace_back(2 * FF, H, l * 31 + e), dn.emplace_back(H, FF, l * 37 + e);
  }
};

static void attention(Layer &L, bool act8, const float *xn, float *qkv, const float *ov, float *y) {
  const QMat *w3[3] = {&L.q.q, &L.k.q, &L.v.q};
  ActQ a8, a4;
  const XIn xin = prepare_x(xn, H, 1, H, act8, {w3[0]}, a8, a4);
  const int64_t cq = ND / kChunk, ck = KD / kChunk, QKV = ND + 2 * KD;
  Pool::get().run(cq + 2 * ck, [&](int64_t c) {
    const int w = c < cq ? 0 : (c < cq + ck ? 1 : 2);
    const int64_t cc = w == 0 ? c : (w == 1 ? c - cq : c - cq - ck), base = w == 0 ? 0 : (w == 1 ? ND : ND + KD);
    mat_dot(*w3[w], cc * kChunk, (cc + 1) * kChunk, xin, qkv + base, QKV);
  });
  ActQ b8, b4;
  const XIn oin = prepare_x(ov, ND, 1, ND, act8, {&L.o.q}, b8, b4);
  Pool::get().run(H / kChunk, [&](int64_t c) { mat_dot(L.o.q, c * kChunk, (c + 1) * kChunk, oin, y, H); });
}

static void moe(Layer &L, bool act8, const float *z, float *gu, float *ye) {
  ActQ q8, q4;
  const XIn zin = prepare_x(z, H, 1, H, act8, {&L.gu[0].q}, q8, q4);
  Pool::get().run(TOPK, [&](int64_t t) {
    float *g = gu + t * 2 * FF, *u = g + FF;
    mat_dot(L.gu[t].q, 0, FF, zin, g, FF);
    mat_dot(L.gu[t].q.rows(FF), 0, FF, zin, u, FF);
    for (int64_t i = 0; i < FF; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    ActQ a8, a4;
    const XIn ain = prepare_x(g, FF, 1, FF, act8, {&L.dn[t].q}, a8, a4);
    mat_dot(L.dn[t].q, 0, H, ain, ye + t * H, H);
  });
}

// a plain sum over every byte of the given matrices, split over the pool (the memory's rate)
static double sum_rate(const std::vector<const Mat *> &ms, int reps) {
  std::vector<double> t;
  std::vector<float> part(ms.size());
  double bytes = 0;
  for (const Mat *m : ms) bytes += m->w.size();
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    Pool::get().run(static_cast<int64_t>(ms.size()), [&](int64_t i) {
      const uint8_t *p = ms[i]->w.data();
      __m512i a = _mm512_setzero_si512();
      for (size_t k = 0; k < ms[i]->w.size(); k += 64) a = _mm512_add_epi32(a, _mm512_loadu_si512(p + k));
      part[i] = static_cast<float>(_mm512_reduce_add_epi32(a));
    });
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return bytes / t[t.size() / 2] / 1e9;
}

int main(int argc, char **argv) {
  const int nl = argc > 1 ? atoi(argv[1]) : 120, reps = argc > 2 ? atoi(argv[2]) : 9;
  std::vector<Layer> layers;
  layers.reserve(nl);
  for (int l = 0; l < nl; ++l) layers.emplace_back(static_cast<unsigned>(l));
  double ab = 0, mb = 0;
  std::vector<const Mat *> am, mm;
  for (Layer &L : layers) {
    for (const Mat *m : {&L.q, &L.k, &L.v, &L.o}) ab += m->bytes(), am.push_back(m);
    for (int t = 0; t < TOPK; ++t) mb += L.gu[t].bytes() + L.dn[t].bytes(), mm.push_back(&L.gu[t]), mm.push_back(&L.dn[t]);
  }
  avec<float> xn(H), qkv(ND + 2 * KD), ov(ND), y(H), gu(TOPK * 2 * FF), ye(TOPK * H);
  for (int64_t i = 0; i < H; ++i) xn[i] = 0.01f * (i % 13) - 0.05f;
  for (int64_t i = 0; i < ND; ++i) ov[i] = 0.01f * (i % 7) - 0.03f;
  printf("%d layers: attention %.0f MB, MoE (8 experts a layer) %.0f MB, %d threads, median of %d passes\n", nl,
         ab / 1e6, mb / 1e6, Pool::get().threads(), reps);
  const double sa = sum_rate(am, reps), sm = sum_rate(mm, reps);
  printf("plain sum: attention rows %.1f GB/s, expert rows %.1f GB/s\n", sa, sm);
  for (int act8 = 0; act8 < 2; ++act8) {
    std::vector<double> ta, tm;
    for (int r = 0; r < reps; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      for (Layer &L : layers) attention(L, act8, xn.data(), qkv.data(), ov.data(), y.data());
      auto t1 = std::chrono::steady_clock::now();
      for (Layer &L : layers) moe(L, act8, xn.data(), gu.data(), ye.data());
      auto t2 = std::chrono::steady_clock::now();
      ta.push_back(std::chrono::duration<double>(t1 - t0).count());
      tm.push_back(std::chrono::duration<double>(t2 - t1).count());
    }
    std::sort(ta.begin(), ta.end());
    std::sort(tm.begin(), tm.end());
    const double ra = ab / ta[reps / 2] / 1e9, rm = mb / tm[reps / 2] / 1e9;
    printf("%s activations: attention %.1f GB/s (%.2fx the sum), MoE %.1f GB/s (%.2fx the sum)\n",
           act8 ? "int8   " : "float32", ra, ra / sa, rm, rm / sm);
  }
  return 0;
}
