"""The metrics of a training run (training/trainer.py): the logged records (metrics window ->
history, log line, metrics.jsonl) and the held-out validation at epoch ends (best weights kept)."""

from __future__ import annotations

import json
import math
import time

import torch

from training.checkpoint import save_best
from training.distributed import all_reduce
from training.metrics import MetricsWindow, measure_acceptance
from training.train_state import TrainRun, TrainState, best_record


def sync_tokens(run: TrainRun, state: TrainState) -> None:
    # Token counts are summed over ranks only here (log and checkpoint), not every step.
    t = torch.tensor([state.tokens_pending], dtype=torch.int64)
    state.tokens_seen += int(all_reduce(t).item()) if run.world > 1 else state.tokens_pending
    state.tokens_pending = 0


def flush_metrics(run: TrainRun, state: TrainState) -> None:
    if run.is_main:
        run.store.write_bytes(run.metrics_key, "".join(json.dumps(r) + "\n" for r in state.history).encode())


def log_metrics(run: TrainRun, state: TrainState, window: MetricsWindow, lr: float) -> None:
    """Close the metrics window into a record: history, the log line, metrics.jsonl now and then."""
    m = window.summary(run.world)
    sync_tokens(run, state)
    dt = time.perf_counter() - window.t0
    eta = (run.total - state.step) * dt / max(window.steps, 1)
    state.last_record = {"step": state.step, "epoch": state.epoch, "lr": lr, "grad_norm": state.grad_norm, **m,
                         "tokens_per_s": m["tokens"] / max(dt, 1e-9), "tokens_seen": state.tokens_seen,
                         "elapsed_s": state.wall_seconds(), "eta_s": eta}
    state.history.append(state.last_record)
    if run.is_main:
        acc = " ".join(f"{a:.2f}" for a in m["acc"])
        run.log(f"step {state.step}/{run.total} ep {state.epoch} loss {m['loss']:.4f} acc [{acc}] "
                f"tau {m['simulated_acceptance_length']:.2f} lr {lr:.2e} gnorm {state.grad_norm:.2f} "
                f"tok/s {state.last_record['tokens_per_s']:.0f} eta {fmt_eta(eta)}")
    window.reset()
    if time.perf_counter() - state.last_flush > run.cfg.metrics_flush_seconds:
        flush_metrics(run, state)
        state.last_flush = time.perf_counter()


def validate(run: TrainRun, state: TrainState, finished_epoch: int) -> None:
    """Measure the held-out rows, record them, and keep the weights when they are the best yet."""
    # Every rank measures the whole held-out set: identical numbers, no collective.
    cfg = run.cfg
    m = measure_acceptance(run.draft, run.heldout, run.target_head, run.t2d, ttt_length=cfg.ttt_length,
                           max_tokens_per_batch=cfg.max_tokens_per_batch, loss_fn=run.loss_fn)
    record = {"step": state.step, "epoch": finished_epoch, "loss": m["loss"], "acc": m["acc"],
              "cond_acc": m["cond_acc"], "simulated_acceptance_length": m["simulated_acceptance_length"],
              "replayed_acceptance_length": m.get("replayed_acceptance_length"), "tokens": m["tokens"]}
    state.validation.append(record)
    is_best = best_record(state.validation) is record
    if run.is_main:
        acc = " ".join(f"{a:.2f}" for a in m["acc"])
        run.log(f"held-out after epoch {finished_epoch} (step {state.step}): loss {m['loss']:.4f} acc [{acc}] "
                f"tau {m['simulated_acceptance_length']:.3f}"
                + (f" replayed {m['replayed_acceptance_length'][-1]:.3f}" if m.get("replayed_acceptance_length") else "")
                + (" (best)" if is_best else ""))
        if is_best:
            save_best(run.store, run.prefix, step=state.step, model_state=dict(run.named), record=record)


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
