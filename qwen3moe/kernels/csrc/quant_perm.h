// Input permutations of quantized weights (act-order GPTQ converted at load time, see
// docs/quantization.md): the weight's input columns are stored sorted by group, so groups are
// contiguous again and the row loops stay as they are, and a perm int32 [I] says which input each
// stored column multiplies: y[o] = sum_j W[o, j] * x[perm[j]]. The ops gather x by perm once per
// weight (before any quantization of the activations), then run the unpermuted kernels on the
// gathered rows: the same arithmetic as calling them with x[perm]. The row loops never read perm.
// Included by quant_common.h (parse_weight takes the optional fourth tensor).
#pragma once
#include <cstdint>
#include <cstring>

// Whether every entry of perm[0:I] lies in [0, I): the ops check each perm they are about to use
// once per call (a true permutation is the loader's promise; this keeps a bad one from reading
// outside x). One pass of compares the compiler vectorizes: 2048 entries are ~0.3 us.
static inline bool perm_in_range(const int32_t *perm, int64_t I) {
  if (I > INT32_MAX) return false;
  const uint32_t n = static_cast<uint32_t>(I);  // negative entries wrap to >= n
  uint32_t bad = 0;
  for (int64_t j = 0; j < I; ++j) bad |= static_cast<uint32_t>(perm[j]) >= n;
  return bad == 0;
}

// out[b * ldo + j] = x[b * ldx + perm[j]] for j < I, b < nb: the rows of x in the stored column order
static inline void gather_rows(const int32_t *perm, int64_t I, const float *x, int64_t ldx, int64_t nb, float *out,
                               int64_t ldo) {
  for (int64_t b = 0; b < nb; ++b) {
    const float *xb = x + b * ldx;
    float *ob = out + b * ldo;
    for (int64_t j = 0; j < I; ++j) ob[j] = xb[perm[j]];
  }
}

// Whether two weights with input width I read x in the same order (both unpermuted, or equal perms:
// q / k / v of an act-order checkpoint share one, so one gathered copy serves all three)
static inline bool same_perm(const int32_t *a, const int32_t *b, int64_t I) {
  return a == b || (a != nullptr && b != nullptr && std::memcmp(a, b, I * sizeof(int32_t)) == 0);
}
