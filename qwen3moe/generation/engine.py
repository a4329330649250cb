"""Static-KV-cache decoder engine: one compiled step for prefill (Sq = prompt bucket) and decode (Sq = 1).

Shapes: B batch, Sq query tokens this step, T = S_max cache slots, H hidden, N query heads,
K kv heads, D head_dim, V vocab, L layers.
The engine reuses the model's sub-cells (norms, projections, MoE blocks, lm_head) without editing
them. Each layer's K/V cache is a Parameter [B, K, T, D] updated in-graph by `scatter_nd_update`
with host-built indices (measured fastest on CPU, see MINDSPORE_CPU.md), so the step graph has
static shapes: one compile per (B, Sq, T). Slot layout per row: the left-padded prompt occupies
slots [0, P), decode step t writes slot P + t; the host-built additive bias hides pad slots and
future slots, and positions are cumsum(mask) - 1 per row (pads get 1, as transformers 5).
"""
from __future__ import annotations

import itertools

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from qwen3moe.layers.attention import grouped_attention
from qwen3moe.models.inputs import MASK_VALUE, rope_tables

SLOT_BUCKET = 64     # cache length multiple: fewer distinct (B, T) graphs
PROMPT_BUCKET = 16   # prompt length multiple: fewer prefill graphs
_ENGINE_IDS = itertools.count()
_COMPILED: set[tuple] = set()  # (engine id, B, Sq, T) signatures compiled in this process


def compile_count() -> int:
    """Distinct step-graph signatures compiled so far in this process (each is one graph compile)."""
    return len(_COMPILED)


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class _StepCell(nn.Cell):
    """The compiled step. auto_prefix=False keeps the model's HF parameter names."""

    def __init__(self, model: nn.Cell, batch: int, slots: int, uid: int) -> None:
        super().__init__(auto_prefix=False)
        self.net = model
        cfg = model.config
        shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        zeros = lambda: Tensor(np.zeros(shape, np.float32))
        L = cfg.num_hidden_layers
        self.k_cache = ParameterTuple([Parameter(zeros(), f"kv_cache{uid}.k.{i}", requires_grad=False)
                                       for i in range(L)])
        self.v_cache = ParameterTuple([Parameter(zeros(), f"kv_cache{uid}.v.{i}", requires_grad=False)
                                       for i in range(L)])

    @ms.jit
    def construct(self, ids_BS: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias_B1ST: Tensor,
                  idx_BKS3: Tensor) -> Tensor:
        body = self.net.model
        x_BSH = body.embed_tokens(ids_BS)
        B, S, H = x_BSH.shape
        i = 0
        for layer in body.layers:
            attn = layer.self_attn
            q_BNSD, k_BKSD, v_BKSD = attn.project_qkv(layer.input_layernorm(x_BSH), cos_BSD, sin_BSD)
            # the returned (updated) caches order the write before the read in the graph
            k_BKTD = ops.scatter_nd_update(self.k_cache[i], idx_BKS3, k_BKSD)
            v_BKTD = ops.scatter_nd_update(self.v_cache[i], idx_BKS3, v_BKSD)
            o_BNSD = grouped_attention(q_BNSD, k_BKTD, v_BKTD, bias_B1ST, attn.scale)
            h_BSH = x_BSH + attn.output(o_BNSD)
            z_TH = layer.post_attention_layernorm(h_BSH).reshape(B * S, H)
            if layer.is_sparse:
                y_TH = layer.mlp(z_TH)[0]
            else:
                y_TH = layer.mlp(z_TH)
            x_BSH = h_BSH + y_TH.reshape(B, S, H)
            i += 1
        last_BH = body.norm(x_BSH[:, S - 1])  # only the last position feeds the next token
        return self.net.lm_head(last_BH)


class DecodeEngine:
    """Host side of the cached decoder: slot bookkeeping, positions, masks, cos/sin, indices.

    Usage: `logits_BV = engine.prefill(ids_BP, mask_BP)` then `engine.decode(next_B)` per token.
    Valid for (B, T) fixed at construction; prompts must fit T - max_new_tokens.
    """

    def __init__(self, model: nn.Cell, batch: int, slots: int) -> None:
        self.model, self.config = model, model.config
        self.batch, self.slots = batch, slots
        self.uid = next(_ENGINE_IDS)
        self.cell = _StepCell(model, batch, slots, self.uid)
        self.valid_BT = np.zeros((batch, slots), bool)  # slots a query may attend (real tokens)
        self.next_pos_B = np.zeros(batch, np.int64)
        self.cursor = 0  # next slot to write

    def _run(self, ids_BS: np.ndarray, pos_BS: np.ndarray, bias_B1ST: np.ndarray) -> np.ndarray:
        B, S = ids_BS.shape
        cos, sin = rope_tables(self.config, pos_BS)
        idx = np.empty((B, self.config.num_key_value_heads, S, 3), np.int32)
        idx[..., 0] = np.arange(B)[:, None, None]
        idx[..., 1] = np.arange(self.config.num_key_value_heads)[None, :, None]
        idx[..., 2] = self.cursor + np.arange(S)[None, None, :]
        _COMPILED.add((self.uid, B, S, self.slots))
        logits = self.cell(Tensor(ids_BS.astype(np.int32)), Tensor(cos), Tensor(sin),
                           Tensor(bias_B1ST), Tensor(idx))
        self.cursor += S
        return logits.asnumpy()

    def prefill(self, ids_BP: np.ndarray, mask_BP: np.ndarray) -> np.ndarray:
        """Run the (left-padded) prompt; returns float32 logits [B, V] of its last position."""
        B, P = ids_BP.shape
        if B != self.batch or P >= self.slots:
            raise ValueError(f"prompt {ids_BP.shape} does not fit the engine ({self.batch}, {self.slots})")
        mask = mask_BP.astype(bool)
        pos = np.cumsum(mask, axis=1) - 1
        pos[~mask] = 1
        self.cursor = 0
        self.valid_BT[:] = False
        self.valid_BT[:, :P] = mask
        allowed = self.valid_BT[:, None, :] & (np.arange(self.slots)[None, None, :] <= np.arange(P)[None, :, None])
        bias = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]
        self.next_pos_B = mask.sum(1).astype(np.int64)
        return self._run(ids_BP, pos, bias)

    def decode(self, next_B: np.ndarray) -> np.ndarray:
        """Feed one token per row (at the next slot); returns float32 logits [B, V]."""
        if self.cursor >= self.slots:
            raise ValueError(f"KV cache full ({self.slots} slots)")
        self.valid_BT[:, self.cursor] = True
        bias = np.where(self.valid_BT, 0.0, MASK_VALUE).astype(np.float32)[:, None, None, :]
        pos = self.next_pos_B[:, None].copy()
        self.next_pos_B += 1
        return self._run(np.asarray(next_B, np.int64).reshape(-1, 1), pos, bias)


def get_engine(model: nn.Cell, batch: int, prompt_len: int, max_new_tokens: int) -> tuple[DecodeEngine, int]:
    """A cached engine for (B, T) plus the bucketed prompt length P (engines are kept per model,
    so repeated generate calls reuse compiled graphs)."""
    P = round_up(prompt_len, PROMPT_BUCKET)
    T = round_up(P + max_new_tokens, SLOT_BUCKET)
    cache: dict = model.__dict__.setdefault("_decode_engines", {})
    engine = cache.get((batch, T))
    if engine is None:
        if len(cache) >= 4:  # bound memory: drop the oldest engine (its caches and graphs)
            cache.pop(next(iter(cache)))
        engine = cache[(batch, T)] = DecodeEngine(model, batch, T)
    return engine, P
