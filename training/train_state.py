"""The state one training run carries (training/trainer.py): what is fixed once it is set up
(TrainRun), what changes step by step and a checkpoint stores (TrainState), and what it returns
(TrainResult)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from training.recipe import TrainConfig
    from training.sources import BatchSource
    from training.storage import ObjectStore


def best_record(validation: list[dict]) -> dict | None:
    """The held-out record export_checkpoint="best" exports: the highest simulated acceptance
    length, the earliest on a tie (None without validation). The one rule every reader uses."""
    return max(validation, key=lambda r: r["simulated_acceptance_length"], default=None)


def exported_record(validation: list[dict], exported_step: int | None) -> dict | None:
    """The held-out record of the weights a run returned (None when that step was not measured)."""
    return next((r for r in validation if r["step"] == exported_step), None)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float
    acc: list[float]               # top-1 agreement per TTT step over the final log window
    cond_acc: list[float]          # conditional acceptance per step over the same window
    simulated_acceptance_length: float
    wall_seconds: float
    draft: torch.nn.Module
    step_losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    metrics: list[dict] = field(default_factory=list)  # every logged record, as in metrics.jsonl
    config: dict = field(default_factory=dict)         # the resolved TrainConfig
    recipe_fields: list[str] = field(default_factory=list)  # fields the recipe filled (None in the given config)
    validation: list[dict] = field(default_factory=list)  # one held-out record per epoch end
    exported_step: int | None = None  # the step whose weights the returned draft holds

    def summary(self) -> dict[str, Any]:
        """JSON-ready view (no model), what the asset returns as metadata."""
        # Not asdict(): it would deep-copy the draft and every metrics record.
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("draft", "metrics")}
        return out | {"log_records": len(self.metrics)}

    @property
    def best(self) -> dict | None:
        """The held-out record with the highest simulated acceptance length (None without validation)."""
        return best_record(self.validation)


@dataclass
class TrainRun:
    """What the parts of one training run share, fixed once it is set up."""

    cfg: TrainConfig
    recipe_fields: list[str]  # the fields the recipe filled
    source: BatchSource
    heldout: BatchSource | None
    draft: torch.nn.Module
    model: torch.nn.Module  # the draft, or its DDP wrapper
    named: list[tuple[str, torch.nn.Parameter]]
    opt: torch.optim.Optimizer
    opt_names: list[str]
    target_head: torch.Tensor
    t2d: torch.Tensor
    store: ObjectStore
    prefix: str
    loss_fn: Callable
    log: Callable[[str], None]
    rank: int
    world: int
    micro: list[int]        # micro-batches per rank per epoch
    epoch_steps: list[int]  # optimizer steps per epoch
    total: int
    warmup: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def metrics_key(self) -> str:
        return f"{self.prefix}/metrics.jsonl"


@dataclass
class TrainState:
    """What changes as the run goes; a checkpoint stores it and a resume restores it."""

    step: int = 0
    epoch: int = 0
    pos: int = 0  # micro-batches of this epoch consumed
    tokens_seen: int = 0
    tokens_pending: int = 0  # this rank's tokens since the last sum over ranks
    wall_before: float = 0.0  # training seconds before a resume
    grad_norm: float = 0.0
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    last_record: dict | None = None
    resumed_from: int | None = None
    t_start: float = 0.0
    last_flush: float = 0.0

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start
