"""Training batches from a GPTDataset: the one batcher of the package (CLI pretrain, the parallel
trainers, the demo, the examples), micro-batches sharded by data-parallel rank, resumable.

Framing: a GPTDataset sample is S+1 tokens (input_ids = tokens[:S], labels = tokens[1:]); the
batch row is all S+1 tokens and the model shifts labels itself, so the S predictions and their
loss_mask are Megatron's. Split rule: global batch g holds samples [g*G, (g+1)*G) of the dataset
order (G = micro_batch_size * dp) and rank r takes the contiguous rows [r*B, (r+1)*B) of it, as
Megatron's MegatronPretrainingSampler does (and as parallel/step.rank_rows cuts a global
batch), so the ranks' rows stacked in rank order are exactly the single-process batch.
`start_sample` resumes mid-run: batch i reads from sample `start_sample + i*G`, with no state
but that offset.
Shapes: B micro-batch, S+1 tokens per row.
"""
from __future__ import annotations

import numpy as np


class GPTBatches:
    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 start_sample: int = 0, wrap: bool = True, position_ids: bool | None = None) -> None:
        """position_ids: pass the dataset's position ids on; None: exactly when the dataset resets
        them after EOD (reset_position_ids), else the model's 0..S equal them."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if position_ids is None:  # a reset must never be silently lost
            configs = [d.cfg for d in getattr(dataset, "datasets", [dataset]) if hasattr(d, "cfg")]
            position_ids = any(c.reset_position_ids for c in configs)
        self.ds, self.B, self.rank, self.dp = dataset, micro_batch_size, dp_rank, dp_size
        self.start, self.wrap, self.position_ids = start_sample, wrap, position_ids

    @property
    def global_batch(self) -> int:
        return self.B * self.dp

    def sample_ids(self, i: int) -> np.ndarray:
        base = self.start + i * self.global_batch
        ids = base + self.rank * self.B + np.arange(self.B)
        if ids.max() >= len(self.ds):
            if not self.wrap:
                raise IndexError(f"batch {i} needs sample {int(ids.max())}, dataset has {len(self.ds)}")
            ids = ids % len(self.ds)
        return ids

    def items(self, i: int) -> list[dict]:
        return [self.ds[int(j)] for j in self.sample_ids(i)]

    def tokens(self, i: int) -> np.ndarray:
        """[B, S+1] token ids: each sample's inputs plus its last label (the model shifts labels
        internally: same objective as Megatron's input_ids/labels pair)."""
        return np.stack([np.concatenate([it["input_ids"], it["labels"][-1:]]) for it in self.items(i)])

    def batch(self, i: int) -> dict[str, np.ndarray]:
        """{"input_ids": [B, S+1], "labels": [B, S+1]} (and "position_ids" [B, S+1] when the
        dataset resets them after EOD) for TrainStep. The dataset's loss_mask (eod_mask_loss,
        padding) is honoured: loss_mask[t] = 0 masks the prediction of labels[t] = token t+1,
        which in the [B, S+1] frame is label position t+1 -> -100 (the model ignores -100 after
        its shift, and position 0 is never a target). The last row position predicts nothing
        and nothing attends to it, so its position id (the previous one + 1) cannot matter."""
        items = self.items(i)
        ids = np.stack([np.concatenate([it["input_ids"], it["labels"][-1:]]) for it in items]).astype(np.int64)
        mask_BS = np.stack([np.asarray(it.get("loss_mask", np.ones(len(it["labels"]))), np.float32)
                            for it in items])
        labels = ids.copy()
        labels[:, 1:][mask_BS <= 0] = -100
        out = {"input_ids": ids, "labels": labels}
        if self.position_ids:
            pos_BS = np.stack([np.asarray(it["position_ids"], np.int64) for it in items])
            out["position_ids"] = np.concatenate([pos_BS, pos_BS[:, -1:] + 1], axis=1)
        return out

    def position(self, i: int) -> int:
        """The sample offset to resume from after batch i."""
        return self.start + (i + 1) * self.global_batch

