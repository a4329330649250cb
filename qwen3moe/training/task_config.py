"""Seed-style YAML task configs (MindSpore Transformers shape) validated against dataclasses.

`load_task_config(path, overrides)` reads a task file such as MindSpore Transformers'
`pretrain_qwen3_30b_a3b_4k.yaml`, applies dotted overrides (`--parallel_config.model_parallel 2`,
values parsed with `yaml.safe_load`), and validates every key: an unknown key anywhere is a
`TaskConfigError` naming the full dotted path and the closest valid key (difflib). Sections
that only make sense on Ascend (`context`, `parallel`, `trainer`, ...) are accepted as free-form
and reported in `TaskConfig.notes`; MindSpore-Transformers model keys are mapped to HF names
(`moe_aux_loss_coeff` -> `router_aux_loss_coef`, ...) or noted as ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from qwen3moe.errors import TaskConfigError  # noqa: F401  (raised here, imported from here)
from qwen3moe.models.config import ConfigError, Qwen3MoeConfig


# ---- sections -------------------------------------------------------------------------------
@dataclass
class RunnerConfig:
    epochs: int = 1
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    sink_mode: bool = True
    sink_size: int = 1
    # qwen3moe additions: -1 = epochs * samples / batch (or lr_schedule.total_steps when set)
    train_steps: int = -1
    log_interval: int = 1
    nan_abort_after: int = 10           # abort after this many consecutive non-finite steps
    time_budget_s: float | None = None
    mfu_probe_size: int = 2048          # matmul size of the peak-FLOP/s probe; 0 = no MFU
    compute_dtype: str = "float32"      # decoder-layer compute: float32 | float16 (bf16: not on CPU)


@dataclass
class RunnerWrapperConfig:
    type: str = "MFTrainOneStepCell"
    scale_sense: Any = 1.0              # dynamic loss scale for fp16 compute (training/precision.py)
    use_clip_grad: bool = True
    max_grad_norm: float = 1.0


@dataclass
class OptimizerConfig:
    type: str = "AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    learning_rate: float | None = None  # seed files put it in lr_schedule; this wins when set
    no_decay_norms_and_biases: bool = False


@dataclass
class LRScheduleConfig:
    type: str = "ConstantWarmUpLR"
    learning_rate: float = 3e-5
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    total_steps: int = -1
    lr_end: float = 0.0
    min_lr: float | None = None
    warmup_lr_init: float = 0.0
    num_cycles: float = 0.5


@dataclass
class DataConfig:
    seed: int = 1234
    seq_length: int = 4096
    split: str = "1, 0, 0"
    data_path: list[Any] = field(default_factory=list)
    num_dataset_builder_threads: int = 1
    eod: int | None = 151643
    pad: int | None = 151643
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    create_attention_mask: bool = True
    create_compressed_eod_mask: bool = False
    eod_pad_length: int = 128
    mmap_bin_files: bool = True
    dataset_dir: str = ""


@dataclass
class DataLoaderConfig:
    type: str = "BlendedMegatronDatasetDataLoader"
    sizes: list[int] = field(default_factory=list)
    shuffle: bool = False
    config: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainDatasetConfig:
    data_loader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    input_columns: list[str] = field(default_factory=list)
    construct_args_key: list[str] = field(default_factory=list)
    num_parallel_workers: int = 8
    python_multiprocessing: bool = False
    drop_remainder: bool = True
    numa_enable: bool = False
    prefetch_size: int = 1
    seed: int = 1234
    batch_size: int | None = None
    repeat: int = 1


@dataclass
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    expert_parallel: int = 1
    micro_batch_num: int = 1
    vocab_emb_dp: bool = False
    use_seq_parallel: bool = False
    gradient_aggregation_group: int = 1
    context_parallel: int = 1
    expert_model_parallel: int | None = None


@dataclass
class RecomputeConfig:
    recompute: Any = False
    select_recompute: Any = False
    parallel_optimizer_comm_recompute: bool = False
    mp_comm_recompute: bool = True
    recompute_slice_activation: bool = False
    select_comm_recompute: Any = False


@dataclass
class ModelSection:
    model_config: dict[str, Any] = field(default_factory=dict)  # validated in model_config()
    preset: str = ""                     # qwen3moe addition: a named preset under model_config
    arch: dict[str, Any] = field(default_factory=dict)   # legacy `arch: {type: ...}`


@dataclass
class TaskConfig:
    seed: int = 0
    output_dir: str = "./output"
    run_mode: str = "train"
    load_checkpoint: str = ""
    load_ckpt_format: str = "safetensors"
    auto_trans_ckpt: bool = False
    only_save_strategy: bool = False
    resume_training: Any = False
    resume_override: Any = field(default_factory=list)  # qwen3moe addition: [model, data] or "model,data"
    use_parallel: bool = False
    use_legacy: bool = False
    pretrained_model_dir: str = ""
    src_strategy_path_or_dir: str = ""
    transform_process_num: int = 1
    micro_batch_interleave_num: int = 1
    print_separate_loss: bool = True
    do_eval: bool = False
    runner_config: RunnerConfig = field(default_factory=RunnerConfig)
    runner_wrapper: RunnerWrapperConfig = field(default_factory=RunnerWrapperConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    train_dataset: TrainDatasetConfig = field(default_factory=TrainDatasetConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    recompute_config: RecomputeConfig = field(default_factory=RecomputeConfig)
    model: ModelSection = field(default_factory=ModelSection)
    callbacks: list[dict] = field(default_factory=list)
    # accepted verbatim, not used on CPU (Ascend context, auto-parallel context, registries)
    trainer: dict = field(default_factory=dict)
    train_dataset_task: dict = field(default_factory=dict)
    eval_dataset: dict = field(default_factory=dict)
    eval_dataset_task: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)
    monitor_config: dict = field(default_factory=dict)
    moe_config: dict = field(default_factory=dict)
    swap_config: dict = field(default_factory=dict)
    profile: bool = False
    profile_start_step: int = 1
    profile_stop_step: int = 10
    notes: list[str] = field(default_factory=list)  # filled by the loader, not read from YAML

    # ---- derived views ------------------------------------------------------------------
    def model_config(self) -> Qwen3MoeConfig:
        """Qwen3MoeConfig from `model.preset` (if any) overlaid with `model.model_config`."""
        hf, _ = map_model_config(self.model.model_config, "model.model_config")
        try:
            if self.model.preset:
                return Qwen3MoeConfig.from_preset(self.model.preset, **hf)
            return Qwen3MoeConfig.from_dict(hf, source="model.model_config")
        except (ConfigError, ValueError) as exc:
            raise TaskConfigError(str(exc)) from None

    def moe_training(self) -> dict[str, Any]:
        """aux_coef / aux_mode / z_coef for TrainStep from the MindSpore-Transformers keys."""
        _, mst = map_model_config(self.model.model_config, "model.model_config")
        kind = mst.get("moe_router_load_balancing_type", "aux_loss")
        modes = {"aux_loss": "megatron", "seq_aux_loss": "seq", "hf": "hf",
                 "global_aux_loss": "global", "gbs_aux_loss": "global", "none": "megatron"}
        if kind not in modes:
            raise TaskConfigError(f"model.model_config.moe_router_load_balancing_type: {kind!r} is not one "
                                  f"of {sorted(modes)}")
        coef = 0.0 if kind == "none" else float(mst.get("moe_aux_loss_coeff", self.model_config().router_aux_loss_coef))
        return {"aux_coef": coef, "aux_mode": modes[kind], "z_coef": float(mst.get("moe_z_loss_coeff", 0.0) or 0.0)}

    def data_geometry(self) -> dict[str, Any]:
        """The keys that fix which samples step i trains on (stored in checkpoints; a resume
        with other values would skip or repeat data), by their YAML paths."""
        dc, r = self.train_dataset.data_loader.config, self.runner_config
        return {"runner_config.batch_size": r.batch_size,
                "runner_config.gradient_accumulation_steps": r.gradient_accumulation_steps,
                "train_dataset.data_loader.config.seq_length": dc.seq_length,
                "train_dataset.data_loader.config.data_path": [str(p) for p in dc.data_path] or [dc.dataset_dir],
                "train_dataset.data_loader.config.seed": dc.seed,
                "train_dataset.data_loader.config.split": dc.split}

    def callback(self, type_name: str) -> dict:
        """The first callback entry of this type ({} when absent)."""
        return next((c for c in self.callbacks if c.get("type") == type_name), {})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("notes")
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)


# ---- model_config keys ----------------------------------------------------------------------
# MindSpore-Transformers (Megatron-style) names -> HF names
MST_TO_HF = {"num_moe_experts": "num_experts", "moe_router_topk": "num_experts_per_tok",
             "moe_ffn_hidden_size": "moe_intermediate_size", "ffn_hidden_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "kv_channels": "head_dim",
             "layernorm_epsilon": "rms_norm_eps", "params_dtype": "torch_dtype",
             "padded_vocab_size": "vocab_size", "moe_router_topk_scaling_factor": None}
# training options taken by TrainStep (see TaskConfig.moe_training)
MST_TRAINING = ("moe_aux_loss_coeff", "moe_router_load_balancing_type", "moe_z_loss_coeff")
# accepted and ignored: compute dtypes, fused-kernel and Ascend dispatch switches
MST_IGNORED = (
    "offset", "compute_dtype", "layernorm_compute_dtype", "softmax_compute_dtype", "rotary_dtype",
    "router_dense_type", "moe_router_dtype", "moe_token_dispatcher_type", "moe_grouped_gemm",
    "moe_permute_fusion", "moe_router_enable_expert_bias", "moe_router_score_function",
    "moe_router_bias_update_rate", "moe_shared_expert_intermediate_size", "moe_shared_expert_overlap",
    "moe_input_jitter_eps", "moe_token_drop_policy", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity",
    "moe_router_pre_softmax", "moe_router_num_groups", "moe_router_group_topk", "moe_layer_freq",
    "first_k_dense_replace", "seq_length", "use_flash_attention", "use_fused_rope", "use_fused_swiglu",
    "use_fused_rms_norm", "qkv_concat", "add_bias_linear", "add_qkv_bias", "hidden_dropout",
    "gated_linear_unit", "normalization", "qk_layernorm", "position_embedding_type", "mask_func_type",
    "input_sliced_sig", "is_dynamic", "use_past", "block_size", "num_blocks", "batch_size",
    "max_decode_length", "repetition_penalty", "top_k", "top_p", "do_sample", "bias_swiglu_fusion",
    "apply_rope_fusion", "use_attn_mask_compression", "use_eod_attn_mask_compression", "pre_process",
    "post_process", "init_method_std", "transformers_version", "type", "untie_embeddings_and_output_weights",
    "shared_expert_num", "use_gating_sigmoid", "multi_latent_attention", "mtp_depth", "npu_nums_per_device",
    "fp16_lm_cross_entropy", "calculate_per_token_loss", "use_contiguous_weight_layout", "hidden_act_fn")
HF_ALIASES = ("architectures", "model_type", "dtype", "num_local_experts", "rope_parameters",
              "moe_capacity_factor", "extra")


def _hf_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Qwen3MoeConfig)}


def map_model_config(mc: dict, where: str) -> tuple[dict, dict]:
    """(HF keys for Qwen3MoeConfig.from_dict, MindSpore-Transformers training keys); unknown -> error."""
    hf_names = _hf_fields() | set(HF_ALIASES)
    valid = hf_names | set(MST_TO_HF) | set(MST_TRAINING) | set(MST_IGNORED)
    hf, mst = {}, {}
    for key, value in (mc or {}).items():
        if key not in valid:
            raise unknown_key(f"{where}.{key}", key, valid)
        if key in MST_TRAINING:
            mst[key] = value
        elif key in MST_TO_HF:
            target = MST_TO_HF[key]
            if target and target not in mc:  # the HF spelling wins when both are given
                hf.setdefault(target, value)
        elif key in hf_names and key not in ("architectures", "model_type"):
            hf[key] = value
    if hf.get("torch_dtype") is not None:
        hf["torch_dtype"] = str(hf["torch_dtype"]).replace("fp32", "float32").replace("bf16", "bfloat16")
    return hf, mst


def ignored_model_keys(mc: dict) -> list[str]:
    return [k for k in (mc or {}) if k in MST_IGNORED]


# ---- generic validation -------------------------------------------------------------------
def unknown_key(path: str, key: str, valid) -> TaskConfigError:
    """Error for an unknown key, suggesting the closest valid one with its full dotted path."""
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
    hint = f"; did you mean {parent}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return TaskConfigError(f"unknown key {path}{hint}")


def _check_scalar(value: Any, tp: Any, path: str) -> Any:
    """Light type check + int->float widening; None allowed for Optional fields."""
    origin = typing.get_origin(tp)
    if tp is Any or value is None and (origin in (typing.Union, types.UnionType)):
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for a in args:
            try:
                return _check_scalar(value, a, path)
            except TaskConfigError:
                continue
        raise TaskConfigError(f"{path}: expected {tp}, got {value!r}")
    base = origin or tp
    if base in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = base(value)
        except ValueError:
            pass
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if base in (list, dict) and isinstance(value, base):
        return value
    if base is list and isinstance(value, tuple):
        return list(value)
    raise TaskConfigError(f"{path}: expected {getattr(base, '__name__', base)}, got {value!r}")


def build(cls: type, data: Any, path: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking every key and nested section."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TaskConfigError(f"{path or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"notes"}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise unknown_key(full, str(key), names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, full)
        else:
            kwargs[key] = _check_scalar(value, tp, full)
    return cls(**kwargs)


# ---- overrides ----------------------------------------------------------------------------
def parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """`--a.b value` / `--a.b=value` pairs -> [(dotted key, yaml-parsed value)]."""
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise TaskConfigError(f"expected --section.key value, got {tok!r}")
        if "=" in tok:
            key, raw = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise TaskConfigError(f"{tok}: missing value")
            key, raw = tok[2:], tokens[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out.append((key, raw if value is None and raw.strip() not in ("null", "~", "") else value))
    return out


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set raw[a][b]... = value, creating mappings; unknown keys are caught by `build` later."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise TaskConfigError(f"--{dotted}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


# ---- loading ------------------------------------------------------------------------------
def load_task_config(path: str | None, overrides: list[str] | None = None,
                     extra: dict[str, Any] | None = None) -> TaskConfig:
    """Read YAML `path`, apply `extra` (dotted key -> value) then `overrides` (CLI tokens), validate."""
    raw: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise TaskConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise TaskConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TaskConfigError(f"{path}: top level must be a mapping")
    for key, value in (extra or {}).items():
        apply_override(raw, key, value)
    for key, value in parse_overrides(list(overrides or [])):
        apply_override(raw, key, value)
    cfg = build(TaskConfig, raw, "")
    _validate(cfg)
    cfg.notes = _notes(cfg, raw)
    return cfg


def _validate(cfg: TaskConfig) -> None:
    if cfg.run_mode not in ("train", "finetune", "predict", "eval"):
        raise TaskConfigError(f"run_mode must be train, finetune or predict, got {cfg.run_mode!r}")
    for i, cb in enumerate(cfg.callbacks):
        if not isinstance(cb, dict) or "type" not in cb:
            raise TaskConfigError(f"callbacks[{i}]: expected a mapping with a type")
        valid = CALLBACK_KEYS.get(cb["type"])
        for key in cb if valid else ():
            if key not in valid:
                raise unknown_key(f"callbacks[{i}].{key}", key, valid)
    if cfg.run_mode in ("train", "finetune"):
        map_model_config(cfg.model.model_config, "model.model_config")
    from qwen3moe.training.task_checks import check_training_values, resume_override

    check_training_values(cfg)
    cfg.resume_override = resume_override(cfg.resume_override)


# keys of the callbacks acted on (others are ignored whole, with a note)
CALLBACK_KEYS = {
    "MFLossMonitor": {"type", "per_print_times", "learning_rate", "micro_batch_num", "origin_epochs",
                      "dataset_size", "initial_epoch", "initial_step", "global_batch_size",
                      "gradient_accumulation_steps", "check_for_nan_in_loss_and_grad",
                      "calculate_per_token_loss", "print_separate_loss"},
    "CheckpointMonitor": {"type", "prefix", "directory", "save_checkpoint_steps", "save_checkpoint_seconds",
                          "keep_checkpoint_max", "keep_checkpoint_per_n_minutes", "integrated_save",
                          "save_network_params", "save_trainable_params", "async_save", "checkpoint_format",
                          "remove_redundancy", "embedding_local_norm_threshold", "append_info",
                          "exception_save", "save_optimizer", "global_batch_size"},
}

SCHEDULES = {"constantwarmuplr": "constant", "constant": "constant", "cosinewithwarmuplr": "cosine",
             "cosine": "cosine", "linearwithwarmuplr": "linear", "linear": "linear",
             "warmupcosinedecaylr": "cosine", "cosinewithrestartswarmuplr": "cosine"}


def _notes(cfg: TaskConfig, raw: dict) -> list[str]:
    """What is accepted but not acted on, one line each (printed at start-up)."""
    notes = [f"section {k!r} accepted and ignored on CPU" for k in
             ("context", "parallel", "trainer", "train_dataset_task", "swap_config", "moe_config", "monitor_config")
             if raw.get(k)]
    ignored = ignored_model_keys(cfg.model.model_config)
    if ignored:
        notes.append(f"model.model_config keys ignored (Ascend kernels / dtypes): {', '.join(ignored)}")
    known_cb = ("MFLossMonitor", "CheckpointMonitor")
    other = [c["type"] for c in cfg.callbacks if c["type"] not in known_cb]
    if other:
        notes.append(f"callbacks ignored: {', '.join(other)}")
    if cfg.lr_schedule.type.lower() not in SCHEDULES:
        notes.append(f"lr_schedule.type {cfg.lr_schedule.type!r} unknown here: using cosine")
    if cfg.optimizer.type.lower() not in ("adamw", "fusedadamw", "adamwoptimizer"):
        notes.append(f"optimizer.type {cfg.optimizer.type!r}: AdamW (torch semantics) used instead")
    return notes
