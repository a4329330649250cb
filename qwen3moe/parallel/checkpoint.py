"""Sharded checkpoints: online-sharded loading from an HF folder (each rank reads only its
slices, like vLLM / the seed via get_slice), per-rank save, re-shard to another layout, and
export to an HF folder.

A per-rank checkpoint is one safetensors file per rank whose keys carry the shard position:
"<hf name>|<style>|<tp_rank>|<tp_size>|<ep_rank>|<ep_size>"; loading any set of rank files
assembles the full tensors (ranks.assemble) and re-slices them for the new mesh (the seed's
`auto_trans_ckpt`). Shapes: E experts, I expert ffn, H hidden.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qwen3moe.io.gptq import check_float_modules, gptq_config, gptq_keys
from qwen3moe.io.hf_checkpoint import CheckpointSource, check_unexpected, model_keys, native_sources
from qwen3moe.io.safetensors_io import CheckpointError, SafetensorsFile, check_tensor_names, write_safetensors
from qwen3moe.parallel.ranks import ShardInfo, assemble


def _block(n: int, rank: int, size: int) -> slice:
    if n % size:
        raise ValueError(f"dim of size {n} is not divisible by {size} ranks")
    k = n // size
    return slice(rank * k, (rank + 1) * k)


class ShardReader:
    """`read_shard(info, cfg)`: the slice of an HF folder's tensor a rank holds; counts bytes.
    Before the first read, a folder tensor the model does not read is the single-process
    loader's one-line error (every rank checks the whole folder's names, reading no tensor)."""

    def __init__(self, directory) -> None:
        self.src = CheckpointSource(os.fspath(directory))
        self.bytes_read = 0
        self.checked = False

    def _read(self, name: str, index: tuple) -> np.ndarray:
        arr = self.src.read_slice(name, index)
        self.bytes_read += arr.nbytes
        return arr

    def read_shard(self, info: ShardInfo, cfg) -> np.ndarray:
        if not self.checked:
            from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

            have = set(self.src.where)  # missing tensors: below, per name
            keys = model_keys(Qwen3MoeForCausalLM, cfg, have)
            spec = gptq_config(cfg, self.src.directory)
            if spec is not None:  # its projections' GPTQ / AWQ tensors
                check_float_modules(self.src)
                keys |= gptq_keys(keys, spec.keys)
            check_unexpected(self.src, keys & have, cfg)
            self.checked = True
        name = info.name
        if name == "lm_head.weight" and name not in self.src.where and cfg.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        # every key of the parameter, not just this rank's experts: the single-process error, on every rank
        check_tensor_names(self.src.directory, self.src.where, native_sources(name, cfg.num_experts, self.src.where),
                           name, unexpected=False)
        if ".mlp.experts." in name:
            return self._experts(info, cfg)
        shape = self.src.shape(name)
        t, ts = info.tp_rank, info.tp_size
        if info.style == "replicate" or ts == 1:
            return self._read(name, ())
        if info.style == "row":
            return self._read(name, (slice(None), _block(shape[1], t, ts)))
        return self._read(name, (_block(shape[0], t, ts),))

    def _experts(self, info: ShardInfo, cfg) -> np.ndarray:
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        experts = range(*_block(E, info.ep_rank, info.ep_size).indices(E))
        rows = _block(I, info.tp_rank, info.tp_size)
        gate_up = info.name.endswith("gate_up_proj")
        if info.name in self.src.where:  # fused transformers-5 layout
            eb = slice(experts.start, experts.stop)
            if gate_up:
                return np.concatenate([self._read(info.name, (eb, rows)),
                                       self._read(info.name, (eb, slice(I + rows.start, I + rows.stop)))], 1)
            return self._read(info.name, (eb, slice(None), rows))
        prefix = info.name.rsplit(".", 1)[0]
        out = []
        for j in experts:  # per-expert HF layout: only this rank's experts are opened
            if gate_up:
                out.append(np.concatenate([self._read(f"{prefix}.{j}.gate_proj.weight", (rows,)),
                                           self._read(f"{prefix}.{j}.up_proj.weight", (rows,))], 0))
            else:
                out.append(self._read(f"{prefix}.{j}.down_proj.weight", (slice(None), rows)))
        return np.stack(out)


def _key(i: ShardInfo) -> str:
    return f"{i.name}|{i.style}|{i.tp_rank}|{i.tp_size}|{i.ep_rank}|{i.ep_size}"


def save_sharded(pl, directory) -> list[Path]:
    """One safetensors file per rank this process holds: rank_<global rank>.safetensors."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    m = pl.mesh
    for s, per in enumerate(pl.entries):
        for n, entries in per.items():
            rank = s * m.dp * m.tp + n
            path = d / f"rank_{rank}.safetensors"
            tmp = d / f".rank_{rank}.safetensors.tmp"  # renamed when complete: no half-written rank file
            write_safetensors(str(tmp), [(_key(i), p.asnumpy().astype(np.float32), "F32") for p, i in entries],
                              {"format": "qwen3moe-sharded", "mesh": f"dp{m.dp}.tp{m.tp}.pp{m.pp}.ep{m.ep}"})
            os.replace(tmp, path)
            written.append(path)
    return written


class ShardedTensors(dict):
    """Full tensors by HF name; a missing one is the loaders' one-line CheckpointError."""

    def __init__(self, directory, tensors: dict) -> None:
        super().__init__(tensors)
        self.directory = os.fspath(directory)

    def __missing__(self, name: str):
        check_tensor_names(self.directory, self, [name], unexpected=False)


def load_sharded(directory) -> ShardedTensors:
    """Full HF-named tensors assembled from every rank file of a sharded checkpoint."""
    files = sorted(Path(directory).glob("rank_*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no rank_*.safetensors files (not a sharded checkpoint)")
    items = []
    for f in files:
        st = SafetensorsFile(str(f))
        for key in st.keys():
            parts = key.split("|")
            if len(parts) != 6:
                raise CheckpointError(f"{f}: key {key!r} is not name|style|tp_rank|tp_size|ep_rank|ep_size")
            name, style, t, ts, e, es = parts
            items.append((ShardInfo(name, style, int(t), int(ts), int(e), int(es)), st.read(key)))
        st.close()
    return ShardedTensors(directory, assemble(items))


def export_hf(directory, cfg, out_dir, dtype: str | None = None, tokenizer_dir=None) -> None:
    """Sharded checkpoint -> HF folder (per-expert layout, via the model's own saver)."""
    from qwen3moe.training.checkpoint import export_pretrained

    export_pretrained(cfg, load_sharded(directory), out_dir, dtype, tokenizer_dir, source=str(directory))
