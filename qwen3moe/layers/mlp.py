"""SwiGLU feed-forward `down(silu(gate(x)) * up(x))` (dense Qwen3 layers). Shapes: T tokens, H hidden, F ffn."""
from __future__ import annotations

from mindspore import Tensor, nn, ops

from qwen3moe.layers.linear import Linear


class Qwen3MoeMLP(nn.Cell):
    def __init__(self, hidden_size: int, intermediate_size: int, init_std: float = 0.02,
                 param_dtype=None, make_linear=Linear) -> None:
        super().__init__()
        self.gate_proj = make_linear(hidden_size, intermediate_size, False, init_std, param_dtype)
        self.up_proj = make_linear(hidden_size, intermediate_size, False, init_std, param_dtype)
        self.down_proj = make_linear(intermediate_size, hidden_size, False, init_std, param_dtype)

    def construct(self, x_TH: Tensor) -> Tensor:
        return self.down_proj(ops.silu(self.gate_proj(x_TH)) * self.up_proj(x_TH))
