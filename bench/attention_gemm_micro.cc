// Micro-benchmark: the attention core's q k^T GEMM for one 64-row query block (64 x 128 against
// tc x 128 keys, kernels/csrc/attention_core.cc) as one call vs in key chunks of 256..2048, one
// thread, oneDNN's dnnl_sgemm through common.h's `gemm`; prints GFLOP/s and whether the chunked
// scores equal the single call's bit for bit. Also times the block's PV GEMM (64 x tc x 128).
// Build (paths from the repo's .venv):
//   MS=$PWD/.venv/lib/python3.11/site-packages/mindspore/lib; NL=$PWD/.venv/lib/python3.11/site-packages/numpy.libs
//   g++ -O3 -march=native -std=c++17 -DQWEN3MOE_DNNL bench/attention_gemm_micro.cc -o /tmp/attn_gemm_micro \
//     -L$MS -l:libdnnl.so.3 -L$NL -l:$(basename $NL/libopenblas64_*.so) -Wl,-rpath,$MS -Wl,-rpath,$NL
//   OMP_NUM_THREADS=1 /tmp/attn_gemm_micro
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "../qwen3moe/kernels/csrc/common.h"

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int main() {
  const int64_t D = 128, M = 64;
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (int64_t tc : {1000, 4096, 8192}) {
    std::vector<float> q(M * D), k(tc * D), v(tc * D), one(M * tc), chunked(M * tc), o(M * D);
    for (auto *a : {&q, &k, &v})
      for (auto &x : *a) x = nd(g);
    const double flops = 2.0 * M * tc * D;
    for (int64_t ch : {0, 256, 512, 1024, 2048}) {  // 0: one call over all tc keys
      double best = 1e9;
      for (int r = 0; r < 5; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        if (ch == 0)
          gemm(false, true, M, tc, D, q.data(), D, k.data(), D, one.data(), tc, 0.0f);
        else
          for (int64_t j = 0; j < tc; j += ch)
            gemm(false, true, M, std::min(ch, tc - j), D, q.data(), D, k.data() + j * D, D, chunked.data() + j, tc, 0.0f);
        best = std::min(best, seconds_since(t0));
      }
      const bool same = ch == 0 || std::memcmp(one.data(), chunked.data(), M * tc * sizeof(float)) == 0;
      printf("tc %5ld  q k^T chunk %4ld: %6.1f GFLOP/s  bit-identical %s\n", tc, ch, flops / best / 1e9,
             same ? "yes" : "NO");
    }
    double best = 1e9;
    for (int r = 0; r < 5; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      gemm(false, false, M, D, tc, one.data(), tc, v.data(), D, o.data(), D, 0.0f);
      best = std::min(best, seconds_since(t0));
    }
    printf("tc %5ld  p v: %6.1f GFLOP/s\n", tc, flops / best / 1e9);
  }
}
