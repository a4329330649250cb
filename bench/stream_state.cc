// How fast this VM streams memory right now, sampled over time (bench/RESULTS.md "Streaming rate").
//   g++ -O3 -march=native -fopenmp bench/stream_state.cc -o /tmp/stream_state
//   OMP_WAIT_POLICY=PASSIVE /tmp/stream_state [SECONDS=30] [MB=1024] [PAGES=thp|4k]
// One buffer (MB, far beyond L3) summed again and again with a linear software prefetch 8 KB
// ahead (as the decode row loops read weights); each sample is one pass by the thread on core 0
// alone, one by core 1 alone, and one with both cores each taking half. Prints one line per
// sample: seconds since start, the three rates in GB/s. Why: the 2-core rate of the same process
// and buffer moves between two levels over seconds while one core's rate stays put, so a
// benchmark process that compares weight formats needs this rate next to its timings.
#include <immintrin.h>
#include <omp.h>
#include <sched.h>
#include <sys/mman.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

static float sum_pass(const char *p, size_t n) {
  const float *f = reinterpret_cast<const float *>(p);
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  for (size_t i = 0; i < n / 4; i += 64) {
    for (int q = 0; q < 4; ++q) _mm_prefetch(p + 8192 + i * 4 + q * 64, _MM_HINT_T0);
    a = _mm512_add_ps(a, _mm512_load_ps(f + i));
    b = _mm512_add_ps(b, _mm512_load_ps(f + i + 16));
    c = _mm512_add_ps(c, _mm512_load_ps(f + i + 32));
    d = _mm512_add_ps(d, _mm512_load_ps(f + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char **argv) {
  const double secs = argc > 1 ? atof(argv[1]) : 30;
  const size_t N = static_cast<size_t>(argc > 2 ? atoi(argv[2]) : 1024) << 20, huge = 2 << 20;
  const bool thp = argc <= 3 || strcmp(argv[3], "4k") != 0;
  // 2 MB aligned, so that every page of it can be a huge page (thp) or none is (4k)
  char *raw = static_cast<char *>(mmap(nullptr, N + 2 * huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (raw == MAP_FAILED) return 1;
  char *p = reinterpret_cast<char *>((reinterpret_cast<uintptr_t>(raw) + huge - 1) / huge * huge);
  madvise(p, N + huge, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  memset(p, 1, N + huge);  // + the prefetch's overrun
  float sink = 0;
#pragma omp parallel num_threads(2)
  {  // thread t on core t, so "core 0 alone" and "core 1 alone" mean what they say
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(omp_get_thread_num(), &s);
    sched_setaffinity(0, sizeof s, &s);
  }
  printf("# seconds  core0 GB/s  core1 GB/s  both GB/s  (%zu MB, %s pages)\n", N >> 20, thp ? "2 MB" : "4 KB");
  for (const double t0 = now(); now() - t0 < secs;) {
    double rate[3];
    for (int m = 0; m < 3; ++m) {  // m 0 / 1: that core alone over the first half; 2: both, a half each
      const double s = now();
#pragma omp parallel num_threads(2) reduction(+ : sink)
      {
        const int t = omp_get_thread_num();
        if (m == 2) sink += sum_pass(p + t * N / 2, N / 2);
        else if (t == m) sink += sum_pass(p, N / 2);
      }
      rate[m] = (m == 2 ? N : N / 2) / (now() - s) / 1e9;
    }
    printf("%7.2f %7.1f %7.1f %7.1f\n", now() - t0, rate[0], rate[1], rate[2]);
    fflush(stdout);
  }
  return sink == 12345.f ? 2 : 0;
}
