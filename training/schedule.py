"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The lr is a pure function of the optimizer step (nanoGPT's get_lr), so the scheduler's whole
state is the step counter the checkpoint already stores: nothing to serialize, nothing to drift
on resume.
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """An explicit warmup_steps wins; otherwise a fraction of the run (at least one step)."""
    if warmup_steps is not None:
        return max(0, int(warmup_steps))
    return max(1, round(warmup_ratio * total_steps)) if total_steps > 0 else 0


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_lr_ratio: float = 0.1) -> float:
    """lr for optimizer step `step` (0-based: the step about to be taken).

    Warmup ramps (step+1)/warmup so the very first update is already nonzero and step warmup-1
    reaches base_lr; the cosine then runs from base_lr at step `warmup` to min_lr at step total-1.
    """
    min_lr = base_lr * min_lr_ratio
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = total - 1 - warmup
    if decay_steps <= 0:
        return base_lr
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
