// quant_gemm8.h's product on AMX tiles (Intel AMX-INT8: TDPBUSD multiplies a 16 x 64-byte u8 tile
// by a 16 x 64-byte s8 tile in VNNI layout into 16 x 16 int32), same arithmetic, same float order:
//
//   for 16 weight rows x 16 tokens (one XPack8 vector) and each 16-input activation block b,
//   C[r, t] = sum_{k in b} u[r, k] q[t, k]   (one TDPBUSD, K = 16: A = 16 weight rows x 16 bytes
//   read in place with the rows' stride, B = XPack8's 4 dwords x 16 lanes of the block, as stored)
//
// then, as gemm8_micro does per (row, vector): acc = fma(float(C[r]), sx(b), acc) over the group's
// blocks, t = acc - z * zs, out = s_w * t summed over groups. The integer sums are exact either way
// and every float operation is the same one in the same order, so the outputs equal the VNNI
// path's bit for bit (tests/test_act8_kernel.py checks it). Why: vpdpbusd needs one instruction per
// 64 products and the weight broadcasts besides; one TDPBUSD does 4096 on its own unit, and the
// vector ports are left with the per-block conversion and FMA (48 instructions per 4096 products
// instead of ~96).
//
// Use needs the CPU's AMX-TILE and AMX-INT8 (cpuid 7.0 EDX bits 24, 25), the build's (-march=native
// on such a CPU) and Linux's permission for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM), asked
// once per process; QWEN3MOE_AMX=0 (or QuantSetAmx(0)) keeps the VNNI loop.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "quant_common.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
#define QWEN3MOE_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// Whether this process can run tile instructions (CPU, build, kernel permission), checked once
static inline bool amx_supported() {
#if defined(QWEN3MOE_HAVE_AMX)
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    const long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// Runtime switch: on where supported unless QWEN3MOE_AMX=0 at load or QuantSetAmx(0)
static inline bool &quant_amx_flag() {
  static bool flag = [] {
    const char *e = std::getenv("QWEN3MOE_AMX");
    return !(e != nullptr && e[0] == '0');
  }();
  return flag;
}

static inline bool quant_amx() { return quant_amx_flag() && !quant_portable_flag() && amx_supported(); }

#if defined(QWEN3MOE_HAVE_AMX)
// Tile registers: C0-C3 (int32 16 x 16: a ring of four blocks in flight), A0, A1 (16 weight rows x
// 16 bytes), B0, B1 (4 x 64 bytes), alternating between blocks
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 16, 16, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 4, 4};
};

// tile C = sums of block b: 16 weight rows (w, stride ldw) x the vector's 16 tokens (qv); a macro:
// the intrinsics take tile numbers as literals
#define AMX_ISSUE(C, A, B, b)                 \
  do {                                        \
    _tile_zero(C);                            \
    _tile_loadd(A, w + 16 * (b), ldw);        \
    _tile_loadd(B, qv + 64 * (b), 64);        \
    _tile_dpbusd(C, A, B);                    \
  } while (0)

// Block b's sums (c, [16 rows][16 tokens]) into the group accumulators acc; after the group's last
// block, the group's zero-point term and scale into out (gemm8_micro's operations, in its order).
// Inlined so that acc stays in registers.
__attribute__((always_inline)) static inline void amx_consume(__m512 *acc, float (*out)[16], const int32_t *c,
                                                              const QMat &W, int64_t o, const float *sxv,
                                                              const float *zsv, int64_t bpg, int64_t b) {
  const __m512 sx = _mm512_loadu_ps(sxv + b * 16);
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * r)), sx, acc[r]);
  if ((b + 1) % bpg) return;
  const int64_t gi = b / bpg;
  const __m512 zs = _mm512_loadu_ps(zsv + gi * 16);
  for (int r = 0; r < 16; ++r) {
    const __m512 sw = _mm512_set1_ps(half_to_float(W.s[(o + r) * W.lds + gi]));
    const __m512 zf = _mm512_set1_ps(static_cast<float>(W.z[(o + r) * W.lds + gi]));
    const __m512 t = _mm512_fnmadd_ps(zf, zs, acc[r]);
    _mm512_store_ps(out[r], gi == 0 ? _mm512_mul_ps(sw, t) : _mm512_fmadd_ps(sw, t, _mm512_load_ps(out[r])));
    acc[r] = _mm512_setzero_ps();
  }
}

// y[j, o + r] for 16 weight rows (bytes w, natural order, rows ldw apart) x one 16-token vector of
// packed activations: qv its dwords [I/4][16], sxv its block scales [I/16][16], zsv its group sums
// [G][16] (quant_gemm8.h XPack8), bpg blocks per group; valid rows of y. NB = I / 16 blocks, a
// multiple of 4 (amx_fits). The tile configuration is loaded (amx_begin). Four blocks are in
// flight: block b + 4's product is issued before block b's sums are read back, so the tile unit
// runs while the vector ports scale.
static void gemm8_amx_tile(const QMat &W, int64_t o, const uint8_t *w, int64_t ldw, const int32_t *qv,
                           const float *sxv, const float *zsv, int64_t NB, int64_t bpg, float *y, int64_t ldy,
                           int64_t valid) {
  __m512 acc[16];
  alignas(64) float out[16][16];
  alignas(64) int32_t c[4][256];  // one buffer per ring tile: no store waits on the previous block's reads
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  AMX_ISSUE(0, 4, 6, 0);
  AMX_ISSUE(1, 5, 7, 1);
  AMX_ISSUE(2, 4, 6, 2);
  AMX_ISSUE(3, 5, 7, 3);
  for (int64_t b = 0; b < NB; b += 4) {
    const bool more = b + 4 < NB;
    _tile_stored(0, c[0], 64);
    if (more) AMX_ISSUE(0, 4, 6, b + 4);
    amx_consume(acc, out, c[0], W, o, sxv, zsv, bpg, b);
    _tile_stored(1, c[1], 64);
    if (more) AMX_ISSUE(1, 5, 7, b + 5);
    amx_consume(acc, out, c[1], W, o, sxv, zsv, bpg, b + 1);
    _tile_stored(2, c[2], 64);
    if (more) AMX_ISSUE(2, 4, 6, b + 6);
    amx_consume(acc, out, c[2], W, o, sxv, zsv, bpg, b + 2);
    _tile_stored(3, c[3], 64);
    if (more) AMX_ISSUE(3, 5, 7, b + 7);
    amx_consume(acc, out, c[3], W, o, sxv, zsv, bpg, b + 3);
  }
#undef AMX_ISSUE
  for (int64_t j = 0; j < valid; ++j)
    for (int r = 0; r < 16; ++r) y[j * ldy + r] = out[r][j];
}

static inline void amx_begin() {
  static const AmxConfig cfg;
  _tile_loadconfig(&cfg);  // per use: the tile state is per thread
}
static inline void amx_end() { _tile_release(); }
#endif

// Whether W's rows may go through the tiles: AMX in use, whole 16-input blocks per group and a
// multiple of 4 blocks per row (the ring in gemm8_amx_tile)
static inline bool amx_fits(const QMat &W) { return quant_amx() && W.g % 16 == 0 && W.I % 64 == 0; }
