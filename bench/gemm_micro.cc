// Micro-benchmark: the MoE expert GEMMs (32 experts x 128 rows, [128,512]x[512,512]^T then
// [128,256]x[512,256]^T, as bench-mini's gate_up / down) through numpy's OpenBLAS (mode 0),
// oneDNN's dnnl_sgemm (mode 1) and oneDNN's internal packed-A sgemm_compute with weights packed
// once (mode 2). OpenMP threads each run whole experts with a sequential GEMM, as moe_fused.cc.
// Build (paths from the repo's .venv):
//   MS=$PWD/.venv/lib/python3.11/site-packages/mindspore/lib; NL=$PWD/.venv/lib/python3.11/site-packages/numpy.libs
//   g++ -O3 -march=native -fopenmp bench/gemm_micro.cc -o /tmp/gemm_micro -L$MS -l:libdnnl.so.3 \
//     -L$NL -l:$(basename $NL/libopenblas64_*.so) -Wl,-rpath,$MS -Wl,-rpath,$NL
//   LD_LIBRARY_PATH=$NL OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE /tmp/gemm_micro
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <omp.h>
#include "../qwen3moe/kernels/csrc/common.h"
typedef int64_t dim_t;
extern "C" int dnnl_sgemm(char ta, char tb, dim_t M, dim_t N, dim_t K, float alpha, const float *A, dim_t lda,
                          const float *B, dim_t ldb, float beta, float *C, dim_t ldc);
namespace dnnl { namespace impl { namespace cpu {
int sgemm_pack_get_size(const char *id, const char *ta, const char *tb, const dim_t *M, const dim_t *N, const dim_t *K,
                        const dim_t *lda, const dim_t *ldb, size_t *size, bool *pack);
int sgemm_pack(const char *id, const char *ta, const char *tb, const dim_t *M, const dim_t *N, const dim_t *K,
               const dim_t *lda, const dim_t *ldb, const float *src, float *dst);
int sgemm_compute(const char *ta, const char *tb, const dim_t *M, const dim_t *N, const dim_t *K, const float *A,
                  const dim_t *lda, const float *B, const dim_t *ldb, const float *beta, float *C, const dim_t *ldc);
}}}
using namespace std::chrono;
int main(int argc, char **argv) {
  const int E = 32, n = 128, H = 512, I2 = 512, I = 256;
  std::vector<float> x(E * n * H), wgu((size_t)E * I2 * H), wd((size_t)E * H * I), gu(E * n * I2), y(E * n * H);
  for (auto &v : x) v = rand() / (float)RAND_MAX - 0.5f;
  for (auto &v : wgu) v = rand() / (float)RAND_MAX - 0.5f;
  for (auto &v : wd) v = rand() / (float)RAND_MAX - 0.5f;
  openblas_set_num_threads64_(1);
  double flops = 2.0 * E * n * (I2 * H + H * I);
  // oneDNN packing is column-major: C^T[I2,n] = W[I2,H] (row-major, so transa T) * x^T[H,n]
  std::vector<std::vector<float>> pgu(E), pd(E);
  for (int e = 0; e < E; ++e) {
    dim_t M = I2, N = n, K = H, lda = H, ldb = H; size_t sz; bool p;
    dnnl::impl::cpu::sgemm_pack_get_size("A", "T", "N", &M, &N, &K, &lda, &ldb, &sz, &p);
    pgu[e].resize(sz / 4 + 16);
    dnnl::impl::cpu::sgemm_pack("A", "T", "N", &M, &N, &K, &lda, &ldb, wgu.data() + (size_t)e * I2 * H, pgu[e].data());
    dim_t M2 = H, K2 = I, lda2 = I, ldb2 = I;
    dnnl::impl::cpu::sgemm_pack_get_size("A", "T", "N", &M2, &N, &K2, &lda2, &ldb2, &sz, &p);
    pd[e].resize(sz / 4 + 16);
    dnnl::impl::cpu::sgemm_pack("A", "T", "N", &M2, &N, &K2, &lda2, &ldb2, wd.data() + (size_t)e * H * I, pd[e].data());
  }
  for (int rep = 0; rep < 5; ++rep) {
    for (int mode = 0; mode < 3; ++mode) {
      auto t0 = steady_clock::now();
      #pragma omp parallel for schedule(dynamic,1)
      for (int e = 0; e < E; ++e) {
        const float *xe = x.data() + e * n * H; float *ge = gu.data() + e * n * I2; float *ye = y.data() + e * n * H;
        if (mode == 0) {
          gemm(false, true, n, I2, H, xe, H, wgu.data() + (size_t)e * I2 * H, H, ge, I2);
          gemm(false, true, n, H, I, ge, I2, wd.data() + (size_t)e * H * I, I, ye, H);
        } else if (mode == 1) {
          dnnl_sgemm('N', 'T', n, I2, H, 1.f, xe, H, wgu.data() + (size_t)e * I2 * H, H, 0.f, ge, I2);
          dnnl_sgemm('N', 'T', n, H, I, 1.f, ge, I2, wd.data() + (size_t)e * H * I, I, 0.f, ye, H);
        } else {
          dim_t M = I2, N = n, K = H, lda = H, ldb = H, ldc = I2; float beta = 0;
          dnnl::impl::cpu::sgemm_compute("P", "N", &M, &N, &K, pgu[e].data(), &lda, xe, &ldb, &beta, ge, &ldc);
          dim_t M2 = H, K2 = I, lda2 = I, ldb2 = I2, ldc2 = H;
          dnnl::impl::cpu::sgemm_compute("P", "N", &M2, &N, &K2, pd[e].data(), &lda2, ge, &ldb2, &beta, ye, &ldc2);
        }
      }
      double dt = duration<double>(steady_clock::now() - t0).count();
      printf("mode %d: %.2f ms  %.1f GF/s   chk %g\n", mode, dt * 1e3, flops / dt / 1e9, (double)y[12345]);
    }
  }
}
