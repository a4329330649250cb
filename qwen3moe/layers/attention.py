"""GQA self-attention with Qwen3's per-head q/k RMSNorm applied before RoPE.

Shapes: B batch, S query length, T key length, H hidden, N query heads, K kv heads,
G = N/K query heads per kv head, D head_dim.
GQA never materialises repeated K/V: queries are grouped as [B, K, G*S, D] so one batched
matmul per kv head serves its G query heads (query head n uses kv head n // G, as HF).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.kernels import attention as attention_kernel
from qwen3moe.kernels import norm_rope as norm_rope_kernel
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
    scores = scores_BKXT.reshape(B, K, G, S, T).astype(ms.float32) + bias_B1ST.reshape(B, 1, 1, S, T)
    probs = ops.softmax(scores, -1).astype(q_BNSD.dtype).reshape(B, K, G * S, T)
    out_BKXD = ops.BatchMatMul()(probs, v_BKTD)
    return out_BKXD.reshape(B, N, S, D)


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
        if (self.use_norm_rope and x_BSH.dtype == ms.float32 and cos_BSD.dtype == ms.float32
                and self.q_norm.weight.dtype == ms.float32 and self.k_norm.weight.dtype == ms.float32):
            return self._project_qkv_fused(x_TH, B, S, cos_BSD, sin_BSD)
        q = self.q_norm(self.q_proj(x_TH).reshape(B, S, self.num_heads, D)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x_TH).reshape(B, S, self.num_kv_heads, D)).transpose(0, 2, 1, 3)
        v = self.v_proj(x_TH).reshape(B, S, self.num_kv_heads, D).transpose(0, 2, 1, 3)
        cos, sin = cos_BSD.expand_dims(1), sin_BSD.expand_dims(1)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _project_qkv_fused(self, x_TH: Tensor, B: int, S: int, cos_BSD: Tensor, sin_BSD: Tensor):
        D = self.head_dim
        q_BSND = self.q_proj(x_TH).reshape(B, S, self.num_heads, D)
        k_BSKD = self.k_proj(x_TH).reshape(B, S, self.num_kv_heads, D)
        q = norm_rope_kernel.norm_rope(q_BSND, self.q_norm.weight, self.q_norm.eps_1, cos_BSD, sin_BSD)
        k = norm_rope_kernel.norm_rope(k_BSKD, self.k_norm.weight, self.k_norm.eps_1, cos_BSD, sin_BSD)
        v = self.v_proj(x_TH).reshape(B, S, self.num_kv_heads, D).transpose(0, 2, 1, 3)
        return q, k, v

    def output(self, o_BNSD: Tensor) -> Tensor:
        B, N, S, D = o_BNSD.shape
        return self.o_proj(o_BNSD.transpose(0, 2, 1, 3).reshape(B * S, N * D)).reshape(B, S, -1)

    def construct(self, x_BSH: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias_B1SS: Tensor) -> Tensor:
        q, k, v = self.project_qkv(x_BSH, cos_BSD, sin_BSD)
        if self.use_kernel and q.dtype == ms.float32:
            return self.output(attention_kernel.attention_core(q, k, v, bias_B1SS.astype(ms.float32)))
        return self.output(grouped_attention(q, k, v, bias_B1SS, self.scale))
