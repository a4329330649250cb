// Forward-only layers over bf16 / int8 / int4 weights (quant_common.h layout) with float32
// activations and accumulation (ops.Custom aot): a linear layer y[T, O] = x[T, I] @ W^T and the
// fused MoE experts (moe_fused.cc's forward: bucket by expert, SwiGLU, weighted combine).
//
// Few rows (decode-shaped, T < kGemvRows): each weight row is dequantized in registers while it
// streams and dotted with every x row (memory bound: bytes per weight are the cost). Many rows
// (prefill): a block of kBlockRows weight rows is dequantized into an L2-resident float32 scratch
// once and multiplied with every x row by the register-blocked kernel below (x transposed once per
// call so that 16 rows of x fill a vector and each dequantized weight is a broadcast): the GEMM
// runs at the fp32 FMA rate with the dequantization paid once per weight. (The previous form,
// 64-row tiles through dnnl_sgemm, re-packed x for every tile and ran the experts at about half
// the fp32 experts' rate: bench/RESULTS.md.) The portable path keeps tiles + common.h's sgemm.
// The *A8 entry points: the opt-in int8-activation arithmetic (quant_vnni.h / quant_gemm8.h) for
// the int8 / int4 weights whose shapes take it.
#include <algorithm>
#include <cstring>
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "decode_pool.h"
#include "quant_common.h"
#include "quant_amx_bf16.h"
#include "quant_gemm8.h"

static const int64_t kGemvRows = 16, kTile = 64, kChunkRows = 64;

static int64_t rows_of(int nd, const int64_t *shape) {
  int64_t r = 1;
  for (int i = 0; i + 1 < nd; ++i) r *= shape[i];
  return r;
}

static float *tile_scratch(int64_t n) {
  thread_local std::unique_ptr<float[]> p;
  thread_local int64_t cap = 0;
  if (cap < n) p.reset(new float[n]), cap = n;
  return p.get();
}

// fn(i) for i in [0, n): on the decode pool (decode_pool.h: an OpenMP barrier waits for a
// descheduled thread on a loaded machine, which made a decode-sized GEMV ~50x slower; figures in
// bench/RESULTS.md) or serially inside an already parallel task.
template <class F>
static void for_each(int64_t n, bool parallel, F &&fn) {
  if (parallel && n > 1)
    Pool::get().run(n, [&fn](int64_t i) { fn(i); });
  else
    for (int64_t i = 0; i < n; ++i) fn(i);
}

#if defined(__AVX512F__)
// x rows [m0, m0 + L) transposed into xp[k * L + j] = x[m0 + j, k] (rows past T: zeros)
static void pack_xt(const float *x, int64_t ldx, int64_t m0, int64_t T, int64_t K, int64_t L, float *xp) {
  for (int64_t j = 0; j < L; ++j) {
    if (m0 + j >= T) {
      for (int64_t k = 0; k < K; ++k) xp[k * L + j] = 0.0f;
      continue;
    }
    const float *xr = x + (m0 + j) * ldx;
    for (int64_t k = 0; k < K; ++k) xp[k * L + j] = xr[k];
  }
}

// y[m0 + j, o + r] = sum_k w[r * K + k] * xp[k * 16NZ + j] for r < NR, j < valid: NR dequantized
// weight rows against 16 * NZ x rows, NR x NZ accumulators (<= 24 of the 32 zmm registers),
// k summed in order. Each weight is one broadcast feeding NZ FMAs; each x vector feeds NR.
template <int NR, int NZ>
static void qgemm_micro(const float *w, int64_t K, const float *xp, float *y, int64_t ldy, int64_t valid) {
  __m512 acc[NR][NZ];
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 xv[NZ];
    for (int z = 0; z < NZ; ++z) xv[z] = _mm512_loadu_ps(xp + k * 16 * NZ + 16 * z);
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(w[r * K + k]);
      for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_fmadd_ps(b, xv[z], acc[r][z]);
    }
  }
  alignas(64) float c[NR][16 * NZ];
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < NZ; ++z) _mm512_store_ps(c[r] + 16 * z, acc[r][z]);
  for (int64_t j = 0; j < valid; ++j)
    for (int r = 0; r < NR; ++r) y[j * ldy + r] = c[r][j];
}

// Rows per micro-kernel call for NZ x vectors: NR * NZ accumulators
template <int NZ>
constexpr int kMicroRows = NZ == 1 ? 12 : (NZ == 2 ? 12 : (NZ == 3 ? 8 : 6));

template <int NZ>
static void qgemm_rows(const float *w, int64_t n, int64_t K, const float *xp, float *y, int64_t ldy, int64_t valid) {
  constexpr int NR = kMicroRows<NZ>;
  int64_t r = 0;
  for (; r + NR <= n; r += NR) qgemm_micro<NR, NZ>(w + r * K, K, xp, y + r, ldy, valid);
  for (; r < n; ++r) qgemm_micro<1, NZ>(w + r * K, K, xp, y + r, ldy, valid);
}

// Weight rows per dequantized block: a multiple of every kMicroRows (24 x 2048 floats = 192 KB, in L2)
static const int64_t kBlockRows = 24, kGroupRows = 64;

// Token groups of up to 64 x rows (4 vectors); the last group takes as many vectors as it needs
static inline int64_t group_vectors(int64_t T, int64_t m0) {
  const int64_t left = T - m0;
  return left >= kGroupRows ? 4 : (left + 15) / 16;
}

// y[:, o0:o0+n] for all T rows: dequantize the n (<= kBlockRows) weight rows, then every token group
static void qgemm_block(const QMat &W, int64_t o0, int64_t n, const float *xp, int64_t T, float *y, int64_t ldy) {
  float *wb = tile_scratch(kBlockRows * W.I);
  dequant_rows(W, o0, n, wb, W.I);
  for (int64_t m0 = 0; m0 < T; m0 += kGroupRows) {
    const int64_t nz = group_vectors(T, m0), valid = std::min(kGroupRows, T - m0);
    const float *g = xp + m0 * W.I;
    float *yg = y + m0 * ldy + o0;
    switch (nz) {
      case 1: qgemm_rows<1>(wb, n, W.I, g, yg, ldy, valid); break;
      case 2: qgemm_rows<2>(wb, n, W.I, g, yg, ldy, valid); break;
      case 3: qgemm_rows<3>(wb, n, W.I, g, yg, ldy, valid); break;
      default: qgemm_rows<4>(wb, n, W.I, g, yg, ldy, valid);
    }
  }
}

// x rows padded up to whole token groups, as qlinear packs them
static inline int64_t packed_rows(int64_t T) {
  return (T / kGroupRows) * kGroupRows + (T % kGroupRows + 15) / 16 * 16;
}
#endif

static float *xpack_scratch(int64_t n) {
  thread_local std::unique_ptr<float[]> p;
  thread_local int64_t cap = 0;
  if (cap < n) p.reset(new float[n]), cap = n;
  return p.get();
}

#if defined(QWEN3MOE_HAVE_AMX_BF16)
// 16-row tiles per AMX-BF16 block (qlinear_amx_bf16)
static const int64_t kAmxTiles = 4;

// qlinear on AMX-BF16 tiles (quant_amx_bf16.h): x split into the caller's planes, then per 16 weight
// rows their bf16 (u - z) and group scales once, every token vector against them
static void qlinear_amx_bf16(const QMat &W, int64_t O, const float *x, int64_t T, float *y, int64_t ldy,
                             bool parallel) {
  thread_local XSplit mine;
  XSplit &xs = mine;  // the caller's (helpers read it inside run())
  xs.reset(T, W.I);
  for_each(xs.V, parallel, [&](int64_t v) {
    for (int64_t t = v * 16; t < std::min(T, (v + 1) * 16); ++t) xsplit_row(x + t * W.I, t, xs);
  });
  const bool q = W.quantized();
  const int64_t G = q ? W.I / W.g : 1, cpg = q ? W.g / 32 : W.I / 32;
  // blocks of up to 4 x 16 rows: each token vector's planes (3 x 2 I bytes x 16) are read from L2 by
  // the block's 4 tiles rather than from L3 once per 16 rows
  const int64_t nb = (O / 16 + kAmxTiles - 1) / kAmxTiles;
  for_each(nb, parallel, [&](int64_t b) {
    const int64_t o0 = 16 * kAmxTiles * b, n = std::min<int64_t>(kAmxTiles, O / 16 - kAmxTiles * b);
    thread_local avec<uint32_t> wa;
    thread_local avec<float> sw;
    if (q) {
      wa.resize(kAmxTiles * 8 * W.I), sw.resize(kAmxTiles * G * 16);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t o = o0 + 16 * t;
        amx_bf16_weights(W, o, wa.data() + t * 8 * W.I);
        for (int64_t gi = 0; gi < G; ++gi)
          for (int r = 0; r < 16; ++r) sw[(t * G + gi) * 16 + r] = half_to_float(W.s[(o + r) * W.lds + gi]);
      }
    }
    amx_bf16_begin();
    for (int64_t v = 0; v < xs.V; ++v)
      for (int64_t t = 0; t < n; ++t) {
        const int64_t o = o0 + 16 * t;
        const uint32_t *a = q ? wa.data() + t * 8 * W.I : reinterpret_cast<const uint32_t *>(W.w + o * W.ld);
        amx_bf16_tile(a, q ? 2 * W.I : W.ld, xs, v, q ? sw.data() + t * G * 16 : nullptr, G, cpg,
                      y + v * 16 * ldy + o, ldy, std::min<int64_t>(16, T - v * 16));
      }
    amx_end();
  });
}
#endif

// y[T, O] (row stride ldy) = x[T, I] @ W^T, parallel over weight rows; used by the MoE kernel too
static void qlinear(const QMat &W, int64_t O, const float *x, int64_t T, float *y, int64_t ldy, bool parallel) {
  if (T < kGemvRows) {
    for_each((O + kChunkRows - 1) / kChunkRows, parallel, [&](int64_t c) {
      rows_dot_q(W, c * kChunkRows, std::min(O, (c + 1) * kChunkRows), x, W.I, T, y, ldy);
    });
    return;
  }
#if defined(QWEN3MOE_HAVE_AMX_BF16)
  if (amx_bf16_fits(W, O)) return qlinear_amx_bf16(W, O, x, T, y, ldy, parallel);
#endif
#if defined(__AVX512F__)
  const int64_t step = step_of(W.kind);
  if (quant_vector() && W.kind != kF32 && W.I % step == 0 && (W.kind == kBF16 || W.g % step == 0)) {
    float *xp = xpack_scratch(packed_rows(T) * W.I);  // the caller's; helpers write / read it inside run()
    for_each((T + kGroupRows - 1) / kGroupRows, parallel, [&](int64_t i) {  // group at m0: xp + m0 * I
      const int64_t m0 = i * kGroupRows;
      pack_xt(x, W.I, m0, T, W.I, 16 * group_vectors(T, m0), xp + m0 * W.I);
    });
    for_each((O + kBlockRows - 1) / kBlockRows, parallel, [&](int64_t b) {
      const int64_t o0 = b * kBlockRows;
      qgemm_block(W, o0, std::min(O, o0 + kBlockRows) - o0, xp, T, y, ldy);
    });
    return;
  }
#endif
  SerialBlas serial;  // (OpenBLAS backend) one thread per tile
  for_each((O + kTile - 1) / kTile, parallel, [&](int64_t t) {
    const int64_t o0 = t * kTile, n = std::min(O, o0 + kTile) - o0;
    float *wt = tile_scratch(kTile * W.I);
    dequant_rows(W, o0, n, wt, W.I);
    gemm(false, true, T, n, W.I, x, W.I, wt, W.I, y + o0, ldy, 0.0f);
  });
}

// qlinear in the int8-activation mode for a weight that takes it (gemm8_fits): x quantized per
// 16-input block; 1-4 rows through the decode rows (quant_vnni.h), more through quant_gemm8.h.
// From 5 x rows on, the GEMM (16 rows per vector, the rest zeros) beats streaming the rows with the
// decode kernel (an expert's gate_up, 1536 x 2048: 8 rows 0.21 vs 0.28 ms, 12 rows 0.22 vs 0.41 ms,
// 4 rows 0.20 vs 0.13 ms; bench/gemm8_micro.cc, CPU time)
static const int64_t kAct8GemmRows = 5;
// weight rows per block on AMX: whole 16-row tiles (the projections' row counts are multiples of 16)
static const int64_t kAmxBlockRows = 48;

static void qlinear8(const QMat &W, int64_t O, const float *x, int64_t T, float *y, int64_t ldy, bool parallel) {
  if (T < kAct8GemmRows) {
    thread_local ActQ a;
    act_quantize(W.kind, x, W.I, T, W.I, a);
    const ActView av = act_view(a);
    for_each((O + kChunkRows - 1) / kChunkRows, parallel, [&](int64_t c) {
      act8_rows(W, c * kChunkRows, std::min(O, (c + 1) * kChunkRows), av, T, y, ldy);
    });
    return;
  }
  thread_local XPack8 mine;
  XPack8 &p = mine;  // the caller's (a thread_local named inside the lambdas would be each helper's own)
  p.reset(T, W.I, W.g);
  for_each(p.V, parallel, [&](int64_t v) {
    for (int64_t t = v * kLanes; t < std::min(T, (v + 1) * kLanes); ++t) pack_row8(x + t * W.I, t, p);
  });
  const int64_t rows = amx_fits(W) ? kAmxBlockRows : kBlockRows;
  for_each((O + rows - 1) / rows, parallel, [&](int64_t b) {
    thread_local std::vector<uint8_t> buf;
    if (W.kind != kQ8) buf.resize(rows * W.I);  // int4 / 6-bit rows unpacked to bytes
    const int64_t o0 = b * rows;
    gemm8_block(W, o0, std::min(O, o0 + rows) - o0, p, T, y, ldy, buf.data());
  });
}

// the product in the mode asked for: int8 activations where the weight takes them
static inline void qlinear_mode(const QMat &W, int64_t O, const float *x, int64_t T, float *y, int64_t ldy,
                                bool parallel, bool act8) {
  if (act8 && gemm8_fits(W)) return qlinear8(W, O, x, T, y, ldy, parallel);
  qlinear(W, O, x, T, y, ldy, parallel);
}

// inputs: x [..., I] float32, then one weight: bf16 [O, I] | (qweight uint8 [O, I or I/2],
//         scales float16 [O, G], qzeros uint8 [O, G][, perm int32 [I]]);  output: y [..., O] float32
// A perm'd weight multiplies the rows of x gathered by perm (quant_perm.h), in a buffer of T * I.
static int quant_linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool act8) {
  if (nparam < 3 || !dtype_is(dtypes[0], "float32")) return 1;
  const int64_t I = shapes[0][ndims[0] - 1], T = rows_of(ndims[0], shapes[0]);
  int i = 1;
  QMat W;
  if (!parse_weight(i, nparam, params, ndims, shapes, dtypes, I, 0, &W) || i != nparam - 1) return 1;
  const int64_t O = shapes[1][0];
  if (shapes[i][ndims[i] - 1] != O || rows_of(ndims[i], shapes[i]) != T) return 1;
  const float *x = static_cast<const float *>(params[0]);
  if (W.perm) {
    thread_local avec<float> xg;
    xg.resize(T * I);
    float *out = xg.data();
    const int64_t nc = (T + kChunkRows - 1) / kChunkRows;
    for_each(nc, T >= 2 * kChunkRows, [&](int64_t c) {
      const int64_t t0 = c * kChunkRows, n = std::min(T, t0 + kChunkRows) - t0;
      gather_rows(W.perm, I, x + t0 * I, I, n, out + t0 * I, I);
    });
    x = out;
  }
  qlinear_mode(W, O, x, T, static_cast<float *>(params[i]), O, true, act8);
  return 0;
}

extern "C" int QuantLinearFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  return quant_linear(nparam, params, ndims, shapes, dtypes, false);
}

// The same with int8 activations (the opt-in mode) for weights that take them
extern "C" int QuantLinearFwdA8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  return quant_linear(nparam, params, ndims, shapes, dtypes, true);
}

// Plain pointers, never freed: no static destructor runs at exit while another thread (MindSpore's
// runtime, a pool helper) might still be inside a kernel using the buffers.
static float *scratch(int slot, int64_t n) {
  static float *p[4] = {nullptr, nullptr, nullptr, nullptr};
  static int64_t cap[4] = {0, 0, 0, 0};
  if (cap[slot] < n) delete[] p[slot], p[slot] = new float[n], cap[slot] = n;
  return p[slot];
}

// inputs: x [T,H] float32, idx [T,K] int32, w [T,K] float32, gate_up weight [E,2I,H] and down
//         weight [E,H,I], each bf16 (one param) or qweight/scales/qzeros (three params) optionally
//         followed by perm int32 [E,H] / [E,I] (quant_perm.h: each expert's rows of x / of the SwiGLU
//         output gathered by its perm; the perms of the experts that get rows are range-checked)
// output: y [T,H] = sum_j w_tj * SwiGLU_{idx_tj}(x_t), summed in j order as moe_fused.cc
// Experts run in parallel (one thread each, claimed dynamically on the decode pool); an expert with fewer than kGemvRows rows
// streams its weights (qlinear's GEMV path), a busier one goes through the dequantized-block micro-kernel
// (the QuantMoeFwdA8 entry: qlinear8's paths instead).
static int quant_moe(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool act8) {
  if (nparam < 6 || ndims[0] != 2 || ndims[1] != 2 || !dtype_is(dtypes[1], "int32")) return 1;
  const int64_t T = shapes[0][0], H = shapes[0][1], K = shapes[1][1], A = T * K;
  int i = 3;
  QMat gu, dn;
  if (!parse_weight(i, nparam, params, ndims, shapes, dtypes, H, 1, &gu)) return 1;
  const int64_t E = shapes[3][0], I2 = shapes[3][1], I = I2 / 2;
  const int gi = i;
  if (I2 % 2 != 0 || !parse_weight(i, nparam, params, ndims, shapes, dtypes, I, 1, &dn)) return 1;
  if (shapes[gi][0] != E || shapes[gi][1] != H || i != nparam - 1) return 1;
  const float *x = static_cast<const float *>(params[0]), *w = static_cast<const float *>(params[2]);
  const int32_t *idx = static_cast<const int32_t *>(params[1]);
  float *y = static_cast<float *>(params[i]);
  std::vector<int64_t> off(E + 1, 0), row(A);
  for (int64_t a = 0; a < A; ++a) {
    if (idx[a] < 0 || idx[a] >= E) return 1;
    ++off[idx[a] + 1];
  }
  for (int64_t e = 0; e < E; ++e) off[e + 1] += off[e];
  std::vector<int64_t> cur(off.begin(), off.end() - 1);
  for (int64_t a = 0; a < A; ++a) row[a] = cur[idx[a]]++;
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (off[e + 1] > off[e]) {
      active.push_back(e);
      if ((gu.perm && !perm_in_range(gu.perm_of(e), H)) || (dn.perm && !perm_in_range(dn.perm_of(e), I))) return 1;
    }
  float *xs = scratch(0, A * H), *g = scratch(1, A * I2), *act = scratch(2, A * I), *ye = scratch(3, A * H);
  for_each(A, A >= 64, [&](int64_t a) {  // token rows in expert order (gathered by the expert's perm)
    if (gu.perm)
      gather_rows(gu.perm_of(idx[a]), H, x + (a / K) * H, H, 1, xs + row[a] * H, H);
    else
      std::memcpy(xs + row[a] * H, x + (a / K) * H, H * sizeof(float));
  });
  for_each(static_cast<int64_t>(active.size()), true, [&](int64_t j) {
    const int64_t e = active[j], r0 = off[e], n = off[e + 1] - off[e];
    qlinear_mode(gu.rows(e * I2), I2, xs + r0 * H, n, g + r0 * I2, I2, false, act8);
    const int32_t *pd = dn.perm_of(e);
    for (int64_t r = r0; r < r0 + n; ++r) {
      float *gr = g + r * I2;
      silu_mul(gr, gr + I, pd ? gr : act + r * I, I);  // in place (elementwise), then gathered
      if (pd) gather_rows(pd, I, gr, I, 1, act + r * I, I);
    }
    qlinear_mode(dn.rows(e * H), H, act + r0 * I, n, ye + r0 * H, H, false, act8);
  });
  for_each(T, T >= 16, [&](int64_t t) {
    float *yt = y + t * H;
    std::memset(yt, 0, H * sizeof(float));
    for (int64_t j = 0; j < K; ++j) {
      const float wt = w[t * K + j], *src = ye + row[t * K + j] * H;
      for (int64_t c = 0; c < H; ++c) yt[c] += wt * src[c];
    }
  });
  return 0;
}

extern "C" int QuantMoeFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  return quant_moe(nparam, params, ndims, shapes, dtypes, false);
}

extern "C" int QuantMoeFwdA8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return quant_moe(nparam, params, ndims, shapes, dtypes, true);
}

// Exported for the tests: 1 = the portable scalar loops from now on, 0 = vector code again.
extern "C" void QuantSetPortable(int on) { quant_portable_flag() = on != 0; }
// AMX tiles for the many-row GEMMs (quant_amx.h, quant_amx_bf16.h): 1 = on where supported, 0 = off;
// whether this process can run them
extern "C" void QuantSetAmx(int on) { quant_amx_flag() = on != 0; }
extern "C" int QuantAmxSupported() { return amx_supported() ? 1 : 0; }
