"""GPTQ-format folders: read (ours and third-party) into the in-memory layout of layers/quant.py,
and write them from a float HF folder (`qwen3moe quantize`), streaming tensor by tensor.

Shapes: O out-features, I in-features, G groups, b bits, F = 32 // b values per int32.
On disk, per projection `<prefix>.{qweight,scales,qzeros,g_idx}` (prefix e.g.
`model.layers.3.mlp.experts.7.gate_proj`), as AutoGPTQ / GPTQModel / transformers write them:
  qweight int32 [I // F, O]: input k of column o is bits (k % F) * b .. +b of row k // F;
  scales  float16 [G, O];  g_idx int32 [I] (group of input k; k // g unless act-order);
  qzeros  int32 [G, O // F]: zero point of (group, column o) at bits (o % F) * b of column o // F.
  W[o, k] = (u[k, o] - z[g_idx[k], o]) * scales[g_idx[k], o].
Zero-point convention: `checkpoint_format` "gptq" (v1; the default when absent, what AutoGPTQ,
transformers/optimum and Qwen's GPTQ-Int4 release use) stores z - 1 (sym 4-bit: 0x77777777 for
z = 8), read back as (stored + 1) mod 2^b like AutoGPTQ's reference dequantization;
"gptq_v2" (GPTQModel's internal format) stores z. We write v1 and read both.
AWQ folders load through the same loader (GptqSpec.format "awq"; their packing: io/awq.py).
Only the quantized projections use this layout; embeddings, norms, router and lm_head stay float
tensors (the lm_head is quantized per channel when loading, int8 or 6 bits: docs/quantization.md).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from qwen3moe.io.act_order import UnsortableMap, sort_by_group
from qwen3moe.io.safetensors_io import CheckpointError
from qwen3moe.layers.quant import GROUP_SIZES, QuantizationConfig, use_group_maps

QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


@dataclass(frozen=True)
class GptqSpec:
    config: QuantizationConfig
    zero_minus_one: bool  # v1 ("gptq"): qzeros hold z - 1
    format: str = "gptq"  # "gptq" | "awq" (io/awq.py): how the projections' tensors are packed

    @property
    def label(self) -> str:
        return f"{self.config.bits}-bit {self.format.upper()}"

    @property
    def keys(self) -> tuple[str, ...]:
        """The tensor suffixes of one quantized projection."""
        from qwen3moe.io.awq import AWQ_KEYS

        return AWQ_KEYS if self.format == "awq" else QUANT_KEYS


# ---- config ---------------------------------------------------------------------------------
def gptq_config(config, directory: str) -> GptqSpec | None:
    """The folder's quantization_config (config.json, or an old quantize_config.json), checked."""
    qc = config.extra.get("quantization_config")
    where = os.path.join(directory, "config.json")
    side = os.path.join(directory, "quantize_config.json")
    if qc is None and os.path.isfile(side):
        with open(side, encoding="utf-8") as fh:
            qc, where = json.load(fh), side
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method", "gptq")
    if method == "fp8":
        return None  # block-scaled FP8 weights: a float folder to CheckpointSource (io/fp8.py)
    if method == "awq":
        from qwen3moe.io.awq import awq_config

        return GptqSpec(awq_config(qc, where, config), False, "awq")
    if method != "gptq":
        raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                              f"(only 'gptq', 'awq' and 'fp8')")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: quantization_config.checkpoint_format {fmt!r} is not supported "
                              f"('gptq' or 'gptq_v2')")
    bits, g = qc.get("bits"), qc.get("group_size", -1)
    if bits not in (4, 8):
        raise CheckpointError(f"{where}: quantization_config.bits {bits!r} is not supported (4 or 8)")
    if g not in GROUP_SIZES:
        raise CheckpointError(f"{where}: quantization_config.group_size {g!r} is not supported "
                              f"(one of {GROUP_SIZES})")
    for key in ("sym", "desc_act"):
        if not isinstance(qc.get(key, key == "sym"), bool):
            raise CheckpointError(f"{where}: quantization_config.{key} must be true or false, got {qc[key]!r}")
    if qc.get("lm_head", False):
        raise CheckpointError(f"{where}: quantization_config.lm_head true (a quantized lm_head) is not "
                              f"supported; the lm_head must be a float tensor")
    return GptqSpec(QuantizationConfig(bits, g, bool(qc.get("sym", True)), bool(qc.get("desc_act", False))),
                    fmt == "gptq")


def quantization_config_json(qc: QuantizationConfig) -> dict:
    """What we write into config.json (AutoGPTQ / transformers keys; v1 zero points)."""
    return {"quant_method": "gptq", "bits": qc.bits, "group_size": qc.group_size, "sym": True,
            "desc_act": False, "checkpoint_format": "gptq", "lm_head": False}


# ---- GPTQ tensors <-> in-memory layout ------------------------------------------------------
def _shifts(bits: int) -> np.ndarray:
    return (np.arange(32 // bits, dtype=np.uint32) * bits)


def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> unsigned values, the F values of each word laid out along `axis` (0 or 1)."""
    w = np.ascontiguousarray(packed, np.int32).view(np.uint32)  # the words' bits
    mask = np.uint32((1 << bits) - 1)
    if axis == 0:  # [R, C] -> [R * F, C]
        v = (w[:, None, :] >> _shifts(bits)[None, :, None]) & mask
        return v.reshape(-1, w.shape[1]).astype(np.uint8 if bits <= 8 else np.uint32)
    v = (w[:, :, None] >> _shifts(bits)[None, None, :]) & mask  # [R, C] -> [R, C * F]
    return v.reshape(w.shape[0], -1)


def pack_int32(u: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned values -> int32 words packing F consecutive values along `axis` (0 or 1)."""
    if axis == 0:
        return np.ascontiguousarray(_pack_rows(np.ascontiguousarray(u.T), bits).T).view(np.int32)
    return _pack_rows(u, bits).view(np.int32)


_NIBBLE_MASKS = ((4, 0x00FF00FF00FF00FF), (8, 0x0000FFFF0000FFFF), (16, 0x00000000FFFFFFFF))


def _pack_rows(u: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] values < 2^bits -> uint32 [R, C // F], value c at bits (c % F) * b of word c // F.
    Works on the bytes: 8 bits is a little-endian view of 4 bytes; 4 bits views 8 one-value
    bytes as a uint64 and folds the nibbles together (bytes 2j, 2j+1 -> byte j) in 3 steps."""
    b = np.ascontiguousarray(u, np.uint8)
    if bits == 8:
        return b.view("<u4").astype(np.uint32)
    x = b.view("<u8")
    for shift, mask in _NIBBLE_MASKS:
        x = (x | (x >> np.uint64(shift))) & np.uint64(mask)
    return x.astype(np.uint32)


def to_gptq(u: np.ndarray, scales: np.ndarray, qzeros: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """Unpacked values u [O, I] u8, scales [O, G] f16, qzeros [O, G] u8 -> v1 GPTQ tensors."""
    O, I = u.shape
    G = scales.shape[1]
    return {"qweight": pack_int32(u.T, bits, 0),
            "scales": np.ascontiguousarray(scales.T, np.float16),
            "qzeros": pack_int32((qzeros.astype(np.int32) - 1).T & ((1 << bits) - 1), bits, 1),
            "g_idx": np.repeat(np.arange(G, dtype=np.int32), I // G)}


def read_gptq(src, prefix: str, out_features: int, in_features: int, spec: GptqSpec):
    """One projection's GPTQ tensors -> (qweight [O, P] u8, scales [O, G] f16, qzeros [O, G] u8,
    g_idx [I] int32 or None when it is the plain k // g)."""
    bits = spec.config.bits
    O, I, F = out_features, in_features, 32 // bits
    g = I if spec.config.group_size == -1 else spec.config.group_size
    if I % g:
        raise CheckpointError(f"{src.directory}: quantization_config.group_size {g} does not divide the "
                              f"input dimension {I} of {prefix}")
    G = I // g
    for key in ("qweight", "scales", "qzeros"):
        if f"{prefix}.{key}" not in src.where:
            raise CheckpointError(f"{src.directory}: missing tensor {prefix}.{key!s} "
                                  f"(GPTQ {bits}-bit folder)")
    want = {"qweight": ([I // F, O], "I32"), "scales": ([G, O], "F16"), "qzeros": ([G, O // F], "I32"),
            "g_idx": ([I], "I32")}
    arrays = {}
    for key, (shape, tag) in want.items():
        name = f"{prefix}.{key}"
        if name not in src.where:
            continue  # g_idx may be absent: plain groups
        st = src.where[name]
        if list(st.shape(name)) != shape or st.dtype(name) != tag:
            raise CheckpointError(f"{st.path}: tensor {name!r} is {st.dtype(name)} {list(st.shape(name))}, "
                                  f"expected {tag} {shape}")
        arrays[key] = src.read(name)
    # qweight [I // F, O] -> [O, I // F] words; a word's little-endian bytes hold its values
    # low bits first (k even in the low nibble): exactly the in-memory packing, so no unpacking
    packed = np.ascontiguousarray(arrays["qweight"].astype("<u4", copy=False).T).view(np.uint8)
    z = unpack_int32(arrays["qzeros"], bits, 1).astype(np.int32)  # [G, O]
    if spec.zero_minus_one:  # v1: z - 1 stored modulo 2^b (a zero point of 0 is stored as 2^b - 1)
        z = (z + 1) & ((1 << bits) - 1)
    g_idx = arrays.get("g_idx")
    if g_idx is not None:
        if g_idx.min() < 0 or g_idx.max() >= G:
            raise CheckpointError(f"{src.directory}: {prefix}.g_idx has groups outside [0, {G})")
        if np.array_equal(g_idx, np.arange(I) // g):
            g_idx = None
    return (packed, np.ascontiguousarray(arrays["scales"].T, np.float16),
            np.ascontiguousarray(z.T, np.uint8), None if g_idx is None else g_idx.astype(np.int32))


def load_gptq(cls, directory: str, config, spec: GptqSpec, param_dtype):
    """A GPTQ folder into a quantized model, packed tensors read as stored (no re-quantizing);
    the float lm_head is quantized per channel on the way in (int8, or spec.config.lm_head_bits)."""
    from qwen3moe.io.hf_checkpoint import CheckpointSource, check_unexpected
    from qwen3moe.io.quantized import load_plain, quantize_cell, quantized_cells
    from qwen3moe.layers.dtypes import skip_init

    src = CheckpointSource(directory)
    check_float_modules(src)
    with skip_init():
        model = cls(config, param_dtype=param_dtype, quantization=spec.config)
    cells = quantized_cells(model)
    owned = {id(p) for c in cells.values() for p in c.get_parameters()}
    # the float tensors first: the embedding's read transient comes before the quantized
    # weights are resident, not on top of them (the peak RSS of a 30B-class reload)
    used = set(load_plain(src, model, owned, config))
    if "lm_head.weight" in cells:  # first, too
        used.update(quantize_cell(src, "lm_head.weight", cells.pop("lm_head.weight"), config.num_experts))
    try:
        used.update(_fill_projections(src, cells, spec, config.num_experts))
    except UnsortableMap:  # not GPTQ's own act-order maps: read them as stored (composite path)
        use_group_maps(model)
        used.update(_fill_projections(src, cells, spec, config.num_experts))
    check_unexpected(src, used & set(src.where), config)
    model.source_dir = directory
    return model


def _fill_projections(src, cells: dict, spec: GptqSpec, num_experts: int) -> set[str]:
    """Every quantized cell but the lm_head from the folder's projections; returns the names read."""
    used = set()
    for name, cell in cells.items():
        m = _FUSED.match(name)
        prefixes = ([f"{m.group(1)}.{j}.{p}" for j in range(num_experts)
                     for p in (("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",))]
                    if m else [name[:-len(".weight")]])
        fill_from_gptq(src, cell, prefixes, spec)
        used.update(f"{p}.{k}" for p in prefixes for k in spec.keys)
    return used


def read_projection(src, prefix: str, out_features: int, in_features: int, spec: GptqSpec):
    """read_gptq, and an act-order g_idx refused unless the folder declares desc_act (the model
    then holds no group map for it)."""
    if spec.format == "awq":
        from qwen3moe.io.awq import read_awq

        return read_awq(src, prefix, out_features, in_features, spec)
    q, s, z, g_idx = read_gptq(src, prefix, out_features, in_features, spec)
    if g_idx is not None and not spec.config.desc_act:
        raise CheckpointError(f"{src.directory}: {prefix}.g_idx is act-order (not k // group_size) "
                              f"but quantization_config.desc_act is false")
    return q, s, z, g_idx


def gptq_keys(float_keys: set[str], keys: tuple[str, ...] = QUANT_KEYS) -> set[str]:
    """The GPTQ (AWQ: keys=GptqSpec.keys) tensor names standing for a float model's quantized
    projections (`<prefix>.qweight` etc. for each projection `<prefix>.weight`): what a GPTQ
    folder's loaders read."""
    return {f"{k[:-len('.weight')]}.{q}" for k in float_keys if _EXPERT.match(k) or _LINEAR.match(k)
            for q in keys}


_PACKED = re.compile(r"^(.*)\.(qweight|qzeros)$")


def check_float_modules(src) -> None:
    """A packed tensor of a module the model keeps float (the router mlp.gate, lm_head, embeddings):
    one line naming it, before the loaders miss its float weight."""
    for name in src.where:
        m = _PACKED.match(name)
        if m and not (_EXPERT.match(m.group(1) + ".weight") or _LINEAR.match(m.group(1) + ".weight")):
            raise CheckpointError(f"{src.directory}: quantized tensor {name!r}: only the attention, expert and "
                                  f"dense-MLP projections may be quantized ({m.group(1)} must be a float weight)")


def fill_from_gptq(src, cell, prefixes: list[str], spec: GptqSpec, full: tuple | None = None, split=None) -> None:
    """Fill a quantized cell from the folder's projections `prefixes` (an expert stack: each
    expert's projections in order). `full`: (rows, inputs) of each stored projection (default:
    the cell's own); `split`: maps each projection read (qweight, scales, qzeros, g_idx) to the
    part the cell keeps (a tensor-parallel rank's: parallel/quantized.fill_gptq_shard). An
    act-order cell with a perm gets each projection's columns sorted by group (sort_by_group)."""
    from qwen3moe.io.quantized import empty_arrays, fill_cell

    lead = tuple(cell.qweight.shape[:-2])
    per = len(prefixes) // (lead[0] if lead else 1)
    rows = cell.out_features // per
    full = full or (rows, cell.in_features)
    q, s, z = empty_arrays(cell)
    gi = None if cell.g_idx is None else np.empty(tuple(cell.g_idx.shape), np.int32)
    perm = None if cell.perm is None else np.empty(tuple(cell.perm.shape), np.int32)
    for i, prefix in enumerate(prefixes):
        j, r = divmod(i, per)
        at = (j, slice(r * rows, (r + 1) * rows)) if lead else (slice(r * rows, (r + 1) * rows),)
        part = read_projection(src, prefix, *full, spec)
        if gi is not None and part[3] is None:  # plain groups in an act-order folder: the map k // g
            part = (*part[:3], np.arange(full[1], dtype=np.int32) // spec.config.group_for(full[1]))
        if perm is not None:
            packed, p = sort_by_group(part[0], part[3], cell.bits, cell.group_size, f"{src.directory}: {prefix}")
            if r and not np.array_equal(p, perm[j] if lead else perm):
                raise UnsortableMap(f"{src.directory}: {prefix}.g_idx differs from {prefixes[i - r]}.g_idx, and the "
                                    f"fused gate/up stack has one input order")
            part = (packed, *part[1:])
            perm[j if lead else slice(None)] = p
        q[at], s[at], z[at], g_idx = part if split is None else split(part)
        if gi is not None:
            gi[(j, r) if lead else (r,)] = g_idx
    fill_cell(cell, q, s, z, gi, perm)


# ---- writing: float HF folder -> GPTQ folder, streaming -------------------------------------
WORKERS = 1  # a thread quantizing ahead of the writer: overlaps the math with the write syscalls
AHEAD = 6    # source tensors in flight: bounds the RAM to a few tensors' transients


def quantize_folder(src_dir: str, out_dir: str, qc: QuantizationConfig, max_shard_size: int | str = "5GB",
                    source=None) -> dict:
    """Quantize every expert / attention / dense-MLP projection of a float HF folder into a GPTQ
    folder (v1 zero points); other tensors (embeddings, norms, router, lm_head) are copied as
    stored. Source tensors are read and quantized in order by WORKERS threads, at most AHEAD
    ahead of the writer; the folder appears only when complete. `source`: a CheckpointSource
    of src_dir to read from instead of opening one (bench/big.py passes one that waits for
    shards still being written). Returns {"tensors": n, "quantized": n_projections, "bytes": data bytes}."""
    from qwen3moe.io.atomic import atomic_directory
    from qwen3moe.io.hf_checkpoint import CheckpointSource, parse_size
    from qwen3moe.models.config import Qwen3MoeConfig

    config = Qwen3MoeConfig.from_pretrained(src_dir)
    if gptq_config(config, src_dir) is not None:
        raise CheckpointError(f"{src_dir}: already quantized (config.json has a quantization_config)")
    src = CheckpointSource(src_dir) if source is None else source
    plan = _plan(src, qc, config)
    shards = _shard(plan, parse_size(max_shard_size))
    with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as fh:
        raw_config = json.load(fh)
    raw_config["quantization_config"] = quantization_config_json(qc)
    with atomic_directory(out_dir) as tmp:
        total = _write_shards(tmp, shards, _computed(plan))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(raw_config, fh, indent=2)
        _copy_side_files(src_dir, tmp)
    return {"tensors": len(plan), "quantized": sum(e[0].endswith(".qweight") for e in plan), "bytes": total}


def _plan(src, qc: QuantizationConfig, config) -> list[tuple]:
    """(out name, shape, tag, job) per output tensor, in source order; a job (one source
    tensor) returns {out name: array} for its consecutive entries."""
    plan = []
    for name in src.where:
        m_exp, m_fused = _EXPERT.match(name), _FUSED.match(name)
        if m_exp or _LINEAR.match(name):
            plan += _quant_entries(name[:-len(".weight")], src.shape(name), qc, lambda n=name: src.read(n))
        elif m_fused:
            base, kind = m_fused.groups()
            E, rows, cols = src.shape(name)
            projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            per = rows // len(projs)
            for j in range(E):
                for r, proj in enumerate(projs):
                    read = (lambda n=name, j=j, r=r: src.read_slice(n, (slice(j, j + 1), slice(r * per, (r + 1) * per)))[0])
                    plan += _quant_entries(f"{base}.{j}.{proj}", (per, cols), qc, read)
        elif name in src.scales:  # an FP8 weight outside the projections: float32, exact
            plan.append((name, src.shape(name), "F32", lambda n=name: {n: src.read(n)}))
        else:  # copied as stored (bytes): no float32 transient
            plan.append((name, src.shape(name), src.dtype(name), lambda n=name: {n: src.where[n].read_raw(n)}))
    return plan


def _quant_entries(prefix: str, shape, qc: QuantizationConfig, read) -> list[tuple]:
    from qwen3moe.layers.quant import quantize_codes

    O, I = shape
    g = qc.group_for(I, prefix)
    F = 32 // qc.bits
    if I % F or O % F:
        raise CheckpointError(f"{prefix}: shape {[O, I]} cannot be GPTQ-packed ({F} values per int32 word)")

    def job():
        return {f"{prefix}.{k}": v for k, v in to_gptq(*quantize_codes(read(), qc.bits, g), qc.bits).items()}

    G = I // g
    return [(f"{prefix}.qweight", (I // F, O), "I32", job),
            (f"{prefix}.qzeros", (G, O // F), "I32", job),
            (f"{prefix}.scales", (G, O), "F16", job),
            (f"{prefix}.g_idx", (I,), "I32", job)]


def _computed(plan: list[tuple]):
    """The plan's arrays in order, its jobs run by WORKERS threads at most AHEAD jobs ahead."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    jobs = list(dict.fromkeys(e[3] for e in plan))  # in order, each once
    ex = ThreadPoolExecutor(WORKERS, thread_name_prefix="quantize")
    try:
        pending = deque(ex.submit(j) for j in jobs[:AHEAD])
        at, nxt = 0, AHEAD
        while pending:
            out = pending.popleft().result()
            if nxt < len(jobs):
                pending.append(ex.submit(jobs[nxt]))
                nxt += 1
            for _ in out:  # the job's entries are the next len(out) of the plan
                yield out[plan[at][0]]
                at += 1
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(entry) -> int:
    return int(np.prod(entry[1], dtype=np.int64)) * _ITEMSIZE[entry[2]]


def _shard(plan: list[tuple], limit: int) -> list[list[tuple]]:
    shards, size = [[]], 0
    for e in plan:
        if shards[-1] and size + _nbytes(e) > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += _nbytes(e)
    return shards


def _write_stream(path: str, entries: list[tuple], arrays) -> int:
    """A safetensors file whose header is known up front; its tensors, taken in order from the
    iterator `arrays`, are written one by one."""
    import struct

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, tag, _ in entries:
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + _nbytes((name, shape, tag))]}
        offset += _nbytes((name, shape, tag))
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for name, shape, tag, _ in entries:
            arr = np.ascontiguousarray(next(arrays))
            if arr.nbytes != _nbytes((name, shape, tag)):
                raise CheckpointError(f"{name}: produced {arr.dtype} {list(arr.shape)}, planned {tag} {list(shape)}")
            fh.write(memoryview(arr.reshape(-1)).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def _write_shards(tmp: str, shards: list[list[tuple]], arrays) -> int:
    from qwen3moe.io.hf_checkpoint import INDEX_FILE

    n = len(shards)
    if n == 1:
        return _write_stream(os.path.join(tmp, "model.safetensors"), shards[0], arrays)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        total += _write_stream(os.path.join(tmp, fname), shard, arrays)
        weight_map.update({e[0]: fname for e in shard})
    with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
    return total


def _copy_side_files(src_dir: str, tmp: str) -> None:
    import shutil

    from qwen3moe.io.hf_checkpoint import TOKENIZER_FILES

    for fname in (*TOKENIZER_FILES, "generation_config.json"):
        if os.path.isfile(os.path.join(src_dir, fname)):
            shutil.copy2(os.path.join(src_dir, fname), os.path.join(tmp, fname))
