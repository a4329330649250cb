"""Write small HF Qwen3-MoE folders + transformers 5.24 reference outputs for the parity tests.

    .venv-ref/bin/python tools/make_hf_fixtures.py [--variants ...]   # needs the `reference` extra

Keys and semantics follow shared/reference/REFERENCE_KEYS.md (the independent tiny-a reference),
so the same tests run on tiny-a and on these. Reference compute: fp32 (bf16 checkpoints upcast),
eager attention and experts, 1 thread. Inputs are re-drawn until every router top-k logit margin is
>= 2e-3 (5e-4 for the 200-token input) so fp32 noise cannot flip a discrete choice; the greedy
step margins are recorded in ref_meta.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_SRC = REPO.parent / "shared" / "reference" / "tiny-a"
TOK_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
PAD, EOS = 1021, [1023, 1021]
PROMPT_TEXT, PROMPT_CHAT = "The history of the Python programming language", "Write a short poem about the sea."
BASE = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
            norm_topk_prob=True, max_position_embeddings=1024, rms_norm_eps=1e-6, router_aux_loss_coef=0.001,
            bos_token_id=1021, eos_token_id=1023, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6})
VARIANTS = {
    "tiny-fp32-gqa": dict(seed=2002, dtype="float32", config={}),
    "tiny-mqa-dense": dict(seed=3003, dtype="float32", router_std=0.5, config=dict(
        num_key_value_heads=1, head_dim=16, mlp_only_layers=[0], intermediate_size=96, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=False)),
    "tiny-bf16-tied-yarn": dict(seed=4004, dtype="bfloat16", shard="40KB", config=dict(
        tie_word_embeddings=True, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                         "original_max_position_embeddings": 64})),
}


def init_weights(model: Qwen3MoeForCausalLM, seed: int, router_std: float = 0.25) -> None:
    """Non-degenerate random weights (HF's 0.02 init gives near-uniform routers and logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(router_std * torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def router_margins(router_logits, k: int) -> float:
    m = np.inf
    for lg in router_logits:
        top = torch.topk(lg.float(), k + 1, -1).values  # logit gap (softmax is monotonic)
        m = min(m, float((top[:, k - 1] - top[:, k]).min()))
    return m


def draw(model, seed: int, tag: int, shape, k: int, vocab: int, mask=None,
         min_margin: float = 2e-3) -> tuple[np.ndarray, int]:
    for attempt in range(400):
        ids = np.random.default_rng([seed, tag, attempt]).integers(0, vocab - 3, shape)
        with torch.no_grad():
            out = model(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                        output_router_logits=True)
        logits = [lg for lg in out.router_logits]
        if mask is not None:
            keep = torch.from_numpy(mask.reshape(-1).astype(bool))
            logits = [lg[keep] for lg in logits]
        if router_margins(logits, k) >= min_margin:
            return ids, attempt
    raise RuntimeError(f"no input with router margins >= {min_margin}")


def forward_keys(model, cfg, ids: np.ndarray) -> dict:
    t = torch.from_numpy(ids)
    with torch.no_grad():
        out = model(t, labels=t, output_router_logits=True, output_hidden_states=True)
        plain = model(t, labels=t)
    k = cfg.num_experts_per_tok
    rl = torch.stack(list(out.router_logits)).float()
    probs = torch.softmax(rl, -1)
    topw, topi = torch.topk(probs, k, -1)
    if cfg.norm_topk_prob:
        topw = topw / topw.sum(-1, keepdim=True)
    top_k1 = torch.topk(rl, k + 1, -1).values
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, k)
    return {
        "input_ids": ids, "logits": out.logits.float().numpy(),
        "hidden_states": torch.stack(list(out.hidden_states)).float().numpy(),
        "router_logits": rl.numpy(), "moe_layer_indices": np.array(moe_layers, np.int64),
        "router_topk_idx": topi.numpy().astype(np.int64), "router_topk_weight": topw.numpy(),
        "router_topk_margin": (top_k1[..., k - 1] - top_k1[..., k]).numpy(),
        "expert_counts": np.stack([np.bincount(i.ravel(), minlength=cfg.num_experts) for i in topi.numpy()]),
        "lm_loss": np.float64(plain.loss), "aux_loss": np.float64(aux), "total_loss": np.float64(out.loss),
        "router_aux_loss_coef": np.float64(cfg.router_aux_loss_coef),
    }


def padded_keys(model, cfg, seed: int) -> tuple[dict, int]:
    mask = np.ones((2, 16), np.int64)
    mask[1, :6] = 0
    ids, attempt = draw(model, seed, 2, (2, 16), cfg.num_experts_per_tok, cfg.vocab_size, mask)
    ids[1, :6] = PAD
    pos = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)
    t, m, p = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos)
    labels = torch.where(m > 0, t, torch.full_like(t, -100))
    with torch.no_grad():
        a = model(t, attention_mask=m)
        b = model(t, attention_mask=m, position_ids=p, labels=labels, output_router_logits=True)
        lm = model(t, attention_mask=m, position_ids=p, labels=labels)
        alone = model(t[1:, 6:])
    aux = load_balancing_loss_func(b.router_logits, cfg.num_experts, cfg.num_experts_per_tok, m)
    return {"padded_input_ids": ids, "padded_attention_mask": mask, "padded_position_ids": pos,
            "padded_logits": a.logits.float().numpy(), "padded_logits_maskpos": b.logits.float().numpy(),
            "padded_row1_unpadded_logits": alone.logits.float().numpy(), "padded_aux_loss": np.float64(aux),
            "padded_lm_loss": np.float64(lm.loss)}, attempt


def gen_keys(model, tok, folder: Path) -> dict:
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT_CHAT}], add_generation_prompt=True,
                                   tokenize=False)
    rows = [tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"], tok(chat, add_special_tokens=False)["input_ids"]]
    P = max(map(len, rows))
    ids = np.array([[PAD] * (P - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (P - len(r)) + [1] * len(r) for r in rows], np.int64)
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=PAD, eos_token_id=EOS, use_cache=True)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_logits=True,
                             return_dict_in_generate=True, **kw)
        singles = [model.generate(torch.tensor([r]), **kw).numpy() for r in rows]
    steps = torch.stack(list(out.logits)).float().numpy()
    top2 = np.sort(steps, -1)[..., -2:]
    return {"gen_input_ids": ids, "gen_attention_mask": mask, "gen_output_ids": out.sequences.numpy(),
            "gen_new_ids": out.sequences.numpy()[:, P:], "gen_step_logits": steps,
            "gen_step_margin": (top2[..., 1] - top2[..., 0]).T.astype(np.float32),
            "gen_single0_output_ids": singles[0], "gen_single1_output_ids": singles[1]}


def grad_names(model) -> list[str]:
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    s0, s1 = moe[0], moe[1]
    return ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{s0}.mlp.experts.0.gate_proj.weight", f"model.layers.{s1}.mlp.gate.weight",
            "lm_head.weight", "model.layers.0.self_attn.q_norm.weight",
            f"model.layers.{s0}.mlp.experts.0.up_proj.weight", f"model.layers.{s0}.mlp.experts.0.down_proj.weight",
            "model.norm.weight"]


def per_expert(model, name: str, grads: bool):
    """Tensor (or its grad) for a checkpoint-style name; experts are slices of the fused params."""
    parts = name.split(".")
    if ".mlp.experts." in name:
        layer, j, proj = int(parts[2]), int(parts[5]), parts[6]
        ex = model.model.layers[layer].mlp.experts
        fused = ex.down_proj if proj == "down_proj" else ex.gate_up_proj
        t = fused.grad if grads else fused.data
        I = ex.down_proj.shape[-1]
        t = t[j]
        return {"gate_proj": t[:I], "up_proj": t[I:], "down_proj": t}[proj].detach().clone()
    p = dict(model.named_parameters(remove_duplicate=False))[name]
    return (p.grad if grads else p.data).detach().clone()


def train_keys(model, cfg, ids: np.ndarray) -> dict:
    model.train()
    t = torch.from_numpy(ids)
    names = grad_names(model)
    before = {n: per_expert(model, n, False) for n in names}
    out = model(t, labels=t, output_router_logits=True)
    out.loss.backward()
    lm_before = float(out.loss - cfg.router_aux_loss_coef * out.aux_loss)
    grads = {n: per_expert(model, n, True) for n in names}
    params = list(model.parameters())  # tied weight appears once
    global_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt.step()
    after = {n: per_expert(model, n, False) for n in names}
    with torch.no_grad():
        out2 = model(t, labels=t, output_router_logits=True)
    model.eval()
    keys = {"train_loss_before": np.float64(out.loss), "train_aux_loss_before": np.float64(out.aux_loss),
            "train_lm_loss_before": np.float64(lm_before), "grad_names": np.array(names),
            "grad_norms": np.array([float(grads[n].double().norm()) for n in names]),
            "grad_global_norm": np.float64(global_norm),
            "adamw_update_norms": np.array([float((after[n] - before[n]).double().norm()) for n in names]),
            "train_loss_after": np.float64(out2.loss), "train_aux_loss_after": np.float64(out2.aux_loss),
            "train_lm_loss_after": np.float64(out2.loss - cfg.router_aux_loss_coef * out2.aux_loss)}
    for n in (names[3], names[5], names[8]):
        keys[f"grad.{n}"] = grads[n].float().numpy()
        keys[f"param_after_step.{n}"] = after[n].float().numpy()
    return keys


def make_variant(name: str, spec: dict, out_root: Path) -> dict:
    torch.manual_seed(spec["seed"])
    cfg = Qwen3MoeConfig(**{**BASE, **spec["config"]})
    model = Qwen3MoeForCausalLM(cfg).eval()
    init_weights(model, spec["seed"], spec.get("router_std", 0.25))
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    save_dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    model.to(save_dtype).save_pretrained(folder, max_shard_size=spec.get("shard", "50MB"))
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager").eval()
    for f in TOK_FILES:
        shutil.copy2(TOKENIZER_SRC / f, folder / f)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1021, "do_sample": False, "eos_token_id": EOS, "pad_token_id": PAD,
         "transformers_version": transformers.__version__}, indent=2) + "\n")
    tok = AutoTokenizer.from_pretrained(folder)
    k, V = cfg.num_experts_per_tok, cfg.vocab_size
    ids, att_a = draw(model, spec["seed"], 1, (2, 16), k, V)
    ref = forward_keys(model, cfg, ids)
    padded, att_b = padded_keys(model, cfg, spec["seed"])
    ref.update(padded)
    # 200 tokens x every layer: 5e-4 is still ~500x the fp32 noise on router probabilities
    long_ids, att_long = draw(model, spec["seed"], 3, (1, 200), k, V, min_margin=5e-4)
    with torch.no_grad():
        ref["long_input_ids"], ref["long_logits"] = long_ids, model(torch.from_numpy(long_ids)).logits.float().numpy()
    rot = model.model.rotary_emb
    ref["rope_inv_freq"] = rot.inv_freq.float().numpy()
    ref["rope_attention_scaling"] = np.float64(rot.attention_scaling)
    ref.update(gen_keys(model, tok, folder))
    if spec["dtype"] == "bfloat16":
        bf = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
        with torch.no_grad():
            ref["logits_bf16"] = bf(torch.from_numpy(ids)).logits.float().numpy()
    ref.update(train_keys(model, cfg, ids))
    np.savez(folder / "ref_outputs.npz", **ref)
    meta = {"variant": name, "seed": spec["seed"], "checkpoint_dtype": spec["dtype"],
            "accepted_attempts": {"a": att_a, "b": att_b, "long": att_long},
            "transformers": transformers.__version__, "torch": torch.__version__,
            "reference_compute": "float32, eager attention and experts, 1 thread, CPU",
            "prompts": [PROMPT_TEXT, PROMPT_CHAT], "config": cfg.to_dict(),
            "min_router_margin": float(ref["router_topk_margin"].min()),
            "min_gen_step_margin": float(ref["gen_step_margin"].min()),
            "adamw": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}}
    (folder / "ref_meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def make_fused(src: Path, dst: Path) -> list[str]:
    """The same weights saved in transformers 5's fused expert layout (save_original_format=False)."""
    model = Qwen3MoeForCausalLM.from_pretrained(src, dtype=torch.float32)
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst, save_original_format=False)
    for f in (*TOK_FILES, "generation_config.json"):
        shutil.copy2(src / f, dst / f)
    from safetensors import safe_open

    keys = [k for f in sorted(dst.glob("*.safetensors")) for k in safe_open(f, "np").keys()]
    fused = sorted(k for k in keys if "experts" in k)
    (dst / "ref_meta.json").write_text(json.dumps(
        {"variant": dst.name, "reference": f"../{src.name}/ref_outputs.npz", "fused_expert_keys": fused[:2],
         "transformers": transformers.__version__}, indent=2) + "\n")
    return fused


def roundtrip(folder: Path) -> None:
    """transformers loads the folder our save_pretrained wrote; record its logits."""
    ref = np.load(folder.parent / "tiny-fp32-gqa" / "ref_outputs.npz")
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ref["input_ids"])).logits.float().numpy()
    np.savez(folder / "hf_logits.npz", input_ids=ref["input_ids"], logits=logits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--roundtrip", action="store_true", help="step 2 of tools/save_roundtrip_fixture.py")
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "hf"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.roundtrip:
        return roundtrip(Path(args.out) / "roundtrip-bf16")
    for name in args.variants:
        meta = make_variant(name, VARIANTS[name], Path(args.out))
        print(name, "router margin", meta["min_router_margin"], "gen margin", meta["min_gen_step_margin"],
              "attempts", meta["accepted_attempts"])
    if "tiny-fp32-gqa" in args.variants:
        out = Path(args.out)
        print("tiny-fused keys", make_fused(out / "tiny-fp32-gqa", out / "tiny-fused")[:2])


if __name__ == "__main__":
    main()
