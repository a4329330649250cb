"""Weight-only quantization (int8 / int4): the in-memory format, pure NumPy quantize/dequantize,
and the quantized layers with their composite (dequantize-in-graph) forward.

Shapes: O out-features, I in-features (the HF weight is W[O, I]), g group size along I,
G = I // g groups per row, P packed bytes per row (kernels.quant.packed_width: I for 8 bits, I // 2
for 4 bits, 3 I // 4 for 6), E experts, NB blocks, T tokens. Leading dims `...` (e.g. E for stacked
experts) pass through.

In-memory layout (the contract with qwen3moe.kernels.quant):
  qweight uint8 [..., O, P]: 8 bits: the unsigned value u in 0..255; 4 bits: two values per byte
          along I, LOW nibble = even input index k, HIGH nibble = odd k, u in 0..15;
          6 bits (the opt-in lm_head, one group per row, I % 4 == 0): u in 0..63 split in two
          planes, bytes [0, I/2) the low 4 bits of u exactly as 4 bits packs them, then bytes
          [I/2, 3I/4) the high 2 bits: byte I/2 + m holds u[4m + t] >> 4 at bits 2t..2t+1.
  scales  float16 [..., O, G];  qzeros uint8 [..., O, G] (zero point z; symmetric: 128 / 8).
  W[o, k] = (u[o, k] - z[o, k // g]) * float32(scales[o, k // g]).
  perm    optional int32 [..., I] (GPTQ act-order folders, one process): the stored columns are
          the HF columns sorted by group, so groups are contiguous again, and stored column j
          multiplies input perm[j]: y = W_stored @ x[perm] (exact; the kernels gather x).
  g_idx   optional int32 [..., R, I] (act-order folders under a row-parallel split only,
          use_group_map): the group of input k is g_idx[r, k] instead of k // g, for each of R
          row blocks of O // R rows (R = 2 for the fused gate_up stack: gate rows, then up rows).
          Composite path only. A cell holding some input columns of its rows (a tensor-parallel
          rank's) keeps all the rows' G groups (hold_groups): the map's values index them.
Quantizing here is symmetric round-to-nearest: s = max|W_group| / qmax rounded UP to float16
(qmax = 127 / 31 / 7, z = 128 / 32 / 8), u = round(W / s) + z, so |W - dequant| <= s / 2 per element (nothing clipped).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Zero

from qwen3moe.kernels import quant as quant_kernel


def kernel_available() -> bool:
    """True when qwen3moe/kernels/quant.py built here; the quantized layers then route to it."""
    return quant_kernel.available()


def zero_point(bits: int) -> int:
    return 1 << (bits - 1)  # 128 for 8 bits, 32 for 6 bits, 8 for 4 bits


class QuantizationError(ValueError):
    """An unsupported quantization setting, reported in one line naming the key and value."""


GROUP_SIZES = (-1, 32, 64, 128)  # -1: one group per output row (per channel)
ACTIVATIONS = ("float32", "int8")  # activations of quantized products: weight-only (default) or int8 (VNNI)
LM_HEAD_BITS = (8, 6)  # the untied lm_head, per output channel: int8 (default) or the opt-in 6 bits


@dataclass(frozen=True)
class QuantizationConfig:
    """Weight-only quantization of the expert, attention and dense-MLP projections (and the
    untied lm_head in int8 per channel); embeddings, norms and the router stay as loaded.

    bits 8 or 4; group_size along the input dimension, -1 = per output channel; sym False and
    desc_act True only come from GPTQ folders (zero points / act-order group maps read as is).
    activations "int8" (opt-in, docs/quantization.md): the quantized projections' kernels (decode
    steps, prefill and forward) quantize their activations to int8 per 16-input block and take
    integer dot products (AVX512-VNNI). It needs the C++ kernels.
    lm_head_bits 8 (default) or 6 (opt-in, docs/quantization.md): the untied lm_head per output
    channel in int8 or in 6 bits (llama.cpp's Q6_K output tensor's width, 25% fewer bytes read
    per decode step); a tied lm_head reads the float embedding, so 6 there is refused (the model)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    activations: str = "float32"
    lm_head_bits: int = 8

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"quantization bits must be 4 or 8, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise QuantizationError(f"quantization group_size must be one of {GROUP_SIZES} "
                                    f"(-1 = per output channel), got {self.group_size!r}")
        if self.activations not in ACTIVATIONS:
            raise QuantizationError(f"quantization activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.lm_head_bits not in LM_HEAD_BITS or isinstance(self.lm_head_bits, bool):
            raise QuantizationError(f"quantization lm_head_bits must be one of {LM_HEAD_BITS}, got {self.lm_head_bits!r}")

    @classmethod
    def from_name(cls, name: str, group_size: int | None = None, activations: str = "float32",
                  lm_head_bits: int = 8) -> "QuantizationConfig":
        """"int8" (per channel unless group_size is given) or "int4" (group_size default 128)."""
        if name == "int8":
            return cls(8, -1 if group_size is None else group_size, activations=activations, lm_head_bits=lm_head_bits)
        if name == "int4":
            return cls(4, 128 if group_size is None else group_size, activations=activations, lm_head_bits=lm_head_bits)
        raise QuantizationError(f"quantization must be 'int8' or 'int4', got {name!r}")

    @classmethod
    def of(cls, quantization, group_size: int | None = None, lm_head_bits: int | None = None,
           activations: str | None = None) -> "QuantizationConfig | None":
        """None, a name ("int8"/"int4") or a QuantizationConfig -> QuantizationConfig or None
        (lm_head_bits / activations None: the config's own, 8 / "float32" for a name)."""
        if quantization is None or isinstance(quantization, cls):
            for key, value in (("group_size", group_size), ("lm_head_bits", lm_head_bits),
                               ("activations", activations)):
                if value is not None and quantization is not None:
                    raise QuantizationError(f"{key} is set both in the QuantizationConfig and as an argument")
            return quantization
        return cls.from_name(str(quantization), group_size, activations or "float32",
                             8 if lm_head_bits is None else lm_head_bits)

    @property
    def int8_activations(self) -> bool:
        return self.activations == "int8"

    def check_runnable(self) -> None:
        """activations='int8' exists only in the C++ kernels (fused decode, quantized forward ops):
        refuse it where they are not built."""
        from qwen3moe.kernels import decode as decode_kernel

        if self.int8_activations and not (decode_kernel.available() and kernel_available()):
            raise QuantizationError("quantization activations='int8' needs the fused decode kernels, which are not "
                                    "available here (QWEN3MOE_KERNELS=0, or no C++ compiler)")

    def group_for(self, in_features: int, what: str = "weight") -> int:
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise QuantizationError(f"quantization group_size {g} does not divide the input dimension "
                                    f"{in_features} of {what}")
        return g

    def make_linear(self, in_features: int, out_features: int, bias: bool = False, init_std=None,
                    param_dtype=None) -> "QuantizedLinear":
        """Drop-in for layers.linear.Linear(in, out, bias, init_std, param_dtype)."""
        if bias:
            raise QuantizationError("attention_bias: true cannot be quantized (the quantized linear has no bias)")
        return QuantizedLinear(in_features, out_features, self.bits,
                               self.group_for(in_features, f"a [{out_features}, {in_features}] projection"),
                               self.desc_act, self.int8_activations)


# ---- pure NumPy format ----------------------------------------------------------------------
def quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [..., O, I] float -> (qweight uint8 [..., O, P], scales f16 [..., O, G], qzeros u8 [..., O, G])."""
    u, scales, qzeros = quantize_codes(w, bits, group_size)
    return pack(u, bits), scales, qzeros


def quantize_codes(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [..., O, I] -> (unsigned values u uint8 [..., O, I], scales, qzeros), unpacked."""
    *lead, O, I = w.shape
    g = group_size
    G = I // g
    qmax = (1 << (bits - 1)) - 1
    w_g = np.asarray(w, np.float32).reshape(*lead, O, G, g)
    scales = fp16_ceil(_absmax_last(w_g) / np.float32(qmax))
    s = scales.astype(np.float32)[..., None]
    q = np.divide(w_g, np.where(s == 0, np.float32(1), s))
    np.rint(q, out=q)  # |q| <= qmax: the scale was rounded up, so no clipping is needed
    q += np.float32(zero_point(bits))
    u = q.astype(np.uint8).reshape(*lead, O, I)
    return u, scales, np.full(scales.shape, zero_point(bits), np.uint8)


def _absmax_last(x: np.ndarray) -> np.ndarray:
    """max |x| over the last axis. A short axis (a group of <= 256) is halved with elementwise
    maxima: exact (max does not round) and several times faster than numpy's reduction over a
    short inner axis; a long one (per-channel rows) is reduced by numpy, faster there."""
    a = np.abs(x)
    if a.shape[-1] > 256:
        return a.max(-1)
    while a.shape[-1] % 2 == 0 and a.shape[-1] > 1:
        h = a.shape[-1] // 2
        a = np.maximum(a[..., :h], a[..., h:])
    return a.max(-1)


def fp16_ceil(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= x (x >= 0, finite in fp16): a scale rounded up keeps every |W| / s
    <= qmax, so nothing is clipped even where fp16 is coarse (subnormal scales of tiny groups)."""
    x = np.asarray(x, np.float32)
    if (x > 65504).any():
        raise ValueError(f"a weight group's max |W| {float(x.max()):.4g} x qmax overflows a float16 scale")
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)


def pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values u [..., O, I] -> qweight [..., O, P]."""
    if bits == 8:
        return np.ascontiguousarray(u, np.uint8)
    lo = (u[..., 0::2] & 15) | ((u[..., 1::2] & 15) << 4)
    if bits == 4:
        return lo.astype(np.uint8)
    c = u >> 4  # 6 bits: the high 2 bits, four inputs per byte
    hi = c[..., 0::4] | (c[..., 1::4] << 2) | (c[..., 2::4] << 4) | (c[..., 3::4] << 6)
    return np.concatenate([lo, hi], -1).astype(np.uint8)


def unpack(qweight: np.ndarray, bits: int) -> np.ndarray:
    """qweight [..., O, P] -> unsigned values u [..., O, I] (uint8)."""
    if bits == 8:
        return qweight
    I = qweight.shape[-1] * 8 // bits  # quant_kernel.packed_width inverted
    P4 = quant_kernel.packed_width(I, 4)  # 6 bits: the low plane is the 4-bit packing
    out = np.empty((*qweight.shape[:-1], I), np.uint8)
    lo = qweight[..., :P4]
    out[..., 0::2], out[..., 1::2] = lo & 15, lo >> 4
    if bits == 6:
        hi = qweight[..., P4:]
        for t in range(4):
            out[..., t::4] |= ((hi >> (2 * t)) & 3) << 4
    return out


def dequantize(qweight: np.ndarray, scales: np.ndarray, qzeros: np.ndarray, bits: int,
               g_idx: np.ndarray | None = None, perm: np.ndarray | None = None) -> np.ndarray:
    """The format's dequantization: float32 W [..., O, I] (with `perm`: in the HF column order,
    column perm[j] = stored column j)."""
    if perm is not None:
        w = dequantize(qweight, scales, qzeros, bits)
        out = np.empty_like(w)
        np.put_along_axis(out, np.broadcast_to(np.asarray(perm)[..., None, :], w.shape), w, -1)
        return out
    u = unpack(qweight, bits).astype(np.float32)
    *lead, O, I = u.shape
    G = scales.shape[-1]
    if g_idx is None:
        g_idx = np.repeat(np.arange(G), I // G)[None]
    R = g_idx.shape[-2]
    gi = np.broadcast_to(g_idx[..., :, None, :], (*lead, R, O // R, I)).reshape(*lead, O, I)
    z = np.take_along_axis(qzeros.astype(np.float32), gi, -1)
    s = np.take_along_axis(scales.astype(np.float32), gi, -1)
    return (u - z) * s


# ---- MindSpore composite dequantization (exactly the NumPy formula) -------------------------
def dequant_graph(qweight: Tensor, scales: Tensor, qzeros: Tensor, bits: int, g_idx=None) -> Tensor:
    """In-graph dequantization with CPU-supported uint8 ops: float32 W [..., O, I]."""
    if bits == 8:
        u = qweight.astype(ms.float32)
    else:
        u = _unpack_graph(qweight, bits)
    lead, O, I = u.shape[:-2], u.shape[-2], u.shape[-1]
    G = scales.shape[-1]
    z, s = qzeros.astype(ms.float32), scales.astype(ms.float32)
    if g_idx is None:
        w = (u.reshape(lead + (O, G, I // G)) - z.expand_dims(-1)) * s.expand_dims(-1)
        return w.reshape(lead + (O, I))
    R = g_idx.shape[-2]
    gi = ops.broadcast_to(g_idx.expand_dims(-2), lead + (R, O // R, I)).reshape(lead + (O, I))
    return (u - ops.gather_elements(z, -1, gi)) * ops.gather_elements(s, -1, gi)


def _unpack_graph(qweight: Tensor, bits: int) -> Tensor:
    """4 / 6-bit qweight [..., O, P] -> u float32 [..., O, I] (unpack's layout, uint8 ops)."""
    P4 = quant_kernel.packed_width(qweight.shape[-1] * 8 // bits, 4)  # 6 bits: the low plane is the 4-bit packing
    lo = qweight if bits == 4 else qweight[..., :P4]
    u = ops.stack([ops.bitwise_and(lo, 15), ops.floor_div(lo, 16)], -1).astype(ms.float32)
    u = u.reshape(u.shape[:-2] + (u.shape[-2] * 2,))
    if bits == 4:
        return u
    hi = qweight[..., P4:]
    c = ops.stack([ops.bitwise_and(ops.floor_div(hi, 1 << (2 * t)), 3) for t in range(4)], -1).astype(ms.float32)
    return u + c.reshape(u.shape) * 16


# ---- layers ---------------------------------------------------------------------------------
def _zeros(shape: tuple, dtype, name: str) -> Parameter:
    """Lazily initialised zeros: no memory until the loader's set_data (or first use), so
    building a quantized model never holds its weights twice."""
    return Parameter(Tensor(shape=shape, dtype=dtype, init=Zero()), name=name, requires_grad=False)


class QuantizedWeight(nn.Cell):
    """One quantized weight [..., O, I] (GPTQ tensor names qweight / scales / qzeros, and the
    act-order input order perm, or its group map g_idx after use_group_map)."""

    def __init__(self, lead: tuple, out_features: int, in_features: int, bits: int, group_size: int,
                 act_order: bool = False, row_blocks: int = 1) -> None:
        super().__init__()
        if bits not in (4, 6, 8):
            raise ValueError(f"quantization bits must be 4, 6 or 8, got {bits}")
        if group_size <= 0 or in_features % group_size or (bits == 4 and in_features % 2):
            raise ValueError(f"group_size {group_size} does not divide the input dimension {in_features}")
        if bits == 6 and (group_size != in_features or in_features % 4 or act_order):
            raise ValueError(f"6 bits is one group per row of an input dimension divisible by 4, got group_size "
                             f"{group_size} of {in_features}")
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = out_features, in_features
        self.row_blocks = row_blocks  # blocks of rows with a group map each (2: the gate_up stack)
        shape, G = (*lead, out_features), in_features // group_size
        self.qweight = _zeros((*shape, quant_kernel.packed_width(in_features, bits)), ms.uint8, "qweight")
        self.scales = _zeros((*shape, G), ms.float16, "scales")
        self.qzeros = _zeros((*shape, G), ms.uint8, "qzeros")
        self.perm = _zeros((*lead, in_features), ms.int32, "perm") if act_order else None
        self.g_idx = None

    def use_group_map(self) -> None:
        """Hold act-order weights as stored (columns in HF order, the group map g_idx per row
        block) instead of sorted with perm: a tensor-parallel rank splitting the input columns
        needs them so. Composite path only. Before loading: the Parameters are replaced."""
        if self.perm is None:
            raise ValueError("use_group_map: only an act-order cell has a group map")
        lead = tuple(self.qweight.shape[:-2])
        self.perm = None
        self.g_idx = _zeros((*lead, self.row_blocks, self.in_features), ms.int32, "g_idx")

    def kernel_tensors(self) -> tuple:
        """The weight as the C++ kernels take it (kernels/quant.py): (qweight, scales, qzeros[, perm])."""
        if self.perm is None:
            return (self.qweight, self.scales, self.qzeros)
        return (self.qweight, self.scales, self.qzeros, self.perm)

    def hold_groups(self, groups: int) -> None:
        """Scales / zeros of `groups` groups per row instead of in_features // group_size: an
        act-order cell holding some input columns of its rows (a tensor-parallel rank's), whose
        g_idx may name any group of the whole row. Before loading: the Parameters are replaced."""
        if self.g_idx is None:
            raise ValueError("hold_groups: only an act-order cell (with a g_idx map) indexes groups beyond its columns")
        shape = (*self.qweight.shape[:-1], groups)
        self.scales = _zeros(shape, ms.float16, "scales")
        self.qzeros = _zeros(shape, ms.uint8, "qzeros")

    def dequant(self) -> Tensor:
        """float32 W [..., O, I] in the stored column order (a perm cell's inputs: permute_inputs)."""
        return dequant_graph(self.qweight, self.scales, self.qzeros, self.bits, self.g_idx)

    def dequant_rows(self, idx_N: Tensor) -> Tensor:
        """Stacked weights [E, O, I]: dequantize only the entries idx_N -> [N, O, I] float32."""
        g_idx = None if self.g_idx is None else ops.gather(self.g_idx, idx_N, 0)
        return dequant_graph(ops.gather(self.qweight, idx_N, 0), ops.gather(self.scales, idx_N, 0),
                             ops.gather(self.qzeros, idx_N, 0), self.bits, g_idx)

    def permute_inputs(self, x_NBI: Tensor, idx_N: Tensor | None = None) -> Tensor:
        """x in the stored column order: x[..., perm] (stacked weights: entry idx_N[n]'s perm for
        x[n]); unchanged without a perm."""
        if self.perm is None:
            return x_NBI
        if idx_N is None:
            return ops.gather(x_NBI, self.perm, x_NBI.ndim - 1)
        p_NBI = ops.broadcast_to(ops.gather(self.perm, idx_N, 0).expand_dims(1), x_NBI.shape)
        return ops.gather_elements(x_NBI, 2, p_NBI)


class QuantizedLinear(QuantizedWeight):
    """Bias-free y = x @ W^T with W quantized: `kernels.quant.linear` when built, else dequantize
    the weight in the graph and run MatMul (QWEN3MOE_KERNELS=0: always). act8: the opt-in
    int8-activation kernels (QuantizationConfig.check_runnable refuses it without them)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 act_order: bool = False, act8: bool = False) -> None:
        super().__init__((), out_features, in_features, bits, group_size, act_order)
        self.bias = None  # attention_bias models are refused by the quantized build
        self.matmul = ops.MatMul(transpose_b=True)
        self.use_kernel = kernel_available()
        self.act8 = act8

    def use_group_map(self) -> None:
        super().use_group_map()
        self.use_kernel = False  # the kernels read contiguous groups only

    def construct(self, x_TI: Tensor) -> Tensor:
        if self.use_kernel:
            return quant_kernel.linear(x_TI, self.kernel_tensors(), act8=self.act8)
        return self.matmul(self.permute_inputs(x_TI), self.dequant())


class QuantizedExperts(nn.Cell):
    """Stacked SwiGLU experts with quantized gate_up [E, 2I, H] and down [E, H, I] (same entry
    points as layers/experts.Qwen3MoeExperts: `blocks` composite, `fused` kernel)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int,
                 group_size_h: int, group_size_i: int, act_order: bool = False, act8: bool = False) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        E, H, I = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = QuantizedWeight((E,), 2 * I, H, bits, group_size_h, act_order, row_blocks=2)
        self.down_proj = QuantizedWeight((E,), H, I, bits, group_size_i, act_order)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.use_kernel = kernel_available()
        self.act8 = act8  # the opt-in int8-activation kernels

    def use_group_map(self) -> None:
        """Both stacks as stored with their group maps (QuantizedWeight.use_group_map): composite
        only, so the owning MoE block must take its `blocks` path."""
        self.gate_up_proj.use_group_map()
        self.down_proj.use_group_map()
        self.use_kernel = False

    def blocks(self, x_RH: Tensor, expert_NB: Tensor) -> Tensor:
        """Each block of b rows through its expert, dequantizing only the blocks' experts."""
        NB = expert_NB.shape[0]
        R, H = x_RH.shape
        x_NBH = self.gate_up_proj.permute_inputs(x_RH.reshape(NB, R // NB, H), expert_NB)
        gu = self.bmm_t(x_NBH, self.gate_up_proj.dequant_rows(expert_NB))
        I = self.intermediate_size
        h = self.down_proj.permute_inputs(ops.silu(gu[..., :I]) * gu[..., I:], expert_NB)
        return self.bmm_t(h, self.down_proj.dequant_rows(expert_NB)).reshape(R, H)

    def fused(self, x_TH: Tensor, idx_TK: Tensor, w_TK: Tensor) -> Tensor:
        return quant_kernel.moe_experts(x_TH, idx_TK, w_TK.astype(x_TH.dtype), self.gate_up_proj.kernel_tensors(),
                                        self.down_proj.kernel_tensors(), act8=self.act8)


def use_group_maps(model: nn.Cell) -> None:
    """Every act-order cell of `model` as stored with its group maps (use_group_map): the
    composite path. A row-parallel rank needs it (a row split cuts the sorted groups), and a
    folder whose maps cannot be sorted (io/act_order.sort_by_group). Before loading."""
    for _, cell in model.cells_and_names():
        experts = getattr(cell, "experts", None)
        if isinstance(experts, QuantizedExperts) and experts.gate_up_proj.perm is not None:
            experts.use_group_map()
            cell.use_kernel = False  # the MoE block's fused op reads contiguous groups only
        elif isinstance(cell, QuantizedLinear) and cell.perm is not None:
            cell.use_group_map()
    for name, p in model.parameters_and_names():
        p.name = name  # a Parameter set on an attached cell keeps its bare name ("g_idx")
