"""Forward-only CPU ops over bf16 / int8 / int4 weights (kernels/csrc/quant_ops.cc), fp32 math.

Shapes: T rows (all leading dims of x), I in-features, O out-features, G = I // g groups,
E experts, H hidden, F expert ffn (gate_up [E, 2F, H], down [E, H, F]), K top-k.
A weight is passed as a tuple: `(w,)` for a bfloat16 matrix of the fp32 shape (or its uint16 bit
pattern, as the model holds bf16 weights it gathers from), or
`(qweight, scales, qzeros)` for the quantized layout of docs/quantization.md: qweight uint8
[O, I] (8 bits), [O, I // 2] (4 bits, low nibble = even input index) or [O, 3 I // 4] (6 bits,
one group per row: the low-nibble plane, then the high-2-bit plane; layers/quant.py), scales
float16 [O, G], qzeros uint8 [O, G]; W[o, k] = (u[o, k] - z[o, k // g]) * scales[o, k // g]. Experts carry a
leading E on each tensor. A quantized weight may carry a fourth tensor, `perm` int32 [I] ([E, I]
for experts): its input columns are stored in that order (act-order GPTQ with the columns sorted
by group), y[o] = sum_j W[o, j] * x[perm[j]]; the kernels gather x by perm first (csrc/quant_perm.h).
perm must be a permutation of 0..I-1 (the loader's promise); the kernels fail on an entry outside.
- `linear(x, *weight)` = x @ W^T: streaming dequantized rows (GEMV) for a few rows, dequantized
  row blocks + a register-blocked fp32 micro-kernel for many.
- `moe_experts(x_TH, idx_TK, w_TK, gate_up, down)` (or the six quantized tensors, + bits) = sum_j w_tj SwiGLU_{idx_tj}(x_t) (the fp32
  kernels/moe.py op's forward).
- `act8=True` (both): the opt-in int8-activation arithmetic (docs/quantization.md; csrc/quant_vnni.h
  for few rows, csrc/quant_gemm8.h for many) on every int8 / int4 weight whose shape takes it; bf16
  weights and other shapes keep float32 activations.
No gradients: training stays on fp32 weights. `set_portable(True)` switches to the scalar loops
(tests check both code paths against NumPy).
"""
from __future__ import annotations

import ctypes
import functools

import mindspore as ms
from mindspore import Tensor, ops

from qwen3moe.kernels.build import kernel_library


def library() -> str | None:
    return kernel_library("quant_ops")


def available() -> bool:
    return library() is not None


def set_portable(on: bool) -> None:
    """Run the portable scalar loops instead of the AVX-512 ones (both are tested), in these ops
    and in the fused decode ops (kernels/decode.py), whose library holds its own copy of the flag."""
    from qwen3moe.kernels import decode

    ctypes.CDLL(library()).QuantSetPortable(int(bool(on)))
    if decode.available():
        ctypes.CDLL(decode.library()).DecodeSetPortable(int(bool(on)))


def amx_supported() -> bool:
    """Whether this process can run AMX tiles (csrc/quant_amx.h: the CPU's AMX-INT8, a build on
    such a CPU, and Linux's permission for the tile state)."""
    return bool(ctypes.CDLL(library()).QuantAmxSupported())


def set_amx(on: bool) -> None:
    """The many-row products on AMX tiles (on by default where supported; QWEN3MOE_AMX=0 at load
    turns it off) or on the AVX-512 loops: the int8-activation GEMM (csrc/quant_amx.h, the same
    outputs bit for bit) and the float32-activation one (csrc/quant_amx_bf16.h, the same products
    summed in another order). On without support is an error."""
    if on and not amx_supported():
        raise RuntimeError("set_amx(True): this CPU, build or kernel cannot run AMX tiles (csrc/quant_amx.h)")
    ctypes.CDLL(library()).QuantSetAmx(int(bool(on)))


@functools.lru_cache(maxsize=None)
def _op(name: str, out_shape, out_dtype):
    return ops.Custom(f"{library()}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def _linear_op(name: str):
    return _op(name, lambda x, *w: list(x[:-1]) + [w[0][0]], lambda x, *w: x)


def _moe_op(name: str):
    return _op(name, lambda x, *rest: x, lambda x, *rest: x)


def packed_width(in_features: int, bits: int, what: str = "bits") -> int:
    """Bytes per qweight row holding `in_features` inputs: I (8 bits), 3 I // 4 (6 bits), I // 2 (4 bits);
    another bits is a ValueError naming `what`."""
    if bits not in (4, 6, 8):
        raise ValueError(f"{what}: expected 4, 6 or 8, got {bits}")
    return in_features * bits // 8


def _layouts(in_features: int, groups: int, lead: tuple) -> dict[int, int]:
    """bits -> qweight row bytes of each layout the kernels take for input width I > 0 in G groups a
    row, G dividing I (csrc/quant_common.h parse_weight): 8 bits always; 4 bits with an even group
    size (two inputs a byte, never two groups); 6 bits with one group a row, I % 4 == 0 (four
    inputs in three bytes) and no experts."""
    takes = {8: True, 4: in_features // groups % 2 == 0, 6: groups == 1 and in_features % 4 == 0 and not lead}
    return {b: packed_width(in_features, b) for b in (8, 4, 6) if takes[b]}


def check_weight(name: str, weight: tuple, in_features: int, lead: tuple = ()) -> None:
    """ValueError naming `name` unless `weight` is a bf16 matrix or a (qweight, scales, qzeros[, perm])
    tuple in a layout the kernels take (_layouts) with input width `in_features` (and leading dims `lead`)."""
    dims = ", ".join(map(str, lead + ("O",)))
    if len(weight) == 1:
        (w,) = weight
        if w.dtype not in (ms.bfloat16, ms.uint16) or tuple(w.shape[:-2]) != lead or w.shape[-1] != in_features:
            raise ValueError(f"{name}: expected a bfloat16 [{dims}, {in_features}] weight, got {w.dtype} "
                             f"{tuple(w.shape)}")
        return
    if len(weight) not in (3, 4):
        raise ValueError(f"{name}: expected (weight,) or (qweight, scales, qzeros[, perm]), got {len(weight)} tensors")
    q, s, z = weight[:3]
    G = s.shape[-1] if len(s.shape) else 0
    if not (q.dtype == ms.uint8 and s.dtype == ms.float16 and z.dtype == ms.uint8
            and len(q.shape) == len(lead) + 2 and tuple(q.shape[:-2]) == lead and tuple(s.shape) == tuple(z.shape)
            and tuple(s.shape[:-1]) == tuple(q.shape[:-1]) and in_features > 0 and G > 0 and in_features % G == 0):
        raise ValueError(f"{name}: expected qweight uint8 [{dims}, P], scales float16 [{dims}, G], qzeros uint8 "
                         f"[{dims}, G] with G dividing the input width, {in_features}; got {q.dtype} {tuple(q.shape)}, "
                         f"{s.dtype} {tuple(s.shape)}, {z.dtype} {tuple(z.shape)}")
    widths = _layouts(in_features, G, lead)
    if q.shape[-1] not in widths.values():
        ways = [f"{p} ({b} bits)" for b, p in widths.items()]
        listed = ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])} or {ways[-1]}"
        raise ValueError(f"{name}: expected qweight uint8 [{dims}, P] with P = {listed} for input width "
                         f"{in_features} in {G} groups a row (4 bits: an even group size; 6 bits: G = 1, a width "
                         f"divisible by 4, no experts), got {tuple(q.shape)}")
    if len(weight) == 4 and (weight[3].dtype != ms.int32 or tuple(weight[3].shape) != lead + (in_features,)):
        raise ValueError(f"{name}: expected perm int32 {list(lead + (in_features,))}, got {weight[3].dtype} "
                         f"{tuple(weight[3].shape)}")


def _split(args: tuple) -> tuple:
    """(weight tuple,) or loose tensors with an optional trailing `bits` int -> (tensors, bits)."""
    if len(args) == 1 and isinstance(args[0], tuple):
        return args[0], None
    if args and isinstance(args[-1], int):
        return args[:-1], args[-1]
    return args, None


def _check_bits(name: str, weight: tuple, in_features: int, bits) -> None:
    """A `bits` the caller passed must be the layout check_weight found (the shapes alone tell it)."""
    if bits is None:
        return
    want = packed_width(in_features, bits, f"{name}: bits")  # no try: linear runs under jit too
    if len(weight) == 1 or weight[0].shape[-1] != want:
        raise ValueError(f"{name}: bits={bits} does not match qweight {tuple(weight[0].shape)} for input width "
                         f"{in_features}")


def linear(x: Tensor, *weight, act8: bool = False) -> Tensor:
    """x [..., I] float32 @ W^T -> [..., O] float32; weight = (w,) / (qweight, scales, qzeros[, perm])
    as one tuple or loose tensors, optionally followed by bits (checked against the shapes);
    act8: int8 activations (see the module docstring)."""
    weight, bits = _split(weight)
    check_weight("linear weight", weight, x.shape[-1])
    _check_bits("linear weight", weight, x.shape[-1], bits)
    if act8:
        return _linear_op("QuantLinearFwdA8")(x, *weight)
    return _linear_op("QuantLinearFwd")(x, *weight)


def moe_experts(x_TH: Tensor, idx_TK: Tensor, w_TK: Tensor, *weights, act8: bool = False) -> Tensor:
    """Fused experts forward; idx int32 in [0, E), x and w float32. weights = (gate_up tuple,
    down tuple) (each may carry a perm), or gate_up then down tensors (1 + 1, 3 + 3 or, both with
    a perm, 4 + 4) optionally followed by bits; act8: int8 activations (see the module docstring)."""
    if len(weights) == 2 and isinstance(weights[0], tuple) and isinstance(weights[1], tuple):
        gate_up, down, bits = weights[0], weights[1], None
    else:
        flat, bits = _split(weights)
        if len(flat) not in (2, 6, 8):
            raise ValueError(f"moe_experts: expected gate_up then down as 1 + 1, 3 + 3 or 4 + 4 tensors, got "
                             f"{len(flat)} (pass (gate_up, down) tuples when only one carries a perm)")
        half = len(flat) // 2
        gate_up, down = flat[:half], flat[half:]
    E = gate_up[0].shape[0]
    check_weight("experts gate_up", gate_up, x_TH.shape[-1], (E,))
    F = gate_up[0].shape[1] // 2
    check_weight("experts down", down, F, (E,))
    _check_bits("experts gate_up", gate_up, x_TH.shape[-1], bits)
    _check_bits("experts down", down, F, bits)
    if act8:
        return _moe_op("QuantMoeFwdA8")(x_TH, idx_TK, w_TK, *gate_up, *down)
    return _moe_op("QuantMoeFwd")(x_TH, idx_TK, w_TK, *gate_up, *down)
