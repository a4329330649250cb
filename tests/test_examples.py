"""Every examples/ script runs on the tiny reference folder and prints its throughput line."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import FIXTURES, REPO, reference_dir

pytestmark = pytest.mark.examples


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_generate_example_matches_hf_greedy_text():
    out = run_example("generate.py", "--model", str(reference_dir("tiny-a")), "--max-new-tokens", "12")
    # transformers 5.24 greedy continuation of this prompt (tiny-a ref_meta.json gen_decoded[0])
    assert out.startswith("Test\ufffd ne ExtendedContextCon beie dicheckie dicrue")
    assert "tok/s" in out and "peak RSS" in out


def test_chat_example_two_turns():
    """The transcript equals greedy generation on the chat template re-rendered with the history,
    each reply decoded without special tokens (what stream_generate promises to yield)."""
    from qwen3moe import Qwen3MoeForCausalLM, Tokenizer
    from qwen3moe.generation.generate import generate

    d, turns = reference_dir("tiny-a"), ["Hello! Who are you?", "Say that again, shorter."]
    out = run_example("chat.py", "--model", str(d), "--max-new-tokens", "8", "--turns", *turns)
    model, tok = Qwen3MoeForCausalLM.from_pretrained(d), Tokenizer.from_pretrained(d)
    history, want = [], ""
    for user in turns:
        history.append({"role": "user", "content": user})
        ids = np.array([tok.encode(tok.apply_chat_template(history, add_generation_prompt=True,
                                                           enable_thinking=False))])
        new = generate(model, ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        reply = tok.decode([int(t) for t in new], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
        want += f"user: {user}\nassistant: {reply}\n"
    transcript = "".join(line + "\n" for line in out.splitlines() if not line.startswith("  [prompt "))
    assert transcript.startswith(want), (out, want)
    assert "2 turns" in out
    cached = [int(line.split(", ")[1].split()[0]) for line in out.splitlines() if line.startswith("  [prompt ")]
    assert cached[0] == 0 and cached[1] > 0, out  # turn 2 starts from turn 1's cached tokens


def test_inspect_experts_example(tmp_path):
    """The printed per-layer busiest-expert share and the HF aux loss equal a NumPy recomputation
    from the router logits (softmax, top-k counts, E * sum_e f_e * P_e pooled over layers)."""
    from qwen3moe import Qwen3MoeForCausalLM, Tokenizer

    d, text = reference_dir("tiny-a"), "Experts route tokens; " * 5
    out = run_example("inspect_experts.py", "--model", str(d), "--text", text, "--png", str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    model = Qwen3MoeForCausalLM.from_pretrained(d)
    ids = np.array([Tokenizer.from_pretrained(d).encode(text)])
    logits_LTE = np.stack([t.asnumpy() for t in model(ids, output_router_logits=True).router_logits])
    L, T, E = logits_LTE.shape
    k = model.config.num_experts_per_tok
    p = np.exp(logits_LTE - logits_LTE.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    counts_LE = np.stack([np.bincount(np.argsort(-p[i], -1, kind="stable")[:, :k].ravel(), minlength=E)
                          for i in range(L)])
    shares = [float(v) for v in re.findall(r"moe layer +\d+: max share ([\d.]+)", out)]
    np.testing.assert_allclose(shares, (counts_LE / counts_LE.sum(1, keepdims=True)).max(1), atol=6e-4)
    aux = E * np.sum(counts_LE.sum(0) / (L * T) * p.reshape(-1, E).mean(0))
    assert abs(float(re.search(r"aux loss \(HF, pooled\) = ([\d.]+)", out)[1]) - aux) < 6e-5


@pytest.mark.slow  # ~15 s of CPU; make test trains on Megatron data through the CLI (test_pretrain_cli.py, README)
def test_pretrain_example_on_megatron_data(tmp_path):
    """The logged step-1 loss is the freshly initialised tiny model's LM + 1e-3 aux loss on the first
    batch, and the saved checkpoint holds trained weights that score that batch lower."""
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.io.gpt_dataset import build_gpt_dataset
    from qwen3moe.io.gpt_loader import GPTBatches
    from qwen3moe.layers.dtypes import set_init_seed

    prefix = str(FIXTURES / "megatron_gpt" / "golden_a_text_document")
    out = run_example("pretrain.py", "--data", prefix, "--steps", "4", "--batch", "2", "--seq-len", "16",
                      "--out", str(tmp_path))
    logged = float(re.search(r"step    1/4 loss ([\d.]+)", out)[1])
    batch = GPTBatches(build_gpt_dataset(prefix, 16, 8), 2).batch(0)
    set_init_seed(0)  # the example's recipe seeds the initialisation with the task config's seed (0)
    fresh = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", vocab_size=1024))
    first = fresh(batch["input_ids"], labels=batch["labels"], output_router_logits=True)
    assert abs(float(first.lm_loss.asnumpy()) + 1e-3 * float(first.aux_loss.asnumpy()) - logged) < 2e-4
    trained = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "checkpoint")
    after = float(trained(batch["input_ids"], labels=batch["labels"]).lm_loss.asnumpy())
    assert after < float(first.lm_loss.asnumpy()) - 0.01, (after, float(first.lm_loss.asnumpy()))


def test_preprocess_wikitext_script(tmp_path):
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "examples" / "preprocess_wikitext.sh"),
                           str(FIXTURES / "data" / "wiki.sample.tokens"),
                           str(REPO / "qwen3moe" / "assets" / "tiny-tokenizer"), str(tmp_path / "wiki")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from qwen3moe.io.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "wiki_text_document"))
    assert len(ds) == 2 and ds.num_tokens > 20
