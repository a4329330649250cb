"""TP / EP / DP / PP on real processes (`qwen3moe launch --nproc N -- generate / pretrain /
dist-parallel --use_parallel ...`, msrun; shared-memory collectives by default), each launch
its own job with a timeout, against single-process runs computed here with the unmodified
model: generated tokens identical; training losses and parameters after AdamW within fp32
tolerances (see tests/test_parallel_train.py for why: summation order only, eps = 1e-3 bounds
AdamW's amplification of gradient differences near 0)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import mindspore as ms

from helpers import launch

pytestmark = [pytest.mark.dist]  # slow per test; in make test: the dp2 x ep2 sampled generation and
# `pretrain --use_parallel` tp2 on Megatron data


def by_rank(results: list[dict]) -> dict[int, dict]:
    out = {r["rank"]: r for r in results}
    assert sorted(out) == [0, 1], results
    return out


PROMPTS = "hello world\nthe quick brown fox jumps over\nonce upon a time\nin the beginning\nfive\n"
SAMPLED = ["--do_sample", "true", "--seed", "7", "--temperature", "0.8", "--top_k", "20", "--top_p", "0.9",
           "--min_p", "0.05", "--repetition_penalty", "1.2", "--presence_penalty", "0.3"]
PC = "--parallel_config."
GEN_LAYOUTS = {"tp2": [PC + "model_parallel", "2"], "dp2ep2": [PC + "data_parallel", "2", PC + "expert_parallel", "2"],
               "dp2": [PC + "data_parallel", "2"], "tp2ep2": [PC + "model_parallel", "2", PC + "expert_parallel", "2"],
               "pp2": [PC + "pipeline_stage", "2"], "pp2tp2": [PC + "pipeline_stage", "2", PC + "model_parallel", "2"],
               "pp2dp2": [PC + "pipeline_stage", "2", PC + "data_parallel", "2"]}


def generate_both(tmp_path, layout: list[str], *options: str, nproc: int = 2
                  ) -> tuple[list[dict], list[dict], str, str]:
    """`qwen3moe generate` with `options` on PROMPTS under `launch --nproc N ... --use_parallel True`
    and as one process: (parallel results, single results, rank 0's log, the single stderr)."""
    import os
    import subprocess
    import sys

    from helpers import HF_FIXTURES, REPO

    (tmp_path / "prompts.txt").write_text(PROMPTS)
    common = ["generate", "--pretrained_model_dir", str(HF_FIXTURES / "tiny-fp32-gqa"), "--predict_data",
              str(tmp_path / "prompts.txt"), "--max_new_tokens", "8", *options]
    rc, err, _ = launch(tmp_path, *common, "--use_parallel", "True", *layout, "--output", str(tmp_path / "par.jsonl"),
                        timeout=240 if nproc == 2 else 420, nproc=nproc)
    assert rc == 0, err[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    single = subprocess.run([sys.executable, "-m", "qwen3moe.cli", *common, "--output", str(tmp_path / "one.jsonl")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    par, one = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("par.jsonl", "one.jsonl"))
    assert [p["prompt"] for p in par] == PROMPTS.split("\n")[:-1]
    return par, one, (tmp_path / "logs" / "worker_0.log").read_text(), single.stderr


def same_completions(par: list[dict], one: list[dict]) -> None:
    assert [(p["completion"], p["completion_tokens"], p["prompt_tokens"]) for p in par] == \
        [(o["completion"], o["completion_tokens"], o["prompt_tokens"]) for o in one]


@pytest.mark.parametrize("layout", [pytest.param("tp2", marks=pytest.mark.slow), "dp2ep2",
                                    pytest.param("tp2ep2", marks=pytest.mark.slow),
                                    pytest.param("dp2", marks=pytest.mark.slow),
                                    pytest.param("pp2", marks=pytest.mark.slow)])
def test_generate_use_parallel_sampled_batches_match_single_process(tmp_path, layout):
    """`generate --use_parallel True`, --predict_batch_size 4 on 5 prompts of different lengths (a
    left-padded batch of 4, then one prompt filled to 4 rows), seeded sampling with temperature,
    top-k, top-p, min-p, repetition and presence penalties: the completions of one process, token
    for token. One row stops early at EOS while the others go on (per-row EOS; with dp its rank
    keeps stepping until all rows are done). dp ranks take 2 rows each and keep their rows' draws
    of the batch's random stream (fails if a rank draws for its own rows only). pp2: two
    micro-batches of 2 rows overlapped across the stages, the last stage sampling each with its
    rows' draws and sending the tokens back. Before: "greedy only" / "one prompt at a time"
    refusals, or a ValueError traceback for dp2 x ep2."""
    par, one, log0, _ = generate_both(tmp_path, GEN_LAYOUTS[layout], "--predict_batch_size", "4", *SAMPLED)
    assert any(o["completion_tokens"] < 8 for o in one) and any(o["completion_tokens"] == 8 for o in one)
    same_completions(par, one)
    if "pp" not in layout:  # pp = 1 ranks decode with the fused kernels (parallel/fused_step.py)
        assert "(fused step)" in log0


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2ep2", "dp2ep2", "tp2", "pp2"])
def test_generate_use_parallel_greedy_stream_matches_single_process(tmp_path, layout):
    """Greedy, batch 1, --stream: the completions of one process, and rank 0 streams each
    completion's text (rank 1 prints none; pp2: rank 0 is the first stage, which receives the
    tokens the last stage picks)."""
    par, one, log0, single_err = generate_both(tmp_path, GEN_LAYOUTS[layout], "--do_sample", "false", "--stream")
    same_completions(par, one)
    if "pp" not in layout:
        assert "(fused step)" in log0
    log1 = (tmp_path / "logs" / "worker_1.log").read_text()
    for o in one:
        assert o["completion"] + "\n" in single_err and o["completion"] + "\n" in log0
        assert o["completion"] + "\n" not in log1


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2tp2", "pp2dp2"])
def test_generate_use_parallel_pipeline_on_four_processes_matches_single_process(tmp_path, layout):
    """pp2 x tp2 and pp2 x dp2 on 4 processes, greedy, batch 4 (5 prompts, left padding): the
    completions of one process. tp2: each stage's graphs hold the tp collectives, both tp ranks
    of the last stage sample and each sends to its own first stage; dp2: each dp rank's pipeline
    runs 2 micro-batches of 1 row (the second batch's dummy rows included) and the last stages
    all-reduce the done flags, so both pipelines run the same steps."""
    par, one, _, _ = generate_both(tmp_path, GEN_LAYOUTS[layout], "--predict_batch_size", "4", "--do_sample", "false",
                                   nproc=4)
    same_completions(par, one)


@pytest.mark.slow  # make test's `pretrain --use_parallel` run: the tp2 Megatron-data case below
@pytest.mark.parametrize("zero1,accum", [(False, 1), (True, 1), (False, 2)],
                         ids=["adamw", "zero1", "accum2"])
def test_pretrain_use_parallel_dp2_loss_curve(tmp_path, zero1, accum):
    """`qwen3moe launch --nproc 2 -- pretrain --use_parallel True --parallel_config.data_parallel 2`
    logs, on every rank, the loss curve of single-process training with the same config: the
    reference here is TrainStep (compiled, clipping, cosine schedule, Megatron-normalised aux
    loss with a coefficient large enough that a K-fold error shows) on the same batches.
    Both run the compiled per-rank step (parallel/step.py): pure dp writes single-process
    checkpoints, ZeRO-1 sharded ones (each rank's optimizer chunk)."""
    import re

    from helpers import REPO
    from qwen3moe.training.recipe import build_data, build_model, build_schedule, requested_samples, total_steps
    from qwen3moe.training.task_config import load_task_config as load
    from qwen3moe.training.optimizer import AdamW
    from qwen3moe.training.step import TrainStep

    np.save(tmp_path / "tok.npy", np.random.default_rng(0).integers(0, 1024, 4000).astype(np.int32))
    yaml = (REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml").read_text()
    (tmp_path / "t.yaml").write_text(yaml.replace("per_print_times: 2", "per_print_times: 1"))
    overrides = ["--model.model_config.num_hidden_layers", "2", "--model.model_config.moe_router_load_balancing_type",
                 "aux_loss", "--model.model_config.moe_aux_loss_coeff", "0.05", f"--train_dataset.data_loader.config.data_path=['{tmp_path / 'tok.npy'}']",
                 "--runner_config.train_steps", "4", "--runner_config.batch_size", "4", "--optimizer.eps", "1e-3",
                 "--output_dir", str(tmp_path / "out"), "--parallel.enable_parallel_optimizer", str(zero1),
                 "--runner_config.gradient_accumulation_steps", str(accum)]
    rc, err, _ = launch(tmp_path, "pretrain", "--config", str(tmp_path / "t.yaml"), *overrides,
                        "--use_parallel", "True", "--parallel_config.data_parallel", "2")
    assert rc == 0, err[-3000:]
    assert ("ZeRO-1" in (tmp_path / "logs" / "worker_0.log").read_text()) == zero1
    got = {}
    for r in (0, 1):
        text = (tmp_path / "logs" / f"worker_{r}.log").read_text()
        got[r] = [float(x) for x in re.findall(rf"^rank {r} step \d+(?:/4)? loss ([0-9.]+)", text, re.M)]
    if zero1:
        assert (tmp_path / "out" / "checkpoint_sharded" / "step_4" / "rank_1.safetensors").is_file()
    else:
        assert "compiled" in (tmp_path / "logs" / "worker_1.log").read_text()
        assert (tmp_path / "out" / "checkpoint" / "step_00000004" / "model.safetensors").is_file()

    cfg = load(str(tmp_path / "t.yaml"), overrides)
    ms.set_seed(cfg.seed)
    model = build_model(cfg)
    data, samples = build_data(cfg, requested_samples(cfg))
    steps = total_steps(cfg, samples)
    sched, o = build_schedule(cfg, steps), cfg.optimizer
    opt = AdamW(model.trainable_params(), lr=sched(0), betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    step = TrainStep(model, opt, clip=cfg.runner_wrapper.max_grad_norm, schedule=sched, **cfg.moe_training())
    ref = [step(data.batch(i)) for i in range(steps)]
    for r in (0, 1):
        np.testing.assert_allclose(got[r], [m["loss"] for m in ref], rtol=2e-5)  # printed with 6 decimals
    # rank 0's metrics: HF-scale aux value and lm loss as TrainStep reports them (float32 graph vs
    # float64 host sums: 1e-5 relative), and an MFU against the ranks' summed matmul probes
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["aux"] for r in recs], [m["aux"] for m in ref], rtol=1e-5)
    np.testing.assert_allclose([r["lm_loss"] for r in recs], [m["lm_loss"] for m in ref], rtol=1e-5)
    assert all(isinstance(r["mfu"], float) and 0 < r["mfu"] < 1.5 for r in recs)


@pytest.mark.slow
def test_sharded_load_peak_rss_per_rank_is_about_the_shard(tmp_path):
    """Real TP=2 load of an HF folder (~230 MiB fp32): each rank's peak RSS growth while loading
    stays below 0.75x the full model. A rank holds ~0.5x (vocab, attention and experts split,
    norms / router replicated) plus one tensor's read buffer and a layer's zero buffers (freed
    per layer); loading the model and then slicing it needs >= 1x, so the bound separates the
    two with room for allocator noise (measured: 0.63x, 154 MB of 243 MB, load average ~8)."""
    from qwen3moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from qwen3moe.layers.dtypes import set_init_seed

    set_init_seed(0)
    cfg = Qwen3MoeConfig.from_preset("tiny", vocab_size=32000, hidden_size=512, num_hidden_layers=3,
                                     mlp_only_layers=[0], num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=64, num_experts=32, moe_intermediate_size=256,
                                     intermediate_size=1024)
    model = Qwen3MoeForCausalLM(cfg)
    full = sum(p.asnumpy().nbytes for p in model.get_parameters())
    model.save_pretrained(tmp_path / "model")
    del model
    rc, err, results = launch(tmp_path, "dist-parallel", "--model", str(tmp_path / "model"), "--mode", "load",
                              "--tp", "2")
    assert rc == 0, err[-3000:]
    for r in by_rank(results).values():
        growth = r["peak_rss"] - r["rss_before"]
        print(f"rank {r['rank']}: peak RSS growth {growth / 1e6:.0f} MB ({growth / full:.2f}x), holds "
              f"{r['held_bytes'] / 1e6:.0f} MB, full model {full / 1e6:.0f} MB")
        assert r["bytes_read"] == r["held_bytes"] < 0.55 * full
        assert growth < 0.75 * full, (growth, full)


PRETRAIN_LAYOUTS = {"tp2": ["--parallel_config.model_parallel", "2"], "dp2": ["--parallel_config.data_parallel", "2"],
                    "tp2sp": ["--parallel_config.model_parallel", "2", "--parallel_config.use_seq_parallel", "True"],
                    "pp2": ["--parallel_config.pipeline_stage", "2", "--parallel_config.micro_batch_num", "2"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "dp2", "tp2sp", "pp2"])
def test_pretrain_use_parallel_checkpoints_resume_and_metrics(tmp_path, layout):
    """tp = 2 (weights sharded, not only replicated; sharded checkpoints), tp = 2 with sequence
    parallel (the same shards and checkpoints), pp = 2 (each stage its layers and AdamW state,
    sharded checkpoints) and dp = 2 (compiled
    replicas; single-process checkpoints written by rank 0): a 4-step run saving every
    2 steps; resuming from step 2 in a new launch logs exactly the first run's steps 3-4 (model
    + AdamW moments + step restored; batches and lr are functions of the step); rank 0
    wrote metrics.jsonl with a record per step; keep_checkpoint_max prunes."""
    import json
    import re

    from helpers import REPO

    np.save(tmp_path / "tok.npy", np.random.default_rng(1).integers(0, 1024, 4000).astype(np.int32))
    yaml = (REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml").read_text()
    yaml = yaml.replace("per_print_times: 2", "per_print_times: 1").replace("save_checkpoint_steps: 4",
                                                                          "save_checkpoint_steps: 2")
    (tmp_path / "t.yaml").write_text(yaml.replace("keep_checkpoint_max: 2", "keep_checkpoint_max: 3"))
    common = ["--config", str(tmp_path / "t.yaml"), "--model.model_config.num_hidden_layers", "2",
              f"--train_dataset.data_loader.config.data_path=['{tmp_path / 'tok.npy'}']",
              "--runner_config.train_steps", "4", "--runner_config.batch_size", "2", "--optimizer.eps", "1e-3",
              "--use_parallel", "True", *PRETRAIN_LAYOUTS[layout]]
    ck, steps = ("checkpoint", ["step_00000002", "step_00000004"]) if layout == "dp2" else \
        ("checkpoint_sharded", ["step_2", "step_4"])

    def losses(log_dir, r=0):
        text = (log_dir / f"worker_{r}.log").read_text()
        return {int(s): float(x) for s, x in re.findall(rf"^rank {r} step (\d+)(?:/4)? loss ([0-9.]+)", text, re.M)}

    out = tmp_path / "out"
    rc, err, _ = launch(tmp_path, "pretrain", *common, "--output_dir", str(out))
    assert rc == 0, err[-3000:]
    full = losses(tmp_path / "logs")
    assert sorted(full) == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / ck).iterdir()) == steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in records], [full[s] for s in (1, 2, 3, 4)], rtol=1e-6)

    (tmp_path / "logs").rename(tmp_path / "logs_full")
    rc, err, _ = launch(tmp_path, "pretrain", *common, "--resume_training", "True", "--load_checkpoint",
                        str(out / ck / steps[0]), "--output_dir", str(tmp_path / "out2"))
    assert rc == 0, err[-3000:]
    resumed = losses(tmp_path / "logs")
    assert sorted(resumed) == [3, 4]
    assert resumed == {s: full[s] for s in (3, 4)}  # exact (same printed digits)


@pytest.mark.slow  # a 2-process launch for an error path (~40 s); make test-slow runs it
def test_pretrain_replicas_batch_not_divisible_is_one_line_error(tmp_path):
    """Pure dp with runner_config.batch_size 3 over 2 replicas: a one-line error naming both keys."""
    from helpers import REPO

    np.save(tmp_path / "tok.npy", np.random.default_rng(0).integers(0, 1024, 4000).astype(np.int32))
    rc, err, _ = launch(tmp_path, "pretrain", "--config", str(REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml"),
                        f"--train_dataset.data_loader.config.data_path=['{tmp_path / 'tok.npy'}']",
                        "--runner_config.batch_size", "3", "--output_dir", str(tmp_path / "out"),
                        "--use_parallel", "True", "--parallel_config.data_parallel", "2")
    assert rc != 0
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("worker_*.log")))
    assert "runner_config.batch_size 3 is not divisible by parallel_config.data_parallel 2" in logs
    assert "Traceback" not in logs


def final_params(out, steps: int) -> dict[str, np.ndarray]:
    """HF-named parameters of the last training checkpoint of a parallel run: the sharded train
    state (every rank file assembled) or rank 0's single-process checkpoint (pure dp)."""
    from qwen3moe.io.safetensors_io import SafetensorsFile
    from qwen3moe.parallel.checkpoint import load_sharded

    if (out / "checkpoint_sharded").is_dir():
        return dict(load_sharded(out / "checkpoint_sharded" / f"step_{steps}"))
    st = SafetensorsFile(str(out / "checkpoint" / f"step_{steps:08d}" / "model.safetensors"))
    try:
        return {k: st.read(k) for k in st.keys()}
    finally:
        st.close()


_DP2, _ZERO1 = ["--parallel_config.data_parallel", "2"], ["--parallel.enable_parallel_optimizer", "True"]
_TP2 = ["--parallel_config.model_parallel", "2"]
_SP = ["--parallel_config.use_seq_parallel", "True"]


@pytest.mark.parametrize("layout, reset, eod_mask", [
    (_TP2, True, True),
    pytest.param(_TP2, False, False, marks=pytest.mark.slow),
    pytest.param(_TP2 + _SP, True, True, marks=pytest.mark.slow),  # sequence parallel, compiled
    pytest.param(_DP2 + ["--parallel_config.expert_parallel", "2"], True, True, marks=pytest.mark.slow),
    pytest.param(_DP2, True, True, marks=pytest.mark.slow),
    pytest.param(_DP2 + _ZERO1, True, True, marks=pytest.mark.slow),
    # a pipeline needs micro_batch_num >= pp: the reference accumulates the same two micro-batches,
    # each its own token mean (eod_mask_loss: unequal label counts), as the pipeline's groups
    pytest.param(["--parallel_config.pipeline_stage", "2", "--parallel_config.micro_batch_num", "2"], True, True,
                 marks=pytest.mark.slow),
    # 4 processes: two pipeline stages of two data-parallel ranks (each micro-batch's rows split)
    pytest.param(["--parallel_config.pipeline_stage", "2", "--parallel_config.micro_batch_num", "2"] + _DP2, True,
                 True, marks=pytest.mark.slow),
    # 4 processes: two pipeline stages of two tp ranks (gradients ~1000x too large until the
    # vocab-parallel cross-entropy's two reduces became two cells), and the same + sequence
    # parallel (stages exchange each rank's own token rows [1, t, H]; once the PyNative engine's)
    pytest.param(["--parallel_config.pipeline_stage", "2", "--parallel_config.micro_batch_num", "2"] + _TP2,
                 True, True, marks=pytest.mark.slow),
    pytest.param(["--parallel_config.pipeline_stage", "2", "--parallel_config.micro_batch_num", "2"] + _TP2 + _SP,
                 True, True, marks=pytest.mark.slow),
    # pipeline micro-batches without a pipeline: the compiled step accumulates over them
    pytest.param(_DP2 + ["--parallel_config.micro_batch_num", "2"], True, True, marks=pytest.mark.slow),
], ids=["tp2", "tp2-plain", "tp2sp", "dp2ep2", "dp2", "dp2-zero1", "pp2", "pp2dp2", "pp2tp2", "pp2tp2sp", "dp2-mb2"])
def test_pretrain_use_parallel_on_megatron_data(tmp_path, layout, reset, eod_mask):
    """`pretrain --use_parallel` on Megatron .bin/.idx data (reset_position_ids and eod_mask_loss
    true or false) == single-process TrainStep on the same batches: the loss every rank logs, rank
    0's metrics.jsonl losses (2e-6 relative: fp32 summation order over ranks) and the parameters
    of the final checkpoint after 3 AdamW steps (5e-5 absolute, eps 1e-3 bounds AdamW's
    amplification of gradient rounding; tests/test_parallel_train.py). Once a NotImplementedError
    for position_ids."""
    import re

    from helpers import FIXTURES, REPO
    from qwen3moe.training.recipe import build_data, build_model, build_schedule, requested_samples, total_steps
    from qwen3moe.training.optimizer import AdamW
    from qwen3moe.training.step import TrainStep
    from qwen3moe.training.task_config import load_task_config

    yaml = (REPO / "examples" / "configs" / "pretrain_tiny_cpu.yaml").read_text()
    (tmp_path / "t.yaml").write_text(yaml.replace("per_print_times: 2", "per_print_times: 1"))
    dc = "--train_dataset.data_loader.config."
    overrides = ["--model.model_config.num_hidden_layers", "2", "--model.model_config.moe_aux_loss_coeff", "0.05",
                 f"{dc}data_path=['{FIXTURES / 'megatron_gpt' / 'golden_a_text_document'}']",
                 f"{dc}seq_length", "16", f"{dc}pad", "null", f"{dc}eod", "1023",
                 f"{dc}reset_position_ids", str(reset), f"{dc}eod_mask_loss", str(eod_mask),
                 "--runner_config.train_steps", "3", "--optimizer.eps", "1e-3", "--output_dir", str(tmp_path / "out")]
    M = int(layout[layout.index("--parallel_config.micro_batch_num") + 1]) if "--parallel_config.micro_batch_num" \
        in layout else 1
    overrides += ["--runner_config.batch_size", str(4 // M), "--runner_config.gradient_accumulation_steps", str(M)]
    world = 4 if "--parallel_config.pipeline_stage" in layout and len(set(layout) & {
        "--parallel_config.data_parallel", "--parallel_config.model_parallel"}) else 2
    rc, err, _ = launch(tmp_path, "pretrain", "--config", str(tmp_path / "t.yaml"), *overrides,
                        "--use_parallel", "True", *layout, nproc=world, timeout=240 * world // 2)
    assert rc == 0, err[-3000:]
    got = {}
    for r in range(world):
        text = (tmp_path / "logs" / f"worker_{r}.log").read_text()
        got[r] = [float(x) for x in re.findall(rf"^rank {r} step \d+(?:/3)? loss ([0-9.]+)", text, re.M)]
        assert "compiled" in text  # every layout here: the compiled per-rank step

    cfg = load_task_config(str(tmp_path / "t.yaml"), overrides)
    ms.set_seed(cfg.seed)
    model = build_model(cfg)
    data, samples = build_data(cfg, requested_samples(cfg))
    first = data.batch(0)
    assert all(("position_ids" in b) == reset for b in (first if isinstance(first, list) else [first]))
    steps = total_steps(cfg, samples)
    sched, o = build_schedule(cfg, steps), cfg.optimizer
    opt = AdamW(model.trainable_params(), lr=sched(0), betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    step = TrainStep(model, opt, clip=cfg.runner_wrapper.max_grad_norm, schedule=sched, **cfg.moe_training())
    ref = [step(data.batch(i))["loss"] for i in range(steps)]
    for r in range(world):
        np.testing.assert_allclose(got[r], ref, rtol=2e-5)  # printed with 6 decimals
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([rec["loss"] for rec in recs], ref, rtol=2e-6)
    params = final_params(tmp_path / "out", steps)
    assert set(params) == {p.name for p in model.trainable_params()}
    for p in model.trainable_params():
        np.testing.assert_allclose(params[p.name], p.asnumpy(), rtol=0, atol=5e-5, err_msg=p.name)
