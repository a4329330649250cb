"""A shortened `python -m qwen3moe.demo` run: it learns, and what it saves is the model it trained.

12 steps of batch 2 x 32 tokens. The check is on the step-1 batch, which the demo scores again after
training. Measured: its LM loss went 6.929 (~ln 1024, uniform over the tiny vocabulary) -> 6.387,
a 7.8% fall (`python -c "from qwen3moe import demo; demo.main([...same args...])"`); we require
5%: margin for thread-order noise, while an update that does nothing (lr 0) or a broken gradient
fails. The logged step-1 value must be the untrained model's loss on that batch (1e-4: training
graph vs forward graph, different op order). Reload tolerance 1e-5: the same fp32 weights and
the same forward graph; the printed values carry 6 decimals.
"""
from __future__ import annotations

import json
import re

DROP = 0.05
ARGV = ["--steps", "12", "--batch", "2", "--seq-len", "32", "--new-tokens", "3"]


def test_demo_learns_and_its_checkpoint_reloads(tmp_path, capsys):
    from qwen3moe import Qwen3MoeForCausalLM, demo
    from qwen3moe.io.tokenizer import Tokenizer
    from qwen3moe.training import recipe

    out = tmp_path / "demo"
    argv = ARGV + ["--out", str(out)]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    logged = re.search(r"step-1 batch: lm loss ([\d.]+) at step 1 -> ([\d.]+) after training", printed)
    assert logged, printed[-2000:]
    first, final = float(logged[1]), float(logged[2])
    assert final <= (1 - DROP) * first, (first, final)

    ckpt = out / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "text_generation_result.txt").read_text()
    assert all(f"### {p!r}\n{p}" in text for p in demo.PROMPTS)

    tok = Tokenizer.from_pretrained(ckpt)  # the tokenizer files were copied beside the weights
    # the demo's run assembled again, untrained: same seed, same data order
    fresh = recipe.assemble(demo.task_config(tok, demo.build_megatron_corpus(tok, out), demo.parse_args(argv)))
    batch = fresh.data.batch(0)
    # the logged step-1 loss is the untrained model's loss on this batch ...
    assert abs(demo.batch_lm_loss(fresh.model, batch) - first) < 1e-4
    # ... and the saved folder holds the trained weights: it scores the logged final value
    reloaded = Qwen3MoeForCausalLM.from_pretrained(ckpt)
    assert abs(demo.batch_lm_loss(reloaded, batch) - final) < 1e-5
