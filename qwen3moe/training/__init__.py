"""qwen3moe.training: AdamW, LR schedules, compiled train step, checkpoint/resume, trainer."""
from qwen3moe.training.schedules import (Schedule, constant_with_warmup, cosine_with_warmup,
                                         linear_with_warmup, lr_at)

__all__ = ["AdamW", "DEFAULT_NO_DECAY", "decay_mask", "Schedule", "lr_at", "constant_with_warmup",
           "linear_with_warmup", "cosine_with_warmup", "TrainStep", "Trainer", "TrainerConfig",
           "TokenWindows", "save_training_checkpoint", "load_training_checkpoint"]


def __getattr__(name: str):
    """Lazy: the optimizer/step/trainer/checkpoint modules import MindSpore (the CLI and the task
    config must start without it)."""
    if name in ("AdamW", "DEFAULT_NO_DECAY", "decay_mask"):
        from qwen3moe.training import optimizer
        return getattr(optimizer, name)
    if name == "TrainStep":
        from qwen3moe.training.step import TrainStep
        return TrainStep
    if name in ("Trainer", "TrainerConfig", "TokenWindows"):
        from qwen3moe.training import trainer
        return getattr(trainer, name)
    if name in ("save_training_checkpoint", "load_training_checkpoint"):
        from qwen3moe.training import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'qwen3moe.training' has no attribute {name!r}")
