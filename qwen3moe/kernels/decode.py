"""Fused decode-step custom ops (kernels/csrc/decode_layer.cc) for the generation engine.

Shapes: B batch, S query tokens (1 when decoding), H hidden, N/K query/kv heads, D head_dim,
T cache slots, E experts, I expert ffn.
`DecodeOps(B, S, H, V)` holds the ops with static output shapes (measured cheaper than shape
callbacks):
- `attn(x_BSH, ln1, wq, wk, wv, q_norm, k_norm, wo, k_BKTD, v_BKTD, cos_BSD, sin_BSD, bias_BST,
  meta_4, fcfg_2)` -> x + self_attn(rms(x)), writing this step's k/v into the two cache
  Parameters **in place** at slots meta[0] .. meta[0] + S - 1 (the kernel receives the
  Parameters' buffers; tests/test_decode_kernel.py checks the cache contents over consecutive
  steps);
- `moe(h_BSH, ln2, router_EH, gate_up_E2IH, down_EHI, meta_4, fcfg_2)` -> h + MoE(rms(h)), with
  meta = (slot, top_k, norm_topk_prob, 0) int32 and fcfg = (rms eps, attention scale) float32;
  `moe_rows(R)` is the same op on R token rows [R, H];
- `layer(*attn_inputs, *moe_inputs_after_h)` -> moe(attn(x)): one op per decoder layer (MindSpore's
  time between two ops is a measurable share of a decode step);
- `head(x_BSH, final_norm, lm_head_VH, fcfg_2)` -> logits [B, V] of the last position;
- `cache_write(k_BKSD, v_BKSD, k_cache, v_cache, meta_4)` -> [1]: copies a prefill's k/v into the
  cache Parameters in place at slots meta[0] .. meta[0] + S - 1 (order it with ops.depend).
Every weight (q/k/v/o, router, gate_up, down, lm_head) is passed as one float32 or bfloat16
tensor or as three (qweight uint8, scales float16, qzeros uint8: the layout of kernels/quant.py)
or four (+ perm int32 [I], [E, I] for gate_up / down: act-order input permutation, see
kernels/quant.py; the op gathers its input by it), the norm weights as float32 or bfloat16; the
kernels dequantize rows in registers (fp32 math).
On a parallel rank (parallel/fused_step.py) the ops return the branch's partial output, which the
caller all-reduces before adding the residual: `attn` with fcfg = (eps, scale, 0, 1) over the
rank's q/kv heads and o_proj columns; `moe` with fcfg = (eps, scale, 0, 1, lo), router [E_all, H]
and gate_up / down holding experts lo .. lo + E - 1 (expert parallel) or every expert's ffn
slice (tensor parallel, lo 0); assignments to experts held elsewhere add nothing.
The composite MindSpore path in generation/engine.py stays the reference and the fallback
(QWEN3MOE_KERNELS=0, no compiler, attention bias).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops

from qwen3moe.kernels.build import kernel_library


def library() -> str | None:
    return kernel_library("decode_layer")


def available() -> bool:
    return library() is not None


class DecodeOps:
    """The step ops for one (B, S, H) step shape and vocabulary V."""

    def __init__(self, batch: int, queries: int, hidden: int, vocab: int) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("decode kernels are not available here (see kernels/build.py)")
        self.lib, self.hidden = lib, hidden
        shape = [batch, queries, hidden]
        self.attn = ops.Custom(f"{lib}:DecodeAttn", out_shape=shape, out_dtype=ms.float32, func_type="aot")
        self.moe = ops.Custom(f"{lib}:DecodeMoe", out_shape=shape, out_dtype=ms.float32, func_type="aot")
        self.layer = ops.Custom(f"{lib}:DecodeLayer", out_shape=shape, out_dtype=ms.float32, func_type="aot")
        self.head = ops.Custom(f"{lib}:DecodeHead", out_shape=[batch, vocab], out_dtype=ms.float32,
                               func_type="aot")
        self.cache_write = ops.Custom(f"{lib}:CacheWrite", out_shape=[1], out_dtype=ms.float32,
                                      func_type="aot")

    def moe_rows(self, rows: int):
        """The MoE op for `rows` token rows [rows, H] (a parallel rank's gathered rows)."""
        return ops.Custom(f"{self.lib}:DecodeMoe", out_shape=[rows, self.hidden], out_dtype=ms.float32,
                          func_type="aot")
