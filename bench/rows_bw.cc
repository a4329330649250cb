// Weight-row streaming rate of the decode kernels' row dot products (decode_rows.h mat_dot) per
// storage, on the decode pool with every core, as the lm_head op runs them.
//   g++ -O3 -march=native -fopenmp -std=c++17 -Iqwen3moe/kernels/csrc bench/rows_bw.cc -o /tmp/rows_bw
//   /tmp/rows_bw [H=2048] [NB=1] [MB=256]
// "cold": a [M, H] matrix of MB megabytes in each storage (more rows for fewer bytes per weight) streamed
// once per pass, far beyond L3; "hot": the first 64 rows again and again (L1/L2 resident): the
// loop's compute rate, in weight bytes per second. Prints GB/s of weight bytes (best of 7) and ms
// per pass. A plain 2-thread sum gives the memory bandwidth.
// Weights sit on 2 MB pages, as the library's after a load (io/hugepages.py); ROWS_BW_PAGES=4k puts
// them on 4 KB pages. ROWS_BW_AB=n instead: per storage, a 4 KB-page and a 2 MB-page matrix, n
// cold passes over each, alternating (the machine's streaming rate moves over seconds: bench/
// stream_state.cc), then the median GB/s of each and the median of the per-pass ratios.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <ctime>
#include <vector>

#include <sys/mman.h>

#include "decode_pool.h"
#include "decode_rows.h"

static bool g_huge = true;  // the next buffers on 2 MB pages (else 4 KB)

// A std::vector allocator on fresh 2 MB-aligned mappings, madvised MADV_HUGEPAGE or MADV_NOHUGEPAGE
template <class T>
struct PageAlloc {
  using value_type = T;
  PageAlloc() = default;
  template <class U>
  PageAlloc(const PageAlloc<U> &) {}
  static constexpr size_t kHuge = 2 << 20;
  T *allocate(size_t n) {
    const size_t len = (n * sizeof(T) + kHuge - 1) / kHuge * kHuge;
    void *raw = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) throw std::bad_alloc();
    const uintptr_t at = (reinterpret_cast<uintptr_t>(raw) + kHuge - 1) / kHuge * kHuge;
    madvise(reinterpret_cast<void *>(at), len, g_huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    return reinterpret_cast<T *>(at);  // the unaligned head stays mapped: a benchmark's few MB
  }
  void deallocate(T *p, size_t n) { munmap(p, (n * sizeof(T) + kHuge - 1) / kHuge * kHuge); }
  template <class U>
  bool operator==(const PageAlloc<U> &) const { return true; }
  template <class U>
  bool operator!=(const PageAlloc<U> &) const { return false; }
};
using Bytes = std::vector<uint8_t, PageAlloc<uint8_t>>;
using Halves = std::vector<uint16_t, PageAlloc<uint16_t>>;

static QMat make(int kind, int64_t M, int64_t H, int64_t g, Bytes &w, Halves &s, Bytes &z) {
  QMat m;
  m.kind = kind, m.I = H, m.g = kind == kQ4 ? g : H;
  m.ld = QMat::bytes_for(kind, H);
  w.assign(M * m.ld + 4096, 0);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
  if (kind == kBF16)
    for (size_t i = 1; i < w.size(); i += 2) w[i] = 0x3c;  // small normal bf16 values
  m.lds = H / m.g;
  s.assign(M * m.lds + 16, 0x1400);  // fp16 ~ 0.001
  z.assign(M * m.lds + 16, kind == kQ4 ? 8 : (kind == kQ6 ? 32 : 128));
  m.w = w.data(), m.s = s.data(), m.z = z.data();
  return m;
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Modes: 0 fp32, 1 bf16, 2 int8, 3 int4 g128, 4 / 5 int8 / int4 with int8 activations, 6 / 7 6 bits
// (one group per row, the lm_head's) with float32 / int8 activations
constexpr int kModes = 8;
static int kind_of(int mode) { return mode >= 6 ? kQ6 : (mode > kQ4 ? mode - 2 : mode); }
static bool act8_of(int mode) { return mode == 4 || mode == 5 || mode == 7; }

// ROWS_BW_AB: 4 KB vs 2 MB pages for one storage, `rounds` alternating cold passes
static void pages_ab(const char *name, int kind, bool act8, int64_t M, int64_t H, const float *x, int rounds) {
  Bytes w[2], z[2];
  Halves s[2];
  QMat W[2];
  for (int h = 0; h < 2; ++h) g_huge = h, W[h] = make(kind, M, H, 128, w[h], s[h], z[h]);
  const double bytes = static_cast<double>(M) * W[0].ld + (W[0].quantized() ? M * W[0].lds * 3.0 : 0.0);
  const int64_t chunk = 64, nc = M / chunk;  // the decode kernels' kChunk
  std::vector<float> y(M);
  std::vector<double> rate[2], ratio;
  for (int r = 0; r < rounds; ++r) {
    for (int h = 0; h < 2; ++h) {
      ActQ q8, q4;
      const XIn in = prepare_x(x, H, 1, H, act8, {&W[h]}, q8, q4);
      const auto t0 = std::chrono::steady_clock::now();
      Pool::get().run(nc, [&](int64_t c) { mat_dot(W[h], c * chunk, (c + 1) * chunk, in, y.data(), M); });
      rate[h].push_back(bytes / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9);
    }
    ratio.push_back(rate[1].back() / rate[0].back());
  }
  printf("%-10s%s cold, median of %d: 4 KB pages %6.1f GB/s, 2 MB pages %6.1f GB/s, per-pass ratio 2M/4K %.3f\n",
         name, act8 ? " act8" : "     ", rounds, median(rate[0]), median(rate[1]), median(ratio));
}

int main(int argc, char **argv) {
  const int64_t H = argc > 1 ? atoi(argv[1]) : 2048, NB = argc > 2 ? atoi(argv[2]) : 1;
  const int64_t MB = argc > 3 ? atoi(argv[3]) : 256, M0 = (MB << 20) / 4 / H / 256 * 256;
  // x 64-byte aligned (ROWS_BW_XOFF=k floats later: the misaligned x of a plain std::vector), as
  // the decode kernels' activation buffers (quant_common.h avec)
  const char *xoff = std::getenv("ROWS_BW_XOFF");
  float *xbuf = nullptr;
  if (posix_memalign(reinterpret_cast<void **>(&xbuf), 64, (NB * H + 16) * sizeof(float)) != 0) return 1;
  float *x = xbuf + (xoff ? atoi(xoff) : 0);
  std::vector<float> y(NB * M0 * 8);
  for (int64_t i = 0; i < NB * H; ++i) x[i] = 0.01f * (i % 13) - 0.05f;
  Pool &pool = Pool::get();
  const char *names[] = {"fp32", "bf16", "int8", "int4 g128", "6 bits"};  // by kind
  const char *pages = std::getenv("ROWS_BW_PAGES"), *ab = std::getenv("ROWS_BW_AB");
  g_huge = !(pages && std::string(pages) == "4k");
  if (ab) {
    for (int mode = 0; mode < kModes; ++mode) {
      const int kind = kind_of(mode);
      pages_ab(names[kind], kind, act8_of(mode), (MB << 20) / QMat::bytes_for(kind, H) / 64 * 64, H, x, atoi(ab));
    }
    return 0;
  }
  {  // bandwidth reference: a plain sum over the fp32 matrix, split over the pool
    Bytes w, z;
    Halves s;
    const int64_t M = M0, nc = 64, per = M * H / nc;
    make(kF32, M, H, H, w, s, z);
    double best = 1e9;
    std::vector<float> part(nc);
    for (int r = 0; r < 7; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      pool.run(nc, [&](int64_t c) {
        const float *p = reinterpret_cast<const float *>(w.data()) + c * per;
        __m512 a = _mm512_setzero_ps(), b = a;
        for (int64_t i = 0; i < per; i += 32)
          a = _mm512_add_ps(a, _mm512_loadu_ps(p + i)), b = _mm512_add_ps(b, _mm512_loadu_ps(p + i + 16));
        part[c] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
      });
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    printf("sum (bandwidth)      cold %6.1f GB/s  %7.3f ms  (%ld threads)\n", M * H * 4 / best / 1e9, best * 1e3,
           static_cast<long>(pool.threads()));
  }
  // ROWS_BW_HOT=m (with OMP_NUM_THREADS=1): only mode m (kind_of), its hot loop 20000 times, rate
  // per second of this thread's CPU time
  const char *hot_only = std::getenv("ROWS_BW_HOT");
  for (int mode = 0; mode < kModes; ++mode) {
    const int kind = kind_of(mode);
    const bool act8 = act8_of(mode);
    if (hot_only && atoi(hot_only) != mode) continue;
    Bytes w, z;
    Halves s;
    const int64_t M = (MB << 20) / QMat::bytes_for(kind, H) / 256 * 256;  // MB of this storage
    const QMat W = make(kind, M, H, 128, w, s, z);
    const double bytes = static_cast<double>(M) * W.ld + (W.quantized() ? M * W.lds * 3.0 : 0.0);
    const int64_t chunk = 256, nc = M / chunk;
    ActQ q8, q4;
    const XIn in = prepare_x(x, H, NB, H, act8, {&W}, q8, q4);
    if (hot_only) {  // this thread's CPU time, not wall time: the other tenants' load stays out of it
      timespec t0, t1;
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
      for (int r = 0; r < 20000; ++r) mat_dot(W, 0, 64, in, y.data() + r % 4 * 64, M);
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
      const double cpu = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
      printf("%-10s%s NB=%ld hot, one thread: %6.1f GB/s of CPU time\n", names[kind], act8 ? " act8" : "",
             static_cast<long>(NB), 20000.0 * 64 * W.ld / cpu / 1e9);
      continue;
    }
    double best = 1e9, hot = 1e9;
    for (int r = 0; r < 7; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      pool.run(nc, [&](int64_t c) { mat_dot(W, c * chunk, (c + 1) * chunk, in, y.data(), M); });
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      t0 = std::chrono::steady_clock::now();
      pool.run(nc, [&](int64_t c) { mat_dot(W, 0, 64, in, y.data() + c % 4 * 64, M); });
      hot = std::min(hot, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double hot_bytes = static_cast<double>(nc) * 64 * W.ld;
    printf("%-10s%s NB=%ld   cold %6.1f GB/s  %7.3f ms   hot %6.1f GB/s   (y[0] %g)\n", names[kind],
           act8 ? " act8" : "", static_cast<long>(NB), bytes / best / 1e9, best * 1e3, hot_bytes / hot / 1e9, y[0]);
  }
  return 0;
}
