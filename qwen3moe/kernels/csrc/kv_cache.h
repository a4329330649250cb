// KV-cache element types of the generation kernels (decode_layer.cc, attention_core.cc): float32,
// bfloat16 (as bfloat16 or its uint16 bit pattern) or float16. A 16-bit cache halves the cache's
// memory and the bytes each decode step reads; all math stays float32: values are widened
// (exactly) when read and rounded to nearest even when written, so a kernel on a 16-bit cache
// gives the bits it gives on a float32 cache holding the widened values.
// kernels/build.py hashes csrc/*.h into every kernel's cache key.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "quant_common.h"  // half_to_float, bf16_to_float, dtype_is, is_bf16

// Storage wrappers: distinct types so the templates below pick the conversion.
struct Bf16 {
  uint16_t bits;
};
struct Half {
  uint16_t bits;
};

// -1: not a cache dtype the kernels take
enum KvKind { kKvF32 = 0, kKvBf16 = 1, kKvF16 = 2 };
static inline int kv_kind(const char *dt) {
  if (dtype_is(dt, "float32")) return kKvF32;
  if (is_bf16(dt)) return kKvBf16;
  if (dtype_is(dt, "float16")) return kKvF16;
  return -1;
}

static inline float widen(float v) { return v; }
static inline float widen(Bf16 v) { return bf16_to_float(v.bits); }
static inline float widen(Half v) { return half_to_float(v.bits); }

// float -> bf16 bits, round to nearest even; NaN stays a (quiet) NaN: io/safetensors_io.f32_to_bf16
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// float -> IEEE half bits, round to nearest even (overflow -> inf, subnormals kept), as numpy's astype
static inline uint16_t float_to_half(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;                  // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;                 // rounds past 65504: inf
  if (a < 0x38800000u) {                                       // below 2^-14: a subnormal half
    const float mag = std::fabs(f) * 16777216.0f;              // units of 2^-24, exact
    return sign | static_cast<uint16_t>(std::nearbyint(mag));  // default mode: nearest even
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);            // RNE on the 13 dropped bits
  return sign | static_cast<uint16_t>((r - 0x38000000u) >> 13);
#endif
}

static inline void narrow(float v, float *dst) { *dst = v; }
static inline void narrow(float v, Bf16 *dst) { dst->bits = float_to_bf16(v); }
static inline void narrow(float v, Half *dst) { dst->bits = float_to_half(v); }

// dst[0, n) = rounded src (the cache write of one key or value row)
template <typename E>
static inline void store_row(const float *src, E *dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) narrow(src[i], dst + i);
}

// dst[0, n) = widened src (a block of cache rows as float32 for the GEMMs)
template <typename E>
static inline void load_row(const E *src, float *dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}

#if defined(__AVX512F__)
// 16 consecutive cache values widened into a vector register (exact)
static inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const Bf16 *p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
static inline __m512 load16(const Half *p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
}
#endif
