"""Stacked SwiGLU experts held fused as transformers 5.x holds them.

gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I].
Shapes: E experts, I expert ffn, H hidden, NB blocks, b rows per block, R = NB*b rows.
Two compute paths with identical results (tests check both): `blocks` is portable composite
MindSpore (block-padded batched matmul); `fused` is the whole dispatch + experts + combine in
one C++ op (token order in, token order out): kernels/moe.py for fp32 (with a backward), the
forward-only kernels/quant.py op for bf16 storage (its uint16 bits carry no gradient anyway),
which widens one expert's rows at a time instead of the whole stack.
"""
from __future__ import annotations

from mindspore import Tensor, nn, ops

from qwen3moe.layers.dtypes import init_param, widen
from qwen3moe.kernels import moe as moe_kernel
from qwen3moe.kernels import quant as quant_kernel


class Qwen3MoeExperts(nn.Cell):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 init_std: float = 0.02, param_dtype=None) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = init_param((num_experts, 2 * intermediate_size, hidden_size), init_std,
                                       "gate_up_proj", param_dtype, gathered=True)
        self.down_proj = init_param((num_experts, hidden_size, intermediate_size), init_std,
                                    "down_proj", param_dtype, gathered=True)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

    def blocks(self, x_RH: Tensor, expert_NB: Tensor) -> Tensor:
        """Run each block of b rows through its expert: [R, H] -> [R, H]."""
        NB = expert_NB.shape[0]
        R, H = x_RH.shape
        w_gu = widen(ops.gather(self.gate_up_proj, expert_NB, 0), x_RH.dtype)  # [NB, 2I, H]
        w_d = widen(ops.gather(self.down_proj, expert_NB, 0), x_RH.dtype)      # [NB, H, I]
        gu = self.bmm_t(x_RH.reshape(NB, R // NB, H), w_gu)
        I = self.intermediate_size
        h = ops.silu(gu[..., :I]) * gu[..., I:]
        return self.bmm_t(h, w_d).reshape(R, H)

    def fused(self, x_TH: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
        """sum_j w_tj * Expert_{idx_tj}(x_t) by the fused C++ op: [T, H] -> [T, H]."""
        if self.gate_up_proj.dtype != x_TH.dtype:  # bf16 (bits) storage
            return quant_kernel.moe_experts(x_TH, idx_TK, w_TK.astype(x_TH.dtype), (self.gate_up_proj,),
                                            (self.down_proj,))
        return moe_kernel.moe_experts(x_TH, idx_TK, w_TK.astype(x_TH.dtype),
                                      widen(self.gate_up_proj, x_TH.dtype), widen(self.down_proj, x_TH.dtype))
