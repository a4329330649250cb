// Micro-benchmark: quant_ops.cc's many-row product, fp32 activations (qlinear) vs int8 activations
// (qlinear8, quant_gemm8.h; on vpdpbusd and, where the CPU has them, AMX tiles, outputs checked equal),
// one thread, CPU time of the calling thread (the machine is shared).
// Shapes: q_proj 4096 x 2048 at T rows, an expert's gate_up 1536 x 2048 and down 2048 x 768 at n rows.
// Build (the kernels' own link flags: oneDNN, OpenBLAS):
//   LINK=$(.venv/bin/python -c "from qwen3moe.kernels.build import _link_flags; print(' '.join(_link_flags()))")
//   g++ -O3 -march=native -fopenmp -std=c++17 bench/gemm8_micro.cc -o /tmp/gemm8_micro $LINK
//   /tmp/gemm8_micro [reps]
#include <ctime>
#include <cstdio>
#include <random>
#include "../qwen3moe/kernels/csrc/quant_ops.cc"

static double cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

struct Weight {
  std::vector<uint8_t> q, z;
  std::vector<uint16_t> s;
  QMat m;
  Weight(int kind, int64_t O, int64_t I, int64_t g, std::mt19937 &rng) {
    const int64_t ld = kind == kQ4 ? I / 2 : I, G = I / g;
    q.resize(O * ld), s.resize(O * G), z.assign(O * G, kind == kQ4 ? 8 : 128);
    for (auto &v : q) v = rng() & 255;
    for (auto &v : s) v = 0x1c00 + (rng() & 0xff);  // ~0.004
    m.kind = kind, m.w = q.data(), m.s = s.data(), m.z = z.data(), m.ld = ld, m.lds = G, m.I = I, m.g = g;
  }
};

int main(int argc, char **argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 5;
  std::mt19937 rng(0);
  struct Case { const char *name; int64_t O, I, T; };
  const Case cases[] = {{"q_proj T=512", 4096, 2048, 512}, {"gate_up n=32", 1536, 2048, 32}, {"down n=32", 2048, 768, 32},
                        {"gate_up n=20", 1536, 2048, 20}, {"gate_up n=48", 1536, 2048, 48},
                        {"gate_up n=4", 1536, 2048, 4}, {"gate_up n=8", 1536, 2048, 8}, {"gate_up n=12", 1536, 2048, 12}};
  for (const Case &c : cases)
    for (int kind : {kQ8, kQ4}) {
      Weight W(kind, c.O, c.I, kind == kQ4 ? 128 : c.I, rng);
      std::vector<float> x(c.T * c.I), y(c.T * c.O);
      std::normal_distribution<float> nd;
      for (auto &v : x) v = nd(rng);
      // modes: 0 fp32 activations, 1 int8 activations on vpdpbusd, 2 the same on AMX tiles (quant_amx.h)
      const bool amx = amx_supported();
      double best[3] = {1e30, 1e30, 1e30};
      std::vector<float> ref(y.size());
      for (int r = 0; r < reps; ++r)
        for (int m = 0; m < (amx ? 3 : 2); ++m) {
          quant_amx_flag() = m == 2;
          const double t0 = cpu_ms();
          qlinear_mode(W.m, c.O, x.data(), c.T, y.data(), c.O, false, m > 0);
          best[m] = std::min(best[m], cpu_ms() - t0);
          if (m == 1) ref = y;
          if (m == 2 && std::memcmp(ref.data(), y.data(), y.size() * sizeof(float)) != 0) {
            printf("%s: AMX and VNNI outputs differ\n", c.name);
            return 1;
          }
        }
      const double gmac = 1e-6 * c.O * c.I * c.T;
      printf("%-14s %s: fp32-act %7.3f ms (%5.1f GMAC/s)  int8-act %7.3f ms (%5.1f)  %.2fx", c.name,
             kind == kQ4 ? "int4" : "int8", best[0], gmac / best[0], best[1], gmac / best[1], best[0] / best[1]);
      if (amx) printf("  AMX %7.3f ms (%5.1f)  %.2fx vs vpdpbusd", best[2], gmac / best[2], best[1] / best[2]);
      printf("\n");
    }
}
