"""Token permute / unpermute for grouped expert compute with static shapes and no drops.

Shapes: T tokens, K experts per token (top-k), A = T*K assignments, E experts, H hidden,
b rows per block, NB blocks, R = NB*b padded rows.

Block-padded grouping ("dropless grouped GEMM without a grouped-GEMM kernel"): the A
(token, slot) assignments are grouped by expert and each expert's group is padded up to a
multiple of b rows. Expert e with n_e assignments needs ceil(n_e/b) blocks, and since at most
m = min(E, A) experts are non-empty,
    sum_e ceil(n_e / b) <= sum_e (n_e + b - 1) / b <= (A + m (b - 1)) / b,
so NB = floor((A + m(b-1)) / b) blocks always suffice: a static shape, whatever the routing.
Each block then runs one batched matmul against its own expert's weights, so compute scales
with A + m*b rows (tokens * k), never with T * E, and no token is ever dropped.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Tensor, ops


def choose_block_size(num_assign: int, num_experts: int, gather_cost_rows: int = 12) -> int:
    """Rows per block minimising padded rows + cost of gathering each block's weights.

    A block costs b rows of matmul plus copying one expert's weights, worth about
    `gather_cost_rows` rows of matmul on a CPU (bytes moved vs flops per row).
    """
    best_b, best_cost = 1, math.inf
    for b in (1, 2, 4, 8, 16, 32, 64, 128):
        nb = num_blocks(num_assign, num_experts, b)
        cost = nb * (b + gather_cost_rows)
        if cost < best_cost:
            best_b, best_cost = b, cost
    return best_b


def num_blocks(num_assign: int, num_experts: int, block: int) -> int:
    m = min(num_experts, num_assign)
    return (num_assign + m * (block - 1)) // block


def dispatch_indices(expert_idx_TK: Tensor, num_experts: int, block: int, nblocks: int):
    """Integer routing plan (no gradient).

    Returns
      slot_A   [A] int32: padded row of assignment a = t*K + j,
      src_R    [R] int32: source token of each padded row (T for empty rows -> zero row),
      expert_NB [NB] int32: expert owning each block,
      counts_E [E] float32: assignments per expert (for load-balancing statistics).
    """
    T, K = expert_idx_TK.shape
    A = T * K
    flat_A = expert_idx_TK.reshape(A).astype(ms.int32)
    onehot_AE = ops.one_hot(flat_A, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
    rank_A = (ops.cumsum(onehot_AE, 0) * onehot_AE).sum(-1) - 1.0  # position within its expert
    counts_E = onehot_AE.sum(0)
    padded_E = ops.ceil(counts_E / block) * block
    end_E = ops.cumsum(padded_E, 0)
    start_E = end_E - padded_E
    slot_A = (ops.gather(start_E, flat_A, 0) + rank_A).astype(ms.int32)
    block_start_NB = iota(nblocks) * block
    expert_NB = (end_E.reshape(1, -1) <= block_start_NB.reshape(-1, 1)).astype(ms.int32).sum(-1)
    expert_NB = ops.minimum(expert_NB, num_experts - 1).astype(ms.int32)
    token_A = ops.floor_divide(iota(A), K).astype(ms.int32)
    src_R = ops.fill(ms.int32, (nblocks * block,), T)
    src_R = ops.tensor_scatter_update(src_R, slot_A.reshape(A, 1), token_A)
    return (ops.stop_gradient(slot_A), ops.stop_gradient(src_R), ops.stop_gradient(expert_NB),
            ops.stop_gradient(counts_E))


def iota(n: int) -> Tensor:
    """[0, 1, ..., n-1] as float32 built in-graph (exact below 2**24; mint.arange has no CPU kernel,
    and a Python-list constant of n elements would be unrolled by the graph compiler)."""
    return ops.cumsum(ops.ones((n,), ms.float32), 0) - 1.0


def permute(x_TH: Tensor, src_R: Tensor) -> Tensor:
    """Gather token rows into expert-grouped padded order; empty rows read a zero row."""
    zero_1H = ops.zeros((1, x_TH.shape[1]), x_TH.dtype)
    return ops.gather(ops.concat((x_TH, zero_1H), 0), src_R, 0)


def unpermute(y_RH: Tensor, slot_A: Tensor, weight_TK: Tensor) -> Tensor:
    """out_t = sum_j w_tj * y[slot(t, j)]: the weighted combine back to token order."""
    T, K = weight_TK.shape
    y_TKH = ops.gather(y_RH, slot_A, 0).reshape(T, K, -1)
    return (y_TKH * weight_TK.astype(y_RH.dtype).expand_dims(-1)).sum(1)


def capacity_dispatch(expert_idx_TK: Tensor, num_experts: int, capacity: int):
    """Capacity-limited plan (optional token dropping, GShard/Switch style).

    Expert e keeps its first `capacity` assignments in token order; later ones are dropped
    (their combine weight becomes 0, so the token keeps only its residual for that slot).
    Returns slot_A (row e*C + rank, 0 when dropped), src_R [E*C], keep_A float32, counts_E.
    Static shapes: R = E*C rows, one block per expert (no weight gather needed).
    """
    T, K = expert_idx_TK.shape
    A = T * K
    flat_A = expert_idx_TK.reshape(A).astype(ms.int32)
    onehot_AE = ops.one_hot(flat_A, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
    rank_A = (ops.cumsum(onehot_AE, 0) * onehot_AE).sum(-1) - 1.0
    keep_A = (rank_A < capacity).astype(ms.float32)
    slot_A = ((flat_A.astype(ms.float32) * capacity + rank_A) * keep_A).astype(ms.int32)
    token_A = ops.floor_divide(iota(A), K).astype(ms.int32)
    # dropped assignments scatter to a scratch row R (sliced off) instead of colliding with kept ones
    target_A = ops.select(keep_A > 0, slot_A, ops.fill(ms.int32, (A,), num_experts * capacity))
    src_R = ops.fill(ms.int32, (num_experts * capacity + 1,), T)
    src_R = ops.tensor_scatter_update(src_R, target_A.reshape(A, 1), token_A)[: num_experts * capacity]
    return (ops.stop_gradient(slot_A), ops.stop_gradient(src_R), ops.stop_gradient(keep_A),
            ops.stop_gradient(onehot_AE.sum(0)))
