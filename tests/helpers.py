"""Shared test helpers (paths, reference-data lookup, a 2-process launcher). Test modules import
from here, never from each other or from conftest.py (which holds only pytest fixtures)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# shared/ sits beside the checkout (developer machines and CI); override with QWEN3MOE_SHARED
SHARED = Path(os.environ.get("QWEN3MOE_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
FIXTURES = REPO / "tests" / "fixtures"
HF_FIXTURES = FIXTURES / "hf"


def reference_dir(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_dir():  # a missing cross-check is an error, never a silent skip
        raise FileNotFoundError(f"reference data {path} not found; set QWEN3MOE_SHARED to the shared/ folder")
    return path


def parity_dirs() -> list[Path]:
    """tiny-a (independent cross-check) plus every committed fixture with a reference npz."""
    dirs = [REFERENCE / "tiny-a"]
    if HF_FIXTURES.is_dir():
        dirs += sorted(p for p in HF_FIXTURES.iterdir() if (p / "ref_outputs.npz").is_file())
    return dirs


def generation_dirs() -> list[Path]:
    """The parity folders whose reference npz holds HF generate() outputs (gen_output_ids)."""
    import numpy as np

    out = []
    for d in parity_dirs():
        with np.load(d / "ref_outputs.npz") as ref:
            if "gen_output_ids" in ref.files:
                out.append(d)
    return out


def cli_error(argv: list[str], capsys) -> str:
    """`qwen3moe <argv>` run in this process (cli.main), expected to refuse: exit code 2, stderr
    exactly one line `qwen3moe <command>: error: ...`, no traceback. Returns that line. Output
    printed before the call is dropped first."""
    from qwen3moe.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err[-2000:])
    assert err.startswith(f"qwen3moe {argv[0]}: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def launch(tmp_path, *cmd: str, timeout: int = 240, nproc: int = 2) -> tuple[int, str, list[dict]]:
    """`qwen3moe launch --nproc <nproc> -- cmd...` in tmp_path: (exit code, stderr, RESULT lines of all workers)."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO),
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "qwen3moe.cli", "launch", "--nproc", str(nproc), "--log_dir",
                           str(tmp_path / "logs"), "--timeout", str(timeout - 30), "--", *cmd],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    results = []
    for log in sorted((tmp_path / "logs").glob("worker_*.log")):
        results += [json.loads(line.split("RESULT ", 1)[1]) for line in log.read_text().splitlines()
                    if line.startswith("RESULT ")]
    return proc.returncode, proc.stderr, results


_REF_CACHE: dict = {}


def reference(cfg, model, ids, labels, dp: int, M: int, position_ids=None):
    """(loss, {name: gradient}) of the single-device model at its current weights: the
    unmodified model's loss (mean CE over valid labels + coef * pooled aux) and MindSpore
    gradients, accumulated over M micro-batches as dp x M would split the global batch
    (RoPE positions `position_ids`, default 0..S-1)."""
    weights = hashlib.sha1(b"".join(p.asnumpy().tobytes() for p in model.trainable_params())).hexdigest()
    pos = None if position_ids is None else position_ids.tobytes()
    key = (weights, ids.tobytes(), labels.tobytes(), dp, M, pos)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = _reference(cfg, model, ids, labels, dp, M, position_ids)
    return _REF_CACHE[key]


def _reference(cfg, model, ids, labels, dp: int, M: int, position_ids=None):
    import mindspore as ms
    from mindspore import ParameterTuple

    from qwen3moe.models.inputs import prepare_inputs

    B = ids.shape[0]
    b = B // (dp * M)
    params = ParameterTuple(model.trainable_params())
    n_valid = float((labels[:, 1:] != -100).sum())
    total, grads = 0.0, None
    for m in range(M):
        rows = [r for i in range(dp) for r in range(i * B // dp + m * b, i * B // dp + (m + 1) * b)]
        t = prepare_inputs(cfg, ids[rows], labels=labels[rows],
                           position_ids=None if position_ids is None else position_ids[rows])
        n_m = float((t.labels.asnumpy() != -100).sum())

        def objective():
            out = model.construct(t.input_ids, t.cos, t.sin, t.bias, t.token_mask, t.labels, 0, True, False)
            return out[2] * n_m / n_valid + cfg.router_aux_loss_coef * out[3] / M

        loss, g = ms.value_and_grad(objective, None, params)()
        total += float(loss.asnumpy())
        g = [x.asnumpy() for x in g]
        grads = g if grads is None else [a + x for a, x in zip(grads, g)]
    return total, {p.name: x for p, x in zip(params, grads)}


def clear_kernel_caches() -> None:
    """Forget every built-kernel lookup (lru_cache) so a changed QWEN3MOE_KERNELS takes effect."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("qwen3moe.kernels"):
            for obj in vars(mod).values():
                if callable(getattr(obj, "cache_clear", None)):
                    obj.cache_clear()


def make_run(seed: int, **step_kw):
    """(model, optimizer, TrainStep, schedule) of a 2-layer tiny model seeded `seed` (resume tests)."""
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed
    from qwen3moe.training import AdamW, cosine_with_warmup
    from qwen3moe.training.step import TrainStep

    set_init_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig.from_preset("tiny", num_hidden_layers=2))
    opt = AdamW(model.trainable_params(), lr=1e-3, weight_decay=0.1)
    sched = cosine_with_warmup(3e-3, 2, 6, min_lr=1e-4)
    return model, opt, TrainStep(model, opt, aux_coef=1e-3, z_coef=1e-4, clip=1.0, schedule=sched,
                                            **step_kw), sched


def batch_at(rng) -> "np.ndarray":
    """The next [2, 12] token batch of `rng`."""
    return rng.integers(0, 1000, (2, 12))


# ---- a third-party GPTQ folder, built with the independent packer (tools/gptq_unpack.py) -------
def _asym_act_order(W, bits: int, g: int, rng, blocks: int = 1, g_idx=None) -> tuple:
    """GPTQ-style asymmetric RTN with an act-order g_idx (given, or drawn): groups are g inputs of
    a permutation (blocks > 1: a permutation within each of `blocks` equal column blocks, so
    block b's columns use only groups of block b, as a row-parallel split into `blocks` ranks can
    hold exactly)."""
    import numpy as np

    O, I = W.shape
    maxq = 2 ** bits - 1
    n = I // blocks
    if g_idx is None:
        g_idx = np.concatenate([np.argsort(rng.permutation(n)) // g + b * (n // g)
                                for b in range(blocks)]).astype(np.int32)
    G = I // g
    scales = np.zeros((G, O), np.float16)
    z = np.zeros((G, O), np.int64)
    q = np.zeros((I, O), np.int64)
    for grp in range(G):
        cols = np.nonzero(g_idx == grp)[0]
        lo, hi = np.minimum(W[:, cols].min(1), 0), np.maximum(W[:, cols].max(1), 0)
        s = ((hi - lo) / maxq).astype(np.float16)
        scales[grp] = s
        z[grp] = np.clip(np.rint(-lo / s.astype(np.float32)), 0, maxq)
        q[cols] = np.clip(np.rint(W[:, cols].T / s.astype(np.float32)) + z[grp], 0, maxq)
    z[0, :3] = 0  # zero points of 0: v1 stores them as 2^b - 1 (read back modulo 2^b)
    return q, z, scales, g_idx


def third_party_gptq_folder(folder: Path, src: Path, bits: int, v1: bool, blocks: int = 1,
                            shared_maps: bool = False) -> tuple:
    """`src` (a float fixture) with every projection asymmetric, act-order (desc_act, group 32)
    GPTQ-packed by tools/gptq_unpack.pack into `folder`; returns the folder and the independent
    dequantization of each projection. Each projection draws its own map, or with `shared_maps`
    as GPTQ makes them: projections of the same input (q/k/v; an expert's gate/up) share one,
    since GPTQ orders the columns by the Hessian of that input."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    sys.path.insert(0, str(REPO / "tools"))
    import gptq_unpack  # independent implementation of the format

    folder.mkdir()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    rng = np.random.default_rng(bits)
    out, deq, maps = {}, {}, {}
    for name, W in tensors.items():
        if not name.endswith("proj.weight"):
            out[name] = W
            continue
        same_input = name.replace("up_proj", "gate_proj").replace("k_proj", "q_proj").replace("v_proj", "q_proj")
        q, z, s, g_idx = _asym_act_order(W, bits, 32, rng, blocks, maps.get(same_input) if shared_maps else None)
        maps[same_input] = g_idx
        packed = gptq_unpack.pack(q, z, s, g_idx, bits, v1=v1)
        prefix = name[:-len(".weight")]
        out.update({f"{prefix}.{k}": v for k, v in packed.items()})
        deq[name] = gptq_unpack.dequantize(packed["qweight"], packed["qzeros"], packed["scales"],
                                           packed["g_idx"], bits, v1=v1)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": 32, "sym": False,
                                  "desc_act": True, "damp_percent": 0.01, "true_sequential": True,
                                  **({} if v1 else {"checkpoint_format": "gptq_v2"})}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, deq


def dequantized_reference(qm, deq: dict, fp32_dir: Path):
    """The fp32 model of `fp32_dir` holding an independent unpacker's dequantized weights `deq`
    (HF name -> W [O, I] of each projection) and the quantized model `qm`'s own int8 lm_head
    (the float lm_head is quantized on load)."""
    import numpy as np

    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.io.quantized import quantized_cells
    from qwen3moe.layers.dtypes import write_param
    from qwen3moe.layers.quant import dequantize

    ref = Qwen3MoeForCausalLM.from_pretrained(fp32_dir)
    params = {p.name: p for p in ref.get_parameters()}
    E = ref.config.num_experts
    for name, p in params.items():
        if name.endswith("experts.gate_up_proj"):
            base = name[:-len("gate_up_proj")]
            write_param(p, np.stack([np.concatenate([deq[f"{base}{j}.gate_proj.weight"],
                                                     deq[f"{base}{j}.up_proj.weight"]]) for j in range(E)]))
        elif name.endswith("experts.down_proj"):
            write_param(p, np.stack([deq[f"{name[:-len('down_proj')]}{j}.down_proj.weight"] for j in range(E)]))
        elif name in deq:
            write_param(p, deq[name])
    head = quantized_cells(qm)["lm_head.weight"]
    write_param(params["lm_head.weight"], dequantize(head.qweight.asnumpy(), head.scales.asnumpy(),
                                                     head.qzeros.asnumpy(), 8))
    return ref


def assert_close_to_reference(qm, ref, rel_tol: float) -> None:
    """qm's logits of a fixed (2, 8) batch within rel_tol x max|logit| of ref's, and the same
    6 greedy tokens: a quantized model against the fp32 model of its dequantized weights."""
    import numpy as np

    ids = np.random.default_rng(4).integers(0, qm.config.vocab_size, (2, 8))
    a, b = qm(ids).logits.asnumpy(), ref(ids).logits.asnumpy()
    np.testing.assert_allclose(a, b, rtol=0, atol=rel_tol * np.abs(b).max())
    kw = dict(max_new_tokens=6, do_sample=False, ignore_eos=True)
    np.testing.assert_array_equal(np.asarray(qm.generate(ids, **kw)), np.asarray(ref.generate(ids, **kw)))


# ---- an AWQ folder, built with the independent packer (tools/awq_unpack.py) -----------------
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}


def awq_folder(folder: Path, src: Path, **config) -> tuple:
    """`src` (a float fixture) with every projection asymmetric-RTN-quantized (4 bits, group 32)
    and AWQ-packed by tools/awq_unpack.pack into `folder` (`config`: quantization_config entries
    replacing AWQ_CONFIG's); returns the folder and the independent dequantization of each
    projection."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    sys.path.insert(0, str(REPO / "tools"))
    import awq_unpack  # independent implementation of the format

    folder.mkdir()
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    rng = np.random.default_rng(0)
    out, deq = {}, {}
    for name, W in tensors.items():
        if not name.endswith("proj.weight"):
            out[name] = W
            continue
        q, z, s, _ = _asym_act_order(W, 4, 32, rng, g_idx=np.arange(W.shape[1]) // 32)
        packed = awq_unpack.pack(q, z, s)
        out.update({f"{name[:-len('.weight')]}.{k}": v for k, v in packed.items()})
        deq[name] = awq_unpack.dequantize(packed["qweight"], packed["qzeros"], packed["scales"])
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {**AWQ_CONFIG, **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    for side in src.glob("*.json"):  # tokenizer and generation config
        if side.name not in ("config.json", "model.safetensors.index.json"):
            (folder / side.name).write_bytes(side.read_bytes())
    return folder, deq
