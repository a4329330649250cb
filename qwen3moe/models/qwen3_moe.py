"""Qwen3-MoE model: MoE block, decoder layer, model and causal-LM head (no parallel code).

Shapes: B batch, S sequence, T = B*S tokens, H hidden, V vocab, E experts, K top-k,
D head_dim, L layers.
The tensor-level forward (`construct`) is pure MindSpore and runs compiled (`ms.jit`);
`__call__` does the host-side work (input checks, positions, RoPE tables, masks, label shift)
so every graph input has a static shape.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.kernels.cross_entropy import token_cross_entropy
from qwen3moe.layers.attention import Qwen3MoeAttention
from qwen3moe.layers.dtypes import init_param, to_ms_dtype, widen
from qwen3moe.layers.experts import Qwen3MoeExperts
from qwen3moe.layers.linear import Linear
from qwen3moe.layers.mlp import Qwen3MoeMLP
from qwen3moe.layers.norm import RMSNorm
from qwen3moe.layers.quant import (QuantizationConfig, QuantizationError, QuantizedExperts, QuantizedLinear,
                                   kernel_available as quant_kernel_available)
from qwen3moe.models.config import Qwen3MoeConfig
from qwen3moe.models.inputs import prepare_inputs
from qwen3moe.router import dispatch
from qwen3moe.router.losses import router_stats, switch_aux_loss
from qwen3moe.router.topk import TopKRouter


class Qwen3MoeSparseMoeBlock(nn.Cell):
    """Router -> permute -> stacked experts (block-grouped, dropless) -> weighted combine."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 norm_topk_prob: bool, init_std: float = 0.02, param_dtype=None,
                 moe_backend: str = "auto", capacity_factor: float | None = None,
                 quantization: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor  # None = dropless (HF semantics)
        self.gate = TopKRouter(hidden_size, num_experts, top_k, norm_topk_prob, init_std, param_dtype)
        if quantization is None:
            self.experts = Qwen3MoeExperts(num_experts, hidden_size, intermediate_size, init_std, param_dtype)
            # fp32 experts: the fused kernel (fwd + bwd); bf16: the forward-only kernels/quant.py op
            fp32 = to_ms_dtype(param_dtype or "float32") == ms.float32
            kernel = resolve_moe_backend(moe_backend) and (fp32 or quant_kernel_available())
        else:
            q = quantization
            self.experts = QuantizedExperts(num_experts, hidden_size, intermediate_size, q.bits,
                                            q.group_for(hidden_size, "the experts' gate/up projections"),
                                            q.group_for(intermediate_size, "the experts' down projection"),
                                            q.desc_act, q.int8_activations)
            kernel = self.experts.use_kernel and moe_backend != "composite"
        self.use_kernel = capacity_factor is None and kernel

    def construct(self, x_TH: Tensor):
        logits_TE, probs_TE, weights_TK, idx_TK = self.gate(x_TH)
        return self.combine(x_TH, weights_TK, idx_TK), logits_TE, probs_TE, idx_TK

    def combine(self, x_TH: Tensor, weights_TK: Tensor, idx_TK: Tensor) -> Tensor:
        """sum_k weights_tk * Expert_{idx_tk}(x_t) over this block's experts (idx in [0, E_held)):
        the routed half of the block, also run by parallel dispatchers on their local experts."""
        E = self.experts.num_experts
        if self.use_kernel:  # one fused op: bucket by expert, grouped SwiGLU, weighted combine
            return self.experts.fused(x_TH, idx_TK, weights_TK)
        A = x_TH.shape[0] * idx_TK.shape[1]
        if self.capacity_factor is not None:
            C = max(1, math.ceil(self.capacity_factor * A / E))
            slot_A, src_R, keep_A, _ = dispatch.capacity_dispatch(idx_TK, E, C)
            y_RH = self.experts.blocks(dispatch.permute(x_TH, src_R), dispatch.iota(E).astype(ms.int32))
            weights_TK = weights_TK * keep_A.reshape(weights_TK.shape).astype(weights_TK.dtype)
            return dispatch.unpermute(y_RH, slot_A, weights_TK)
        b = dispatch.choose_block_size(A, E)
        nb = dispatch.num_blocks(A, E, b)
        slot_A, src_R, expert_NB, _ = dispatch.dispatch_indices(idx_TK, E, b, nb)
        y_RH = self.experts.blocks(dispatch.permute(x_TH, src_R), expert_NB)
        return dispatch.unpermute(y_RH, slot_A, weights_TK)


def resolve_moe_backend(name: str) -> bool:
    """True for the fused MoE C++ kernel. "auto" uses it when it builds here (QWEN3MOE_KERNELS=0
    forces the composite path); "composite" never; "kernel" requires it."""
    from qwen3moe.kernels import moe as moe_kernel

    if name not in ("auto", "kernel", "composite"):
        raise ValueError(f"moe_backend must be 'auto', 'kernel' or 'composite', got {name!r}")
    if name == "composite":
        return False
    if name == "kernel" and not moe_kernel.available():
        raise RuntimeError("moe_backend='kernel' but the fused MoE kernel could not be built "
                           "(needs g++ and numpy's bundled OpenBLAS on x86-64 Linux)")
    return moe_kernel.available()


class Qwen3MoeDecoderLayer(nn.Cell):
    def __init__(self, config: Qwen3MoeConfig, layer_idx: int, param_dtype=None,
                 quantization: QuantizationConfig | None = None) -> None:
        super().__init__()
        c, std = config, config.initializer_range
        lin = quantization.make_linear if quantization else Linear
        self.is_sparse = c.is_sparse_layer(layer_idx)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
        self.self_attn = Qwen3MoeAttention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                           c.head_dim, c.rms_norm_eps, c.attention_bias, std, param_dtype, lin)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype)
        if self.is_sparse:
            self.mlp = Qwen3MoeSparseMoeBlock(c.hidden_size, c.num_experts, c.num_experts_per_tok,
                                              c.moe_intermediate_size, c.norm_topk_prob, std, param_dtype,
                                              capacity_factor=c.moe_capacity_factor, quantization=quantization)
        else:
            self.mlp = Qwen3MoeMLP(c.hidden_size, c.intermediate_size, std, param_dtype, lin)

    def construct(self, x_BSH: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias_B1ST: Tensor,
                  k_cache_BKTD: Tensor | None = None, v_cache_BKTD: Tensor | None = None,
                  idx_BKS3: Tensor | None = None):
        """(out [B,S,H], router outputs or None); with a KV cache see Qwen3MoeAttention.construct."""
        a_BSH = self.input_layernorm(x_BSH)
        h_BSH = x_BSH + self.self_attn(a_BSH, cos_BSD, sin_BSD, bias_B1ST, k_cache_BKTD, v_cache_BKTD, idx_BKS3)
        return self.feed_forward(h_BSH)

    def feed_forward(self, h_BSH: Tensor):
        """Post-attention norm, MLP or MoE block, residual: (out [B,S,H], router outputs or None)."""
        B, S, H = h_BSH.shape
        z_TH = self.post_attention_layernorm(h_BSH).reshape(B * S, H)
        if self.is_sparse:
            y_TH, logits_TE, probs_TE, idx_TK = self.mlp(z_TH)
            return h_BSH + y_TH.reshape(B, S, H), (logits_TE, probs_TE, idx_TK)
        return h_BSH + self.mlp(z_TH).reshape(B, S, H), None


class Qwen3MoeModel(nn.Cell):
    def __init__(self, config: Qwen3MoeConfig, param_dtype=None,
                 quantization: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _Embedding(config.vocab_size, config.hidden_size, config.initializer_range,
                                       param_dtype)
        self.layers = nn.CellList([Qwen3MoeDecoderLayer(config, i, param_dtype, quantization)
                                   for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)

    def construct(self, input_ids_BS: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias_B1SS: Tensor,
                  token_mask_T: Tensor, want_hidden: bool = False):
        """Returns (final hidden [B,S,H], router logits per sparse layer, router statistics
        (counts [L_moe,E], prob sums [L_moe,E], counted tokens n) or () without sparse layers,
        hidden states tuple (HF-5 semantics) or ()). See router/losses.py for the statistics."""
        x = self.embed_tokens(input_ids_BS)
        hidden = (x,) if want_hidden else ()
        router_logits, counts, probsums = (), (), ()
        n_tok = token_mask_T.astype(ms.float32).sum()
        for layer in self.layers:
            x, routed = layer(x, cos_BSD, sin_BSD, bias_B1SS)
            if want_hidden:
                hidden = hidden + (x,)
            if routed is not None:
                logits_TE, probs_TE, idx_TK = routed
                router_logits = router_logits + (logits_TE,)
                c_E, s_E, _ = router_stats(probs_TE, idx_TK, token_mask_T)
                counts, probsums = counts + (c_E,), probsums + (s_E,)
        x = self.norm(x)
        if want_hidden:
            hidden = hidden[:-1] + (x,)
        stats = (ops.stack(counts), ops.stack(probsums), n_tok) if counts else ()
        return x, router_logits, stats, hidden


class _Embedding(nn.Cell):
    def __init__(self, vocab_size: int, hidden_size: int, init_std: float, param_dtype=None) -> None:
        super().__init__()
        self.weight = init_param((vocab_size, hidden_size), init_std, "weight", param_dtype, gathered=True)

    def construct(self, ids: Tensor) -> Tensor:
        return widen(ops.gather(self.weight, ids, 0))  # rows first: only T*H values widened


class TokenCrossEntropy(nn.Cell):
    """Per-token cross-entropy [T] of logits [T, V] (C++ kernel or composite)."""

    def construct(self, logits_TV: Tensor, labels_T: Tensor) -> Tensor:
        return token_cross_entropy(logits_TV, labels_T)


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    router_logits: tuple = ()
    hidden_states: tuple = ()
    router_stats: tuple = ()  # (counts [L_moe,E], prob sums [L_moe,E], n tokens); see router/losses.py


class Qwen3MoeForCausalLM(nn.Cell):
    """The HF-compatible causal LM. Parameter names are the HF names."""

    def __init__(self, config: Qwen3MoeConfig, param_dtype=None,
                 quantization: QuantizationConfig | None = None) -> None:
        super().__init__()
        self.config, self.quantization = config, quantization
        self.model = Qwen3MoeModel(config, param_dtype, quantization)
        H, V = config.hidden_size, config.vocab_size
        if quantization is not None and quantization.lm_head_bits != 8 and config.tie_word_embeddings:
            raise QuantizationError(f"quantization lm_head_bits={quantization.lm_head_bits} needs an untied lm_head "
                                    f"(tie_word_embeddings is true: the lm_head reads the float embedding)")
        if quantization is not None and not config.tie_word_embeddings:  # per channel, int8 or 6 bits
            self.lm_head = QuantizedLinear(H, V, quantization.lm_head_bits, H, act8=quantization.int8_activations)
        else:  # a tied lm_head reads the (unquantized) embedding
            self.lm_head = Linear(H, V, False, config.initializer_range, param_dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cross_entropy = TokenCrossEntropy()  # a module, so a parallel plan can swap it
        self.source_dir: str | None = None  # set by from_pretrained (tokenizer files to copy on save)
        self.generation_config = None

    # ---- tensor-level forward (compiled) ------------------------------------------------
    def construct(self, input_ids_BS, cos_BSD, sin_BSD, bias_B1SS, token_mask_T, labels_T,
                  keep: int = 0, want_router: bool = False, want_hidden: bool = False):
        # input: [B, S] ids, or a pipeline stage's received hidden states (sequence parallel:
        # own token rows [1, t, H]); B and S are those of the model's output
        x_BSH, router_logits, stats, hidden = self.model(
            input_ids_BS, cos_BSD, sin_BSD, bias_B1SS, token_mask_T, want_hidden)
        if keep:
            x_BSH = x_BSH[:, x_BSH.shape[1] - keep:]
        B, Sk = x_BSH.shape[0], x_BSH.shape[1]
        logits_TV = self.lm_head(x_BSH.reshape(B * Sk, -1))
        # absent losses are returned as 0.0 (a None graph output makes MindSpore fall back to an
        # "any type" runtime path that cannot run custom kernels); __call__ maps them to None
        zero = ops.zeros((), ms.float32)
        lm_loss = aux = loss = zero
        if labels_T is not None:
            valid_T = (labels_T != -100).astype(ms.float32)
            safe_T = ops.select(labels_T != -100, labels_T, ops.zeros_like(labels_T))
            ce_T = self.cross_entropy(logits_TV.astype(ms.float32), safe_T)
            lm_loss = (ce_T * valid_T).sum() / ops.maximum(valid_T.sum(), Tensor(1.0, ms.float32))
            loss = lm_loss
        if want_router and len(stats) == 3:
            # HF pools every sparse layer's tokens: sum the per-layer statistics, n counts L copies
            L = stats[0].shape[0]
            aux = switch_aux_loss(stats[0].sum(0), stats[1].sum(0), stats[2] * L)
            if labels_T is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
        if not want_router:
            router_logits = ()
        return logits_TV.reshape(B, Sk, -1), loss, lm_loss, aux, router_logits, hidden, stats

    # ---- public API ---------------------------------------------------------------------
    def __call__(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                 output_router_logits: bool = False, logits_to_keep: int = 0,
                 output_hidden_states: bool = False) -> CausalLMOutput:
        t = prepare_inputs(self.config, input_ids, attention_mask, position_ids, labels, logits_to_keep)
        return self.run(t, logits_to_keep, output_router_logits, output_hidden_states)

    def run(self, t, logits_to_keep: int = 0, output_router_logits: bool = False,
            output_hidden_states: bool = False) -> CausalLMOutput:
        """The forward on prepared inputs (models/inputs.GraphInputs; a pipeline stage passes
        its received hidden states [B, S, H] as t.input_ids)."""
        fn = self.graph_runner() if compile_enabled() else self.construct
        logits, loss, lm_loss, aux, router_logits, hidden, stats = fn(
            t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels,
            int(logits_to_keep), bool(output_router_logits), bool(output_hidden_states))
        has_labels, has_aux = t.labels is not None, output_router_logits and len(stats) == 3
        loss = loss if has_labels else None
        lm_loss = lm_loss if has_labels else None
        aux = aux if has_aux else None
        return CausalLMOutput(logits, loss, lm_loss, aux, tuple(router_logits), tuple(hidden),
                              tuple(stats))

    forward = __call__

    def graph_runner(self) -> "_GraphRunner":
        """The compiled forward, created once per model (kept out of the cell tree)."""
        runner = self.__dict__.get("_graph_runner")
        if runner is None:
            runner = _GraphRunner(self)
            self.__dict__["_graph_runner"] = runner
        return runner

    def num_parameters(self, active: bool = False) -> int:
        return self.config.num_parameters(active=active)

    @classmethod
    def from_pretrained(cls, path, dtype: str | None = "float32", quantization=None,
                        group_size: int | None = None, **kwargs) -> "Qwen3MoeForCausalLM":
        """dtype: float32, bfloat16 (kept bf16 in memory, fp32 math) or None (the folder's).
        quantization: None, "int8" (per channel), "int4" (group_size 32/64/128, default 128) or a
        QuantizationConfig: weights quantized tensor by tensor while loading. GPTQ folders load
        quantized as stored (docs/quantization.md). Keywords, with quantization (a name) or a
        GPTQ folder: lm_head_bits=6, the untied lm_head in 6 bits per channel instead of int8;
        activations="int8", the opt-in int8-activation kernels (QuantizationConfig)."""
        from qwen3moe.io.load import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, quantization=quantization, group_size=group_size,
                               **kwargs)

    def save_pretrained(self, path, dtype: str | None = None, max_shard_size: int | str = "5GB") -> None:
        from qwen3moe.io.hf_checkpoint import save_pretrained

        save_pretrained(self, path, dtype=dtype, max_shard_size=max_shard_size)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        from qwen3moe.generation.generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)


def compile_enabled() -> bool:
    """Graph mode unless QWEN3MOE_PYNATIVE=1 (debug switch)."""
    return os.environ.get("QWEN3MOE_PYNATIVE", "0") in ("", "0")


class _GraphRunner(nn.Cell):
    """Compiles `model.construct` once per input signature.

    Passing the model as an argument to a jit function re-traces it on every call; a wrapping
    Cell with a jit construct caches the graph (bench/RESULTS.md, "Figures moved from docstrings").
    auto_prefix=False keeps the HF parameter names.
    """

    def __init__(self, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.net = model

    @ms.jit
    def construct(self, input_ids_BS, cos_BSD, sin_BSD, bias_B1SS, token_mask_T, labels_T,
                  keep, want_router, want_hidden):
        return self.net.construct(input_ids_BS, cos_BSD, sin_BSD, bias_B1SS, token_mask_T, labels_T,
                                  keep, want_router, want_hidden)
