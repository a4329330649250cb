// Can MindSpore's bundled oneDNN (libdnnl.so.3, v3.10.1) run our int8 / int4 weight-only linear
// layers itself (matmul weights decompression: u8/u4 weights, grouped f16 scales and u8 zero
// points, fpmath_mode(f32, apply_to_int = true)), and is it faster than kernels/csrc/quant_ops.cc
// (streaming GEMV for M < 16, dequantized 24-row blocks x its register-blocked micro-kernel above)?
// The wheel ships no headers: take include/oneapi/dnnl from oneDNN's git tag v3.10.1 and fill
// dnnl_config.h / dnnl_version.h from their .in templates (CPU runtime OMP), then
//   g++ -O3 -march=native -fopenmp -std=c++17 -DQWEN3MOE_DNNL -I/tmp/dnnl_inc bench/dnnl_decompress.cc \
//     -o /tmp/dnnl_decompress -L$MS/lib -l:libdnnl.so.3 -Wl,-rpath,$MS/lib \
//     -L$NUMPY_LIBS -l:libopenblas64_p-r0-*.so -Wl,-rpath,$NUMPY_LIBS
//   OMP_NUM_THREADS=2 /tmp/dnnl_decompress
// ($MS = site-packages/mindspore, $NUMPY_LIBS = site-packages/numpy.libs). Prints best-of-N ms
// per call for y[M, N] = x[M, K] @ W^T, W [N, K] = q_proj of Qwen3-30B-A3B (N 4096, K 2048),
// int4 g128 and int8 per channel, and the fp32 sgemm on the dequantized weights for scale.
// Timing only: random codes; the scale layout of oneDNN ([K/g, N]) is not ours ([N, G]). int8 is
// asked in its most favourable form (s8 weights, per-channel f32 scales, no zero points).
#include <chrono>
#include <string>
#include <unordered_map>
#include <cstdio>
#include <random>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "../qwen3moe/kernels/csrc/quant_ops.cc"

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

template <class F>
static double best_ms(F &&f, int reps = 7) {
  f();
  double best = 1e9;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

static double onednn_ms(engine &eng, stream &s, int64_t M, int64_t N, int64_t K, int bits, int64_t g, fpmath_mode mode,
                        bool &ok) {
  const int64_t G = K / g;
  memory::desc src_md({M, K}, dt::f32, tag::ab), dst_md({M, N}, dt::f32, tag::ab);
  memory::desc w_md({K, N}, bits == 4 ? dt::u4 : (g == K ? dt::s8 : dt::u8), tag::ba);  // W^T, K innermost: our rows
  primitive_attr attr;
  attr.set_fpmath_mode(mode, true);  // strict: f32 math; bf16: bf16 products (not our numerics)
  if (g == K) {  // one group per row: per-output-channel scales, s8 weights, no zero points
    attr.set_scales(DNNL_ARG_WEIGHTS, 1 << 1, {}, dt::f32);
  } else {
    attr.set_scales(DNNL_ARG_WEIGHTS, (1 << 0) | (1 << 1), {g, 1}, dt::f16);
    attr.set_zero_points(DNNL_ARG_WEIGHTS, (1 << 0) | (1 << 1), {g, 1}, dt::u8);
  }
  matmul::primitive_desc pd;
  try {
    pd = matmul::primitive_desc(eng, src_md, w_md, dst_md, attr);
  } catch (error &e) {
    std::printf("  oneDNN refused M=%ld bits=%d g=%ld: %s\n", static_cast<long>(M), bits, static_cast<long>(g), e.what());
    ok = false;
    return 0;
  }
  ok = true;
  const std::string impl = pd.impl_info_str();
  std::printf("  oneDNN impl for M=%ld bits=%d fpmath %s: %s\n", static_cast<long>(M), bits,
              mode == fpmath_mode::strict ? "strict" : "bf16", impl.c_str());
  memory src(src_md, eng), dst(dst_md, eng), w(w_md, eng);
  memory sc(memory::desc({G, N}, g == K ? dt::f32 : dt::f16, tag::ab), eng), zp(memory::desc({G, N}, dt::u8, tag::ab), eng);
  std::mt19937 rng(0);
  auto *wp = static_cast<uint8_t *>(w.get_data_handle());
  for (size_t i = 0; i < w_md.get_size(); ++i) wp[i] = rng() & 255;
  auto *sp = static_cast<uint16_t *>(sc.get_data_handle());
  for (int64_t i = 0; i < G * N * (g == K ? 2 : 1); ++i) sp[i] = 0x2000;  // fp16 ~ 0.0078 (f32: tiny)
  std::fill_n(static_cast<uint8_t *>(zp.get_data_handle()), G * N, bits == 4 ? 8 : 128);
  std::fill_n(static_cast<float *>(src.get_data_handle()), M * K, 0.5f);
  matmul mm(pd);
  return best_ms([&] {
    std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst},
                                            {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, sc}};
    if (g != K) args[DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_WEIGHTS] = zp;
    mm.execute(s, args);
    s.wait();
  }, impl.rfind("ref", 0) == 0 ? 1 : 7);  // the reference impl takes seconds per call
}

// The dynamic int8 activation route (llama.cpp's Q8_0 path): x quantized to s8 with one scale,
// s8 weights with per-channel scales, s32 accumulation (VNNI), f32 out; the x quantization itself
// is not timed. A ceiling for that candidate, not a drop-in: its numerics differ from ours.
static double vnni_ms(engine &eng, stream &s, int64_t M, int64_t N, int64_t K) {
  memory::desc src_md({M, K}, dt::s8, tag::ab), dst_md({M, N}, dt::f32, tag::ab), w_md({K, N}, dt::s8, tag::ba);
  primitive_attr attr;
  attr.set_scales_mask(DNNL_ARG_SRC, 0);
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, 1 << 1);
  matmul::primitive_desc pd(eng, src_md, w_md, dst_md, attr);
  std::printf("  oneDNN impl for M=%ld s8 x s8: %s\n", static_cast<long>(M), pd.impl_info_str());
  memory src(src_md, eng), dst(dst_md, eng), w(w_md, eng);
  memory xs(memory::desc({1}, dt::f32, tag::a), eng), ws(memory::desc({N}, dt::f32, tag::a), eng);
  std::fill_n(static_cast<int8_t *>(src.get_data_handle()), M * K, 3);
  std::fill_n(static_cast<int8_t *>(w.get_data_handle()), K * N, -5);
  std::fill_n(static_cast<float *>(xs.get_data_handle()), 1, 0.01f);
  std::fill_n(static_cast<float *>(ws.get_data_handle()), N, 0.01f);
  matmul mm(pd);
  return best_ms([&] {
    mm.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst},
                   {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, xs}, {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, ws}});
    s.wait();
  });
}

static double ours_ms(int64_t M, int64_t N, int64_t K, int bits, int64_t g) {
  const int64_t G = K / g, P = bits == 4 ? K / 2 : K;
  std::vector<uint8_t> q(N * P), z(N * G, bits == 4 ? 8 : 128);
  std::vector<uint16_t> s(N * G, 0x2000);
  std::vector<float> x(M * K, 0.5f), y(M * N);
  std::mt19937 rng(0);
  for (auto &v : q) v = rng() & 255;
  void *params[] = {x.data(), q.data(), s.data(), z.data(), y.data()};
  int nd[] = {2, 2, 2, 2, 2};
  int64_t sx[] = {M, K}, sq[] = {N, P}, ss[] = {N, G}, sy[] = {M, N};
  int64_t *shapes[] = {sx, sq, ss, ss, sy};
  const char *dts[] = {"float32", "uint8", "float16", "uint8", "float32"};
  return best_ms([&] { QuantLinearFwd(5, params, nd, shapes, dts, nullptr, nullptr); });
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  const int64_t N = 4096, K = 2048;
  for (int64_t M : {1, 64, 512}) {
    std::vector<float> x(M * K, 0.5f), w(N * K, 0.01f), y(M * N);
    const double f32 = best_ms([&] {
#pragma omp parallel num_threads(2)
      {
        const int t = omp_get_thread_num();
        gemm(false, true, M, N / 2, K, x.data(), K, w.data() + t * (N / 2) * K, K, y.data() + t * (N / 2), N);
      }
    });
    std::printf("M=%ld fp32 sgemm (dequantized W): %.3f ms\n", static_cast<long>(M), f32);
    for (int bits : {8, 4}) {
      const int64_t g = bits == 8 ? K : 128;
      const double o = ours_ms(M, N, K, bits, g);
      std::printf("M=%ld int%d: ours %.3f ms\n", static_cast<long>(M), bits, o);
      for (fpmath_mode mode : {fpmath_mode::strict, fpmath_mode::bf16}) {
        if (M > 1 && (bits == 4 || mode == fpmath_mode::bf16)) continue;  // ref:any at M = 1 already (seconds)
        bool ok;
        const double d = onednn_ms(eng, s, M, N, K, bits, g, mode, ok);
        if (ok) std::printf("M=%ld int%d: oneDNN decompression %.3f ms (oneDNN/ours %.2fx)\n", static_cast<long>(M), bits, d, d / o);
      }
    }
    const double v = vnni_ms(eng, s, M, N, K);
    std::printf("M=%ld int8 activations (s8 x s8 brgemm, dynamic per-tensor x scale, not our numerics): %.3f ms\n",
                static_cast<long>(M), v);
  }
  return 0;
}
