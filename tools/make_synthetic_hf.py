"""Write a random Hugging Face folder with a released Qwen3-MoE model's exact layout, streaming.

    python tools/make_synthetic_hf.py --preset qwen3-30b-a3b --layers 2 --dtype bfloat16 \
        --out /work/data/synth-2l

The folder looks like the hub's: config.json as published (only num_hidden_layers /
max_window_layers change with --layers, plus any --set KEY=VALUE override), per-expert tensors
`model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight`, shards of at most --shard_size bytes
named model-0000X-of-0000Y.safetensors, model.safetensors.index.json, generation_config.json and
the real Qwen3 tokenizer files.

Weights are N(0, initializer_range) (0.02), norms N(1, 0.02): real-ish normal values, so
quantization error is measured on a non-degenerate distribution. Speed and bounded memory come from
one random block of BLOCK (a prime) values drawn once; each tensor is a window of that block at its
own random offset, written in slices, so the 61 GB 48-layer folder needs ~0.1 GB of RAM and runs
at disk speed. The folder is written to a temporary sibling and renamed when complete.

--stream (for a consumer that must not hold the whole folder on disk, bench/big.py): config,
tokenizer and index.json (listing every shard up front) are written to --out first, then each
shard as `.NAME.partial`, renamed to NAME when complete (the consumer reads only renamed
shards, never a half-written file). With --max_ahead N the writer waits while N complete shards
are on disk, so a consumer that deletes each shard once read bounds the disk to N + 1 shards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from qwen3moe.io.atomic import atomic_directory  # noqa: E402

TOKENIZER_DIR = REPO / "qwen3moe" / "assets" / "qwen3-tokenizer"
BLOCK = 16_777_259  # prime: windows of consecutive tensors never line up on a period
CHUNK = 8 << 20     # elements per write

# config.json of the hub releases, field for field (transformers 4.51 era files).
_QWEN3_MOE_COMMON = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "norm_topk_prob": True,
    "num_experts": 128, "num_experts_per_tok": 8, "num_key_value_heads": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
CONFIGS = {
    "qwen3-30b-a3b": dict(_QWEN3_MOE_COMMON, hidden_size=2048, intermediate_size=6144,
                          max_window_layers=48, moe_intermediate_size=768, num_attention_heads=32,
                          num_hidden_layers=48),
    "qwen3-235b-a22b": dict(_QWEN3_MOE_COMMON, hidden_size=4096, intermediate_size=12288,
                            max_window_layers=94, moe_intermediate_size=1536,
                            num_attention_heads=64, num_hidden_layers=94),
}
GENERATION_CONFIG = {
    "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
    "transformers_version": "4.51.0",
}
DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}


def make_config(preset: str, layers: int | None, dtype: str, overrides: list[str]) -> dict:
    if preset not in CONFIGS:
        raise SystemExit(f"--preset: unknown {preset!r}; choose one of {sorted(CONFIGS)}")
    cfg = dict(CONFIGS[preset], torch_dtype=dtype)
    if layers is not None:
        if layers < 1:
            raise SystemExit(f"--layers: expected a positive integer, got {layers}")
        cfg.update(num_hidden_layers=layers, max_window_layers=layers)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in cfg:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a config.json field")
        cfg[key] = json.loads(value)
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in the hub's order; kind is 'w' (a weight) or 'norm'."""
    H, V, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    E, I = cfg["num_experts"], cfg["moe_intermediate_size"]
    specs = [("model.embed_tokens.weight", (V, H), "w")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [(f"{p}.input_layernorm.weight", (H,), "norm"),
                  (f"{p}.self_attn.q_proj.weight", (q, H), "w"),
                  (f"{p}.self_attn.k_proj.weight", (kv, H), "w"),
                  (f"{p}.self_attn.v_proj.weight", (kv, H), "w"),
                  (f"{p}.self_attn.o_proj.weight", (H, q), "w"),
                  (f"{p}.self_attn.q_norm.weight", (hd,), "norm"),
                  (f"{p}.self_attn.k_norm.weight", (hd,), "norm"),
                  (f"{p}.post_attention_layernorm.weight", (H,), "norm")]
        sparse = (i not in cfg["mlp_only_layers"] and E > 0
                  and (i + 1) % cfg["decoder_sparse_step"] == 0)
        if sparse:
            specs.append((f"{p}.mlp.gate.weight", (E, H), "w"))
            for j in range(E):
                specs += [(f"{p}.mlp.experts.{j}.gate_proj.weight", (I, H), "w"),
                          (f"{p}.mlp.experts.{j}.up_proj.weight", (I, H), "w"),
                          (f"{p}.mlp.experts.{j}.down_proj.weight", (H, I), "w")]
        else:
            F = cfg["intermediate_size"]
            specs += [(f"{p}.mlp.gate_proj.weight", (F, H), "w"),
                      (f"{p}.mlp.up_proj.weight", (F, H), "w"),
                      (f"{p}.mlp.down_proj.weight", (H, F), "w")]
    specs.append(("model.norm.weight", (H,), "norm"))
    if not cfg["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (V, H), "w"))
    return specs


def plan_shards(specs, itemsize: int, limit: int) -> list[list]:
    """Greedy split in order, as transformers' max_shard_size does (a tensor never straddles)."""
    shards, size = [[]], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def random_blocks(seed: int, std: float, dtype: str) -> dict[str, np.ndarray]:
    """One block of N(0, std) weights and one of N(1, std) norms, already in the output dtype."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(BLOCK, dtype=np.float32)
    out = {}
    for kind, vals in (("w", z * np.float32(std)), ("norm", 1.0 + z[:1 << 16] * np.float32(std))):
        if dtype == "bfloat16":
            u = vals.view(np.uint32)
            out[kind] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        else:
            out[kind] = vals.astype(np.float16 if dtype == "float16" else np.float32)
    return out


def write_window(fh, block: np.ndarray, n: int, offset: int) -> None:
    """Write block[(offset + arange(n)) % len(block)] in slices, without materialising it."""
    L = len(block)
    pos = offset % L
    while n:
        take = min(n, L - pos, CHUNK)
        fh.write(memoryview(block[pos:pos + take]).cast("B"))  # no copy
        n -= take
        pos = (pos + take) % L


def write_shard(path: str, specs, tag: str, itemsize: int, blocks, rng) -> int:
    header, off = {}, 0
    for name, shape, _ in specs:
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape, kind in specs:
            block = blocks[kind]
            write_window(fh, block, int(np.prod(shape)), int(rng.integers(len(block))))
    return off


def write_folder(cfg: dict, out: str, dtype: str, shard_size: int, seed: int,
                 stream: bool = False, max_ahead: int = 0) -> dict:
    tag, itemsize = DTYPES[dtype]
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, itemsize, shard_size)
    n = len(shards)
    names = ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if stream:
        os.makedirs(out, exist_ok=True)
        write_side_files(cfg, out, shards, names, itemsize)
        total = write_shards(out, shards, names, tag, itemsize, seed, cfg, max_ahead)
    else:
        with atomic_directory(out) as tmp:
            total = write_shards(tmp, shards, names, tag, itemsize, seed, cfg, 0)
            write_side_files(cfg, tmp, shards, names, itemsize)
    return {"shards": n, "tensors": len(specs), "bytes": total}


def write_shards(out: str, shards, names, tag: str, itemsize: int, seed: int, cfg: dict,
                 max_ahead: int) -> int:
    """Each shard as .NAME.partial, renamed to NAME when complete; with max_ahead, first wait
    until fewer than max_ahead complete shards are on disk (the consumer deletes them)."""
    blocks = random_blocks(seed, cfg["initializer_range"], dtype_of(tag))
    rng = np.random.default_rng(seed + 1)
    total = 0
    for shard, fname in zip(shards, names):
        while max_ahead and sum(os.path.exists(os.path.join(out, f)) for f in names) >= max_ahead:
            time.sleep(0.2)
        partial = os.path.join(out, f".{fname}.partial")
        total += write_shard(partial, shard, tag, itemsize, blocks, rng)
        os.rename(partial, os.path.join(out, fname))
    return total


def dtype_of(tag: str) -> str:
    return next(name for name, (t, _) in DTYPES.items() if t == tag)


def write_side_files(cfg: dict, out: str, shards, names, itemsize: int) -> None:
    if len(shards) > 1:
        weight_map = {name: fname for shard, fname in zip(shards, names) for name, _, _ in shard}
        total = sum(int(np.prod(shape)) * itemsize for shard in shards for _, shape, _ in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        Path(out, "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    Path(out, "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = dict(GENERATION_CONFIG)
    if cfg["vocab_size"] <= max(gen["eos_token_id"]):  # a shrunken vocab: no Qwen special ids
        gen = {"do_sample": False}
    Path(out, "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(TOKENIZER_DIR / f, os.path.join(out, f))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the preset's)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard_size", type=int, default=5_000_000_000, help="bytes per shard (hub: 5 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream", action="store_true",
                    help="write into --out directly: index first, each shard renamed into place when complete")
    ap.add_argument("--max_ahead", type=int, default=0,
                    help="with --stream: wait while this many complete shards are on disk (0: never wait)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config.json field (JSON value), e.g. --set hidden_size=64")
    args = ap.parse_args(argv)
    if args.shard_size <= 0:
        raise SystemExit(f"--shard_size: expected a positive byte count, got {args.shard_size}")
    cfg = make_config(args.preset, args.layers, args.dtype, args.set)
    t0 = time.perf_counter()
    if args.max_ahead < 0 or (args.max_ahead and not args.stream):
        raise SystemExit(f"--max_ahead: expected a count >= 0 with --stream, got {args.max_ahead}")
    info = write_folder(cfg, args.out, args.dtype, args.shard_size, args.seed, args.stream, args.max_ahead)
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in "
          f"{info['shards']} shard(s), {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
