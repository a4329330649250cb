"""The fused decode step (generation/fused_step.py) on a parallelized rank model (parallelize.py,
pp = 1): the same kernels on this rank's slices, with the plan's own collectives between them.

Shapes: B batch, S = 1 query, H hidden, T = B * S tokens, R rows the local experts see, v = V/tp.
Per decoder layer (decode), as the composite step computes it through the plan's cells:
    attention   tp > 1: DecodeAttn over this rank's q/kv heads and o_proj columns returns its
                partial output (no residual); the o_proj wrapper's reduce (all-reduce over tp)
                sums the ranks' partials, then x + it. tp = 1: the single-process op.
    sparse MoE  the dispatcher's rows (tp without ep: all T rows, every expert's ffn slice; ep:
                the rows gathered over the ep group), DecodeMoe with the replicated router over
                all E experts and this rank's experts (lo .. lo + e - 1, others add nothing)
                returns the partial sum; the dispatcher's combine (all-reduce over tp, or
                reduce-scatter over ep and gather over tp) completes it, then h + it.
    dense MLP   the layer's own feed_forward (its sharded Linears and collectives).
Embedding: the plan's vocab-parallel lookup. Head: DecodeHead on this rank's vocab rows [B, v],
then the lm_head wrapper's gather over tp (full logits on every rank, as the composite step).
Prefill runs the base class's path (the layers' own cells, collectives included).
int8 activations (QuantizationConfig activations="int8"): the kernels' flag as in one process;
a rank's row-parallel slices hold whole 16-input activation blocks (quantized.check_act8_layout),
so its partials are one process's up to the order of the float32 sum over ranks.
The composite step (generation/engine._StepCell) on the same rank model is the reference
(tests/test_parallel_fused.py).
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn

from qwen3moe.generation.fused_step import FusedStepCell, int8_activations, kernel_weight
from qwen3moe.kernels import decode as decode_kernel


def _fused_moe(layer) -> bool:
    """A sparse layer (the plan's ParallelMoeBlock around the model's block) without capacity."""
    return bool(layer.is_sparse) and layer.mlp.block.capacity_factor is None


class RankFusedStepCell(FusedStepCell):
    """FusedStepCell on a rank model: partial kernel outputs, the plan's collectives, residuals.
    `tp` > 1: the plan wrapped q/k/v/o_proj and lm_head (parallelize._Around: `.inner` holds
    this rank's slice, `.post` its output collective)."""

    one_op_layers = False  # the attention's partial output is all-reduced before the MoE

    def __init__(self, model: nn.Cell, batch: int, k_cache, v_cache, tp: int = 1, hidden_out: bool = False) -> None:
        super().__init__(model, batch, k_cache, v_cache, hidden_out)
        cfg = model.config
        eps, scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5
        self.tp = tp > 1
        # a stage before the last has no lm_head (its head op is never called)
        vocab = cfg.vocab_size if hidden_out else kernel_weight(self._linear(model.lm_head))[0].shape[0]
        self.ops1 = decode_kernel.DecodeOps(batch, 1, cfg.hidden_size, vocab)
        # (eps, scale, int8 activations as the model was loaded (quantized.check_act8_layout: a
        # rank's slices hold whole activation blocks), partial: on[, expert offset])
        act8 = float(int8_activations(model))
        self.fcfg_attn = Tensor(np.array([eps, scale, act8, 1.0], np.float32))
        moe = [layer.mlp.dispatcher for layer in model.model.layers if _fused_moe(layer)]
        self.moe_op, self.fcfg_moe = None, None
        if moe:
            # one plan for every sparse layer: the same rows and expert block on this rank
            self.moe_op = self.ops1.moe_rows(moe[0].rows_for(batch))
            self.fcfg_moe = Tensor(np.array([eps, scale, act8, 1.0, moe[0].expert_lo], np.float32))

    def _linear(self, cell: nn.Cell) -> nn.Cell:
        """The Linear holding this rank's slice (inside the plan's wrapper when tp > 1)."""
        return cell.inner if self.tp else cell

    def head(self, x_BSH: Tensor) -> Tensor:
        body, lm = self.net.model, self.net.lm_head
        logits = self.ops1.head(x_BSH, body.norm.weight, *kernel_weight(self._linear(lm)), self.fcfg)
        return lm.post(logits) if self.tp else logits

    def _decode_attention(self, layer, x_B1H, cos_B1D, sin_B1D, bias_B1T, meta_4, i):
        a = layer.self_attn
        fcfg = self.fcfg_attn if self.tp else self.fcfg
        w = [kernel_weight(self._linear(p)) for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]
        y = self.ops1.attn(x_B1H, layer.input_layernorm.weight, *w[0], *w[1], *w[2], a.q_norm.weight,
                           a.k_norm.weight, *w[3], self.k_cache[i], self.v_cache[i], cos_B1D, sin_B1D, bias_B1T,
                           meta_4, fcfg)
        return x_B1H + a.o_proj.post(y) if self.tp else y

    def _mlp(self, layer, h_BSH, meta_4):
        B, S, H = h_BSH.shape
        if S == 1 and _fused_moe(layer):
            blk, d = layer.mlp.block, layer.mlp.dispatcher
            y_RH = self.moe_op(d.rows(h_BSH.reshape(B, H)), layer.post_attention_layernorm.weight,
                               *kernel_weight(blk.gate), *kernel_weight(blk.experts.gate_up_proj),
                               *kernel_weight(blk.experts.down_proj), meta_4, self.fcfg_moe)
            return h_BSH + d.combine(y_RH, B).reshape(B, S, H)
        return layer.feed_forward(h_BSH)[0]
