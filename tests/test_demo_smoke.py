"""A shortened `python -m qwen3moe.demo` run: every output file is written and well-formed."""
from __future__ import annotations

import json


def test_demo_smoke(tmp_path, capsys):
    from qwen3moe import demo

    out = tmp_path / "demo"
    assert demo.main(["--steps", "6", "--batch", "2", "--seq-len", "32", "--new-tokens", "3",
                      "--out", str(out)]) == 0
    ckpt = out / "checkpoint"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "qwen3_moe"
    assert (out / "loss.png").is_file() or len((out / "loss.csv").read_text().splitlines()) == 7
    text = (out / "text_generation_result.txt").read_text()
    assert all(p in text for p in demo.PROMPTS)
    printed = capsys.readouterr().out
    assert "loss drop:" in printed and "step     6/6" in printed

    from qwen3moe import Qwen3MoeForCausalLM

    reloaded = Qwen3MoeForCausalLM.from_pretrained(str(ckpt))
    assert reloaded.config.vocab_size == 1024
