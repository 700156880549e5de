"""The learning-rate schedule: linear warm-up, then a cosine down to `train.min_lr_ratio` of the peak.

A torch `LambdaLR` over the engine's optimizer (DeepSpeed steps it after every optimizer step). Optimizer step
s (0-based) uses `peak * lr_factor(s, ...)`: with warm-up W the first step already learns (1/W of the peak;
no step runs at learning rate 0), without warm-up (W = 0) the first step uses the peak. The factor function is
rebuilt from the config on every start, so a resumed run follows the new total steps, warm-up and floor; the
peak restored with the checkpoint is replaced by this run's `train.learning_rate` (`set_peak_lr`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vlm.config import TrainConfig


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Fraction of the peak learning rate that optimizer step `step` (0-based) of `total` uses.

    Warm-up: (step + 1) / warmup for the first `warmup` steps; then cosine from 1 at step `warmup` to
    `min_ratio` at the last step (step total - 1), and `min_ratio` after it.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(train_cfg: TrainConfig, total_steps: int) -> Callable[[Optimizer], LambdaLR]:
    """What `deepspeed.initialize(lr_scheduler=...)` takes: optimizer -> the schedule of this run."""
    warmup, floor = train_cfg.warmup_steps, train_cfg.min_lr_ratio

    def factory(optimizer: Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, floor))

    return factory


def set_peak_lr(scheduler: LambdaLR, peak: float) -> float:
    """Make `peak` the schedule's peak learning rate from the current step on; returns the previous peak."""
    previous = float(scheduler.base_lrs[0])
    scheduler.base_lrs = [peak for _ in scheduler.base_lrs]
    step = scheduler.last_epoch  # the index of the next optimizer step
    for group, factor in zip(scheduler.optimizer.param_groups, (f(step) for f in scheduler.lr_lambdas)):
        group["lr"] = peak * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return previous
