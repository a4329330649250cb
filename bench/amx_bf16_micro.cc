// Micro-benchmark: quant_ops.cc's float32-activation product (qlinear, >= 16 x rows) on the
// AVX-512 FMA micro-kernel vs on AMX-BF16 tiles (csrc/quant_amx_bf16.h), int8 / int4 g128 / bf16
// weights, one thread, CPU time of the calling thread (best of [reps]); prints the ratio and the
// largest difference between the two relative to the largest output (float32 summation order:
// ~1e-6). Shapes: q_proj 4096 x 2048 at 512 rows, an expert's gate_up 1536 x 2048 and down
// 2048 x 768 at 20-32 rows. Needs a CPU with AMX (else both columns run the FMA loop).
// Build (the kernels' own link flags):
//   LINK=$(.venv/bin/python -c "from qwen3moe.kernels.build import _link_flags; print(' '.join(_link_flags()))")
//   g++ -O3 -march=native -fopenmp -std=c++17 bench/amx_bf16_micro.cc -o /tmp/amx_bf16_micro $LINK
//   OMP_NUM_THREADS=1 /tmp/amx_bf16_micro [reps]
#include <ctime>
#include <cstdio>
#include <cmath>
#include <random>
#include "../qwen3moe/kernels/csrc/quant_ops.cc"
static double cpu_ms() { timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6; }
int main(int argc, char **argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 3;
  std::mt19937 rng(0);
  struct Case { const char *name; int64_t O, I, T; };
  const Case cases[] = {{"q_proj T=512", 4096, 2048, 512}, {"gate_up n=32", 1536, 2048, 32}, {"down n=32", 2048, 768, 32}, {"gate_up n=20", 1536, 2048, 20}};
  for (const Case &c : cases)
    for (int kind : {kQ8, kQ4, kBF16}) {
      const int64_t g = kind == kQ4 ? 128 : c.I, ld = QMat::bytes_for(kind, c.I), G = c.I / g;
      std::vector<uint8_t> q(c.O * ld), z(c.O * G);
      std::vector<uint16_t> s(c.O * G);
      for (auto &v : q) v = rng() & 255;
      if (kind == kBF16) for (size_t i = 1; i < q.size(); i += 2) q[i] = 0x3c;
      for (auto &v : s) v = 0x1c00 + (rng() & 0xff);
      for (auto &v : z) v = kind == kQ4 ? (rng() % 16) : (rng() % 256);
      QMat W; W.kind = kind; W.w = q.data(); W.s = s.data(); W.z = z.data(); W.ld = ld; W.lds = G; W.I = c.I; W.g = g;
      std::vector<float> x(c.T * c.I), y0(c.T * c.O), y1(c.T * c.O);
      std::normal_distribution<float> nd; for (auto &v : x) v = nd(rng);
      double best[2] = {1e30, 1e30};
      for (int r = 0; r < reps; ++r)
        for (int m = 0; m < 2; ++m) {
          quant_amx_flag() = m == 1;
          const double t0 = cpu_ms();
          qlinear(W, c.O, x.data(), c.T, (m ? y1 : y0).data(), c.O, false);
          best[m] = std::min(best[m], cpu_ms() - t0);
        }
      double md = 0, mm = 0;
      for (size_t i = 0; i < y0.size(); ++i) md = std::max(md, (double)std::fabs(y0[i] - y1[i])), mm = std::max(mm, (double)std::fabs(y0[i]));
      const double gmac = 1e-6 * c.O * c.I * c.T;
      printf("%-14s %s: fma %7.3f ms (%5.1f GMAC/s)  amx-bf16 %7.3f ms (%5.1f)  %.2fx  max|diff|/max|y| %.2e\n", c.name, kind == kQ4 ? "int4" : kind == kQ8 ? "int8" : "bf16",
             best[0], gmac / best[0], best[1], gmac / best[1], best[0] / best[1], md / mm);
    }
}
