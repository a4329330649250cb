"""Training batches from a GPTDataset: micro-batches sharded by data-parallel rank, resumable.

Global batch g holds samples [g*G, (g+1)*G) of the dataset order (G = micro_batch_size * dp);
rank r takes every dp-th of them (r, r+dp, ...), as Megatron's pretraining sampler does, so the
union over ranks is exactly the single-process batch. `start_sample` resumes mid-run: batch i
reads from sample `start_sample + i*G`, with no state but that offset.
Shapes: B micro-batch, S+1 tokens per sample (inputs and shifted labels share it).
"""
from __future__ import annotations

import numpy as np


class GPTBatches:
    def __init__(self, dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 start_sample: int = 0, wrap: bool = True) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        configs = [d.cfg for d in getattr(dataset, "datasets", [dataset]) if hasattr(d, "cfg")]
        if any(c.reset_position_ids for c in configs):  # batch() yields token windows only
            raise ValueError("reset_position_ids=True: GPTBatches feeds [B, S+1] token windows without "
                             "position ids, so the reset would be silently lost; build the dataset without it")
        self.ds, self.B, self.rank, self.dp = dataset, micro_batch_size, dp_rank, dp_size
        self.start, self.wrap = start_sample, wrap

    @property
    def global_batch(self) -> int:
        return self.B * self.dp

    def sample_ids(self, i: int) -> np.ndarray:
        base = self.start + i * self.global_batch
        ids = base + self.rank + self.dp * np.arange(self.B)
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
        """{"input_ids": [B, S+1], "labels": [B, S+1]} for TrainStep. The dataset's loss_mask
        (eod_mask_loss, padding) is honoured: loss_mask[t] = 0 masks the prediction of
        labels[t] = token t+1, which in the [B, S+1] frame is label position t+1 -> -100 (the
        model ignores -100 after its shift, and position 0 is never a target)."""
        items = self.items(i)
        ids = np.stack([np.concatenate([it["input_ids"], it["labels"][-1:]]) for it in items])
        mask_BS = np.stack([np.asarray(it.get("loss_mask", np.ones(len(it["labels"]))), np.float32)
                            for it in items])
        labels = ids.copy()
        labels[:, 1:][mask_BS <= 0] = -100
        return {"input_ids": ids, "labels": labels}

    def position(self, i: int) -> int:
        """The sample offset to resume from after batch i."""
        return self.start + (i + 1) * self.global_batch
