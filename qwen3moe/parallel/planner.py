"""Memory and communication estimates per device for candidate (dp, tp, pp, ep) layouts.

A computed version of the seed's static recommendation table. Assumptions (stated so they can
be checked): bf16 weights/activations (2 B), fp32 gradients (4 B), AdamW with fp32 master weights
and moments (12 B / param, divided by dp with ZeRO-1), fused attention (no S^2 buffer), experts
split over ep and their ffn dim over etp (tp when ep == 1), vocab-parallel embedding/lm_head, 1F1B pipeline holding
min(pp, micro_batch_num) micro-batches of activations on the first stage.
Shapes: S sequence, b micro-batch, H hidden, I expert ffn, E experts, k top-k, L layers.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from qwen3moe.models.config import Qwen3MoeConfig
from qwen3moe.parallel.mesh import Mesh, MeshError

GiB = 2**30
# layouts validated by MindSpore Transformers for Qwen3-MoE (the seed's table)
SEED_LAYOUTS = {
    ("train", "qwen3-30b-a3b", 16): (1, 4, 4, 4),
    ("infer", "qwen3-30b-a3b", 2): (1, 2, 1, 1),
    ("infer", "qwen3-235b-a22b", 16): (1, 16, 1, 1),
}


@dataclass
class Estimate:
    mesh: Mesh
    weights: float
    grads: float
    optimizer: float
    activations: float
    kv_cache: float
    comm_bytes: float
    bubble: float
    decode_bytes: float = 0.0  # inference: weight bytes read per generated token along the pipeline
    seed: bool = False

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.kv_cache


def params_per_device(cfg: Qwen3MoeConfig, m: Mesh) -> tuple[float, float]:
    """(dense params, expert params) held by the busiest device (first or last stage)."""
    H, D = cfg.hidden_size, cfg.head_dim
    kv_rank = m.kv_heads_per_rank(cfg.num_key_value_heads)
    attn = H * D * (2 * cfg.num_attention_heads // m.tp + 2 * kv_rank) + 2 * D + 2 * H
    layers = math.ceil(cfg.num_hidden_layers / m.pp)
    sparse = sum(cfg.is_sparse_layer(i) for i in range(layers))
    dense_ffn = (layers - sparse) * 3 * H * cfg.intermediate_size / m.tp
    router = sparse * cfg.num_experts * H
    experts = sparse * (cfg.num_experts // m.ep) * 3 * H * cfg.moe_intermediate_size / m.expert_tp
    vocab = cfg.vocab_size * H / m.tp * (1 if m.pp > 1 or cfg.tie_word_embeddings else 2)
    return layers * attn + dense_ffn + router + vocab + H, experts  # + final norm


def activation_bytes(cfg: Qwen3MoeConfig, m: Mesh, seq: int, mbs: int, recompute: bool) -> float:
    """Stored activations of the first stage for one step (bf16)."""
    H, I, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    q = cfg.num_attention_heads * cfg.head_dim / m.tp
    kv = 2 * m.kv_heads_per_rank(cfg.num_key_value_heads) * cfg.head_dim
    split = m.tp if m.sp else 1  # sequence parallel also splits norms / residual activations
    per_tok = (4 * H / split + q * 2 + kv + cfg.num_experts * 2 + k * (H + 3 * I))  # elements
    tokens = seq * mbs
    layers = math.ceil(cfg.num_hidden_layers / m.pp)
    in_flight = min(m.pp, m.micro_batch_num) if m.pp > 1 else 1
    if recompute:  # keep only each layer's input, recompute one layer at a time in backward
        stored = layers * tokens * H / split + tokens * per_tok
    else:
        stored = layers * tokens * per_tok
    return 2 * stored * in_flight


def comm_bytes(cfg: Qwen3MoeConfig, m: Mesh, seq: int, mbs: int, train: bool) -> float:
    """Bytes one device sends per step (ring collectives; micro-batches included)."""
    H, L, k = cfg.hidden_size, cfg.num_hidden_layers / m.pp, cfg.num_experts_per_tok
    act = 2 * seq * mbs * H * m.micro_batch_num
    passes = 2 if train else 1
    tp = 2 * L * passes * act * 2 * (m.tp - 1) / m.tp if m.tp > 1 else 0.0
    ep = 2 * L * passes * act * k * (m.ep - 1) / m.ep if m.ep > 1 else 0.0
    pp = 2 * passes * act if m.pp > 1 else 0.0
    dense, experts = params_per_device(cfg, m)
    dp = 4 * (dense * 2 * (m.dp - 1) / m.dp + experts * 2 * (m.edp - 1) / m.edp) if train else 0.0
    return tp + ep + pp + dp


def estimate(cfg: Qwen3MoeConfig, m: Mesh, seq: int, mbs: int = 1, mode: str = "train",
             recompute: bool = True, zero1: bool = False, infer_batch: int = 1) -> Estimate:
    dense, experts = params_per_device(cfg, m)
    n = dense + experts
    train = mode == "train"
    kv = 0.0
    decode = 0.0
    if not train:
        sparse = sum(cfg.is_sparse_layer(i) for i in range(math.ceil(cfg.num_hidden_layers / m.pp)))
        active_experts = sparse * min(cfg.num_experts_per_tok, cfg.num_experts // m.ep) * 3 * \
            cfg.hidden_size * cfg.moe_intermediate_size / m.expert_tp
        decode = 2 * (dense + active_experts) * m.pp  # stages run one after another for a token
        kv = (2 * 2 * math.ceil(cfg.num_hidden_layers / m.pp) * m.kv_heads_per_rank(cfg.num_key_value_heads)
              * cfg.head_dim * seq * infer_batch)
    return Estimate(
        mesh=m, weights=2 * n, grads=4 * n if train else 0.0,
        optimizer=(12 * n / (m.dp if zero1 else 1)) if train else 0.0,
        activations=activation_bytes(cfg, m, seq, mbs, recompute) if train else 0.0,
        kv_cache=kv, comm_bytes=comm_bytes(cfg, m, seq, mbs, train),
        bubble=(m.pp - 1) / (m.micro_batch_num + m.pp - 1) if train else 0.0, decode_bytes=decode)


def candidates(cfg: Qwen3MoeConfig, devices: int, micro_batch_num: int) -> list[Mesh]:
    out = []
    divs = [d for d in range(1, devices + 1) if devices % d == 0]
    for tp, pp, ep in itertools.product(divs, divs, divs):
        if devices % (tp * pp):
            continue
        mesh = Mesh(dp=devices // (tp * pp), tp=tp, pp=pp, ep=ep, micro_batch_num=max(micro_batch_num, pp))
        try:
            mesh.validate(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                          num_kv_heads=cfg.num_key_value_heads, num_experts=cfg.num_experts)
        except MeshError:
            continue
        out.append(mesh)
    return out


def plan(cfg: Qwen3MoeConfig, devices: int, device_memory: float, seq: int, *, preset: str = "",
         mode: str = "train", mbs: int = 1, micro_batch_num: int = 16, recompute: bool = True,
         zero1: bool = False, infer_batch: int = 1) -> list[Estimate]:
    """All valid layouts: those that fit first; training then by pipeline bubble and traffic,
    inference by weight bytes read per token (latency) and traffic."""
    ests = []
    seed = SEED_LAYOUTS.get((mode, preset, devices))
    for m in candidates(cfg, devices, micro_batch_num if mode == "train" else 1):
        e = estimate(cfg, m, seq, mbs, mode, recompute, zero1, infer_batch)
        e.seed = seed == (m.dp, m.tp, m.pp, m.ep)
        ests.append(e)
    fits = lambda e: e.total <= 0.9 * device_memory
    if mode == "train":
        return sorted(ests, key=lambda e: (not fits(e), round(e.bubble, 3), e.comm_bytes, e.total))
    return sorted(ests, key=lambda e: (not fits(e), e.decode_bytes, e.comm_bytes, e.total))
