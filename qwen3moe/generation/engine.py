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
                 kv_cache_dtype: str = "float32", moved: tuple[nn.Cell, int] | None = None) -> None:
        super().__init__(auto_prefix=False)
        self.net, self.hidden_out = model, hidden_out
        cfg = model.config
        shape = (batch, kv_heads(model), slots, cfg.head_dim)
        L = len(model.model.layers)  # a pipeline stage holds only its own layers
        np_dtype = KV_STORAGE[kv_cache_dtype]

        def cache(kind: str, i: int) -> Parameter:
            data = np.zeros(shape, np_dtype)
            if moved is not None:  # (a smaller cell, n): its first n slots, written by earlier steps
                old, n = moved
                data[:, :, :n] = getattr(old, f"{kind}_cache")[i].asnumpy()[:, :, :n]
            return Parameter(Tensor(data), f"kv_cache{uid}.{kind}.{i}", requires_grad=False)

        self.k_cache = ParameterTuple([cache("k", i) for i in range(L)])
        self.v_cache = ParameterTuple([cache("v", i) for i in range(L)])

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
                 kv_cache_dtype: str = "float32", grown_from: tuple[DecodeEngine, int] | None = None) -> None:
        self.model, self.config = model, model.config
        self.batch, self.slots, self.kv_heads = batch, slots, kv_heads(model)
        check_kv_cache_dtype(kv_cache_dtype)
        self.fused = fused_eligible(model)
        if kv_cache_dtype != "float32" and not self.fused:
            raise GenerationError(f"kv_cache_dtype={kv_cache_dtype} needs the fused decode kernels, which do not apply "
                                  f"here ({not_fused_reason(model)}); use kv_cache_dtype=float32")
        self.uid = next(_ENGINE_IDS)
        # grown_from (a smaller batch-1 engine, keep): its cache up to the keep-th token moves here
        moved = None if grown_from is None else (grown_from[0].cell, grown_from[0].end_of(grown_from[1]))
        self.cell = _StepCell(model, batch, slots, self.uid, hidden_out, kv_cache_dtype, moved)
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
        # batch 1: the tokens whose k/v the cache holds, in the order of their slots (the valid ones)
        self.cached: list[int] = []
        if grown_from is not None:  # the moved slots' record (extend() sets the cursor and positions)
            old, keep = grown_from
            self.cached = old.cached[:keep]
            self.valid_BT[:, :moved[1]] = old.valid_BT[:, :moved[1]]

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
        self.cursor = 0
        self.valid_BT[:] = False
        self.next_pos_B[:] = 0
        self.cached = []
        C = chunk_size if chunk_size and chunk_size < P else P
        return self._fill(ids_BP, mask_BP, [min(C, P - start) for start in range(0, P, C)])

    def common_prefix(self, ids_S: np.ndarray) -> int:
        """How many leading tokens of a batch-1 prompt (its real tokens `ids_S`) the cache holds,
        short of the prompt's last token (its logits are wanted): what `extend` can keep."""
        n = min(len(self.cached), len(ids_S) - 1)
        if self.batch != 1 or n <= 0:
            return 0
        same = np.asarray(self.cached[:n]) == np.asarray(ids_S[:n])
        return n if same.all() else int(np.argmin(same))

    def slots_needed(self, n_prompt: int, keep: int, max_new_tokens: int) -> int:
        """Cache slots an `extend` keeping `keep` of `n_prompt` tokens, then decoding, takes."""
        return self.end_of(keep) + round_up(n_prompt - keep, PROMPT_BUCKET) + max_new_tokens

    def end_of(self, keep: int) -> int:
        """The slot after the `keep`-th cached token (batch 1: the valid slots hold them in order)."""
        return int(np.flatnonzero(self.valid_BT[0])[keep - 1]) + 1

    def extend(self, ids_S: np.ndarray, keep: int, chunk_size: int | None = None, pad: int = 0) -> np.ndarray:
        """Prefill a batch-1 prompt (its real tokens `ids_S`) whose first `keep` tokens the cache
        holds (`common_prefix`): the cache is cut back to them and only the rest runs, left-padded
        to a PROMPT_BUCKET multiple, at the slots after them, in `pow2_chunks` steps (chunked
        prefill steps). Returns the logits [1, V] of the prompt's last token."""
        if not 0 < keep < len(ids_S) or np.any(np.asarray(self.cached[:keep]) != np.asarray(ids_S[:keep])):
            raise ValueError(f"extend: the cache does not hold the prompt's first {keep} tokens")
        check_prefill_chunk_size(chunk_size)
        self.cursor = self.end_of(keep)
        self.valid_BT[:, self.cursor:] = False
        self.next_pos_B[:] = keep
        del self.cached[keep:]
        rest = np.asarray(ids_S[keep:], np.int64)
        lead = round_up(len(rest), PROMPT_BUCKET) - len(rest)
        ids = np.concatenate([np.full(lead, pad, np.int64), rest])[None]
        mask = np.concatenate([np.zeros(lead, np.int64), np.ones(len(rest), np.int64)])[None]
        return self._fill(ids, mask, pow2_chunks(ids.shape[1], chunk_size))

    def _fill(self, ids_BS: np.ndarray, mask_BS: np.ndarray, chunks: list[int]) -> np.ndarray:
        """Run S left-padded tokens per row at slots [cursor, cursor + S), positions following
        each row's earlier tokens, as steps of `chunks` tokens (sum S); returns the last
        position's logits."""
        B, S = ids_BS.shape
        base, mask = self.cursor, mask_BS.astype(bool)
        if base + S > self.slots:
            raise ValueError(f"{S} prompt tokens after slot {base} do not fit the engine's {self.slots} slots")
        pos = self.next_pos_B[:, None] + np.cumsum(mask, axis=1) - 1
        pos[~mask] = 1
        self.valid_BT[:, base:base + S] = mask
        self.next_pos_B = self.next_pos_B + mask.sum(1)
        if B == 1:
            self.cached += ids_BS[0, mask[0]].tolist()
        start = 0
        for size in chunks:
            end = start + size
            logits = self._run(ids_BS[:, start:end], pos[:, start:end], self._prefill_bias(base + start, base + end))
            start = end
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
        if self.batch == 1:
            self.cached.append(int(np.asarray(next_B).reshape(-1)[0]))
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


def pow2_chunks(n: int, chunk_size: int | None) -> list[int]:
    """n (a PROMPT_BUCKET multiple) as steps of PROMPT_BUCKET x a power of two, each at most
    `chunk_size` (0 / None: no bound), largest first: a conversation's turns of every length take
    a few step shapes, each compiled once, instead of one per length."""
    out = []
    while n:
        c = PROMPT_BUCKET
        while 2 * c <= n and (not chunk_size or 2 * c <= chunk_size):
            c *= 2
        out.append(c)
        n -= c
    return out


def engine_with_prefix(model: nn.Cell, ids_S: np.ndarray, max_new_tokens: int,
                       kv_cache_dtype: str = "float32") -> tuple[DecodeEngine, int] | None:
    """(engine, keep) for a batch-1 prompt (its real tokens `ids_S`) whose first `keep` tokens a
    kept batch-1 engine of this cache dtype holds (the longest such prefix), or None. An engine
    too small for the rest and the new tokens is replaced by a larger one (a quarter of headroom
    for the next turn of a conversation) that takes over its cache up to the kept tokens."""
    engines: dict = model.__dict__.setdefault("_decode_engines", {})
    best = None
    for key, engine in engines.items():
        keep = engine.common_prefix(ids_S) if key[0] == 1 and key[2] == kv_cache_dtype else 0
        if keep and (best is None or keep > best[2]):
            best = (key, engine, keep)
    if best is None:
        return None
    key, engine, keep = best
    need = engine.slots_needed(len(ids_S), keep, max_new_tokens)
    if need <= engine.slots:
        return engine, keep
    T = round_up(need + need // 4, SLOT_BUCKET)
    check_cache_fits(model, 1, T, max_new_tokens, kv_cache_dtype)
    grown = DecodeEngine(model, 1, T, kv_cache_dtype=kv_cache_dtype, grown_from=(engine, keep))
    del engines[key]  # its cache lives on in the grown engine
    engines.pop((1, T, kv_cache_dtype), None)
    if len(engines) >= 2:
        engines.pop(next(iter(engines)))
    engines[(1, T, kv_cache_dtype)] = grown
    return grown, keep


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
