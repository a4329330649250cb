"""This rank's model: the model's own classes at per-rank sizes, with a parallel plan applied
from outside (torchtitan `parallelize_module`, gpt-fast `tp.py`), one rank per process.

API (stable; other modules build on it):

    rm = parallelize(cfg, mesh, rank, weights=None, *, gather_logits=True, dispatcher="auto",
                     coll=None, param_dtype=None, quantization=None)

    cfg       the global Qwen3MoeConfig; mesh: parallel.mesh.Mesh; rank: this process's global
              rank (mindspore.communication.get_rank() under msrun, after init()).
    weights   None (zeros: load later), an HF folder (each rank preads only its slices through
              checkpoint.ShardReader), a callable hf_name -> full array (sliced here), or any
              object with read_shard(info, cfg).
    gather_logits  True: the lm_head's vocab-split logits are all-gathered over tp, so
              `rm.model(...)` returns full [B, S, V] logits (generation, evaluation). False:
              logits stay [B, S, V/tp] (this rank's vocab block, starting at rm.vocab_start;
              training: the [T, V] logits are never gathered). Either way the model's own loss
              (`labels=`) is right: the plan swaps its cross-entropy module for
              `VocabParallelCrossEntropy` (each rank's max, sum of exp and target logit gathered over tp).
    dispatcher "auto" (TPExpertsDispatcher when ep = 1, AllGatherDispatcher when ep > 1), "tp",
              "allgather" or "alltoall" (AllToAllDispatcher; dispatchers.py).
    coll      a process.ProcessCollectives of this rank (default: created here; needs init()).
    param_dtype, quantization  (generation) the model's own build options: bf16 storage, int8 /
              int4 projections quantized from the rank's float slices (quantized.py; their
              entries carry the float weight's split and are not for training or save_sharded).
              A GPTQ folder as `weights` (config.json quantization_config) loads its projections
              as stored, each rank its slice (quantized.fill_gptq_shard); quantization= is then
              an error.

    returns RankModel:
      .model      a Qwen3MoeForCausalLM (models/qwen3_moe.py) whose forward is the model's own:
                  `rm.model(input_ids, attention_mask=..., labels=..., output_router_logits=...)`
                  runs compiled (ms.jit, collectives inside the graph); parameter names are the
                  HF names; router statistics come out as in one process (`.router_stats`).
      .entries    [(Parameter, ShardInfo)] for every parameter (ranks.ShardInfo: HF name, split
                  style and position over tp / ep, gradient sync group "dp" / "stage" / "edp" /
                  "kv<r>"); `rm.info(name)` looks one up by HF name.
      .coll, .mesh, .rank, .layers (this stage's global layer ids), .vocab_start, .bytes_read,
      .local_config (rank_config: this rank's head / ffn / expert / vocab / layer counts, e.g.
                  for KV-cache shapes; `.model.config` stays the global config)
      .model.fused_step_cell (not sp)  the fused decode step for this plan (fused_step.py), which
                  the generation engine runs when the kernels apply (a pipeline stage's too)
      .forward(input_ids, attention_mask=None, position_ids=None, labels=None,
               output_router_logits=False): the pipeline forward (pp = 1: `.model(...)`)

The plan (ranks.py's layouts, so checkpoint.py, train_state.py and export see the same
shards as the test harness's simulated ranks, tests/parallel_sim):
    attention, dense MLP   `LAYER_PLAN`, gpt-fast style: q/k/v, gate/up colwise (output dim
                           split, kv heads replicated when tp > K as vLLM; one copy f, identity
                           forward and all-reduce backward, on the norm output they all read),
                           o_proj / down_proj rowwise (input dim split; a reduce g, all-reduce
                           forward, on the output), so the attention and MLP modules stay the model's own
                           (per-rank head counts on `self_attn.num_heads` / `num_kv_heads`; the
                           model's config stays the global one) and their construct runs
                           unchanged.
    embedding              vocab rows split: masked local lookup, reduce over tp.
    lm_head                vocab rows split (column-parallel), f on the input, optional gather.
    sparse MoE block       ParallelMoeBlock: f on the input, the replicated router, a dispatcher
                           around the block's own expert combine (fused kernel or composite).
    sequence parallel      (mesh.sp, seqpar.py) the residual stream, norms and MoE input hold the
                           rank's own token rows: attention and dense MLP wrapped whole (all-gather
                           in, reduce-scatter out, no f/g), embedding reduce-scattered, the MoE
                           block fed own rows (all-gather dispatcher, no tp split), the final
                           hidden rows all-gathered for the lm_head; router statistics summed
                           over tp; pipeline stages exchange own rows [1, t, H]
                           (`stage_input_shape`). Not for generation.
Without sp the router sees the same tokens on every tp rank but back-propagates only its partial share
(its experts' ffn slice, or its own rows): its gradient is summed over the stage (sync
"stage"); the router probabilities (aux loss) and logits (z-loss) pass their gradient scaled
by 1/tp, so that sum gives each term exactly once.
Shapes: B batch, S seq, T = B*S, H hidden, V vocab, v = V/tp, E experts, K top-k.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace

import mindspore as ms
from mindspore import Tensor, nn, ops

from qwen3moe.io.hugepages import use_hugepages
from qwen3moe.layers.dtypes import skip_init, widen
from qwen3moe.layers.norm import RMSNorm
from qwen3moe.layers.quant import QuantizationConfig, QuantizationError, QuantizedWeight
from qwen3moe.parallel.dispatchers import TPExpertsDispatcher, _Identity, collective, ep_dispatcher
from qwen3moe.parallel.fused_step import RankFusedStepCell
from qwen3moe.parallel.mesh import Mesh, MeshError
from qwen3moe.parallel.quantized import (check_gptq_layout, check_quantized_layout, fill_gptq_shard, hold_row_groups,
                                        native_name, quantize_shard)
from qwen3moe.parallel.ranks import ShardInfo, load_shard, release_freed_heap, shard_info, stage_layers
from qwen3moe.parallel.seqpar import SequenceParallelAttention, SequenceParallelModel, TokenScatter, own_rows
from qwen3moe.router.topk import TopKRouter

sg = ops.stop_gradient


class _Around(nn.Cell):
    """A module with a collective before (on its first input) and after (on its output)."""

    def __init__(self, inner: nn.Cell, pre: nn.Cell, post: nn.Cell) -> None:
        super().__init__()
        self.inner, self.pre, self.post = inner, pre, post

    def construct(self, x, *args):
        return self.post(self.inner(self.pre(x), *args))


class VocabParallelEmbedding(nn.Cell):
    """Rows [vocab_start, vocab_start + v) of the embedding: masked local lookup, reduce over tp."""

    def __init__(self, inner: nn.Cell, vocab_start: int, reduce: nn.Cell) -> None:
        super().__init__()
        self.inner, self.lo, self.reduce = inner, vocab_start, reduce

    def construct(self, ids_BS: Tensor) -> Tensor:
        v = self.inner.weight.shape[0]
        local = ids_BS - self.lo
        inside = ((local >= 0) & (local < v)).astype(ms.float32)
        rows = widen(ops.gather(self.inner.weight, ops.clip_by_value(local, 0, v - 1), 0))
        return self.reduce(rows * inside.expand_dims(-1))


def _grad_scale(x: Tensor, s: float) -> Tensor:
    """x in value, s * dx in gradient."""
    return x * s + sg(x) * (1.0 - s)


class ParallelMoeBlock(nn.Cell):
    """Qwen3MoeSparseMoeBlock's contract (y_TH, router logits, probs, idx) over a dispatcher:
    `block` is the model's own block holding this rank's experts and the full router; `tp` the
    ranks routing the same tokens (1 with sequence parallel: each routes its own rows)."""

    def __init__(self, block: nn.Cell, dispatcher: nn.Cell, copy: nn.Cell, tp: int) -> None:
        super().__init__()
        self.block, self.dispatcher, self.copy, self.tp = block, dispatcher, copy, tp

    def construct(self, x_TH: Tensor):
        x_TH = self.copy(x_TH)
        logits_TE, probs_TE, w_TK, idx_TK = self.block.gate(x_TH)
        x_RH, w_RK, idx_RK = self.dispatcher.dispatch(x_TH, w_TK, idx_TK)
        y_TH = self.dispatcher.combine(self.block.combine(x_RH, w_RK, idx_RK), x_TH.shape[0])
        if self.tp > 1:
            logits_TE, probs_TE = _grad_scale(logits_TE, 1.0 / self.tp), _grad_scale(probs_TE, 1.0 / self.tp)
        return y_TH, logits_TE, probs_TE, idx_TK


class VocabParallelCrossEntropy(nn.Cell):
    """Per-token cross-entropy [T] (0 where label == -100) from this rank's vocab block of the
    logits [T, v] (vocab ids vocab_start .. vocab_start + v - 1); [T, V] is never formed. Each
    rank reduces its block to three numbers per token: its max m_r, the sum of exp under that
    max s_r and the target logit p_r (0 unless the label is in its block); one all-gather over
    tp brings every rank's three (backward: each rank keeps its own block's gradient, as the
    loss is the same on every rank), and the log-sum-exp is merged as in online softmax:
    M = max_r m_r, sum of exp = sum_r s_r exp(m_r - M) (in rank order). One collective instead
    of a max gather and two sums. Usable inside ms.jit."""

    def __init__(self, tp_group, vocab_start: int) -> None:
        super().__init__()
        self.lo = vocab_start
        self.tp = 1 if tp_group is None else tp_group.size
        self.gather = collective(tp_group, "gather")

    def construct(self, logits_Tv: Tensor, labels_T: Tensor) -> Tensor:
        logits_Tv = logits_Tv.astype(ms.float32)
        v = logits_Tv.shape[1]
        m_T1 = sg(logits_Tv.max(-1, keepdims=True))
        sumexp_T = ops.exp(logits_Tv - m_T1).sum(-1)
        local = labels_T - self.lo
        inside = ((local >= 0) & (local < v)).astype(ms.float32)
        col = ops.clip_by_value(local, 0, v - 1).astype(ms.int32).reshape(-1, 1)
        picked_T = ops.gather_elements(logits_Tv, 1, col).reshape(-1) * inside
        mine_3T = ops.stack([m_T1.reshape(-1), sumexp_T, picked_T])
        all_r3T = self.gather(mine_3T).reshape(self.tp, 3, -1)  # rank r's three rows at [r]
        m_rT = sg(all_r3T[:, 0])
        max_T = m_rT.max(0)
        total_T, target_T = all_r3T[0, 1] * ops.exp(m_rT[0] - max_T), all_r3T[0, 2]
        for r in range(1, self.tp):
            total_T = total_T + all_r3T[r, 1] * ops.exp(m_rT[r] - max_T)
            target_T = target_T + all_r3T[r, 2]
        valid = (labels_T != -100).astype(ms.float32)
        return (ops.log(total_T) + max_T - target_T) * valid


@dataclass
class RankModel:
    model: nn.Cell
    entries: list
    mesh: Mesh
    rank: int
    coll: object
    layers: range
    vocab_start: int
    local_config: object = None
    bytes_read: int = 0
    stage_input: object = None
    _by_name: dict = field(default_factory=dict, repr=False)

    def info(self, name: str) -> ShardInfo:
        return self._by_name[name]

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                output_router_logits: bool = False):
        """The pipeline forward (pp = 1: `self.model(...)`): each stage runs the model's compiled
        graph on its input (token ids on the first stage, the received hidden states [B, S, H]
        elsewhere, kept as `self.stage_input`) and sends its output to the next stage
        (process.py send/recv). Returns the model's CausalLMOutput; on a stage other than the
        last its `logits` are the stage's hidden states (no norm, no lm_head; labels ignored),
        and loss / aux / router_stats cover that stage's layers only."""
        if self.mesh.pp == 1:
            return self.model(input_ids, attention_mask, position_ids, labels, output_router_logits)
        from qwen3moe.models.inputs import prepare_inputs

        cfg, s = self.model.config, self.mesh.coords(self.rank)["pp"]
        last = s == self.mesh.pp - 1
        t = prepare_inputs(cfg, input_ids, attention_mask, position_ids, labels if last else None)
        B, S = t.input_ids.shape
        if s > 0:
            t.input_ids = self.coll.recv(stage_input_shape(self.mesh, cfg, B, S), s - 1)
        self.stage_input = t.input_ids
        out = self.model.run(t, 0, output_router_logits)
        if not last:
            self.coll.send(out.logits, s + 1)
            self.coll.finish()
        return out


def stage_input_shape(mesh: Mesh, cfg, B: int, S: int) -> tuple:
    """What a pipeline stage receives from the one before: hidden states [B, S, H], or with
    sequence parallel the rank's own token rows [1, t, H] (seqpar.py)."""
    return (1, own_rows(B, S, mesh.tp), cfg.hidden_size) if mesh.sp else (B, S, cfg.hidden_size)


def rank_config(cfg, mesh: Mesh, layers: range | None = None):
    """The config whose layer sizes are this rank's: heads, ffn, experts and vocab divided, and
    only the stage's layers (local index j is global layer layers[j], sparse as that one)."""
    tp, etp, ep = mesh.tp, mesh.expert_tp, mesh.ep
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    checks = [("vocab_size", cfg.vocab_size, tp, "tp"), ("intermediate_size", cfg.intermediate_size, tp, "tp")]
    if cfg.num_experts:
        checks.append(("moe_intermediate_size", cfg.moe_intermediate_size, etp, "etp"))
    for name, n, d, what in checks:
        if n % d:
            raise MeshError(f"{what}={d} must divide {name}={n}")
    E = cfg.num_experts // ep if cfg.num_experts else 0
    return cfg.replace(vocab_size=cfg.vocab_size // tp, num_attention_heads=cfg.num_attention_heads // tp,
                       num_key_value_heads=mesh.kv_heads_per_rank(cfg.num_key_value_heads),
                       intermediate_size=cfg.intermediate_size // tp,
                       moe_intermediate_size=cfg.moe_intermediate_size // etp if E else cfg.moe_intermediate_size,
                       num_experts=E, num_experts_per_tok=min(cfg.num_experts_per_tok, E) if E else
                       cfg.num_experts_per_tok, num_hidden_layers=len(layers), decoder_sparse_step=1,
                       mlp_only_layers=[j for j, i in enumerate(layers) if not cfg.is_sparse_layer(i)])


def check_layout(cfg, mesh: Mesh) -> None:
    mesh.validate(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                  num_kv_heads=cfg.num_key_value_heads, num_experts=cfg.num_experts or 0)
    if mesh.ep == 1 and mesh.expert_tp != mesh.tp:
        raise MeshError(f"etp={mesh.expert_tp} with ep=1 and tp={mesh.tp}: without expert parallelism the "
                        "experts' ffn is split over the tp ranks (etp = tp)")
    if mesh.ep > 1 and mesh.expert_tp != 1:
        raise MeshError(f"etp={mesh.expert_tp} with ep={mesh.ep}: experts are split either over ep ranks "
                        "or (ep=1) over the tp ranks' ffn dim")
    if mesh.ep > 1 and cfg.moe_capacity_factor is not None:
        raise MeshError("moe_capacity_factor with ep > 1: capacity is per expert over the whole ep group, "
                        "which the all-gather dispatcher does not compute; use dropless routing")
    if cfg.tie_word_embeddings and mesh.pp > 1:
        raise MeshError("tie_word_embeddings with pp > 1 is not supported (embedding and lm_head live on "
                        "different stages)")


def parallelize(cfg, mesh: Mesh, rank: int, weights=None, *, gather_logits: bool = True,
                dispatcher: str = "auto", coll=None, offset: list[int] | None = None, param_dtype=None,
                quantization: QuantizationConfig | None = None) -> RankModel:
    """This rank's model with the plan applied and its shards loaded (module docstring)."""
    from qwen3moe.models.qwen3_moe import Qwen3MoeForCausalLM

    check_layout(cfg, mesh)
    spec, quantization = _quantization(cfg, mesh, weights, quantization)
    if dispatcher not in ("auto", "tp", "allgather", "alltoall"):
        raise ValueError(f"dispatcher must be 'auto', 'tp', 'allgather' or 'alltoall', got {dispatcher!r}")
    if mesh.sp and dispatcher == "tp":
        raise MeshError("dispatcher 'tp' needs every token on every tp rank; sequence parallel feeds the MoE "
                        "block the rank's own rows (dispatcher 'allgather' or 'alltoall')")
    if dispatcher == "alltoall" and mesh.ep == 1:
        raise MeshError("dispatcher 'alltoall' needs ep > 1 (each ep member holding other experts); with ep=1 "
                        "every tp rank holds all experts' ffn slices: dispatcher 'tp' or 'allgather'")
    if coll is None:
        from qwen3moe.parallel.process import ProcessCollectives

        coll = ProcessCollectives(mesh, rank)
    if cfg.num_key_value_heads < mesh.tp and hasattr(coll, "add_group"):  # replicated kv heads' sync group
        coll.add_group(f"kv{mesh.tp // cfg.num_key_value_heads}")
    c = mesh.coords(rank)
    layers = stage_layers(cfg.num_hidden_layers, mesh.pp, offset)[c["pp"]]
    local_cfg = rank_config(cfg, mesh, layers)
    reader = _source(weights)
    with skip_init(lazy=reader is not None):  # lazy: no zero buffers beside the loaded shards
        model = Qwen3MoeForCausalLM(local_cfg, param_dtype=param_dtype, quantization=quantization)
        hold_row_groups(model, cfg, mesh, spec)  # act-order GPTQ row slices: all groups of the row
        hf = _swap_routers(model, cfg, layers, param_dtype)
    model.config = model.model.config = cfg  # inputs, losses and checks use the global config
    vocab_start = c["tp"] * (cfg.vocab_size // mesh.tp)
    _apply_plan(model, mesh, c, coll.groups, vocab_start, gather_logits,
                "allgather" if dispatcher == "auto" and (mesh.ep > 1 or mesh.sp) else dispatcher)
    body = model.model.inner if mesh.sp else model.model  # sp: the wrapped Qwen3MoeModel
    if c["pp"] > 0:  # torchtitan's model split: the embedding on the first stage only
        body.embed_tokens = _Identity()
    if c["pp"] < mesh.pp - 1:  # final norm and lm_head on the last stage only
        body.norm, model.lm_head = _Identity(), _Identity()
    if not mesh.sp:  # the generation engine's fused decode step (a pipeline stage's too), this plan's collectives
        model.__dict__["fused_step_cell"] = functools.partial(RankFusedStepCell, tp=mesh.tp)
    n = rank % (mesh.dp * mesh.tp)
    info_of = functools.partial(_info, mesh=mesh, n=n, K=cfg.num_key_value_heads)
    quantized = [(cell, info_of(native_name(hf[id(cell.qweight)]))) for _, cell in model.cells_and_names()
                 if isinstance(cell, QuantizedWeight)]
    split_as = {id(p): info for cell, info in quantized for p in cell.get_parameters()}
    entries = []
    for p in model.get_parameters():
        p.name = hf[id(p)]
        info = split_as.get(id(p))  # a quantized tensor is split as its float weight is
        entries.append((p, info_of(p.name) if info is None else replace(info, name=p.name)))
    if reader is not None:
        _load_shards(entries, quantized, cfg, reader, spec, f"rank {rank}",
                     quantization is not None and quantization.group_size == -1)
        if param_dtype is not None or quantization is not None:
            use_hugepages(model)  # as io/load.py: the decode kernels stream these weights
    return RankModel(model, entries, mesh, rank, coll, layers, vocab_start, local_cfg,
                     getattr(reader, "bytes_read", 0), _by_name={i.name: i for _, i in entries})


def _quantization(cfg, mesh: Mesh, weights, quantization):
    """(GPTQ spec or None, the model's QuantizationConfig or None), checked for this layout: a
    GPTQ folder as `weights` builds with its stored config (its projections load as stored,
    sliced per rank), else `quantization` (quantized from the float slices)."""
    from qwen3moe.io.gptq import gptq_config

    spec = gptq_config(cfg, os.fspath(weights)) if isinstance(weights, (str, os.PathLike)) else None
    if spec is not None:
        if quantization is not None:
            raise QuantizationError(f"{os.fspath(weights)}: already quantized ({spec.label}); "
                                    f"load it without quantization= (--quantize)")
        check_gptq_layout(cfg, mesh, spec, os.fspath(weights))
        return spec, spec.config
    if quantization is not None:
        quantization.check_runnable()
        check_quantized_layout(cfg, mesh, quantization)
    return None, quantization


def _load_shards(entries: list, quantized: list, cfg, reader, spec, who: str, per_channel: bool) -> None:
    """The plain Parameters' slices first (as one process loads a GPTQ folder: their read
    transients come before the quantized weights are resident), then the quantized cells: from
    the GPTQ tensors (spec), else quantized from the float slices (the lm_head always: a GPTQ
    folder keeps it float, loaded as int8 per channel; per_channel: group_size -1)."""
    cells = {id(p) for cell, _ in quantized for p in cell.get_parameters()}
    for p, info in entries:
        if id(p) not in cells:
            load_shard(p, info, cfg, reader, who)
            release_freed_heap()
    for cell, info in quantized:
        if spec is not None and info.name != "lm_head.weight":
            reader.bytes_read += fill_gptq_shard(cell, info, cfg, reader.src, spec)
        else:
            quantize_shard(cell, info, cfg, reader, who, per_channel)
        release_freed_heap()


def _info(hf: str, mesh: Mesh, n: int, K: int) -> ShardInfo:
    return shard_info(hf[len("model."):] if hf.startswith("model.") else hf, hf, mesh, n, K)


def _swap_routers(model, cfg, layers: range, param_dtype=None) -> dict:
    """Give each sparse block the full E-way router (the block was built with E/ep experts);
    returns {id(Parameter): HF name} recorded before any wrapper renames them (local layer j is
    global layer layers[j])."""
    for layer in model.model.layers:
        if layer.is_sparse:
            layer.mlp.gate = TopKRouter(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                                        cfg.norm_topk_prob, cfg.initializer_range, param_dtype)

    def hf(name: str) -> str:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return f"model.layers.{layers[int(m.group(1))]}.{name[m.end():]}" if m else name

    return {id(p): hf(name) for name, p in model.parameters_and_names()}


# gpt-fast / torchtitan styles per Linear of a decoder layer (module path -> style): colwise =
# its weight's output rows are this rank's, its input passes the copy f (`_copy_after`: once on
# the norm output that q, k, v or gate, up read), rowwise = reduce g on the output (its input
# columns are this rank's); the modules around them run unchanged
LAYER_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
              "mlp.down_proj": "rowwise"}


class _NormThenCopy(RMSNorm):
    """A decoder layer's RMSNorm followed by the tp copy f (identity forward, gradient all-reduced
    backward): Megatron's f on the layer-norm output, once for all the colwise Linears that read
    it (q, k, v; a dense MLP's gate, up), i.e. one backward all-reduce of their summed partial
    input gradients instead of one per Linear. Attributes and Parameters stay the norm's own."""

    def construct(self, x: Tensor) -> Tensor:
        return self.tp_copy(super().construct(x))


def _copy_after(norm: RMSNorm, copy: nn.Cell) -> None:
    norm.__class__ = _NormThenCopy
    norm.tp_copy = copy


def _apply_plan(model, mesh: Mesh, c: dict, groups: dict, vocab_start: int, gather_logits: bool,
                dispatcher: str) -> None:
    tp_g, sp = groups.get("tp"), mesh.sp

    def style(kind: str, inner: nn.Cell) -> nn.Cell:  # fresh collective Cells per use
        if kind == "colwise":  # its f is the copy after the norm that feeds it (_copy_after)
            return _Around(inner, _Identity(), _Identity())
        return _Around(inner, _Identity(), collective(tp_g, "reduce"))

    m = model.model
    m.embed_tokens = VocabParallelEmbedding(m.embed_tokens, vocab_start,
                                            TokenScatter(tp_g, mesh.tp) if sp else collective(tp_g, "reduce"))
    for layer in m.layers:
        if sp:  # whole modules on gathered rows, reduce-scattered back (seqpar.py): no f/g inside
            layer.self_attn = SequenceParallelAttention(layer.self_attn, tp_g, mesh.tp)
            if not layer.is_sparse:
                layer.mlp = _Around(layer.mlp, collective(tp_g, "gather_rs"), collective(tp_g, "reduce_scatter"))
        else:
            for path, kind in LAYER_PLAN.items():
                owner, name = path.split(".")
                cell = getattr(layer, owner)
                if mesh.tp > 1 and hasattr(cell, name):
                    setattr(cell, name, style(kind, getattr(cell, name)))
            if mesh.tp > 1:
                _copy_after(layer.input_layernorm, collective(tp_g, "copy"))
                if not layer.is_sparse:  # a sparse block's f is ParallelMoeBlock.copy
                    _copy_after(layer.post_attention_layernorm, collective(tp_g, "copy"))
        if layer.is_sparse:
            layer.mlp = _moe_block(layer.mlp, mesh, c, groups, dispatcher)
    if mesh.tp > 1:  # with sp the final hidden rows arrive all-gathered (backward: reduce-scatter)
        model.lm_head = _Around(model.lm_head, _Identity() if sp else collective(tp_g, "copy"),
                                collective(tp_g, "gather", 1) if gather_logits else _Identity())
        if not gather_logits:
            model.cross_entropy = VocabParallelCrossEntropy(tp_g, vocab_start)
    if sp:
        model.model = SequenceParallelModel(m, tp_g, mesh.tp, c["tp"], gather_out=c["pp"] == mesh.pp - 1)
    model.__dict__.pop("_graph_runner", None)


def _moe_block(block, mesh: Mesh, c: dict, groups: dict, dispatcher: str) -> ParallelMoeBlock:
    """The sparse block over its dispatcher. With sp its input is already the rank's own rows:
    the all-gather dispatcher with no tp split or gather around it, and no f (the ep-group
    gather's backward sums the rows' gradients)."""
    tp_g = groups.get("tp")
    if dispatcher in ("allgather", "alltoall"):
        e = block.experts.num_experts
        if mesh.sp:
            return ParallelMoeBlock(block, ep_dispatcher(dispatcher, None, groups.get("ep"), 1, 0, c["ep"] * e, e),
                                    _Identity(), 1)
        d = ep_dispatcher(dispatcher, tp_g, groups.get("ep"), mesh.tp, c["tp"], c["ep"] * e, e)
    else:
        if mesh.ep > 1:
            raise MeshError("dispatcher 'tp' needs ep=1 (experts split over the tp ranks' ffn dim)")
        d = TPExpertsDispatcher(tp_g)
    return ParallelMoeBlock(block, d, collective(tp_g, "copy"), mesh.tp)


def _source(weights):
    if weights is None or callable(weights) or hasattr(weights, "read_shard"):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        from qwen3moe.parallel.checkpoint import ShardReader

        return ShardReader(weights)
    raise TypeError(f"weights must be None, an HF folder, a callable name -> array or a ShardReader, "
                    f"got {type(weights).__name__}")
