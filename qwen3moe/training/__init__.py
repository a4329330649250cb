"""qwen3moe.training: AdamW, LR schedules, compiled train step, checkpoint/resume, trainer."""
from qwen3moe.training.optimizer import DEFAULT_NO_DECAY, AdamW, decay_mask
from qwen3moe.training.schedules import (Schedule, constant_with_warmup, cosine_with_warmup,
                                         linear_with_warmup, lr_at)

__all__ = ["AdamW", "DEFAULT_NO_DECAY", "decay_mask", "Schedule", "lr_at", "constant_with_warmup",
           "linear_with_warmup", "cosine_with_warmup"]
