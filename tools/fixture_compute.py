"""The reference computation of tools/make_fixtures.py: HF transformers 5.24 outputs for one model
folder, as the arrays of shared/reference/REFERENCE_KEYS.md plus self-consistency statistics.

Sections: (a) a plain batch (logits, hidden states, per-layer outputs, router logits / top-k,
losses), (b) a left-padded batch, (c) greedy generation (batched and per row, KV cache vs full
forward), a long sequence (yarn beyond the original context), (e) gradients and (f) one torch
AdamW step, and a native bf16 run for bf16 checkpoints.
Never imports qwen3moe: this is the independent side of the comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3MoeForCausalLM

PAD_ID = 1021  # <|endoftext|>
EOS_IDS = [1023, 1021]  # <|im_end|>, <|endoftext|>
ID_HIGH = 1021  # random ids are drawn from [0, 1021): no special tokens
SEQ = 16
N_PAD = 6
LONG = 200
N_NEW = 12
ADAMW = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


# --------------------------------------------------------------------------------------------- utils
def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def f32(t: torch.Tensor) -> np.ndarray:
    return t2n(t.float()).astype(np.float32)


def i64(x) -> np.ndarray:
    return np.asarray(t2n(x) if isinstance(x, torch.Tensor) else x, dtype=np.int64)


def rng(seed: int, stream: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, attempt])  # PCG64 over SeedSequence([seed, stream, attempt])


def load_model(folder: Path, dtype=torch.float32) -> Qwen3MoeForCausalLM:
    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager",
                                                experts_implementation="eager")
    return model.eval()


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


def topk_info(router_logits: torch.Tensor, k: int, norm: bool):
    """(idx, weight, margin) per row, HF router semantics; margin = k-th minus (k+1)-th logit."""
    idx = torch.topk(torch.softmax(router_logits, dim=-1, dtype=torch.float32), k, dim=-1).indices  # HF's pick
    # weights evaluated in float64 and rounded once (what tiny-a stores; HF's fp32 path is within 1 ulp)
    w = torch.gather(torch.softmax(router_logits.double(), dim=-1), -1, idx)
    if norm:
        w = w / w.sum(dim=-1, keepdim=True)
    srt = torch.sort(router_logits.float(), dim=-1, descending=True).values
    return idx, w.float(), srt[..., k - 1] - srt[..., k]


def router_margins(model, ids, mask=None, pos=None) -> np.ndarray:
    """Router top-k margins of every real token in every MoE layer, [n_moe, n_real]."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_router_logits=True,
                    use_cache=False)
    k = model.config.num_experts_per_tok
    real = torch.ones(ids.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    return np.stack([f32(topk_info(r, k, model.config.norm_topk_prob)[2][real]) for r in out.router_logits])


def padded_batch(seed: int, attempt: int):
    ids = rng(seed, 2, attempt).integers(0, ID_HIGH, (2, SEQ))
    ids[1, :N_PAD] = PAD_ID
    mask = np.ones((2, SEQ), np.int64)
    mask[1, :N_PAD] = 0
    pos = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0)
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos)


def gen_inputs(tok, prompts):
    chat = tok.apply_chat_template([{"role": "user", "content": prompts["chat"]}], tokenize=False,
                                   add_generation_prompt=True)
    tok.padding_side = "left"
    enc = tok([prompts["text"], chat], padding=True, return_tensors="pt", add_special_tokens=False)
    assert int(tok.pad_token_id) == PAD_ID
    return enc["input_ids"], enc["attention_mask"], chat


def generate(model, ids, mask):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=N_NEW,
                              pad_token_id=PAD_ID, use_cache=True, output_logits=True,
                              return_dict_in_generate=True)


def grad_names(model) -> list[str]:
    """Same pattern as tiny-a: 9 checkpoint-style names (+ a dense MLP weight where there is one)."""
    moe = moe_layers(model)
    m0, m1 = moe[0], moe[1] if len(moe) > 1 else moe[0]
    e = f"model.layers.{m0}.mlp.experts.0"
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", f"{e}.gate_proj.weight",
             f"model.layers.{m1}.mlp.gate.weight", "lm_head.weight", "model.layers.0.self_attn.q_norm.weight",
             f"{e}.up_proj.weight", f"{e}.down_proj.weight", "model.norm.weight"]
    dense = [i for i in range(model.config.num_hidden_layers) if i not in moe]
    if dense:
        names.append(f"model.layers.{dense[0]}.mlp.gate_proj.weight")
    return names


def full_grad_names(model) -> list[str]:
    moe = moe_layers(model)
    m1 = moe[1] if len(moe) > 1 else moe[0]
    return [f"model.layers.{m1}.mlp.gate.weight", "model.layers.0.self_attn.q_norm.weight", "model.norm.weight"]


def named(model, name: str, grad: bool) -> torch.Tensor:
    """Checkpoint-style name -> tensor (or its .grad); per-expert names slice the fused parameters."""
    parts = name.split(".")
    if ".mlp.experts." in name:
        layer, j, proj = int(parts[2]), int(parts[5]), parts[6]
        ex = model.model.layers[layer].mlp.experts
        inter = ex.down_proj.shape[-1]
        src = ex.down_proj if proj == "down_proj" else ex.gate_up_proj
        t = src.grad if grad else src.data
        t = t[j]
        if proj == "gate_proj":
            t = t[:inter]
        elif proj == "up_proj":
            t = t[inter:]
        return t
    p = model.get_parameter(name if name != "lm_head.weight" or not model.config.tie_word_embeddings
                            else "model.embed_tokens.weight")
    return p.grad if grad else p.data


def train_losses(model, ids):
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    coef = float(model.config.router_aux_loss_coef)
    total, aux = out.loss.item(), out.aux_loss.item()
    return out, total, aux, total - coef * aux


# ------------------------------------------------------------------------------------------ compute
@dataclass
class Run:
    """What every section reads: the fp32 eager model, its routing constants and the outputs."""
    folder: Path
    seed: int
    attempts: dict
    model: Qwen3MoeForCausalLM
    a: dict = field(default_factory=dict)
    sc: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.model.config.num_experts_per_tok

    @property
    def E(self) -> int:
        return self.model.config.num_experts

    @property
    def norm(self) -> bool:
        return self.model.config.norm_topk_prob


def compute(folder: Path, seed: int, attempts: dict, prompts: dict, bf16: bool):
    """Every reference array for the model stored in `folder` (plus self-consistency stats)."""
    torch.manual_seed(0)
    r = Run(folder, seed, attempts, load_model(folder))
    ids, caps, out = _plain(r)
    _plain_checks(r, ids, caps, out)
    _other_attention(r, ids)
    _padding(r)
    _generation(r, prompts)
    _long(r)
    _train(r, ids)
    if bf16:
        _bf16(r, ids)
    return r.a, r.sc


def _plain(r: Run):
    """(a) a plain batch: outputs, per-layer captures, routing, losses."""
    model, a, k, E, norm, seed, attempts = r.model, r.a, r.k, r.E, r.norm, r.seed, r.attempts
    coef, moe = float(model.config.router_aux_loss_coef), moe_layers(model)
    ids = torch.from_numpy(rng(seed, 1, attempts["a"]).integers(0, ID_HIGH, (2, SEQ)))
    a["input_ids"] = i64(ids)
    caps: dict[str, list] = {"layer": [], "attn": [], "mlp": []}
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(lambda m, i, o: caps["layer"].append(o.detach().clone())))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, i, o: caps["attn"].append(o[0].detach().clone())))
        hooks.append(layer.mlp.register_forward_hook(lambda m, i, o: caps["mlp"].append(o.detach().clone())))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_router_logits=True, use_cache=False)
    for h in hooks:
        h.remove()
    a["logits"] = f32(out.logits)
    a["hidden_states"] = np.stack([f32(h) for h in out.hidden_states])
    a["layer_outputs"] = np.stack([f32(t) for t in caps["layer"]])
    a["attn_outputs"] = np.stack([f32(t) for t in caps["attn"]])
    a["mlp_outputs"] = np.stack([f32(t) for t in caps["mlp"]])
    rot = model.model.rotary_emb
    a["rope_inv_freq"] = f32(rot.inv_freq)
    a["rope_attention_scaling"] = np.float64(rot.attention_scaling)
    a["router_logits"] = np.stack([f32(r) for r in out.router_logits])
    a["moe_layer_indices"] = np.asarray(moe, np.int64)
    tk = [topk_info(r, k, norm) for r in out.router_logits]
    a["router_topk_idx"] = np.stack([i64(t[0]) for t in tk])
    a["router_topk_weight"] = np.stack([f32(t[1]) for t in tk])
    a["router_topk_margin"] = np.stack([f32(t[2]) for t in tk])
    a["expert_counts"] = np.stack([np.bincount(i.ravel(), minlength=E) for i in a["router_topk_idx"]]).astype(np.int64)
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids, use_cache=False)
        full = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    a["lm_loss"] = np.float64(float(plain.loss))
    a["aux_loss"] = np.float64(float(full.aux_loss))
    a["total_loss"] = np.float64(float(full.loss))
    a["router_aux_loss_coef"] = np.float64(coef)
    return ids, caps, out


def _plain_checks(r: Run, ids, caps, out) -> None:
    """Self-consistency of (a): hidden-state semantics, losses recomputed by hand, batch == rows."""
    model, a, sc, k, E = r.model, r.a, r.sc, r.k, r.E
    coef = float(model.config.router_aux_loss_coef)
    fin = model.model.norm(caps["layer"][-1])
    sc["hidden_states_semantics_ok"] = bool(
        np.array_equal(a["hidden_states"][1:-1], a["layer_outputs"][:-1])
        and np.abs(a["hidden_states"][-1] - f32(fin)).max() == 0.0)
    lg = out.logits.double()
    ce = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
    sc["lm_loss_manual_absdiff"] = abs(float(ce) - float(a["lm_loss"]))
    f = np.zeros(E)
    P = np.zeros(E)
    for r in a["router_logits"].astype(np.float64):
        p = np.exp(r - r.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        f += np.bincount(np.argsort(-p, -1, kind="stable")[:, :k].ravel(), minlength=E)
        P += p.sum(0)
    T = a["router_logits"].shape[0] * a["router_logits"].shape[1]
    sc["aux_loss_manual_absdiff"] = abs(E * float((f / T * P / T).sum()) - float(a["aux_loss"]))
    sc["total_minus_parts_absdiff"] = abs(float(a["total_loss"]) - float(a["lm_loss"]) - coef * float(a["aux_loss"]))
    with torch.no_grad():
        single = np.concatenate([f32(model(input_ids=ids[b:b + 1], use_cache=False).logits) for b in range(2)])
    sc["batch_vs_single_maxabs"] = float(np.abs(single - a["logits"]).max())
    lgn = a["logits"]
    top2 = np.sort(lgn, -1)[..., -2:]
    sc.update(logits_std=float(lgn.std()), logits_mean_abs=float(np.abs(lgn).mean()),
              logits_absmax=float(np.abs(lgn).max()),
              logits_top1_top2_gap_min=float((top2[..., 1] - top2[..., 0]).min()),
              router_margin_min=float(a["router_topk_margin"].min()),
              router_margin_median=float(np.median(a["router_topk_margin"])),
              expert_counts=a["expert_counts"].tolist(),
              argmax_unique_tokens=int(len(np.unique(lgn.argmax(-1)))))


def _other_attention(r: Run, ids) -> None:
    """The same logits through sdpa attention and through a float64 model."""
    folder, sc, lgn = r.folder, r.sc, r.a["logits"]
    sdpa = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa",
                                               experts_implementation="eager").eval()
    with torch.no_grad():
        sc["logits_maxabs_vs_sdpa_eager"] = float(np.abs(f32(sdpa(input_ids=ids).logits) - lgn).max())
        m64 = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager",
                                                  experts_implementation="eager").eval()
        sc["fp32_vs_fp64_maxabs"] = float(np.abs(t2n(m64(input_ids=ids).logits) - lgn).max())
    del sdpa, m64


def _padding(r: Run) -> None:
    """(b) a left-padded batch: default and mask-derived positions, padded losses."""
    model, a, sc, k, E, seed, attempts = r.model, r.a, r.sc, r.k, r.E, r.seed, r.attempts
    pids, pmask, ppos = padded_batch(seed, attempts["b"])
    a["padded_input_ids"], a["padded_attention_mask"], a["padded_position_ids"] = i64(pids), i64(pmask), i64(ppos)
    labels = pids.masked_fill(pmask == 0, -100)
    with torch.no_grad():
        a["padded_logits"] = f32(model(input_ids=pids, attention_mask=pmask, use_cache=False).logits)
        a["padded_logits_maskpos"] = f32(model(input_ids=pids, attention_mask=pmask, position_ids=ppos,
                                               use_cache=False).logits)
        a["padded_row1_unpadded_logits"] = f32(model(input_ids=pids[1:, N_PAD:], use_cache=False).logits)
        pa = model(input_ids=pids, attention_mask=pmask, position_ids=ppos, output_router_logits=True,
                   use_cache=False)
        pl = model(input_ids=pids, attention_mask=pmask, position_ids=ppos, labels=labels, use_cache=False)
    a["padded_aux_loss"] = np.float64(float(pa.aux_loss))
    a["padded_lm_loss"] = np.float64(float(pl.loss))
    sc["padded_maskpos_row1_vs_unpadded_maxabs"] = float(
        np.abs(a["padded_logits_maskpos"][1, N_PAD:] - a["padded_row1_unpadded_logits"][0]).max())
    sc["padded_default_pos_row1_vs_unpadded_maxabs"] = float(
        np.abs(a["padded_logits"][1, N_PAD:] - a["padded_row1_unpadded_logits"][0]).max())
    with torch.no_grad():
        row0 = f32(model(input_ids=pids[:1], use_cache=False).logits)
    sc["padded_row0_vs_unpadded_maxabs"] = float(np.abs(a["padded_logits"][0] - row0[0]).max())
    real = pmask.reshape(-1).bool()
    f = torch.zeros(E, dtype=torch.float64)
    P = torch.zeros(E, dtype=torch.float64)
    for r in pa.router_logits:
        p = torch.softmax(r.double()[real], -1)
        f += torch.bincount(torch.topk(p, k, -1).indices.reshape(-1), minlength=E)
        P += p.sum(0)
    n = float(real.sum()) * len(pa.router_logits)
    sc["padded_aux_manual_absdiff"] = abs(E * float((f / n * P / n).sum()) - float(a["padded_aux_loss"]))


def _generation(r: Run, prompts: dict) -> None:
    """(c) greedy generation of a text and a chat prompt, batched and per row."""
    model, a, sc, folder = r.model, r.a, r.sc, r.folder
    tok = AutoTokenizer.from_pretrained(folder)
    gids, gmask, chat_text = gen_inputs(tok, prompts)
    g = generate(model, gids, gmask)
    P_len = gids.shape[1]
    a["gen_input_ids"], a["gen_attention_mask"] = i64(gids), i64(gmask)
    a["gen_output_ids"] = i64(g.sequences)
    a["gen_new_ids"] = i64(g.sequences[:, P_len:])
    a["gen_step_logits"] = np.stack([f32(x) for x in g.logits])
    st = np.sort(a["gen_step_logits"], -1)
    a["gen_step_margin"] = (st[..., -1] - st[..., -2]).T.astype(np.float32).copy()
    for i in range(2):
        prompt = gids[i][gmask[i] > 0][None]
        a[f"gen_single{i}_output_ids"] = i64(generate(model, prompt, torch.ones_like(prompt)).sequences)
    sc["gen_prompt_text"], sc["gen_prompt_chat"] = prompts["text"], prompts["chat"]
    sc["gen_prompt_chat_rendered"] = chat_text
    sc["gen_prompt_lengths"] = [int(x) for x in gmask.sum(1)]
    sc["gen_eos_generated"] = bool(np.isin(a["gen_new_ids"], EOS_IDS).any())
    sc["gen_step_margin_min"] = float(a["gen_step_margin"].min())
    fmask = torch.cat([gmask, torch.ones_like(g.sequences[:, P_len:])], 1)
    fpos = (fmask.cumsum(1) - 1).masked_fill(fmask == 0, 0)
    sc["gen_router_margin_min"] = float(router_margins(model, g.sequences[:, :-1], fmask[:, :-1], fpos[:, :-1]).min())
    sc["gen_batched_equals_single"] = all(
        np.array_equal(a["gen_output_ids"][i][a["gen_output_ids"][i] != PAD_ID] if i == 0 else a["gen_output_ids"][i],
                       a[f"gen_single{i}_output_ids"][0]) for i in range(2)) and not sc["gen_eos_generated"]
    with torch.no_grad():
        fl = f32(model(input_ids=g.sequences[:, :-1], attention_mask=fmask[:, :-1], position_ids=fpos[:, :-1],
                       use_cache=False).logits)[:, P_len - 1:]
    sc["gen_kvcache_vs_full_forward_maxabs"] = float(np.abs(fl.transpose(1, 0, 2) - a["gen_step_logits"]).max())
    sc["gen_decoded"] = tok.batch_decode(a["gen_new_ids"])


def _long(r: Run) -> None:
    """A sequence longer than yarn's original context."""
    model, a, sc, seed, attempts = r.model, r.a, r.sc, r.seed, r.attempts
    lids = torch.from_numpy(rng(seed, 3, attempts["long"]).integers(0, ID_HIGH, (1, LONG)))
    with torch.no_grad():
        a["long_logits"] = f32(model(input_ids=lids, use_cache=False).logits)
    a["long_input_ids"] = i64(lids)
    sc["long_router_margin_min"] = float(router_margins(model, lids).min())


def _train(r: Run, ids) -> None:
    """(e) gradients of lm + aux and (f) one torch AdamW step."""
    model, a, sc = r.model, r.a, r.sc
    model.train()
    model.zero_grad(set_to_none=True)
    out, total, aux, lm = train_losses(model, ids)
    out.loss.backward()
    a["train_loss_before"], a["train_aux_loss_before"], a["train_lm_loss_before"] = map(np.float64, (total, aux, lm))
    sc["train_loss_before_vs_eval_total_loss_absdiff"] = abs(total - float(a["total_loss"]))
    names = grad_names(model)
    a["grad_names"] = np.asarray(names)
    a["grad_norms"] = np.asarray([np.linalg.norm(t2n(named(model, n, True)).astype(np.float64)) for n in names])
    params = list(model.parameters())  # a tied weight appears once
    a["grad_global_norm"] = np.float64(math.sqrt(sum(float((t2n(p.grad).astype(np.float64) ** 2).sum())
                                                     for p in params if p.grad is not None)))
    for n in full_grad_names(model):
        a[f"grad.{n}"] = f32(named(model, n, True))
    before = {n: t2n(named(model, n, False)).copy() for n in names}
    opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    opt.step()
    a["adamw_update_norms"] = np.asarray([np.linalg.norm((t2n(named(model, n, False)) - before[n]).astype(np.float64))
                                          for n in names])
    for n in full_grad_names(model):
        a[f"param_after_step.{n}"] = f32(named(model, n, False))
    with torch.no_grad():
        _, total, aux, lm = train_losses(model, ids)
        a["train_loss_after"], a["train_aux_loss_after"], a["train_lm_loss_after"] = map(np.float64, (total, aux, lm))
        model.eval()
        sc["router_margin_min_after_adamw"] = float(router_margins(model, ids).min())


def _bf16(r: Run, ids) -> None:
    """The bf16 checkpoint run natively in bf16 against the fp32 references."""
    folder, a, sc, k, norm = r.folder, r.a, r.sc, r.k, r.norm
    mb = load_model(folder, torch.bfloat16)
    with torch.no_grad():
        ob = mb(input_ids=ids, output_router_logits=True, use_cache=False)
    a["logits_bf16"] = f32(ob.logits)
    d = a["logits_bf16"] - a["logits"]
    cos = (a["logits_bf16"] * a["logits"]).sum(-1) / (np.linalg.norm(a["logits_bf16"], axis=-1)
                                                      * np.linalg.norm(a["logits"], axis=-1))
    sc.update(bf16_run_vs_fp32_maxabs=float(np.abs(d).max()), bf16_run_vs_fp32_mean_abs=float(np.abs(d).mean()),
              bf16_run_vs_fp32_min_row_cosine=float(cos.min()),
              bf16_run_vs_fp32_argmax_agree=float((a["logits_bf16"].argmax(-1) == a["logits"].argmax(-1)).mean()),
              bf16_run_vs_fp32_routing_agree=float(np.mean([
                  np.array_equal(np.sort(i64(topk_info(rl.float(), k, norm)[0]), -1)[t], np.sort(a["router_topk_idx"][j], -1)[t])
                  for j, rl in enumerate(ob.router_logits) for t in range(rl.shape[0])])))
