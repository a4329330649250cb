"""HF transformers reference fixtures for the qwen3moe parity tests (torch + transformers only).

HF transformers 5.24 `qwen3_moe` is the numerical ground truth. For every variant this writes an HF
folder tests/fixtures/hf/<variant>/ (config.json, generation_config.json, the tiny tokenizer, the
weights via save_pretrained) plus ref_outputs.npz / ref_meta.json with the keys and semantics of
shared/reference/REFERENCE_KEYS.md. CI never needs torch: the outputs are committed.

    python3.11 -m venv .venv-ref
    .venv-ref/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
        transformers==5.24.0 safetensors "numpy<2" tokenizers jinja2
    .venv-ref/bin/python tools/make_fixtures.py --out tests/fixtures/hf          # all variants
    .venv-ref/bin/python tools/make_fixtures.py --check ../shared/reference/tiny-a  # self-test

`--check DIR` recomputes every key of DIR/ref_outputs.npz from DIR's weights (same seed and
accepted attempts, read from DIR/ref_meta.json) and prints max-abs differences.

The computation itself (what each reference array is) lives in tools/fixture_compute.py; this file
holds the variants, the weight initialisation, the acceptance rules and the folder writing.
Never imports qwen3moe: this is the independent side of the comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

from fixture_compute import (ADAMW, EOS_IDS, ID_HIGH, LONG, N_PAD, PAD_ID, SEQ, compute, f32,  # same folder
                             gen_inputs, generate, load_model, padded_batch, rng, router_margins, t2n,
                             train_losses)

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QWEN3MOE_SHARED", REPO.parent / "shared"))
TOKENIZER_SRC = SHARED / "reference" / "tiny-a"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

MARGIN_MIN = 2e-3  # router top-k margin and greedy top1-top2 gap floor (fp32 noise is ~1e-5)
MAX_ATTEMPTS = 50
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog"
PROMPT_CHAT = "Explain mixture of experts in one sentence."

COMMON = dict(
    vocab_size=1024, hidden_size=64, rms_norm_eps=1e-6, router_aux_loss_coef=0.001, hidden_act="silu",
    attention_bias=False, use_sliding_window=False, bos_token_id=1021, eos_token_id=1023, pad_token_id=None,
    max_position_embeddings=1024, output_router_logits=False, initializer_range=0.02,
)
GQA = dict(
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, max_window_layers=4,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
VARIANTS = {
    "tiny-fp32-gqa": dict(
        seed=2002, dtype="float32",
        covers="tiny-a-like GQA (4 q / 2 kv heads, head_dim 32), 8 experts top-2, norm_topk_prob, default "
               "rope, fp32 single-file per-expert checkpoint; independent seed",
        config=dict(COMMON, **GQA)),
    "tiny-mqa-dense": dict(
        seed=3003, dtype="float32",
        covers="MQA (1 kv head), head_dim 16 != hidden/heads, 6 layers with decoder_sparse_step 2 AND "
               "mlp_only_layers [3] -> MoE layers [1, 5], dense SwiGLU (intermediate 96) in 0, 2, 3, 4; "
               "16 experts top-4 with moe_intermediate 16, norm_topk_prob false, rope_theta 1e4",
        config=dict(COMMON, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                    num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, intermediate_size=96,
                    norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3], tie_word_embeddings=False,
                    max_window_layers=6, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "tiny-bf16-tied-yarn": dict(
        seed=4004, dtype="bfloat16", max_shard_size="256KB",
        covers="bf16 checkpoint sharded over >= 2 safetensors files + model.safetensors.index.json, "
               "tie_word_embeddings (no lm_head.weight stored), yarn rope factor 4 / original 64 "
               "(max_position_embeddings 256) in transformers-5 rope_parameters form; references in fp32 from "
               "the bf16 weights upcast, plus logits_bf16 (model run natively in bf16)",
        config=dict(COMMON, **dict(GQA, tie_word_embeddings=True, max_position_embeddings=256,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                    "original_max_position_embeddings": 64}))),
    "tiny-fused": dict(
        same_as="tiny-fp32-gqa",
        covers="the tiny-fp32-gqa model saved with save_pretrained(save_original_format=False): experts "
               "fused as mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj [E, H, I]; "
               "ref_outputs.npz is a symlink to ../tiny-fp32-gqa/ref_outputs.npz"),
}



# ------------------------------------------------------------------------------------------- weights
def init_weights(model: Qwen3MoeForCausalLM, seed: int) -> None:
    """Random weights with O(1) activations (initializer_range 0.02 gives near-uniform routers):
    linear ~ N(0, 1/fan_in), router N(0, (2/sqrt(H))^2), lm_head N(0, (2.5/sqrt(H))^2), embeddings N(0, 1)
    (0.35 when tied, so logits stay ~ 2.7 std), norm weights U(0.5, 1.5) -- the statistics of tiny-a."""
    gen = torch.Generator().manual_seed(seed)
    H = model.config.hidden_size
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * (0.35 if tied else 1.0))
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * 2.5 / math.sqrt(H))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0 / math.sqrt(H))
            else:  # nn.Linear [out, in] or stacked experts [E, out, in]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def write_folder(folder: Path, spec: dict, wseed: int) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = Qwen3MoeConfig(**spec["config"])
    torch.manual_seed(wseed)
    model = Qwen3MoeForCausalLM(cfg)
    init_weights(model, wseed)
    model.generation_config = GenerationConfig(bos_token_id=1021, do_sample=False, eos_token_id=EOS_IDS,
                                               pad_token_id=PAD_ID)
    if spec["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    kw = {"max_shard_size": spec["max_shard_size"]} if "max_shard_size" in spec else {}
    model.save_pretrained(folder, **kw)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SRC / name, folder / name)


def accept(folder: Path, seed: int, prompts: dict) -> tuple[dict, dict] | None:
    """Accepted attempts per input stream, or None when this weight draw gives an unsafe generation."""
    model = load_model(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    gids, gmask, _ = gen_inputs(tok, prompts)
    g = generate(model, gids, gmask)
    P_len = gids.shape[1]
    st = np.sort(np.stack([f32(x) for x in g.logits]), -1)
    fmask = torch.cat([gmask, torch.ones_like(g.sequences[:, P_len:])], 1)
    fpos = (fmask.cumsum(1) - 1).masked_fill(fmask == 0, 0)
    why = {"gen_step_margin_min": float((st[..., -1] - st[..., -2]).min()),
           "gen_router_margin_min": float(router_margins(model, g.sequences[:, :-1], fmask[:, :-1], fpos[:, :-1]).min()),
           "gen_eos_generated": bool(np.isin(t2n(g.sequences[:, P_len:]), EOS_IDS).any())}
    if why["gen_step_margin_min"] < MARGIN_MIN or why["gen_router_margin_min"] < MARGIN_MIN or why["gen_eos_generated"]:
        print(f"  weights rejected: {why}")
        return None
    attempts = {}
    for att in range(MAX_ATTEMPTS):  # (a): margins before and after one AdamW step
        ids = torch.from_numpy(rng(seed, 1, att).integers(0, ID_HIGH, (2, SEQ)))
        if router_margins(model, ids).min() < MARGIN_MIN:
            continue
        m = load_model(folder)
        m.train()
        train_losses(m, ids)[0].loss.backward()
        torch.optim.AdamW(list(m.parameters()), lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"],
                          weight_decay=ADAMW["weight_decay"]).step()
        m.eval()
        if router_margins(m, ids).min() >= MARGIN_MIN:
            attempts["a"] = att
            break
    for att in range(MAX_ATTEMPTS):  # (b): real tokens, both position conventions, and row 1 alone
        pids, pmask, ppos = padded_batch(seed, att)
        if min(router_margins(model, pids, pmask).min(), router_margins(model, pids, pmask, ppos).min(),
               router_margins(model, pids[1:, N_PAD:]).min()) >= MARGIN_MIN:
            attempts["b"] = att
            break
    for att in range(MAX_ATTEMPTS):
        lids = torch.from_numpy(rng(seed, 3, att).integers(0, ID_HIGH, (1, LONG)))
        if router_margins(model, lids).min() >= MARGIN_MIN:
            attempts["long"] = att
            break
    if len(attempts) != 3:
        print(f"  inputs rejected: {attempts}")
        return None
    return attempts, why


def key_table(a: dict) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in a.items()}


def make_variant(name: str, out: Path) -> None:
    spec = VARIANTS[name]
    folder = out / name
    if "same_as" in spec:
        return make_fused(name, spec, out)
    prompts = {"text": PROMPT_TEXT, "chat": PROMPT_CHAT}
    seed = spec["seed"]
    for wattempt in range(MAX_ATTEMPTS):
        wseed = seed * 1000 + wattempt
        print(f"[{name}] weights seed {wseed}")
        write_folder(folder, spec, wseed)
        acc = accept(folder, seed, prompts)
        if acc is not None:
            break
    else:
        raise SystemExit(f"{name}: no acceptable draw")
    attempts, _ = acc
    a, sc = compute(folder, seed, attempts, prompts, bf16=spec["dtype"] == "bfloat16")
    assert sc["router_margin_min"] >= MARGIN_MIN and sc["gen_batched_equals_single"], sc
    np.savez_compressed(folder / "ref_outputs.npz", **a)
    cfg = json.loads((folder / "config.json").read_text())
    meta = {
        "variant": name, "covers": spec["covers"], "seed": seed, "weights_seed": wseed,
        "weights_attempt": wattempt, "accepted_attempts": attempts,
        "checkpoint_dtype": spec["dtype"],
        "reference_compute": "float32 (bf16 checkpoints are upcast at load), attn_implementation=eager, "
                             "experts_implementation=eager, torch.set_num_threads(1), CPU",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "safetensors": safetensors.__version__},
        "input_seeds": {"input_ids": f"numpy default_rng([{seed}, 1, accepted_attempts.a]).integers(0, 1021, (2, 16))",
                        "padded_input_ids": f"default_rng([{seed}, 2, accepted_attempts.b]).integers(0, 1021, (2, 16)); "
                                            "row 1 [:6] = 1021",
                        "long_input_ids": f"default_rng([{seed}, 3, accepted_attempts.long]).integers(0, 1021, (1, 200))",
                        "weights": "tools/make_fixtures.py init_weights(torch.Generator().manual_seed(weights_seed))"},
        "acceptance": f"every router top-k margin >= {MARGIN_MIN} on (a) before and after the AdamW step, (b) real "
                      f"tokens, long; greedy top1-top2 gap and router margins along generation >= {MARGIN_MIN}; "
                      "no eos generated",
        "gen_prompts": prompts,
        "config": cfg, "config_input": spec["config"],
        "moe_layer_indices": a["moe_layer_indices"].tolist(),
        "adamw": ADAMW,
        "files": sorted(p.name for p in folder.iterdir()),
        "self_consistency": sc,
        "keys": key_table(a),
    }
    (folder / "ref_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"[{name}] ok: attempts {attempts}, logits std {sc['logits_std']:.3f}, router margin min "
          f"{sc['router_margin_min']:.4g}, gen margin min {sc['gen_step_margin_min']:.4g}")


def make_fused(name: str, spec: dict, out: Path) -> None:
    src = out / spec["same_as"]
    folder = out / name
    if not (src / "ref_outputs.npz").is_file():
        raise SystemExit(f"{name}: make {spec['same_as']} first")
    if folder.exists():
        shutil.rmtree(folder)
    model = load_model(src)
    model.save_pretrained(folder, save_original_format=False)
    shutil.copyfile(src / "generation_config.json", folder / "generation_config.json")
    for n in TOKENIZER_FILES:
        shutil.copyfile(src / n, folder / n)
    keys = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(f, framework="np") as h:
            keys.update({k: list(h.get_slice(k).get_shape()) for k in h.keys()})
    fused = {k: v for k, v in keys.items() if ".mlp.experts." in k}
    assert fused and all(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in fused), fused
    ref = np.load(src / "ref_outputs.npz")
    re = load_model(folder)
    ids = torch.from_numpy(ref["input_ids"])
    with torch.no_grad():
        diff = float(np.abs(f32(re(input_ids=ids).logits) - ref["logits"]).max())
    # the exact per-expert <-> fused relation, checked on the stored tensors
    from safetensors.numpy import load_file
    per = load_file(src / "model.safetensors")
    fu = load_file(folder / "model.safetensors")
    layout_ok = all(
        np.array_equal(fu[f"model.layers.{i}.mlp.experts.gate_up_proj"][j],
                       np.concatenate([per[f"model.layers.{i}.mlp.experts.{j}.gate_proj.weight"],
                                       per[f"model.layers.{i}.mlp.experts.{j}.up_proj.weight"]], 0))
        and np.array_equal(fu[f"model.layers.{i}.mlp.experts.down_proj"][j],
                           per[f"model.layers.{i}.mlp.experts.{j}.down_proj.weight"])
        for i in json.loads((src / "ref_meta.json").read_text())["moe_layer_indices"]
        for j in range(model.config.num_experts))
    non_expert_same = all(np.array_equal(per[k], fu[k]) for k in fu if ".mlp.experts." not in k)
    assert diff == 0.0 and layout_ok and non_expert_same, (diff, layout_ok, non_expert_same)
    (folder / "ref_outputs.npz").symlink_to(Path("..") / spec["same_as"] / "ref_outputs.npz")
    meta = {
        "variant": name, "covers": spec["covers"], "same_weights_as": spec["same_as"],
        "ref_outputs": f"../{spec['same_as']}/ref_outputs.npz (symlink ref_outputs.npz; every key applies unchanged)",
        "save": "Qwen3MoeForCausalLM.from_pretrained(tiny-fp32-gqa).save_pretrained(dir, save_original_format=False)",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "fused_expert_keys": sorted(fused), "fused_expert_shapes": fused,
        "layout": "gate_up_proj[j] == concat(experts.j.gate_proj.weight, experts.j.up_proj.weight, axis 0) "
                  "[2I, H]; down_proj[j] == experts.j.down_proj.weight [H, I]",
        "layout_verified_against_per_expert_files": layout_ok,
        "non_expert_tensors_identical": non_expert_same,
        "logits_maxabs_reloaded_vs_ref": diff,
        "all_keys": keys,
        "files": sorted(p.name for p in folder.iterdir()),
    }
    (folder / "ref_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"[{name}] ok: fused keys e.g. {sorted(fused)[:2]}, reload diff {diff}")


# --------------------------------------------------------------------------------------------- check
def check(folder: Path) -> int:
    """Recompute every key of folder/ref_outputs.npz with this script and print max-abs differences."""
    meta = json.loads((folder / "ref_meta.json").read_text())
    sc = meta.get("self_consistency", {})
    prompts = meta.get("gen_prompts") or {"text": sc["gen_prompt_text"], "chat": sc["gen_prompt_chat"]}
    ref = dict(np.load(folder / "ref_outputs.npz"))
    a, _ = compute(folder, meta["seed"], meta["accepted_attempts"], prompts,
                   bf16=meta.get("checkpoint_dtype") == "bfloat16" or "logits_bf16" in ref)
    bad = 0
    for k in sorted(set(ref) | set(a)):
        if k not in ref or k not in a:
            print(f"{k:58s} MISSING in {'ref' if k not in ref else 'recomputed'}")
            bad += 1
            continue
        r, m = ref[k], a[k]
        if r.shape != m.shape or r.dtype != m.dtype:
            print(f"{k:58s} shape/dtype {r.shape} {r.dtype} vs {m.shape} {m.dtype}")
            bad += 1
            continue
        if r.dtype.kind in "iUb":
            ok = np.array_equal(r, m)
            print(f"{k:58s} {'exact' if ok else 'DIFFERENT'}")
            bad += not ok
        else:
            d = float(np.abs(r.astype(np.float64) - m.astype(np.float64)).max()) if r.size else 0.0
            tol = 1e-2 if k == "logits_bf16" else 1e-5
            print(f"{k:58s} max|diff| {d:.3e}{'' if d <= tol else '  > tol'}")
            bad += d > tol
    print(f"{len(ref)} reference keys, {bad} problems")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "hf")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--check", type=Path, help="recompute DIR's ref_outputs.npz and print the differences")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    if args.check:
        return check(args.check)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        make_variant(name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
