"""Tensor- and expert-parallel forward of a built model, all ranks simulated in one process.

Each rank gets its own layer objects (the unmodified classes from layers/ and models/, built
with the per-rank sizes) holding the shards that `plans.TP_PLAN` / `plans.EP_PLAN` assign;
the parallel forward runs every rank's shard and joins them with the communicator exactly
where Megatron places its collectives (after row-parallel o_proj / down_proj, after the
expert-parallel combine, around the vocab-parallel lm_head). Shapes: B batch, S seq, H hidden,
T = B*S tokens, N/K query/kv heads, E experts, V vocab.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from qwen3moe.layers.attention import Qwen3MoeAttention
from qwen3moe.layers.dtypes import skip_init
from qwen3moe.layers.experts import Qwen3MoeExperts
from qwen3moe.layers.mlp import Qwen3MoeMLP
from qwen3moe.models.inputs import prepare_inputs
from qwen3moe.parallel.comm import SimComm
from qwen3moe.parallel.plans import EP_PLAN, TP_PLAN, shard_array, style_of
from qwen3moe.router import dispatch


def _load(cell, full, prefix: str, plan: dict, rank: int, size: int, overrides=None) -> None:
    for name, p in cell.parameters_and_names():
        key = f"{prefix}.{name}"
        arr = (overrides or {}).get(name)
        if arr is None:
            arr = shard_array(full[key], style_of(key, plan), rank, size)
        p.set_data(Tensor(np.ascontiguousarray(arr, np.float32)))


def _kv_rows(full_w: np.ndarray, K: int, D: int, tp: int, rank: int, N: int) -> np.ndarray:
    """K/V rows a rank needs: its share of kv heads, or (tp > K) the one head its q heads use."""
    if K % tp == 0:
        return shard_array(full_w, "column", rank, tp)
    head = (rank * (N // tp)) // (N // K)  # vLLM's rule: replicate each kv head tp/K times
    return full_w[head * D:(head + 1) * D]


class TPAttention:
    def __init__(self, attn: Qwen3MoeAttention, prefix: str, full: dict, tp: int, eps: float) -> None:
        N, K, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        H = attn.o_proj.out_features
        self.ranks = []
        for r in range(tp):
            with skip_init():
                a = Qwen3MoeAttention(H, N // tp, max(1, K // tp), D, eps)
            kv = {f"{w}_proj.weight": _kv_rows(full[f"{prefix}.{w}_proj.weight"], K, D, tp, r, N) for w in "kv"}
            _load(a, full, prefix, TP_PLAN, r, tp, kv)
            self.ranks.append(a)

    def __call__(self, x, cos, sin, bias, comm: SimComm):
        return comm.all_reduce([a(x, cos, sin, bias) for a in self.ranks])[0]


class TPMLP:
    def __init__(self, mlp: Qwen3MoeMLP, prefix: str, full: dict, tp: int) -> None:
        H, F = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.ranks = []
        for r in range(tp):
            with skip_init():
                m = Qwen3MoeMLP(H, F // tp)
            _load(m, full, prefix, TP_PLAN, r, tp)
            self.ranks.append(m)

    def __call__(self, x_TH, comm: SimComm):
        return comm.all_reduce([m(x_TH) for m in self.ranks])[0]


class EPMoE:
    """Router replicated; rank r owns experts [r*E/ep, (r+1)*E/ep) (plus a tp split of their ffn
    dim when tp > 1). Fallback dispatch without all-to-all: every rank sees all tokens, keeps the
    assignments routed to its experts (other weights zeroed) and the partial outputs are summed."""

    def __init__(self, block, prefix: str, full: dict, ep: int, tp: int) -> None:
        self.block, self.ep, self.tp = block, ep, tp
        E, I = block.num_experts, block.experts.intermediate_size
        H = block.experts.down_proj.shape[1]
        self.local_E = E // ep
        self.shards = []
        for r in range(ep):
            for t in range(tp):
                with skip_init():
                    ex = Qwen3MoeExperts(self.local_E, H, I // tp)
                ov = {}
                for name in ("gate_up_proj", "down_proj"):
                    arr = shard_array(full[f"{prefix}.experts.{name}"], style_of(f"mlp.experts.{name}", EP_PLAN), r, ep)
                    ov[name] = shard_array(arr, style_of(f"mlp.experts.{name}", TP_PLAN), t, tp)
                _load(ex, full, f"{prefix}.experts", {}, 0, 1, ov)
                self.shards.append((r, ex))

    def __call__(self, x_TH, comm: SimComm):
        _, _, w_TK, idx_TK = self.block.gate(x_TH)
        outs = []
        for r, ex in self.shards:
            lo = r * self.local_E
            mine = ((idx_TK >= lo) & (idx_TK < lo + self.local_E)).astype(w_TK.dtype)
            local_idx = ops.clip_by_value(idx_TK - lo, 0, self.local_E - 1).astype(ms.int32)
            A = x_TH.shape[0] * idx_TK.shape[1]
            b = dispatch.choose_block_size(A, self.local_E)
            nb = dispatch.num_blocks(A, self.local_E, b)
            slot, src, expert_nb, _ = dispatch.dispatch_indices(local_idx, self.local_E, b, nb)
            y = ex.blocks(dispatch.permute(x_TH, src), expert_nb)
            outs.append(dispatch.unpermute(y, slot, w_TK * mine))
        return comm.all_reduce(outs)[0]


def parallel_logits(model, input_ids, tp: int = 1, ep: int = 1):
    """Logits of `model` computed tensor/expert-parallel over simulated ranks (numpy [B, S, V])."""
    cfg = model.config
    full = {p.name: p.asnumpy() for p in model.get_parameters()}
    t = prepare_inputs(cfg, input_ids)
    comm_tp = SimComm(tp)
    x = model.model.embed_tokens(t.input_ids)  # vocab-parallel embedding == gather of its rows
    B, S, H = x.shape
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}"
        attn = TPAttention(layer.self_attn, f"{pre}.self_attn", full, tp, cfg.rms_norm_eps)
        h = x + attn(layer.input_layernorm(x), t.cos, t.sin, t.bias, comm_tp)
        z = layer.post_attention_layernorm(h).reshape(B * S, H)
        if layer.is_sparse:
            y = EPMoE(layer.mlp, f"{pre}.mlp", full, ep, tp)(z, SimComm(ep * tp))
        else:
            y = TPMLP(layer.mlp, f"{pre}.mlp", full, tp)(z, comm_tp)
        x = h + y.reshape(B, S, H)
    x = model.model.norm(x).reshape(B * S, H)
    w = full["lm_head.weight"]
    parts = [ops.matmul(x, Tensor(shard_array(w, "vocab", r, tp)).T) for r in range(tp)]
    return comm_tp.all_gather(parts, axis=1)[0].asnumpy().reshape(B, S, -1)  # column lm_head, gathered
