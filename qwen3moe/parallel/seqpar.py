"""Megatron sequence parallelism as a plan applied from outside (parallelize.py, `mesh.sp`).

Each rank's residual stream, its norms and its MoE input hold only its own token rows: the
T = B*S tokens of its dp rows, zero-padded to Tp (a multiple of tp), cut into tp blocks of
t = Tp / tp rows; rank j of the tp group holds rows [j*t, (j+1)*t), carried as [1, t, H] so
the decoder layer's own code (norms, residual adds, reshape to [T, H] for the MLP) runs
unchanged. Around the model's modules (the layout and backward rules of Megatron's sequence parallelism):

    embedding          vocab-parallel partial rows -> reduce-scatter -> own rows
    attention          own rows -> all-gather -> [B, S, H] -> the module (q/k/v/o unwrapped:
                       no f/g) -> partial [B, S, H] -> reduce-scatter -> own rows
    dense MLP          own rows -> all-gather -> [Tp, H] -> the module -> reduce-scatter
    MoE block          own rows straight to the dispatcher (parallelize.py: the all-gather
                       dispatcher over the ep*etp group, no tp gather)
    final hidden       own rows after the final norm -> all-gather -> [B, S, H] (lm_head);
                       a pipeline stage before the last returns its own rows [1, t, H]
                       unchanged (the next stage's input: stages exchange [1, t, H])
all-gather's backward is a reduce-scatter (gather_rs), reduce-scatter's an all-gather; the
collectives themselves are `collective` cells (process.py `_Op` over backend.py: shared
memory or MCCL), as every other plan's. The norms see only their rank's tokens, so their
gradients are partial: summed over the stage (ranks.ShardInfo). Zero pad rows stay zero
through norms, attention output, MLPs and experts (no biases), and carry token mask 0, so
router statistics never count them.

Router statistics: the model computes them on its own rows (its mask the rank's slice of the
padded token mask); `SequenceParallelModel` sums them over tp with an identity backward, so
each rank's router probabilities receive the gradient of the (replicated) aux term for its
own rows only and the stage sum of router gradients counts every token once. Router logits
are gathered back to [T, E] (backward: own rows).
Shapes: B batch, S seq, T = B*S, Tp padded, t = Tp / tp, H hidden, E experts, L sparse layers.
"""
from __future__ import annotations

from mindspore import Tensor, nn, ops

from qwen3moe.parallel.dispatchers import collective


def own_rows(B: int, S: int, tp: int) -> int:
    """t: the token rows of each tp rank (B*S zero-padded to a multiple of tp)."""
    return -(-B * S // tp)


def pad_rows(x_TX: Tensor, tp: int) -> Tensor:
    """Zero rows up to a multiple of tp."""
    pad = -x_TX.shape[0] % tp
    return ops.concat([x_TX, ops.zeros((pad,) + x_TX.shape[1:], x_TX.dtype)]) if pad else x_TX


class TokenScatter(nn.Cell):
    """Partial activations (any leading dims, T rows of H) -> own rows [1, t, H] of their sum
    over tp (reduce-scatter; backward: all-gather)."""

    def __init__(self, group, tp: int) -> None:
        super().__init__()
        self.tp, self.rs = tp, collective(group, "reduce_scatter")

    def construct(self, x):
        H = x.shape[-1]
        return self.rs(pad_rows(x.reshape(-1, H), self.tp)).reshape(1, -1, H)


class TokenGather(nn.Cell):
    """Own rows (any leading dims, t rows of H) -> [B, S, H] (all-gather, pad rows dropped;
    backward: reduce-scatter)."""

    def __init__(self, group) -> None:
        super().__init__()
        self.gather = collective(group, "gather_rs")

    def construct(self, x, B: int, S: int):
        H = x.shape[-1]
        return self.gather(x.reshape(-1, H))[:B * S].reshape(B, S, H)


class SequenceParallelAttention(nn.Cell):
    """The model's attention module on own rows: gathered in, reduce-scattered out."""

    def __init__(self, attn: nn.Cell, group, tp: int) -> None:
        super().__init__()
        self.inner, self.gather, self.scatter = attn, TokenGather(group), TokenScatter(group, tp)

    def construct(self, x_1tH, cos_BSD, sin_BSD, bias_B1ST, k_cache=None, v_cache=None, idx=None):
        x_BSH = self.gather(x_1tH, cos_BSD.shape[0], cos_BSD.shape[1])
        return self.scatter(self.inner(x_BSH, cos_BSD, sin_BSD, bias_B1ST, k_cache, v_cache, idx))


class SequenceParallelModel(nn.Cell):
    """Qwen3MoeModel's contract (final hidden [B, S, H], router logits [T, E] per sparse layer,
    router statistics of all T tokens, hidden states [B, S, H]) from the model run on own rows
    (module docstring); `gather_out` False (a pipeline stage before the last): the final hidden
    and hidden states stay own rows [1, t, H]. `.embed_tokens`, `.layers`, `.norm`, `.config`
    read the wrapped model's."""

    def __init__(self, inner: nn.Cell, group, tp: int, pos: int, gather_out: bool = True) -> None:
        super().__init__(auto_prefix=False)
        self.inner, self.tp, self.pos, self.gather_out = inner, tp, pos, gather_out
        self.gather = TokenGather(group)
        self.reduce = collective(group, "reduce")           # statistics: bwd identity
        self.gather_rows = collective(group, "gather")      # router logits: bwd own rows

    def construct(self, input_ids_BS, cos_BSD, sin_BSD, bias_B1SS, token_mask_T, want_hidden: bool = False):
        B, S = cos_BSD.shape[0], cos_BSD.shape[1]
        mask_Tp = pad_rows(token_mask_T, self.tp)
        t = mask_Tp.shape[0] // self.tp
        x, router_logits, stats, hidden = self.inner(input_ids_BS, cos_BSD, sin_BSD, bias_B1SS,
                                                     mask_Tp[self.pos * t:(self.pos + 1) * t], want_hidden)
        if len(stats) == 3:
            counts_LE, probsum_LE, n = stats
            LE = counts_LE.shape[0] * counts_LE.shape[1]
            tot = self.reduce(ops.concat([counts_LE.reshape(-1), probsum_LE.reshape(-1), n.reshape(1)]))
            stats = (tot[:LE].reshape(counts_LE.shape), tot[LE:2 * LE].reshape(counts_LE.shape), tot[2 * LE])
        if len(router_logits) > 0:
            E = router_logits[0].shape[1]
            rows = self.gather_rows(ops.concat(router_logits, 1))[:B * S]
            router_logits = ops.split(rows, E, 1)
        if self.gather_out:
            full = ()
            for h in hidden:
                full = full + (self.gather(h, B, S),)
            x, hidden = self.gather(x, B, S), full
        return x, router_logits, stats, hidden

    def __getattr__(self, name):
        if name in _MODEL_PARTS and "inner" in self.__dict__.get("_cells", {}):
            return getattr(self.__dict__["_cells"]["inner"], name)
        return super().__getattr__(name)


_MODEL_PARTS = ("embed_tokens", "layers", "norm", "config")  # read through the wrapper (recompute, precision)
