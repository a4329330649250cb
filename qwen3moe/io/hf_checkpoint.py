"""Hugging Face folder <-> native model: lazy sharded loading, atomic sharded saving.

The one key map: native parameter names ARE the HF names, except stacked experts.
Native (transformers-5 fused layout)            HF per-expert layout (released checkpoints)
  model.layers.i.mlp.experts.gate_up_proj [E,2I,H] = stack_j cat(experts.j.gate_proj.weight [I,H],
                                                                 experts.j.up_proj.weight   [I,H])
  model.layers.i.mlp.experts.down_proj    [E,H,I]  = stack_j experts.j.down_proj.weight  [H,I]
Both layouts load; saving writes the per-expert layout (what transformers and vLLM expect).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import numpy as np
from einops import rearrange

from qwen3moe.io.atomic import OutputError, atomic_files
from qwen3moe.io.fp8 import apply_scales, split_scales
from qwen3moe.io.safetensors_io import (FLOAT_TAGS, CheckpointError, SafetensorsFile, check_finite,
                                        check_tensor_names, bf16_to_f32, f32_to_bf16,
                                        write_safetensors)
from qwen3moe.models.config import Qwen3MoeConfig

# native fused expert parameter -> the per-expert HF projections concatenated along dim 1
EXPERT_KEY_MAP: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class CheckpointSource:
    """All tensors of an HF folder, opened lazily, by name. An FP8 folder (io/fp8.py) reads as the
    float folder it encodes: its scale tensors are hidden and its F8 weights read dequantized."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.where: dict[str, SafetensorsFile] = {}
        index = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index):
            self._open_index(index)
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors weights and no {INDEX_FILE}")
            for f in files:
                st = SafetensorsFile(os.path.join(directory, f))
                self.where.update({k: st for k in st.keys()})
        self.fp8, self.scales = split_scales(directory, self.where)

    def _open_index(self, index: str) -> None:
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' of "
                                  "tensor name -> shard file)")
        opened: dict[str, SafetensorsFile] = {}
        for name, fname in weight_map.items():
            path = os.path.join(self.directory, fname)
            if fname not in opened:
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index}: tensor {name!r} points at missing shard {fname}")
                opened[fname] = SafetensorsFile(path)
            if name not in opened[fname].entries:
                raise CheckpointError(f"{path}: tensor {name!r} listed in {INDEX_FILE} is not in the file")
            self.where[name] = opened[fname]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        arr = self.where[name].read(name, rows)
        return self._dequant(name, arr, rows[0] if rows else 0, 0) if name in self.scales else arr

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        arr = self.where[name].read_slice(name, index)
        if name not in self.scales:
            return arr
        starts = [sl.indices(n)[0] for sl, n in zip(index, self.shape(name))] + [0, 0]
        return self._dequant(name, arr, starts[0], starts[1])

    def _dequant(self, name: str, arr: np.ndarray, row0: int, col0: int) -> np.ndarray:
        key, st = self.scales[name]
        scale_inv = st.read(key)
        check_finite(scale_inv, key, st.path)
        return apply_scales(arr, scale_inv, self.fp8.block, row0, col0)

    def dtype(self, name: str) -> str:
        """The stored dtype tag (F8_E4M3 weights read as float32, dequantized)."""
        return self.where[name].dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def file_of(self, name: str) -> str:
        return self.where[name].path


def native_sources(name: str, num_experts: int, have: set[str]) -> list[str]:
    """Checkpoint keys that make up native parameter `name` (fused key if the folder has it)."""
    m = _FUSED.match(name)
    if not m or name in have:
        return [name]
    prefix, kind = m.groups()
    return [f"{prefix}.{j}.{proj}.weight" for j in range(num_experts) for proj in EXPERT_KEY_MAP[kind]]


def read_native(src: CheckpointSource, name: str, shape: tuple[int, ...], num_experts: int,
                bits: bool = False) -> np.ndarray | None:
    """Our Parameter `name` as float32 from its HF tensor(s). bits=True: as bf16 bits (uint16)
    when every source tensor is BF16 (as stored) or FP8 (dequantized and rounded one tensor at a
    time), else None (the caller widens and rounds instead)."""
    keys = native_sources(name, num_experts, set(src.where))
    check_tensor_names(src.directory, src.where, keys, name, unexpected=False)
    read = read_weight
    if bits:
        if any(src.dtype(k) != "BF16" and k not in src.scales for k in keys):
            return None
        read = read_bf16_bits
    if len(keys) > 1:
        return _read_fused(src, name, keys, shape, len(EXPERT_KEY_MAP[_FUSED.match(name).group(2)]), read)
    arr = read(src, keys[0])
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{src.file_of(keys[0])}: tensor {keys[0]!r} has shape {list(arr.shape)}, "
                              f"expected {list(shape)} for {name}")
    return arr


def read_weight(src: CheckpointSource, key: str) -> np.ndarray:
    """A float weight as float32; an integer tensor or NaN/Inf is an error naming it."""
    st = src.where[key]
    if st.dtype(key) not in FLOAT_TAGS:
        raise CheckpointError(f"{st.path}: tensor {key!r} has dtype {st.dtype(key)}, expected a floating-point "
                              f"weight ({', '.join(FLOAT_TAGS)})")
    arr = src.read(key)
    check_finite(arr, key, st.path)
    return arr


def read_bf16_bits(src: CheckpointSource, key: str) -> np.ndarray:
    """A BF16 tensor's stored bit pattern as uint16 (no fp32 copy), an FP8 weight's dequantized
    values rounded to bf16 bits; NaN/Inf is an error naming it."""
    if key in src.scales:
        return bf16_bits(read_weight(src, key))
    st = src.where[key]
    bits = st.read_raw(key).view(np.uint16).reshape(st.shape(key))
    if ((bits & 0x7F80) == 0x7F80).any():  # exponent all ones: Inf or NaN
        raise CheckpointError(f"{st.path}: tensor {key!r} holds non-finite values (NaN or Inf)")
    return bits


def _read_fused(src: CheckpointSource, name: str, keys: list[str], shape: tuple[int, ...], per: int,
                read=read_weight) -> np.ndarray:
    """Per-expert tensors (keys in expert-major order, `per` projections each, concatenated on
    rows) written straight into one [E, rows, cols] array (float32, or bf16 bits from
    read_bf16_bits): the transient is one expert tensor, not a second and third copy of the stack
    (peak RSS: bench/RESULTS.md)."""
    out = np.empty(shape, np.uint16 if read is read_bf16_bits else np.float32)
    expected = (shape[1] // per, *shape[2:])
    for i, k in enumerate(keys):
        part = read(src, k)
        if tuple(part.shape) != expected:
            raise CheckpointError(f"{src.file_of(k)}: tensor {k!r} has shape {list(part.shape)}, "
                                  f"expected {list(expected)} for {name}")
        j, r = divmod(i, per)
        out[j, r * expected[0]:(r + 1) * expected[0]] = part
    return out


def check_folder(path, config: Qwen3MoeConfig | None = None) -> tuple[str, Qwen3MoeConfig]:
    """(folder path, its config) of an HF model folder, or a one-line CheckpointError."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a folder (expected a Hugging Face model folder)")
    return directory, config or Qwen3MoeConfig.from_pretrained(directory)


def load_pretrained(cls, path, dtype: str | None = "float32", config: Qwen3MoeConfig | None = None):
    """Build `cls(config)` without random init and fill it from an HF folder as stored (float
    weights; io/load.py dispatches quantized and GPTQ folders to io/quantized.py, io/gptq.py)."""
    from qwen3moe.layers.dtypes import skip_init, to_ms_dtype

    directory, config = check_folder(path, config)
    param_dtype = to_ms_dtype(dtype or config.torch_dtype)
    src = CheckpointSource(directory)
    with skip_init():
        model = cls(config, param_dtype=param_dtype)
    used: set[str] = set()
    for p in model.get_parameters():
        load_param(src, p, config.num_experts)
        used.update(native_sources(p.name, config.num_experts, set(src.where)))
    check_unexpected(src, used, config)
    model.source_dir = directory
    return model


def check_unexpected(src: CheckpointSource, used: set[str], config: Qwen3MoeConfig) -> None:
    """Every loader's one-line error for a folder tensor the model does not read (a tied model's
    folder may still hold lm_head.weight)."""
    unexpected = sorted(set(src.where) - used - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
    if unexpected:
        raise CheckpointError(f"{src.directory}: unexpected tensor {unexpected[0]!r} in "
                              f"{os.path.basename(src.file_of(unexpected[0]))}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))


def model_keys(cls, config: Qwen3MoeConfig, have: set[str]) -> set[str]:
    """The folder keys a `cls(config)` model reads (native_sources of each parameter), without
    building it at its size: parameter names depend on the layer count and kinds, tying and the
    expert layout, never on sizes, so the model class is built at toy sizes for its names."""
    from qwen3moe.layers.dtypes import skip_init

    toy = config.replace(hidden_size=8, intermediate_size=8, moe_intermediate_size=8, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, vocab_size=8, num_experts=2 if config.num_experts else 0,
                         num_experts_per_tok=1 if config.num_experts else 0)
    with skip_init():
        names = [p.name for p in cls(toy).get_parameters()]
    return {k for name in names for k in native_sources(name, config.num_experts, have)}


def load_param(src: CheckpointSource, p, num_experts: int) -> None:
    """Fill a freshly built Parameter from the folder. bf16 storage of BF16 tensors takes the
    stored bits: widening to fp32 and rounding back would cost the fp32 tensor plus numpy's
    rounding temporaries (several times a [128, 1536, 2048] expert stack: bench/RESULTS.md)."""
    import mindspore as ms
    from mindspore import Tensor

    from qwen3moe.layers.dtypes import BF16_BITS

    if p.dtype in (BF16_BITS, ms.bfloat16):
        bits = read_native(src, p.name, tuple(p.shape), num_experts, bits=True)
        if bits is not None:
            t = Tensor.from_numpy(np.ascontiguousarray(bits))
            p.set_data(t if p.dtype == BF16_BITS else t.view(ms.bfloat16))
            return
    store_param(p, read_native(src, p.name, tuple(p.shape), num_experts))


ROW_BLOCK_ELEMENTS = 1 << 24  # 64 MiB of float32 per block: bounds per-block temporaries


def bf16_bits(arr: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded in row blocks of ROW_BLOCK_ELEMENTS values:
    f32_to_bf16's uint32 temporaries of a whole tensor (a [V, H] embedding) would be ~3x its
    float32 size on top of it."""
    out = np.empty(arr.shape, np.uint16)
    cols = arr.shape[-1] if arr.ndim else 1
    rows_in, rows_out = arr.reshape(-1, cols), out.reshape(-1, cols)
    step = max(1, ROW_BLOCK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows_in.shape[0], step):
        rows_out[r0:r0 + step] = f32_to_bf16(rows_in[r0:r0 + step])
    return out


def store_param(p, arr: np.ndarray) -> None:
    """A float32 array into a freshly built (not yet compiled) Parameter in its storage dtype:
    bf16 bits (uint16) rounded by numpy (bf16_bits), other dtypes by MindSpore's cast."""
    import mindspore as ms
    from mindspore import Tensor

    from qwen3moe.layers.dtypes import BF16_BITS

    if p.dtype == BF16_BITS:
        p.set_data(Tensor.from_numpy(bf16_bits(arr)))
        return
    t = Tensor.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    p.set_data(t if p.dtype == ms.float32 else t.astype(p.dtype))


def param_f32(p) -> np.ndarray:
    """A Parameter's values as float32 numpy (bf16 bits widened exactly)."""
    from qwen3moe.layers.dtypes import BF16_BITS

    if p.dtype == BF16_BITS:
        return bf16_to_f32(p.asnumpy())
    return p.astype("float32").asnumpy() if str(p.dtype) != "Float32" else p.asnumpy()


# ---- saving --------------------------------------------------------------------------------
def hf_tensors(model, dtype: str):
    """Yield (hf_name, array, tag) in HF per-expert layout, converted to `dtype`."""
    cfg = model.config
    for p in model.get_parameters():
        arr = param_f32(p)
        m = _FUSED.match(p.name)
        if not m:
            yield p.name, *_convert(arr, dtype)
            continue
        prefix, kind = m.groups()
        projs = EXPERT_KEY_MAP[kind]
        per_proj = rearrange(arr, "e (p rows) cols -> e p rows cols", p=len(projs))  # stacked on rows
        for j in range(cfg.num_experts):
            for proj, part in zip(projs, per_proj[j]):
                yield f"{prefix}.{j}.{proj}.weight", *_convert(part, dtype)


def _convert(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    if dtype == "bfloat16":
        return f32_to_bf16(arr), "BF16"
    if dtype == "float16":
        return arr.astype(np.float16), "F16"
    return np.ascontiguousarray(arr, dtype=np.float32), "F32"


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_pretrained(model, path, dtype: str | None = None, max_shard_size: int | str = "5GB") -> None:
    """Write the model files into `path` one by one (temp name, then rename), like HF: other files
    in the folder are left alone; weight files of an earlier save that this one does not write
    (old shards, a stale index or single file) are removed after the new ones are in place."""
    cfg = model.config
    if getattr(model, "quantization", None) is not None:
        raise CheckpointError("save_pretrained of a quantized model is not supported: write a GPTQ folder "
                              "from the float folder with `qwen3moe quantize` (io.gptq.quantize_folder)")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype) or cfg.torch_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    limit = parse_size(max_shard_size)
    directory = os.path.abspath(os.fspath(path))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputError(f"{directory}: not a folder (save_pretrained writes a model folder)")
    shards: list[list] = [[]]
    size = 0
    for name, arr, tag in hf_tensors(model, dtype):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if shards[-1] and size + arr.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, arr, tag))
        size += arr.nbytes
    os.makedirs(directory, exist_ok=True)
    stale = _weight_files(directory)
    written: set[str] = set()
    with atomic_files(directory) as temp_file:  # every file to a temp; all renamed only on success

        def temp(name: str) -> str:
            written.add(name)
            return temp_file(name)

        _write_shards(temp, shards)
        with open(temp("config.json"), "w", encoding="utf-8") as fh:
            fh.write(cfg.replace(torch_dtype=dtype).to_json())
        _write_side_files(model, temp)
    for name in sorted(stale - written):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, name))


_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def _weight_files(directory: str) -> set[str]:
    """Weight files of an earlier save: the index, the files it names, model[-i-of-n].safetensors."""
    found = {f for f in os.listdir(directory) if _WEIGHT_FILE.match(f) or f == INDEX_FILE}
    if INDEX_FILE in found:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            with open(os.path.join(directory, INDEX_FILE), encoding="utf-8") as fh:
                names = json.load(fh)["weight_map"].values()
            found |= {n for n in names if isinstance(n, str) and os.path.basename(n) == n
                      and os.path.isfile(os.path.join(directory, n))}
    return found


def _write_shards(temp, shards: list[list]) -> None:
    n = len(shards)
    if n == 1:
        write_safetensors(temp("model.safetensors"), shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(temp(fname), shard)
        weight_map.update({name: fname for name, _, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(temp(INDEX_FILE), "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2)


def _write_side_files(model, temp) -> None:
    """generation_config.json (the source folder's, else from the config) and tokenizer files."""
    src = getattr(model, "source_dir", None)
    gen_path = os.path.join(src, "generation_config.json") if src else None
    if gen_path and os.path.isfile(gen_path):
        shutil.copyfile(gen_path, temp("generation_config.json"))
    else:
        cfg = model.config
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
        with open(temp("generation_config.json"), "w", encoding="utf-8") as fh:
            json.dump(gen, fh, indent=2)
    if src:
        copy_tokenizer_files(src, temp)


def copy_tokenizer_files(src, dest) -> list[str]:
    """Copy the tokenizer files (TOKENIZER_FILES) that exist in folder `src` to `dest(name)` (a
    temp-file allocator of an atomic save), or each atomically into folder `dest`; their names."""
    from qwen3moe.io.atomic import atomic_copy

    copied = []
    for fname in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, fname)):
            if callable(dest):
                shutil.copyfile(os.path.join(src, fname), dest(fname))
            else:
                atomic_copy(os.path.join(src, fname), os.path.join(dest, fname))
            copied.append(fname)
    return copied
