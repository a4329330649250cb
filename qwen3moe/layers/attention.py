"""GQA self-attention with Qwen3's per-head q/k RMSNorm applied before RoPE.

Shapes: B batch, S query length, T key length, H hidden, N query heads, K kv heads,
G = N/K query heads per kv head, D head_dim.
GQA never materialises repeated K/V: queries are grouped as [B, K, G*S, D] so one batched
matmul per kv head serves its G query heads (query head n uses kv head n // G, as HF).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from qwen3moe.kernels import attention as attention_kernel
from qwen3moe.kernels import norm_rope as norm_rope_kernel
from qwen3moe.layers.dtypes import widen
from qwen3moe.layers.linear import Linear
from qwen3moe.layers.norm import RMSNorm
from qwen3moe.layers.rope import apply_rope


def grouped_attention(q_BNSD: Tensor, k_BKTD: Tensor, v_BKTD: Tensor, bias_B1ST: Tensor,
                      scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) v in fp32 with GQA grouping; returns [B, N, S, D]."""
    B, N, S, D = q_BNSD.shape
    K, T = k_BKTD.shape[1], k_BKTD.shape[2]
    G = N // K
    q_BKXD = q_BNSD.reshape(B, K, G * S, D)
    scores_BKXT = ops.BatchMatMul(transpose_b=True)(q_BKXD, k_BKTD) * scale
    scores = widen(scores_BKXT.reshape(B, K, G, S, T)) + bias_B1ST.reshape(B, 1, 1, S, T)
    probs = widen(ops.softmax(scores, -1), q_BNSD.dtype).reshape(B, K, G * S, T)
    out_BKXD = ops.BatchMatMul()(probs, v_BKTD)
    return out_BKXD.reshape(B, N, S, D)


def heads_first(x_BSXD: Tensor) -> Tensor:
    """[B, S, X, D] -> [B, X, S, D]; a pure reshape when S == 1 (no transpose copy per decode step)."""
    B, S, X, D = x_BSXD.shape
    return x_BSXD.reshape(B, X, 1, D) if S == 1 else swap_axes12(x_BSXD)


def swap_axes12(x: Tensor) -> Tensor:
    """[B, A, C, D] -> [B, C, A, D]: the C++ copy for fp32 when built (a graph Transpose keeps its
    input allocated until the graph ends: kernels/norm_rope.py), else a Transpose."""
    if norm_rope_kernel.available() and x.dtype == ms.float32:
        return norm_rope_kernel.swap_axes12(x)
    return x.transpose(0, 2, 1, 3)


class Qwen3MoeAttention(nn.Cell):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rms_norm_eps: float = 1e-6, bias: bool = False, init_std: float = 0.02,
                 param_dtype=None, make_linear=Linear) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.q_proj = make_linear(hidden_size, num_heads * head_dim, bias, init_std, param_dtype)
        self.k_proj = make_linear(hidden_size, num_kv_heads * head_dim, bias, init_std, param_dtype)
        self.v_proj = make_linear(hidden_size, num_kv_heads * head_dim, bias, init_std, param_dtype)
        self.o_proj = make_linear(num_heads * head_dim, hidden_size, bias, init_std, param_dtype)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps, param_dtype)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps, param_dtype)
        # fused C++ core (fwd + bwd) when built here; grouped_attention stays the reference
        self.use_kernel = attention_kernel.available()
        self.use_norm_rope = norm_rope_kernel.available()  # q/k norm + RoPE + transpose in one op

    def project_qkv(self, x_BSH: Tensor, cos_BSD: Tensor, sin_BSD: Tensor):
        """q [B,N,S,D], k and v [B,K,S,D]; q/k normed per head, then rotated."""
        B, S, H = x_BSH.shape
        D = self.head_dim
        x_TH = x_BSH.reshape(B * S, H)
        if self.use_norm_rope and x_BSH.dtype == ms.float32 and cos_BSD.dtype == ms.float32:
            return self._project_qkv_fused(x_TH, B, S, cos_BSD, sin_BSD)
        q = heads_first(self.q_norm(self.q_proj(x_TH).reshape(B, S, self.num_heads, D)))
        k = heads_first(self.k_norm(self.k_proj(x_TH).reshape(B, S, self.num_kv_heads, D)))
        v = heads_first(self.v_proj(x_TH).reshape(B, S, self.num_kv_heads, D))
        cos, sin = cos_BSD.expand_dims(1), sin_BSD.expand_dims(1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _project_qkv_fused(self, x_TH: Tensor, B: int, S: int, cos_BSD: Tensor, sin_BSD: Tensor):
        D = self.head_dim
        q_BSND = self.q_proj(x_TH).reshape(B, S, self.num_heads, D)
        k_BSKD = self.k_proj(x_TH).reshape(B, S, self.num_kv_heads, D)
        # stored bf16 norm weights are widened (exact) for the fp32 kernel
        q = norm_rope_kernel.norm_rope(q_BSND, widen(self.q_norm.weight), self.q_norm.eps_1, cos_BSD, sin_BSD)
        k = norm_rope_kernel.norm_rope(k_BSKD, widen(self.k_norm.weight), self.k_norm.eps_1, cos_BSD, sin_BSD)
        v = heads_first(self.v_proj(x_TH).reshape(B, S, self.num_kv_heads, D))
        return q, k, v

    def output(self, o_BNSD: Tensor) -> Tensor:
        B, N, S, D = o_BNSD.shape
        o_BSND = o_BNSD if S == 1 else swap_axes12(o_BNSD)  # S == 1: the same memory order
        return self.o_proj(o_BSND.reshape(B * S, N * D)).reshape(B, S, -1)

    def construct(self, x_BSH: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias_B1ST: Tensor,
                  k_cache_BKTD: Parameter | None = None, v_cache_BKTD: Parameter | None = None,
                  idx_BKS3: Tensor | None = None) -> Tensor:
        """Self-attention of the S positions of x [B, S, H] -> [B, S, H].

        Without a cache T = S. With one (generation/engine.py: static KV cache Parameters
        [B, K, T, D] of T slots), the positions' k/v are first written into it at `idx`
        ([b, k, slot] per row, head and position) and q attends over all T slots, the bias hiding
        empty and future ones. Both use the same projections, norms and RoPE, and a plan that
        wraps this cell (tensor parallelism: this rank's heads) passes the cache through."""
        q, k, v = self.project_qkv(x_BSH, cos_BSD, sin_BSD)
        if k_cache_BKTD is not None:
            # the returned (updated) caches order the write before the read in the graph
            k = ops.scatter_nd_update(k_cache_BKTD, idx_BKS3, k)
            v = ops.scatter_nd_update(v_cache_BKTD, idx_BKS3, v)
            return self.output(grouped_attention(q, k, v, bias_B1ST, self.scale))
        if self.use_kernel and q.dtype == ms.float32:
            return self.output(attention_kernel.attention_core(q, k, v, bias_B1ST.astype(ms.float32)))
        return self.output(grouped_attention(q, k, v, bias_B1ST, self.scale))
