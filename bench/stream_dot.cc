// One-core weight-streaming microbenchmark behind decode_layer.cc's block4x prefetch (2026-11-29).
//   g++ -O3 -march=native bench/stream_dot.cc -o /tmp/stream_dot && /tmp/stream_dot 512
// Streams a 64 MiB fp32 matrix [M, H] (far beyond L3) once per pass, dotting every row with NB
// batch rows, and prints GB/s of weights read (best of 7): a plain sum (the bandwidth), 4 rows
// read interleaved without / with a linear software prefetch of the next 4-row block, and one row
// at a time. Here (2 vCPUs, numbers move with the other tenants' load): sum 21-37 GB/s; 4 interleaved
// rows 11-17 GB/s; with the prefetch 23-31 GB/s for NB 1-4 (prefetching 2 blocks ahead was worse);
// NB 8 10-19 GB/s with any layout (8 FMAs per weight vector: FMA-bound on this core).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

template <int NB, bool PF>
static void block4(const float *w0, int64_t H, const float *x, float *y) {
  __m512 acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  const char *next = reinterpret_cast<const char *>(w0 + 4 * H);  // rows are contiguous here
  for (int64_t h = 0; h < H; h += 16) {
    if (PF)
      for (int q = 0; q < 4; ++q) _mm_prefetch(next + (4 * h + 16 * q) * 4, _MM_HINT_T0);
    __m512 xv[NB];
    for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + b * H + h);
    for (int r = 0; r < 4; ++r) {
      const __m512 wv = _mm512_loadu_ps(w0 + r * H + h);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) y[b * 4 + r] = _mm512_reduce_add_ps(acc[r][b]);
}

template <int NB>
static void row1(const float *w, int64_t H, const float *x, float *y) {
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t h = 0; h < H; h += 16) {
    const __m512 wv = _mm512_loadu_ps(w + h);
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * H + h), acc[b]);
  }
  for (int b = 0; b < NB; ++b) y[b] = _mm512_reduce_add_ps(acc[b]);
}

int main(int argc, char **argv) {
  const int64_t H = argc > 1 ? atoi(argv[1]) : 512, M = (64ll << 20) / 4 / H;  // H % 16 == 0
  float *W = static_cast<float *>(aligned_alloc(64, (M + 8) * H * 4));
  float *x = static_cast<float *>(aligned_alloc(64, 8 * H * 4));
  for (int64_t i = 0; i < (M + 8) * H; ++i) W[i] = 1e-3f * (i % 7);
  for (int64_t i = 0; i < 8 * H; ++i) x[i] = 1.f;
  static float y[64];
  volatile float sink = 0.f;
  auto bench = [&](const char *name, auto pass) {
    double best = 1e9;
    for (int r = 0; r < 7; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      pass();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      sink = sink + y[0];
    }
    printf("H=%ld %-26s %5.1f GB/s\n", static_cast<long>(H), name, M * H * 4 / best / 1e9);
  };
  bench("sum", [&] {
    __m512 a = _mm512_setzero_ps();
    for (int64_t i = 0; i < M * H; i += 16) a = _mm512_add_ps(a, _mm512_loadu_ps(W + i));
    y[0] = _mm512_reduce_add_ps(a);
  });
  bench("4 rows interleaved, NB=1", [&] { for (int64_t o = 0; o < M; o += 4) block4<1, false>(W + o * H, H, x, y); });
  bench("4 rows interleaved, NB=4", [&] { for (int64_t o = 0; o < M; o += 4) block4<4, false>(W + o * H, H, x, y); });
  bench("+ next-block prefetch, NB=1", [&] { for (int64_t o = 0; o < M; o += 4) block4<1, true>(W + o * H, H, x, y); });
  bench("+ next-block prefetch, NB=2", [&] { for (int64_t o = 0; o < M; o += 4) block4<2, true>(W + o * H, H, x, y); });
  bench("+ next-block prefetch, NB=4", [&] { for (int64_t o = 0; o < M; o += 4) block4<4, true>(W + o * H, H, x, y); });
  bench("1 row at a time, NB=1", [&] { for (int64_t o = 0; o < M; ++o) row1<1>(W + o * H, H, x, y); });
  bench("1 row at a time, NB=8", [&] { for (int64_t o = 0; o < M; ++o) row1<8>(W + o * H, H, x, y); });
  return 0;
}
