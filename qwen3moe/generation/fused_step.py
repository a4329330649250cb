"""The engine's step graph on the fused CPU kernels (kernels/decode.py), used when they apply.

Shapes: B batch, S query tokens (P prompt bucket or 1), T cache slots, H hidden, N/K query/kv
heads, D head_dim, V vocab.
Decode (S == 1): per layer one attention-block op (writes the step's k/v into the cache
Parameters in place, attends over the cache) and one MoE-block op: ~20 graph ops per step
instead of ~370, and no full-cache copy. Prefill (S > 1: the whole prompt or one chunk of it,
engine.prefill) runs the forward pass's own fast path: Qwen3MoeAttention.project_qkv, the
in-place copy of the step's k/v into the cache at its slots, the forward-only attention core
over the cache [S, T] (earlier chunks' keys included; the kernel skips the keys past the bias's last
visible one per block of rows, so the empty slots cost nothing), the layer's fused MoE.
Dense layers and capacity-dropping MoE layers run their composite MLP inside the same graph.
Weights may be float32, bfloat16 (or its uint16 bits) or quantized (qweight / scales / qzeros
cells): the decode kernels take each as one or three tensors (`kernel_weight`) and dequantize
rows in registers; the prefill runs the layers' own forward (their kernels or composite path).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from qwen3moe.kernels import attention as attention_kernel
from qwen3moe.kernels import decode as decode_kernel
from qwen3moe.layers.attention import grouped_attention


def kernel_weight(obj) -> tuple:
    """One weight as the decode kernels take it: a Parameter or a Linear's weight -> (w,); a
    quantized weight or linear (GPTQ names) -> (qweight, scales, qzeros[, perm])."""
    if getattr(obj, "qweight", None) is not None:
        return obj.kernel_tensors()
    return (obj,) if isinstance(obj, Parameter) else (obj.weight,)


def _kernel_readable(p: Parameter) -> bool:
    """Storage the decode kernels read: fp32 / bf16 (or uint16 bf16 bits) tensors and the
    quantized layout (with an act-order input order perm); anything else (e.g. an act-order
    g_idx group map) keeps the composite graph."""
    if p.dtype in (ms.float32, ms.bfloat16, ms.uint16):
        return True
    leaf = p.name.rsplit(".", 1)[-1]
    return ((leaf in ("qweight", "qzeros") and p.dtype == ms.uint8) or (leaf == "scales" and p.dtype == ms.float16)
            or (leaf == "perm" and p.dtype == ms.int32))


def step_cell_class(model: nn.Cell) -> type:
    """The fused step graph for `model`: FusedStepCell, or the subclass a parallel plan put on the
    model as `fused_step_cell` (parallel/fused_step.py: the ops' partial outputs reduced through
    the plan's collectives)."""
    return model.__dict__.get("fused_step_cell", FusedStepCell)


def fused_eligible(model: nn.Cell) -> bool:
    """Kernels built here, every weight in a storage they read, no q/k/v/o biases (the attention
    kernel has none), head_dim <= 1024 (its RoPE buffer), and no cell swapped in by a parallel plan
    unless the plan also gave the model its `fused_step_cell` (the plain kernels read the weights
    directly and would skip the plan's collectives)."""
    return not_fused_reason(model) is None


def not_fused_reason(model: nn.Cell) -> str | None:
    """Why the fused step graph does not apply to `model` (fused_eligible), or None."""
    if not decode_kernel.available():
        return "the C++ kernels are off (QWEN3MOE_KERNELS=0) or cannot be built here"
    if model.config.head_dim > 1024:
        return f"head_dim {model.config.head_dim} > 1024"
    if "fused_step_cell" not in model.__dict__ and any(
            type(c).__module__.startswith("qwen3moe.parallel") for _, c in model.cells_and_names()):
        return "a parallel plan without fused steps"
    if not all(_kernel_readable(p) for p in model.get_parameters()):
        return "a weight storage the kernels do not read (e.g. act-order GPTQ g_idx maps under a row split)"
    return "attention biases" if model.config.attention_bias else None


def int8_activations(model: nn.Cell) -> bool:
    """The model was loaded with QuantizationConfig(activations="int8")."""
    q = getattr(model, "quantization", None)
    return q is not None and q.activations == "int8"


def _kernel_moe(layer: nn.Cell) -> bool:
    return bool(layer.is_sparse) and layer.mlp.capacity_factor is None


class FusedStepCell(nn.Cell):
    """Compiled step on the fused kernels; the caches are the engine's Parameters [B, K, T, D].
    `hidden_out` (a pipeline stage before the last, whose model has no final norm or lm_head):
    the step returns every position's hidden states [B, S, H] instead of logits.
    auto_prefix=False keeps the model's HF parameter names."""

    # a decode step's sparse layers as one DecodeLayer op each (attention then MoE), not two ops:
    # subclasses whose layers need a collective between the halves (parallel ranks) turn it off
    one_op_layers = True

    def __init__(self, model: nn.Cell, batch: int, k_cache, v_cache, hidden_out: bool = False) -> None:
        super().__init__(auto_prefix=False)
        self.net, self.hidden_out = model, hidden_out
        cfg = model.config
        self.k_cache, self.v_cache = k_cache, v_cache
        self.ops1 = decode_kernel.DecodeOps(batch, 1, cfg.hidden_size, cfg.vocab_size)
        # third element: the opt-in int8-activation mode of the quantized rows (kernels/csrc/quant_vnni.h)
        self.fcfg = Tensor(np.array([cfg.rms_norm_eps, cfg.head_dim ** -0.5, float(int8_activations(model))],
                                    np.float32))
        self.attn_kernel = attention_kernel.available()

    @ms.jit
    def construct(self, ids_BS: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias: Tensor,
                  meta_4: Tensor) -> Tensor:
        body = self.net.model
        x_BSH = body.embed_tokens(ids_BS)
        S = x_BSH.shape[1]
        i = 0
        for layer in body.layers:
            if S == 1 and self.one_op_layers and _kernel_moe(layer):
                x_BSH = self.ops1.layer(*self._attention_inputs(layer, x_BSH, cos_BSD, sin_BSD, bias, meta_4, i),
                                        *self._moe_inputs(layer, meta_4))
            else:
                if S == 1:
                    x_BSH = self._decode_attention(layer, x_BSH, cos_BSD, sin_BSD, bias, meta_4, i)
                else:
                    x_BSH = self._prefill_attention(layer, x_BSH, cos_BSD, sin_BSD, bias, meta_4, i)
                x_BSH = self._mlp(layer, x_BSH, meta_4)
            i += 1
        if self.hidden_out:
            return x_BSH
        return self.head(x_BSH)

    def head(self, x_BSH: Tensor) -> Tensor:
        """Final norm of the last position + lm_head: logits [B, V]."""
        body = self.net.model
        return self.ops1.head(x_BSH, body.norm.weight, *kernel_weight(self.net.lm_head), self.fcfg)

    def _attention_inputs(self, layer, x_B1H, cos_B1D, sin_B1D, bias_B1T, meta_4, i) -> tuple:
        a = layer.self_attn
        return (x_B1H, layer.input_layernorm.weight, *kernel_weight(a.q_proj), *kernel_weight(a.k_proj),
                *kernel_weight(a.v_proj), a.q_norm.weight, a.k_norm.weight, *kernel_weight(a.o_proj),
                self.k_cache[i], self.v_cache[i], cos_B1D, sin_B1D, bias_B1T, meta_4, self.fcfg)

    def _moe_inputs(self, layer, meta_4) -> tuple:
        """The MoE op's inputs after its hidden states."""
        m = layer.mlp
        return (layer.post_attention_layernorm.weight, *kernel_weight(m.gate), *kernel_weight(m.experts.gate_up_proj),
                *kernel_weight(m.experts.down_proj), meta_4, self.fcfg)

    def _decode_attention(self, layer, x_B1H, cos_B1D, sin_B1D, bias_B1T, meta_4, i):
        return self.ops1.attn(*self._attention_inputs(layer, x_B1H, cos_B1D, sin_B1D, bias_B1T, meta_4, i))

    def _prefill_attention(self, layer, x_BSH, cos_BSD, sin_BSD, bias_B1ST, meta_4, i):
        """The forward pass's q/k/v, the in-place cache write of k/v at slots meta[0] .., then the
        attention over the cache (earlier chunks' slots included; the bias hides the rest)."""
        a = layer.self_attn
        q, k, v = a.project_qkv(layer.input_layernorm(x_BSH), cos_BSD, sin_BSD)  # the forward's norm (kernel)
        done = self.ops1.cache_write(k, v, self.k_cache[i], self.v_cache[i], meta_4)
        # the write has no output the attention reads: tie it to q (a depend on the cache
        # Parameters themselves is dropped with the write), so the attention runs after it
        q = ops.depend(q, done)
        if self.attn_kernel:
            o_BNSD = attention_kernel.attention_infer(q, self.k_cache[i], self.v_cache[i], bias_B1ST)  # no probs
        else:
            o_BNSD = grouped_attention(q, self.k_cache[i], self.v_cache[i], bias_B1ST, a.scale)
        return x_BSH + a.output(o_BNSD)

    def _mlp(self, layer, h_BSH, meta_4):
        if _kernel_moe(layer):
            if h_BSH.shape[1] == 1:
                return self.ops1.moe(h_BSH, *self._moe_inputs(layer, meta_4))
        return layer.feed_forward(h_BSH)[0]
