// Fused decode-step kernels for CPU (ops.Custom aot): one op for a decoder layer's attention
// block (norm, q/k/v projections, q/k norms, RoPE, KV-cache write, GQA attention over the cache,
// output projection, residual) and one for its MoE block (norm, router, top-k, experts, combine,
// residual), for a few query tokens (decode: one per row).
//
// Why: the composite decode graph is ~45 graph ops per layer at ~6-11 us dispatch each, and
// MindSpore's scatter_nd_update copies the whole cache Parameter every step. Here the weights
// are streamed once per step (decode is memory bound: each weight row is dotted with every
// row of the batch while it is in L1) and the KV cache is written in place: the cache inputs
// are the engine's Parameters, whose buffers MindSpore hands to the kernel (tests check two
// consecutive steps against NumPy and the composite path).
// Same float32 math as the composite path (HF Qwen3-MoE); only summation orders differ.
// Shapes: B rows, H hidden, N query heads, K kv heads, G = N / K, D head_dim, T cache slots,
// E experts, I expert ffn, A = B * top_k assignments.
// The thread pool splitting each phase over the cores is in decode_pool.h; the attention phase
// (norms, RoPE, cache write, attention over the cache) in decode_attend.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_attend.h"
#include "decode_pool.h"
#include "decode_rows.h"


// Rows [0, rows) split into chunks of kChunk for the parallel loops over weight rows: a chunk's
// first 4-row block is read without software prefetch, so chunks of 16 rows left a quarter of the
// weights to the slow interleaved pattern (B=1 is memory bound); 64 rows still give 8-16 chunks.
static const int64_t kChunk = 64;
static inline int64_t nchunks(int64_t rows) { return (rows + kChunk - 1) / kChunk; }

// Walks the aot params in order: single tensors, and weights that are one param (float32 or
// bfloat16) or three (qweight, scales, qzeros) or four (+ perm int32 lead + [I]: act-order, see
// quant_perm.h; quant_common.h parse_weight). Any mismatch sets ok.
struct Args {
  int n;
  void **p;
  int *nd;
  int64_t **sh;
  const char **dt;
  int i = 0;
  bool ok = true;
  int take() {
    if (i < n) return i++;
    ok = false;
    return n - 1;
  }
  // a weight with input width I (lead leading dims); *rows = its output rows
  QMat weight(int64_t I, int lead, int64_t *rows) {
    QMat m;
    const int at = i;
    if (!ok || !parse_weight(i, n, p, nd, sh, dt, I, lead, &m)) {
      ok = false;
      *rows = 0;
      return m;
    }
    *rows = sh[at][lead];
    return m;
  }
  const float *vec(int at, int64_t len, std::vector<float> &buf) {
    const float *v = vec_f32(p[at], dt[at], len, buf);
    ok = ok && nd[at] == 1 && sh[at][0] == len && v != nullptr;
    return v;
  }
};

// The ops' temporaries live in per-thread buffers kept from call to call: `reused` refills one
// with n zeros (a fresh value-initialised vector, without the heap block). Why: MindSpore frees many
// small objects between two ops, and a fresh block of a few KB then went through glibc's fastbin
// consolidation: 0.05-0.2 ms per op, ~10% of a 48-layer decode step on the 2-core Intel VM
// (bench/RESULTS.md "run 11: the decode step's costs"). The pool's helpers only touch these buffers
// while the calling thread waits in Pool::run.
template <class V>
static V &reused(V &buf, size_t n) {
  buf.assign(n, typename V::value_type());
  return buf;
}

// The same without the zeros, for a buffer the op writes whole before reading it
template <class V>
static V &sized(V &buf, size_t n) {
  buf.resize(n);
  return buf;
}

// fcfg[2] != 0 (a third element, optional): the opt-in int8-activation mode (quant_vnni.h)
static inline bool act8_mode(int *ndims, int64_t **shapes, int ifcfg, const float *fcfg) {
  return ndims[ifcfg] == 1 && shapes[ifcfg][0] >= 3 && fcfg[2] != 0.0f;
}


// inputs: x [B,S,H], ln1 [H], wq [N*D,H], wk [K*D,H], wv [K*D,H], q_norm [D], k_norm [D],
//         wo [H,N*D], k_cache [B,K,T,D], v_cache [B,K,T,D] (float32, bfloat16 / uint16 bits or
//         float16, both the same: kv_cache.h), cos [B,S,D], sin [B,S,D], bias [B,S,T],
//         meta int32 [4] (first slot written, top_k, norm_topk_prob, unused),
//         fcfg float32 [2], [3] or [4] (rms eps, attention scale[, 1 = int8 activations (act8_mode)[, partial]])
// output: y [B,S,H] = x + o_proj(attention(rms(x))); partial != 0: o_proj(attention(rms(x))) only
// (a tensor-parallel rank: its heads and o_proj columns; the caller all-reduces, then adds x)
// Each weight is float32, bfloat16 or (qweight, scales, qzeros[, perm]) (see Args); norms float32 or
// bf16. A perm over H (wq / wk / wv) gathers the normed x for that weight, one over N*D (wo) the
// attention output.
// Query s of row b is written to slot meta[0] + s and sees the keys its bias row allows.
extern "C" int DecodeAttn(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  Args a{nparam, params, ndims, shapes, dtypes};
  const int ix = a.take(), iln = a.take();
  if (!a.ok || ndims[ix] != 3) return 1;
  AttnDims d;
  d.B = shapes[ix][0], d.S = shapes[ix][1], d.H = shapes[ix][2];
  int64_t ND, KD, KDv, Ho;
  const QMat wq = a.weight(d.H, 0, &ND), wk = a.weight(d.H, 0, &KD), wv = a.weight(d.H, 0, &KDv);
  const int iqn = a.take(), ikn = a.take();
  const QMat wo = a.weight(ND, 0, &Ho);
  const int ikc = a.take(), ivc = a.take(), icos = a.take(), isin = a.take(), ibias = a.take();
  const int imeta = a.take(), ifcfg = a.take(), iy = a.take();
  if (!a.ok || a.i != nparam || KD != KDv || Ho != d.H || ndims[ikc] != 4 || ndims[iqn] != 1) return 1;
  d.D = shapes[iqn][0], d.T = shapes[ikc][2];
  if (d.D <= 0 || d.D > 1024 || ND % d.D != 0 || KD % d.D != 0 || KD == 0) return 1;
  d.N = ND / d.D, d.K = KD / d.D, d.G = d.N / d.K;
  struct Scratch {
    std::vector<float> b1, b2, b3;
    avec<float> xn, qkv, o, p;
    XBuf xb[3], ob;
  };
  thread_local Scratch sc;
  std::vector<float> &b1 = sc.b1, &b2 = sc.b2, &b3 = sc.b3;
  const float *x = static_cast<const float *>(params[ix]), *ln1 = a.vec(iln, d.H, b1);
  const float *qn = a.vec(iqn, d.D, b2), *kn = a.vec(ikn, d.D, b3);
  const float *cos = static_cast<const float *>(params[icos]), *sin = static_cast<const float *>(params[isin]);
  const float *bias = static_cast<const float *>(params[ibias]);
  const int32_t *meta = static_cast<const int32_t *>(params[imeta]);
  const float *fcfg = static_cast<const float *>(params[ifcfg]);
  float *y = static_cast<float *>(params[iy]);
  const int64_t slot0 = meta[0];
  const int kind = kv_kind(dtypes[ikc]);
  if (!a.ok || d.N % d.K != 0 || slot0 < 0 || slot0 + d.S > d.T || kind < 0 || kv_kind(dtypes[ivc]) != kind)
    return 1;
  const float eps = fcfg[0], scale = fcfg[1];
  const bool act8 = act8_mode(ndims, shapes, ifcfg, fcfg);
  const bool residual = ndims[ifcfg] != 1 || shapes[ifcfg][0] < 4 || fcfg[3] == 0.f;
  const int64_t R = d.B * d.S, QKV = ND + 2 * KD;
  avec<float> &xn = sized(sc.xn, R * d.H), &qkv = sized(sc.qkv, R * QKV), &o = reused(sc.o, R * ND),
              &p = reused(sc.p, R * d.N * d.T);  // aligned: see avec
  for (int64_t r = 0; r < R; ++r) rms(x + r * d.H, ln1, d.H, eps, xn.data() + r * d.H);
  const QMat *wqkv[3] = {&wq, &wk, &wv}, *wout[1] = {&wo};
  XBuf *xb = sc.xb, &ob = sc.ob;
  for (XBuf &b : sc.xb) b.reset();
  ob.reset();
  XIn xin[3], oin;
  prepare_each(wqkv, 3, xn.data(), d.H, R, d.H, act8, xb, xin);
  Pool &pool = Pool::get();
  // q | k | v projections as one row range over the three weights
  const int64_t cq = nchunks(ND), ck = nchunks(KD);
  pool.run(cq + 2 * ck, [&](int64_t c) {
    const int w = c < cq ? 0 : (c < cq + ck ? 1 : 2);
    const int64_t rows = w == 0 ? ND : KD, base = w == 0 ? 0 : (w == 1 ? ND : ND + KD);
    const int64_t cc = w == 0 ? c : (w == 1 ? c - cq : c - cq - ck);
    const int64_t o0 = cc * kChunk, o1 = o0 + kChunk < rows ? o0 + kChunk : rows;
    mat_dot(*wqkv[w], o0, o1, xin[w], qkv.data() + base, QKV);
  });
  const AttnStep step{d, qkv.data(), QKV, ND, KD, slot0, qn, kn, cos, sin, bias, eps, scale, p.data(), o.data()};
  void *kc = params[ikc], *vc = params[ivc];
  pool.run(d.B * d.K, [&](int64_t bk) {  // one task per (row b, kv head k): attn_task
    if (kind == kKvBf16)
      attn_task(step, static_cast<Bf16 *>(kc), static_cast<Bf16 *>(vc), bk);
    else if (kind == kKvF16)
      attn_task(step, static_cast<Half *>(kc), static_cast<Half *>(vc), bk);
    else
      attn_task(step, static_cast<float *>(kc), static_cast<float *>(vc), bk);
  });
  prepare_each(wout, 1, o.data(), ND, R, ND, act8, &ob, &oin);
  pool.run(nchunks(d.H), [&](int64_t c) {
    const int64_t o0 = c * kChunk, o1 = o0 + kChunk < d.H ? o0 + kChunk : d.H;
    mat_dot(wo, o0, o1, oin, y, d.H);
    for (int64_t r = 0; r < R && residual; ++r)
      for (int64_t i = o0; i < o1; ++i) y[r * d.H + i] = x[r * d.H + i] + y[r * d.H + i];
  });
  return 0;
}

struct MoeDims {
  int64_t R, H, E, I, I2, K, Er, lo;  // Er router experts; this op's E experts are lo .. lo + E - 1
};

// probs = softmax(logits); top-k (largest first, lower expert id on ties); optional renorm
static void route(const float *logits, const MoeDims &d, bool norm, int32_t *idx, float *w) {
  thread_local std::vector<float> pr;
  pr.resize(d.Er);
  float mx = -INFINITY, sum = 0.f;
  for (int64_t e = 0; e < d.Er; ++e) mx = logits[e] > mx ? logits[e] : mx;
  for (int64_t e = 0; e < d.Er; ++e) sum += (pr[e] = std::exp(logits[e] - mx));
  for (int64_t e = 0; e < d.Er; ++e) pr[e] /= sum;
  thread_local std::vector<char> used;
  used.assign(d.Er, 0);
  float tot = 0.f;
  for (int64_t j = 0; j < d.K; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < d.Er; ++e)
      if (!used[e] && (best < 0 || pr[e] > pr[best])) best = e;
    used[best] = 1;
    idx[j] = static_cast<int32_t>(best);
    tot += (w[j] = pr[best]);
  }
  if (norm)
    for (int64_t j = 0; j < d.K; ++j) w[j] /= tot;
}

// The assignments of the step sorted by expert (stable counting sort): row[a] is assignment a's
// row in expert order (-1: an expert held by another rank), off[e] .. off[e + 1] expert e's rows,
// active the experts with rows. idx in: router experts; out: this op's local index (idx - lo) or -1.
// False if an active expert's perm (gate_up over H, down over I) has an entry out of range.
struct Assign {
  std::vector<int64_t> off, row, active;
};

static bool sort_assignments(const MoeDims &d, int32_t *idx, const QMat &wgu, const QMat &wd, Assign &s) {
  const int64_t A = d.R * d.K;
  for (int64_t a = 0; a < A; ++a) idx[a] = idx[a] >= d.lo && idx[a] < d.lo + d.E ? idx[a] - d.lo : -1;
  s.off.assign(d.E + 1, 0), s.row.assign(A, -1), s.active.clear();
  for (int64_t a = 0; a < A; ++a)
    if (idx[a] >= 0) ++s.off[idx[a] + 1];
  for (int64_t e = 0; e < d.E; ++e) s.off[e + 1] += s.off[e];
  thread_local std::vector<int64_t> cur;
  cur.assign(s.off.begin(), s.off.end() - 1);
  for (int64_t a = 0; a < A; ++a)
    if (idx[a] >= 0) s.row[a] = cur[idx[a]]++;
  for (int64_t e = 0; e < d.E; ++e) {
    if (s.off[e + 1] == s.off[e]) continue;
    s.active.push_back(e);
    if ((wgu.perm && !perm_in_range(wgu.perm_of(e), d.H)) || (wd.perm && !perm_in_range(wd.perm_of(e), d.I)))
      return false;
  }
  return true;
}

// Buffers of expert_inputs (kept per thread, see reused)
struct ExpertInputs {
  avec<float> zs;
  ActQ tq8, tq4, zq8, zq4;
};

// The local assignments' rows of z [R, H] in expert order (assignment a at row as.row[a]) as
// gate_up's rows take them, gathered by gate_up's perm. Without a perm every copy of a token is
// the same row, so the R token rows are quantized / put in kernel order once and copied, instead
// of once per assignment (A = R * top_k rows: 64 per layer for a batch-8 step).
static XIn expert_inputs(const MoeDims &d, const float *z, const int32_t *idx, const Assign &as, const QMat &wgu,
                         bool act8, ExpertInputs &b) {
  const int64_t A = d.R * d.K, n = as.off[d.E];  // n local assignments, rows [0, n)
  avec<float> &zs = sized(b.zs, n * d.H);
  for (int64_t a = 0; a < A; ++a) {
    const int64_t to = as.row[a];
    if (to < 0) continue;
    if (wgu.perm)
      gather_rows(wgu.perm_of(idx[a]), d.H, z + (a / d.K) * d.H, d.H, 1, zs.data() + to * d.H, d.H);
    else
      std::memcpy(zs.data() + to * d.H, z + (a / d.K) * d.H, d.H * sizeof(float));
  }
  b.zq8.reset(), b.zq4.reset();
  if (wgu.perm) return prepare_x(zs.data(), d.H, n, d.H, act8, {&wgu}, b.zq8, b.zq4);
  b.tq8.reset(), b.tq4.reset();
  prepare_x(z, d.H, d.R, d.H, act8, {&wgu}, b.tq8, b.tq4);
  act_rows_like(b.tq8, n, b.zq8), act_rows_like(b.tq4, n, b.zq4);
  for (int64_t a = 0; a < A; ++a)
    if (as.row[a] >= 0) act_copy_row(b.tq8, a / d.K, b.zq8, as.row[a]), act_copy_row(b.tq4, a / d.K, b.zq4, as.row[a]);
  XIn in;
  in.x = zs.data(), in.ldx = d.H, in.nb = n, in.q8 = act_view(b.zq8), in.q4 = act_view(b.zq4);
  return in;
}

// Width of the ffn slices of the expert tasks, for na active experts: experts are split only when
// there are fewer than ~2 tasks per thread (batch 1), at whole groups of down's input; a down with
// an input permutation is not split (its columns need the whole SwiGLU output, gathered).
static int64_t ffn_slice(const MoeDims &d, const QMat &wd, int64_t na) {
  const int64_t threads = Pool::get().threads();
  const int64_t P = na >= 2 * threads ? 1 : (2 * threads + na - 1) / (na > 0 ? na : 1);  // na 0: no local rows
  const int64_t gran = wd.quantized() ? (wd.g + 15) / 16 * 16 : 16;  // down slices: whole groups
  const int64_t Is = ((d.I + P - 1) / P + gran - 1) / gran * gran;
  if ((wd.quantized() && Is % wd.g != 0) || wd.perm || Is > d.I) return d.I;
  return Is;
}

// inputs: h [R,H], ln2 [H], router [E,H], gate_up [E,2I,H], down [E,H,I] (each may carry a perm:
//         router [H], gate_up [E,H], down [E,I]; see Args),
//         meta int32 [4] (unused, top_k, norm_topk_prob, unused), fcfg float32 [2 or 3] (rms eps, unused[, int8 activations])
//         or [5] (..., int8 activations, partial, lo)
// output: y [R,H] = h + sum_j w_j SwiGLU_{e_j}(rms(h)); weights and ln2 as in DecodeAttn.
// Parallel ranks (fcfg [5]): the router has all Er experts and gate_up / down hold experts
// lo .. lo + E - 1 (expert parallel) or every expert's slice of the ffn (tensor parallel, lo 0);
// routing is over all Er, assignments to experts held elsewhere add nothing, and partial != 0
// returns the sum without h (the caller reduces over the ranks, then adds h).
extern "C" int DecodeMoe(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  Args args{nparam, params, ndims, shapes, dtypes};
  const int ih = args.take(), iln = args.take();
  if (!args.ok || ndims[ih] < 1) return 1;
  MoeDims d;
  d.R = 1, d.H = shapes[ih][ndims[ih] - 1];
  for (int i = 0; i + 1 < ndims[ih]; ++i) d.R *= shapes[ih][i];
  int64_t Hd;
  const QMat wr = args.weight(d.H, 0, &d.Er);
  const int igu = args.i;
  const QMat wgu = args.weight(d.H, 1, &d.I2);
  d.E = args.ok ? shapes[igu][0] : 0, d.I = d.I2 / 2;
  const int idn = args.i;
  const QMat wd = args.weight(d.I, 1, &Hd);
  const int imeta = args.take(), ifcfg = args.take(), iy = args.take();
  if (!args.ok || args.i != nparam || Hd != d.H || shapes[idn][0] != d.E || d.I2 % 2 != 0) return 1;
  struct Scratch {
    std::vector<float> lnbuf;
    avec<float> z, logits, w, zg, gu, ye;
    std::vector<int32_t> idx;
    Assign as;
    ExpertInputs ex;
  };
  thread_local Scratch sc;
  const float *h = static_cast<const float *>(params[ih]), *ln2 = args.vec(iln, d.H, sc.lnbuf);
  const int32_t *meta = static_cast<const int32_t *>(params[imeta]);
  const float *fcfg = static_cast<const float *>(params[ifcfg]);
  float *y = static_cast<float *>(params[iy]);
  const bool ranked = ndims[ifcfg] == 1 && shapes[ifcfg][0] >= 5, partial = ranked && fcfg[3] != 0.f;
  d.K = meta[1], d.lo = ranked ? static_cast<int64_t>(fcfg[4]) : 0;
  if (!args.ok || d.K < 1 || d.K > d.Er || d.lo < 0 || d.lo + d.E > d.Er || (!ranked && d.Er != d.E)) return 1;
  const int64_t A = d.R * d.K;
  avec<float> &z = sized(sc.z, d.R * d.H), &logits = sized(sc.logits, d.R * d.Er), &w = sized(sc.w, A);
  std::vector<int32_t> &idx = sized(sc.idx, A);
  for (int64_t r = 0; r < d.R; ++r) rms(h + r * d.H, ln2, d.H, fcfg[0], z.data() + r * d.H);
  avec<float> &zg = sc.zg;  // z gathered by the router's perm (range-checked by parse_weight)
  if (wr.perm) zg.resize(d.R * d.H), gather_rows(wr.perm, d.H, z.data(), d.H, d.R, zg.data(), d.H);
  const float *zr = wr.perm ? zg.data() : z.data();
  Pool &pool = Pool::get();
  pool.run(nchunks(d.Er), [&](int64_t c) {  // the router's rows on both threads too
    const int64_t o0 = c * kChunk, o1 = o0 + kChunk < d.Er ? o0 + kChunk : d.Er;
    mat_dot(wr, o0, o1, zr, d.H, d.R, logits.data(), d.Er);
  });
  for (int64_t r = 0; r < d.R; ++r)
    route(logits.data() + r * d.Er, d, meta[2] != 0, idx.data() + r * d.K, w.data() + r * d.K);
  Assign &as = sc.as;
  if (!sort_assignments(d, idx.data(), wgu, wd, as)) return 1;
  const std::vector<int64_t> &off = as.off, &row = as.row, &active = as.active;
  const bool act8 = act8_mode(ndims, shapes, ifcfg, fcfg);
  const XIn zin = expert_inputs(d, z.data(), idx.data(), as, wgu, act8, sc.ex);
  // Tasks: (active expert, slice of its ffn width, ffn_slice). Each task runs gate/up rows, SwiGLU
  // and its slice of the down projection without a barrier; partial outputs are summed last.
  const int64_t na = static_cast<int64_t>(active.size()), Is = ffn_slice(d, wd, na), P = (d.I + Is - 1) / Is;
  avec<float> &gu = sized(sc.gu, A * 2 * Is * P), &ye = reused(sc.ye, P * A * d.H);
  pool.run(na * P, [&](int64_t task) {
    const int64_t e = active[task / P], part = task % P, i0 = part * Is;
    const int64_t ni = i0 + Is < d.I ? Is : d.I - i0, r0 = off[e], n = off[e + 1] - off[e];
    const QMat we = wgu.rows(e * d.I2);
    float *g = gu.data() + part * A * 2 * Is + r0 * 2 * Is, *u = g + n * Is;  // [n, Is] each
    const XIn zr = zin.rows(r0, n);
    mat_dot(we.rows(i0), 0, ni, zr, g, Is);
    mat_dot(we.rows(d.I + i0), 0, ni, zr, u, Is);
    for (int64_t a = 0; a < n; ++a)
      for (int64_t i = 0; i < ni; ++i) {
        const float gv = g[a * Is + i];
        g[a * Is + i] = gv / (1.0f + std::exp(-gv)) * u[a * Is + i];
      }
    // down slice: ye[part][r0 + a][h] = wd[e][h, i0:i0+ni] . act[a, :ni] (a perm: one slice, act gathered)
    const QMat wds = wd.rows(e * d.H).cols(i0, ni);
    thread_local avec<float> gp;
    const float *act = g;
    if (wd.perm) gp.resize(n * ni), gather_rows(wd.perm_of(e), ni, g, Is, n, gp.data(), ni), act = gp.data();
    thread_local ActQ gq8, gq4;  // this thread's (tasks run on every pool thread)
    gq8.reset(), gq4.reset();
    const XIn ain = prepare_x(act, wd.perm ? ni : Is, n, ni, act8, {&wds}, gq8, gq4);
    mat_dot(wds, 0, d.H, ain, ye.data() + (part * A + r0) * d.H, d.H);
  });
  pool.run(d.R, [&](int64_t r) {
    float *yr = y + r * d.H;
    for (int64_t i = 0; i < d.H; ++i) yr[i] = 0.f;
    for (int64_t j = 0; j < d.K; ++j) {
      if (row[r * d.K + j] < 0) continue;  // an expert held by another rank
      const float wj = w[r * d.K + j];
      for (int64_t part = 0; part < P; ++part) {
        const float *src = ye.data() + (part * A + row[r * d.K + j]) * d.H;
        for (int64_t i = 0; i < d.H; ++i) yr[i] += wj * src[i];
      }
    }
    for (int64_t i = 0; i < d.H && !partial; ++i) yr[i] = h[r * d.H + i] + yr[i];
  });
  return 0;
}

// How many of params DecodeAttn's inputs take (x .. fcfg; its weights take 1, 3 or 4 each), or -1:
// the same walk as DecodeAttn's first lines (DecodeAttn itself checks every shape)
static int attn_inputs(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  Args a{nparam, params, ndims, shapes, dtypes};
  const int ix = a.take();
  a.take();  // ln1
  if (!a.ok || ndims[ix] != 3) return -1;
  int64_t ND, KD, Ho;
  a.weight(shapes[ix][2], 0, &ND), a.weight(shapes[ix][2], 0, &KD), a.weight(shapes[ix][2], 0, &KD);
  a.take(), a.take();  // q_norm, k_norm
  a.weight(ND, 0, &Ho);
  for (int k = 0; k < 7; ++k) a.take();  // k_cache, v_cache, cos, sin, bias, meta, fcfg
  return a.ok ? a.i : -1;
}

// inputs: DecodeAttn's (x .. fcfg), then DecodeMoe's after h (ln2, router, gate_up, down, meta, fcfg)
// output: y [B,S,H] = DecodeMoe(DecodeAttn(x)): a decoder layer's decode step as one op instead of
// two. Why: MindSpore takes ~0.1-0.2 ms between two ops on this CPU; with half the ops a 48-layer
// step ran ~2% faster at batch 1 (bench/RESULTS.md "run 11: the decode step's costs"). The
// attention's output goes to a buffer of this thread; both halves are the single ops' code.
extern "C" int DecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  const int na = attn_inputs(nparam, params, ndims, shapes, dtypes);
  if (na < 1 || nparam - na < 3 || ndims[nparam - 1] != 3) return 1;
  const int64_t *xs = shapes[0];
  thread_local avec<float> h;
  thread_local std::vector<void *> p;
  thread_local std::vector<int> nd;
  thread_local std::vector<int64_t *> sh;
  thread_local std::vector<const char *> dt;
  h.resize(xs[0] * xs[1] * xs[2]);
  auto put = [&](void *v, int n, int64_t *s, const char *t) { p.push_back(v), nd.push_back(n), sh.push_back(s), dt.push_back(t); };
  auto pack = [&](void *lead, int from, int to, void *out) {  // [lead], params [from, to), out
    p.clear(), nd.clear(), sh.clear(), dt.clear();
    if (lead) put(lead, 3, shapes[0], dtypes[0]);  // lead and out: [B,S,H] float32, as x
    for (int k = from; k < to; ++k) put(params[k], ndims[k], shapes[k], dtypes[k]);
    put(out, 3, shapes[0], dtypes[0]);
  };
  pack(nullptr, 0, na, h.data());
  if (DecodeAttn(static_cast<int>(p.size()), p.data(), nd.data(), sh.data(), dt.data(), stream, extra) != 0) return 1;
  pack(h.data(), na, nparam - 1, params[nparam - 1]);
  return DecodeMoe(static_cast<int>(p.size()), p.data(), nd.data(), sh.data(), dt.data(), stream, extra);
}

// Rows [slot0, slot0 + S) of every (b, k) cache block [T, D] = the step's [S, D] rows, rounded to E
template <typename E>
static void copy_rows(const float *k, const float *v, E *kc, E *vc, int64_t BK, int64_t S, int64_t D, int64_t T,
                      int64_t slot0) {
  for (int64_t i = 0; i < BK; ++i) {  // a plain copy: may run next to other kernels in a prefill
    store_row(k + i * S * D, kc + (i * T + slot0) * D, S * D);
    store_row(v + i * S * D, vc + (i * T + slot0) * D, S * D);
  }
}

// inputs: 0 k [B,K,S,D]  1 v [B,K,S,D] float32  2 k_cache [B,K,T,D]  3 v_cache [B,K,T,D] (float32,
//         bf16 or float16, both the same)  4 meta int32 [4]
// output: 5 done float32 [1]
// Copies a prefill's keys/values into cache slots meta[0] .. meta[0] + S - 1 in place (the
// engine's prefill runs the forward path's attention and hands its k/v here).
extern "C" int CacheWrite(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 6 || ndims[0] != 4 || ndims[2] != 4) return 1;
  const int kind = kv_kind(dtypes[2]);
  if (kind < 0 || kv_kind(dtypes[3]) != kind || !dtype_is(dtypes[0], "float32") || !dtype_is(dtypes[1], "float32"))
    return 1;
  const float *k = static_cast<const float *>(params[0]), *v = static_cast<const float *>(params[1]);
  const int64_t slot0 = static_cast<const int32_t *>(params[4])[0];
  const int64_t BK = shapes[0][0] * shapes[0][1], S = shapes[0][2], D = shapes[0][3], T = shapes[2][2];
  if (slot0 < 0 || slot0 + S > T || shapes[2][3] != D) return 1;
  if (kind == kKvBf16)
    copy_rows(k, v, static_cast<Bf16 *>(params[2]), static_cast<Bf16 *>(params[3]), BK, S, D, T, slot0);
  else if (kind == kKvF16)
    copy_rows(k, v, static_cast<Half *>(params[2]), static_cast<Half *>(params[3]), BK, S, D, T, slot0);
  else
    copy_rows(k, v, static_cast<float *>(params[2]), static_cast<float *>(params[3]), BK, S, D, T, slot0);
  static_cast<float *>(params[5])[0] = 1.0f;
  return 0;
}

// inputs: x [B,S,H], norm [H], lm_head [V,H] (any weight storage, see Args; a perm gathers rms(x)),
//         fcfg float32 [2 or 3]
// output: logits [B,V] of the last position: lm_head(rms(x[:, S-1]))
extern "C" int DecodeHead(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  Args args{nparam, params, ndims, shapes, dtypes};
  const int ix = args.take(), inorm = args.take();
  if (!args.ok || ndims[ix] != 3) return 1;
  const int64_t B = shapes[ix][0], S = shapes[ix][1], H = shapes[ix][2];
  int64_t V;
  const QMat W = args.weight(H, 0, &V);
  const int ifcfg = args.take(), iy = args.take();
  thread_local std::vector<float> nbuf;
  const float *x = static_cast<const float *>(params[ix]), *nw = args.vec(inorm, H, nbuf);
  if (!args.ok || args.i != nparam) return 1;
  const float *fcfg = static_cast<const float *>(params[ifcfg]);
  float *y = static_cast<float *>(params[iy]);
  thread_local avec<float> zbuf;
  avec<float> &z = sized(zbuf, B * H);
  for (int64_t b = 0; b < B; ++b) rms(x + (b * S + S - 1) * H, nw, H, fcfg[0], z.data() + b * H);
  const QMat *ws[1] = {&W};
  thread_local XBuf zb;
  zb.reset();
  XIn zin;
  prepare_each(ws, 1, z.data(), H, B, H, act8_mode(ndims, shapes, ifcfg, fcfg), &zb, &zin);
  const int64_t chunk = 256, nc = (V + chunk - 1) / chunk;  // see kChunk
  Pool::get().run(nc, [&](int64_t c) {
    const int64_t o1 = (c + 1) * chunk < V ? (c + 1) * chunk : V;
    mat_dot(W, c * chunk, o1, zin, y, V);
  });
  return 0;
}

// inputs: x [B,I] float32, w [O,I] (any weight storage, see Args; a perm gathers x), fcfg float32 [2 or 3]
// output: y [B,O] = x @ W^T through the decode row kernels (the head's loop without its norm):
// the entry tests/test_act8_kernel.py checks the row kernels through, on arbitrary x
extern "C" int DecodeRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  Args args{nparam, params, ndims, shapes, dtypes};
  const int ix = args.take();
  if (!args.ok || ndims[ix] != 2 || !dtype_is(dtypes[ix], "float32")) return 1;
  const int64_t B = shapes[ix][0], I = shapes[ix][1];
  int64_t O;
  const QMat W = args.weight(I, 0, &O);
  const int ifcfg = args.take(), iy = args.take();
  if (!args.ok || args.i != nparam || ndims[iy] != 2 || shapes[iy][0] != B || shapes[iy][1] != O) return 1;
  const float *x = static_cast<const float *>(params[ix]), *fcfg = static_cast<const float *>(params[ifcfg]);
  float *y = static_cast<float *>(params[iy]);
  const QMat *ws[1] = {&W};
  XBuf xb;
  XIn in;
  prepare_each(ws, 1, x, I, B, I, act8_mode(ndims, shapes, ifcfg, fcfg), &xb, &in);
  Pool::get().run(nchunks(O), [&](int64_t c) {
    const int64_t o1 = (c + 1) * kChunk < O ? (c + 1) * kChunk : O;
    mat_dot(W, c * kChunk, o1, in, y, O);
  });
  return 0;
}

// The portable scalar loops instead of the AVX-512 ones in this library (kernels/quant.py
// set_portable switches both libraries: each holds its own copy of the flag)
extern "C" void DecodeSetPortable(int on) { quant_portable_flag() = on != 0; }
