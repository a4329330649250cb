"""The engine's step graph on the fused CPU kernels (kernels/decode.py), used when they apply.

Shapes: B batch, S query tokens (P prompt bucket or 1), T cache slots, H hidden, N/K query/kv
heads, D head_dim, V vocab.
Decode (S == 1): per layer one attention-block op (writes the step's k/v into the cache
Parameters in place, attends over the cache) and one MoE-block op: ~20 graph ops per step
instead of ~370, and no full-cache copy. Prefill (S > 1) runs the forward pass's own fast path
(Qwen3MoeAttention.project_qkv + fused attention core over the prompt's [P, P] block + the
layer's fused MoE), then copies each layer's k/v into the cache in place; the prompt occupies
slots [0, P) so its attention never needs the rest of the cache.
Dense layers and capacity-dropping MoE layers run their composite MLP inside the same graph.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from qwen3moe.kernels import attention as attention_kernel
from qwen3moe.kernels import decode as decode_kernel
from qwen3moe.layers.attention import grouped_attention


def fused_eligible(model: nn.Cell) -> bool:
    """Kernels built here, float32 weights everywhere (the kernels read raw fp32 buffers), no
    q/k/v/o biases (the attention kernel has none) and head_dim <= 1024 (its RoPE buffer)."""
    if not decode_kernel.available() or model.config.head_dim > 1024:
        return False
    if any(p.dtype != ms.float32 for p in model.get_parameters()):
        return False
    return not any(layer.self_attn.q_proj.bias is not None for layer in model.model.layers)


def _kernel_moe(layer: nn.Cell) -> bool:
    return bool(layer.is_sparse) and layer.mlp.capacity_factor is None


class FusedStepCell(nn.Cell):
    """Compiled step on the fused kernels; the caches are the engine's Parameters [B, K, T, D].
    auto_prefix=False keeps the model's HF parameter names."""

    def __init__(self, model: nn.Cell, batch: int, k_cache, v_cache) -> None:
        super().__init__(auto_prefix=False)
        self.net = model
        cfg = model.config
        self.k_cache, self.v_cache = k_cache, v_cache
        self.ops1 = decode_kernel.DecodeOps(batch, 1, cfg.hidden_size, cfg.vocab_size)
        self.fcfg = Tensor(np.array([cfg.rms_norm_eps, cfg.head_dim ** -0.5], np.float32))
        self.attn_kernel = attention_kernel.available()

    @ms.jit
    def construct(self, ids_BS: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias: Tensor,
                  meta_4: Tensor) -> Tensor:
        body = self.net.model
        x_BSH = body.embed_tokens(ids_BS)
        S = x_BSH.shape[1]
        i = 0
        for layer in body.layers:
            if S == 1:
                x_BSH = self._decode_attention(layer, x_BSH, cos_BSD, sin_BSD, bias, meta_4, i)
            else:
                x_BSH = self._prefill_attention(layer, x_BSH, cos_BSD, sin_BSD, bias, meta_4, i)
            x_BSH = self._mlp(layer, x_BSH, meta_4)
            i += 1
        return self.head(x_BSH)

    def head(self, x_BSH: Tensor) -> Tensor:
        """Final norm of the last position + lm_head: logits [B, V]."""
        body = self.net.model
        return self.ops1.head(x_BSH, body.norm.weight, self.net.lm_head.weight, self.fcfg)

    def _decode_attention(self, layer, x_B1H, cos_B1D, sin_B1D, bias_B1T, meta_4, i):
        a = layer.self_attn
        return self.ops1.attn(x_B1H, layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight,
                              a.v_proj.weight, a.q_norm.weight, a.k_norm.weight, a.o_proj.weight,
                              self.k_cache[i], self.v_cache[i], cos_B1D, sin_B1D, bias_B1T, meta_4, self.fcfg)

    def _prefill_attention(self, layer, x_BSH, cos_BSD, sin_BSD, bias_B1SS, meta_4, i):
        """The forward pass's attention over the prompt block, then the in-place cache write."""
        a = layer.self_attn
        q, k, v = a.project_qkv(layer.input_layernorm(x_BSH), cos_BSD, sin_BSD)  # the forward's norm (kernel)
        if self.attn_kernel:
            o_BNSD = attention_kernel.attention_core(q, k, v, bias_B1SS)
        else:
            o_BNSD = grouped_attention(q, k, v, bias_B1SS, a.scale)
        h_BSH = x_BSH + a.output(o_BNSD)
        done = self.ops1.cache_write(k, v, self.k_cache[i], self.v_cache[i], meta_4)
        return ops.depend(h_BSH, done)

    def _mlp(self, layer, h_BSH, meta_4):
        n = layer.post_attention_layernorm
        if _kernel_moe(layer):
            if h_BSH.shape[1] == 1:
                m = layer.mlp
                return self.ops1.moe(h_BSH, n.weight, m.gate.weight, m.experts.gate_up_proj,
                                     m.experts.down_proj, meta_4, self.fcfg)
        B, S, H = h_BSH.shape
        z_TH = n(h_BSH).reshape(B * S, H)
        y_TH = layer.mlp(z_TH)[0] if layer.is_sparse else layer.mlp(z_TH)
        return h_BSH + y_TH.reshape(B, S, H)
