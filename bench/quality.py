"""Quantization quality on a trained model: perplexity, KL divergence and top-1 agreement vs fp32.

    python bench/quality.py [--model tests/fixtures/quality/model] [--text tests/fixtures/quality/heldout.txt]
        [--modes fp32,int8,int4-g32,int4-g64,int4-g128] [--path forward|decode] [--no-results]

The fixture is a small Qwen3-MoE trained by the demo pipeline (tools/make_quality_fixture.py), the
text is held out from its training corpus. The text is tokenized once, cut into non-overlapping
windows of WINDOW tokens, and every mode scores the same windows: perplexity over all next-token
predictions, and against fp32's distributions at the same positions the mean KL(p_fp32 || p_mode)
and the fraction of positions whose argmax agrees. Budgets (issue 14): int8 ppl <= +1%, int4 g128
<= +5% vs fp32. tests/test_quant_quality.py asserts them on the same fixture and text.
--path decode scores every mode except the fp32 reference through the generation engine instead
of the forward pass: the first token is a prefill, every next one a decode step fed the true token
(teacher forcing), so the fused decode kernels make the predictions. The "-a8" modes (the opt-in
int8 activations, QuantizationConfig(activations="int8")) run on both paths: the forward pass is
the prefill's arithmetic (kernels/csrc/quant_gemm8.h), the decode path the decode kernels'.
The "-h6" modes hold the lm_head in the opt-in 6 bits per channel (QuantizationConfig(lm_head_bits=6))
instead of int8; their budgets are their base mode's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "quality"
WINDOW, BATCH = 128, 16
MODES = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(quantization="int8"),
    "int4-g32": dict(quantization="int4", group_size=32),
    "int4-g64": dict(quantization="int4", group_size=64),
    "int4-g128": dict(quantization="int4", group_size=128),
}
MODES.update({f"{m}-a8": dict(v, activations="int8") for m, v in MODES.items() if "quantization" in v})
# "-h6": the opt-in 6-bit lm_head (QuantizationConfig(lm_head_bits=6)) instead of int8
MODES.update({f"{m}-h6": dict(v, lm_head_bits=6) for m, v in MODES.items() if "quantization" in v})
BUDGET_PPL = {"int8": 0.01, "int4-g128": 0.05, "int8-a8": 0.01, "int4-g128-a8": 0.05,
              "int8-h6": 0.01, "int4-g128-h6": 0.05, "int8-a8-h6": 0.01, "int4-g128-a8-h6": 0.05}  # relative ppl increase


def windows(model_dir: Path, text_path: Path, max_windows: int | None = None) -> np.ndarray:
    """[N, WINDOW] int64 token windows of the held-out text (the model folder's tokenizer)."""
    from qwen3moe.io.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    ids = np.asarray(tok.encode(text_path.read_text(encoding="utf-8")), np.int64)
    n = len(ids) // WINDOW
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * WINDOW].reshape(n, WINDOW)


def _log_softmax(logits) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    logits -= logits.max(-1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


def log_probs(model, ids_NS: np.ndarray) -> np.ndarray:
    """[N, S, V] float32 log-softmax of the model's logits, BATCH windows per forward."""
    return np.concatenate([_log_softmax(model(ids_NS[i:i + BATCH]).logits.asnumpy())
                           for i in range(0, len(ids_NS), BATCH)])


def decode_log_probs(model, ids_NS: np.ndarray) -> np.ndarray:
    """The same through the generation engine: a 1-token prefill, then one decode step per true
    next token (teacher forcing), BATCH windows at a time."""
    from qwen3moe.generation.engine import get_engine

    out = []
    for i in range(0, len(ids_NS), BATCH):
        ids = ids_NS[i:i + BATCH]
        engine, P = get_engine(model, len(ids), 1, ids.shape[1])
        first, mask = np.zeros((len(ids), P), np.int64), np.zeros((len(ids), P), np.int64)
        first[:, -1], mask[:, -1] = ids[:, 0], 1  # the first token, left-padded to the prompt bucket
        steps = [engine.prefill(first, mask)]
        steps += [engine.decode(ids[:, t]) for t in range(1, ids.shape[1])]
        out.append(_log_softmax(np.stack(steps, 1)))
    return np.concatenate(out)


def metrics(lp: np.ndarray, ids_NS: np.ndarray, ref: np.ndarray | None) -> dict:
    """Perplexity of next tokens; with a reference [N,S,V] log-prob array also KL and top-1."""
    nll = -np.take_along_axis(lp[:, :-1], ids_NS[:, 1:, None], -1).mean()
    out = {"ppl": float(np.exp(nll)), "tokens": int(ids_NS[:, 1:].size)}
    if ref is not None:
        p = np.exp(ref.astype(np.float64))
        out["kl"] = float((p * (ref - lp)).sum(-1).mean())
        out["top1"] = float((ref.argmax(-1) == lp.argmax(-1)).mean())
    return out


def load(model_dir: Path, mode: str):
    from common import load_kwargs
    from qwen3moe import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM.from_pretrained(str(model_dir), **load_kwargs(MODES[mode]))


def evaluate(model_dir: Path, text_path: Path, modes: list[str], max_windows: int | None = None,
             path: str = "forward") -> dict:
    """{mode: {ppl, kl, top1, tokens}} on the same windows; fp32 is always evaluated first (by
    the forward pass: the reference); path "decode": the other modes through decode steps."""
    import mindspore as ms

    ms.set_device("CPU")
    ids = windows(model_dir, text_path, max_windows)
    results, ref = {}, None
    for mode in ["fp32"] + [m for m in modes if m != "fp32"]:
        model = load(model_dir, mode)
        lp = log_probs(model, ids) if mode == "fp32" or path == "forward" else decode_log_probs(model, ids)
        results[mode] = metrics(lp, ids, ref)
        if mode == "fp32":
            ref = lp
    return results


def report(results: dict) -> list[str]:
    base = results["fp32"]["ppl"]
    lines = []
    for mode, r in results.items():
        line = f"{mode:10s} ppl {r['ppl']:8.4f} ({(r['ppl'] / base - 1) * 100:+.3f}% vs fp32)"
        if "kl" in r:
            line += f"  mean KL {r['kl']:.6f}  top-1 agreement {r['top1'] * 100:.2f}%"
        if mode in BUDGET_PPL:
            ok = r["ppl"] / base - 1 <= BUDGET_PPL[mode]
            line += f"  budget +{BUDGET_PPL[mode] * 100:.0f}%: {'met' if ok else 'MISSED'}"
        lines.append(line)
    lines.append(f"{results['fp32']['tokens']} predicted tokens ({WINDOW}-token windows)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(FIXTURE / "model"))
    ap.add_argument("--text", default=str(FIXTURE / "heldout.txt"))
    ap.add_argument("--modes", default="fp32,int8,int4-g32,int4-g64,int4-g128")
    ap.add_argument("--path", choices=("forward", "decode"), default="forward")
    ap.add_argument("--no-results", action="store_true")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        sys.exit(f"--modes: unknown {bad[0]!r}; choose from {sorted(MODES)}")
    lines = report(evaluate(Path(a.model), Path(a.text), modes, path=a.path))
    lines.append(f"path: {a.path} (fp32 reference: forward)")
    print("\n".join(lines))
    if not a.no_results:
        cmd = "python bench/quality.py " + " ".join(sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as fh:
            fh.write(f"\n## Quantization quality (bench/quality.py)\n\n{stamp}, `{cmd.strip()}`\n\n```\n"
                     + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()
