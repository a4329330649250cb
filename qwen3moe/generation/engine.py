"""Static-KV-cache decoder engine: one compiled step for prefill (Sq = prompt bucket, or a chunk of
it) and decode (Sq = 1).

Shapes: B batch, Sq query tokens this step, T = S_max cache slots, H hidden, N query heads,
K kv heads, D head_dim, V vocab, L layers.
The step is the model's own forward: its embedding, the decoder layers given the cache
(Qwen3MoeAttention.construct with a cache: the forward's projections, q/k norms and RoPE, then the
cache write and attention over the slots), final norm and lm_head, so a model whose cells a parallel plan swapped
(sharded projections with collectives, a parallel MoE block) runs through it unchanged. Each
layer's K/V cache is a Parameter [B, K, T, D] updated in-graph by `scatter_nd_update`
with host-built indices (measured fastest on CPU, see MINDSPORE_CPU.md), so the step graph has
static shapes: one compile per (B, Sq, T). Slot layout per row: the left-padded prompt occupies
slots [0, P), decode step t writes slot P + t; the host-built additive bias hides pad slots and
future slots, and positions are cumsum(mask) - 1 per row (pads get 1, as transformers 5).
A prompt longer than the prefill chunk size C runs as ceil(P / C) steps over consecutive slots
(chunked prefill, as vLLM / llama.cpp): the prefill's memory grows with C, not P.
With the C++ kernels built here (fp32, bf16 or quantized weights), the step graph is
generation/fused_step.py instead (same cache Parameters and host bookkeeping, kernels write the
cache in place; on a parallelized rank model the plan's subclass, parallel/fused_step.py); this composite graph is the reference and the fallback (QWEN3MOE_KERNELS=0,
attention bias, act-order GPTQ maps).
"""
from __future__ import annotations

import itertools

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn

from qwen3moe.generation.config import PROMPT_BUCKET, check_kv_cache_dtype, check_prefill_chunk_size
from qwen3moe.generation.errors import GenerationError
from qwen3moe.generation.fused_step import fused_eligible, int8_activations, not_fused_reason, step_cell_class
from qwen3moe.layers.attention import Qwen3MoeAttention
from qwen3moe.models.inputs import MASK_VALUE, rope_tables

SLOT_BUCKET = 64     # cache length multiple: fewer distinct (B, T) graphs
# kv_cache_dtype -> the cache Parameters' storage: bf16 as its uint16 bit pattern (how the model
# holds bf16 weights the kernels read; no bf16 CPU kernels are needed), fp16 as float16
KV_STORAGE = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
_ENGINE_IDS = itertools.count()
_COMPILED: set[tuple] = set()  # (engine id, B, Sq, T) signatures compiled in this process


def compile_count() -> int:
    """Distinct step-graph signatures compiled so far in this process (each is one graph compile)."""
    return len(_COMPILED)


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def kv_heads(model: nn.Cell) -> int:
    """K/V heads the attention cells hold: the config's, or this rank's share under tensor
    parallelism (found inside whatever wrapper a parallel plan put around them)."""
    return next(int(c.num_kv_heads) for _, c in model.cells_and_names() if isinstance(c, Qwen3MoeAttention))


class _StepCell(nn.Cell):
    """The compiled step: the model's own cells (embedding, decoder layers with the cache, final
    norm, lm_head), whatever plan swapped them. auto_prefix=False keeps the model's HF parameter names."""

    def __init__(self, model: nn.Cell, batch: int, slots: int, uid: int, hidden_out: bool = False,
                 kv_cache_dtype: str = "float32") -> None:
        super().__init__(auto_prefix=False)
        self.net, self.hidden_out = model, hidden_out
        cfg = model.config
        shape = (batch, kv_heads(model), slots, cfg.head_dim)
        L = len(model.model.layers)  # a pipeline stage holds only its own layers
        np_dtype = KV_STORAGE[kv_cache_dtype]
        self.k_cache = ParameterTuple([Parameter(Tensor(np.zeros(shape, np_dtype)), f"kv_cache{uid}.k.{i}",
                                                 requires_grad=False) for i in range(L)])
        self.v_cache = ParameterTuple([Parameter(Tensor(np.zeros(shape, np_dtype)), f"kv_cache{uid}.v.{i}",
                                                 requires_grad=False) for i in range(L)])

    @ms.jit
    def construct(self, ids_BS: Tensor, cos_BSD: Tensor, sin_BSD: Tensor, bias_B1ST: Tensor,
                  idx_BKS3: Tensor) -> Tensor:
        body = self.net.model
        x_BSH = body.embed_tokens(ids_BS)
        S = x_BSH.shape[1]
        i = 0
        for layer in body.layers:
            x_BSH = layer(x_BSH, cos_BSD, sin_BSD, bias_B1ST, self.k_cache[i], self.v_cache[i], idx_BKS3)[0]
            i += 1
        if self.hidden_out:  # a pipeline stage before the last: every position goes to the next stage
            return x_BSH
        return self.net.lm_head(body.norm(x_BSH[:, S - 1]))  # only the last position is needed


class DecodeEngine:
    """Host side of the cached decoder: slot bookkeeping, positions, masks, cos/sin, indices.

    Usage: `logits_BV = engine.prefill(ids_BP, mask_BP)` then `engine.decode(next_B)` per token.
    Valid for (B, T) fixed at construction; prompts must fit T - max_new_tokens.
    `kv_cache_dtype` (config.KV_CACHE_DTYPES): a 16-bit cache runs on the fused kernels only (they
    round k/v when writing it and widen it when reading); elsewhere it is a GenerationError.
    """

    def __init__(self, model: nn.Cell, batch: int, slots: int, hidden_out: bool = False,
                 kv_cache_dtype: str = "float32") -> None:
        self.model, self.config = model, model.config
        self.batch, self.slots, self.kv_heads = batch, slots, kv_heads(model)
        check_kv_cache_dtype(kv_cache_dtype)
        self.fused = fused_eligible(model)
        if kv_cache_dtype != "float32" and not self.fused:
            raise GenerationError(f"kv_cache_dtype={kv_cache_dtype} needs the fused decode kernels, which do not apply "
                                  f"here ({not_fused_reason(model)}); use kv_cache_dtype=float32")
        self.uid = next(_ENGINE_IDS)
        self.cell = _StepCell(model, batch, slots, self.uid, hidden_out, kv_cache_dtype)
        if self.fused:  # same cache Parameters, fused-kernel graph (the composite cell is the fallback)
            self.cell = step_cell_class(model)(model, batch, self.cell.k_cache, self.cell.v_cache,
                                               hidden_out=hidden_out)
        elif int8_activations(model):
            raise GenerationError("quantization activations='int8' runs in the fused decode kernels, which do not "
                                  "apply to this model (a parallel plan, attention biases or act-order GPTQ maps)")
        moe = model.config
        self.meta_head = [int(moe.num_experts_per_tok), int(bool(moe.norm_topk_prob)), 0]
        self.valid_BT = np.zeros((batch, slots), bool)  # slots a query may attend (real tokens)
        self.next_pos_B = np.zeros(batch, np.int64)
        self.cursor = 0  # next slot to write

    @property
    def kv_cache_dtype(self) -> str:
        """The cache's dtype (a KV_STORAGE key) as its Parameters hold it, what reports show."""
        storage = str(self.cell.k_cache[0].dtype).lower()  # MindSpore's name of it, e.g. UInt16
        return next(kind for kind, np_dtype in KV_STORAGE.items() if np.dtype(np_dtype).name == storage)

    def _run(self, ids_BS: np.ndarray, pos_BS: np.ndarray, bias_B1ST: np.ndarray) -> np.ndarray:
        B, S = ids_BS.shape
        cos, sin = rope_tables(self.config, pos_BS)
        if self.fused:  # the kernels take the first slot to write (+ MoE settings)
            where = np.array([self.cursor, *self.meta_head], np.int32)
        else:
            where = np.empty((B, self.kv_heads, S, 3), np.int32)
            where[..., 0] = np.arange(B)[:, None, None]
            where[..., 1] = np.arange(self.kv_heads)[None, :, None]
            where[..., 2] = self.cursor + np.arange(S)[None, None, :]
        _COMPILED.add((self.uid, B, S, self.slots))
        out = self.cell(self._feed(ids_BS), Tensor(cos), Tensor(sin), Tensor(bias_B1ST), Tensor(where))
        self.cursor += S
        return self._emit(out)

    def _feed(self, ids_BS: np.ndarray) -> Tensor:
        """The step's input (a pipeline stage's engine receives the previous stage's hidden states)."""
        return Tensor(ids_BS.astype(np.int32))

    def _emit(self, out: Tensor) -> np.ndarray | None:
        """The step's output as returned (a pipeline stage's engine sends it to the next stage)."""
        return out.asnumpy()

    def prefill(self, ids_BP: np.ndarray, mask_BP: np.ndarray, chunk_size: int | None = None) -> np.ndarray:
        """Run the (left-padded) prompt; returns float32 logits [B, V] of its last position.

        `chunk_size` C (a multiple of PROMPT_BUCKET; 0 / None: never): a prompt longer than C runs
        as steps of at most C tokens, chunk j writing slots [jC, jC + Cj) and attending over the
        cache slots up to each query's own, so every query sees the keys it sees in one step while
        the activations, the bias and the MoE scratch are bounded by C instead of P.
        """
        B, P = ids_BP.shape
        if B != self.batch or P >= self.slots:
            raise ValueError(f"prompt {ids_BP.shape} does not fit the engine ({self.batch}, {self.slots})")
        check_prefill_chunk_size(chunk_size)
        mask = mask_BP.astype(bool)
        pos = np.cumsum(mask, axis=1) - 1
        pos[~mask] = 1
        self.cursor = 0
        self.valid_BT[:] = False
        self.valid_BT[:, :P] = mask
        self.next_pos_B = mask.sum(1).astype(np.int64)
        C = chunk_size if chunk_size and chunk_size < P else P
        for start in range(0, P, C):
            end = min(start + C, P)
            logits = self._run(ids_BP[:, start:end], pos[:, start:end], self._prefill_bias(start, end))
        return logits

    def _prefill_bias(self, start: int, end: int) -> np.ndarray:
        """Additive bias [B, 1, end - start, T] of the prompt queries at slots [start, end): a
        valid slot at or before the query's own (the step writes its k/v before attending)."""
        slot_T = np.arange(self.slots)
        allowed = self.valid_BT[:, None, :] & (slot_T[None, None, :] <= np.arange(start, end)[None, :, None])
        return np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]

    def decode(self, next_B: np.ndarray) -> np.ndarray:
        """Feed one token per row (at the next slot); returns float32 logits [B, V]."""
        if self.cursor >= self.slots:
            raise ValueError(f"KV cache full ({self.slots} slots)")
        self.valid_BT[:, self.cursor] = True
        bias = np.where(self.valid_BT, 0.0, MASK_VALUE).astype(np.float32)[:, None, None, :]
        pos = self.next_pos_B[:, None].copy()
        self.next_pos_B += 1
        return self._run(np.asarray(next_B, np.int64).reshape(-1, 1), pos, bias)


def cache_bytes(model: nn.Cell, batch: int, slots: int, kv_cache_dtype: str = "float32") -> int:
    """Bytes of the K and V caches ([B, K, T, D] per layer) in `kv_cache_dtype`'s storage."""
    size = np.dtype(KV_STORAGE[kv_cache_dtype]).itemsize
    return 2 * len(model.model.layers) * batch * kv_heads(model) * slots * model.config.head_dim * size


def check_cache_fits(model: nn.Cell, batch: int, slots: int, max_new_tokens: int,
                     kv_cache_dtype: str = "float32") -> None:
    """Refuse a KV cache larger than the memory available now, before numpy is asked for it (a
    huge max_new_tokens was a 238 GiB allocation traceback)."""
    need = cache_bytes(model, batch, slots, kv_cache_dtype)
    avail = available_memory()
    if avail is not None and need > avail:
        raise GenerationError(f"max_new_tokens={max_new_tokens}: the {kv_cache_dtype} KV cache for {batch} x {slots} "
                              f"positions needs {need / 2**30:,.1f} GiB, more than the {avail / 2**30:.1f} GiB of "
                              "memory available")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def get_engine(model: nn.Cell, batch: int, prompt_len: int, max_new_tokens: int,
               kv_cache_dtype: str = "float32") -> tuple[DecodeEngine, int]:
    """A cached engine for (B, T, cache dtype) plus the bucketed prompt length P (engines are kept
    per model, so repeated generate calls reuse compiled graphs)."""
    P = round_up(prompt_len, PROMPT_BUCKET)
    T = round_up(P + max_new_tokens, SLOT_BUCKET)
    cache: dict = model.__dict__.setdefault("_decode_engines", {})
    key = (batch, T, kv_cache_dtype)
    engine = cache.get(key)
    if engine is None:
        check_cache_fits(model, batch, T, max_new_tokens, kv_cache_dtype)
        if len(cache) >= 2:  # bound memory (caches are B*T*L*2*K*D values): drop the oldest engine
            cache.pop(next(iter(cache)))
        engine = cache[key] = DecodeEngine(model, batch, T, kv_cache_dtype=kv_cache_dtype)
    return engine, P
