"""EAGLE-3 draft training: one loop for offline (stored hidden states) and online (target in the loop).

The loop is nanoGPT-shaped: AdamW, linear warmup + cosine decay (training/schedule.py), gradient
accumulation, global-norm clipping, and TrainConfig.precision: bf16 autocast over fp32 master
weights (auto's choice on GPU) or fp32 (auto's on CPU). Data comes from a BatchSource
(training/sources.py: hidden_states.HiddenStateDataset offline, online.OnlineBatchSource online);
both yield the same packed-row dicts, so model, loss, metrics (training/metrics.py) and
checkpoints are identical in both modes.

Recipe. Fields of TrainConfig left None are filled by training/recipe.py from the corpus size
(tokens, rows) before anything else; the resolved config is what checkpoints store and
TrainResult reports.

Held-out validation. `validation_rows` rows are taken out of the source (sources.split_validation)
and never trained on; at every epoch end (and at the last step) the draft's acc_k and simulated
acceptance length over them are measured (metrics.measure_acceptance, with the chain-drafting
replay that tracks decoded tau), logged and recorded; the
best epoch's weights are kept in the store (checkpoint.save_best), and with
export_checkpoint="best" the returned draft holds them.

Exact resume. A checkpoint (training/checkpoint.py) holds the trainable weights, the AdamW state,
every rank's torch generator state, the data position as (epoch, micro-batches consumed in that
epoch) and the validation records. Data order is a pure function of (seed, epoch) and sources can
`skip` to a position, and the lr is a pure function of the step, so a run killed after
checkpoint s and resumed follows the uninterrupted trajectory bit for bit on CPU (same seed,
world size and thread count).

Distributed. Under torchrun each rank reads an equal contiguous run of every epoch's batch list
(so offline ranks read disjoint parts), and W ranks with grad_accum G take global batches of W*G
micro-batches: the same data per epoch and the same batch size as one process with grad_accum
W*G, and the very same global batches as that process reading the ranks' batches interleaved
(tests/training/test_ddp.py compares exactly that). The draft is wrapped in DistributedDataParallel
(ttt_forward calls the wrapper, so DDP sees one forward per micro-batch); accumulation
micro-batches run under no_sync and the last one all-reduces. Every rank measures the whole
held-out set (no collective needed); rank 0 alone writes checkpoints, best weights and metrics.
Helpers in training/distributed.py.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist

from training.checkpoint import clear_run, load_best, load_checkpoint, save_checkpoint
from training.distributed import all_reduce, comm_device, rank_world, rng_state, set_rng_state
from training.metrics import MetricsWindow, acceptance_length, measure_acceptance  # noqa: F401 (re-exported)
from training.nonfinite import nonfinite_error, nonfinite_inputs  # noqa: F401 (re-exported)
from training.online import OnlineBatchSource  # noqa: F401 (re-exported)
from training.recipe import RESUME_FREE_FIELDS, TrainConfig, corpus_stats, derived_fields, resolve
from training.schedule import lr_at, warmup_steps_for
from training.sources import BatchSource, split_validation
from training.storage import ObjectStore
from training.train_metrics import flush_metrics, log_metrics, sync_tokens, validate
from training.train_state import TrainResult, TrainRun, TrainState, best_record

__all__ = ["TrainConfig", "TrainResult", "train", "measure_acceptance", "acceptance_length", "OnlineBatchSource",
           "BatchSource", "RESUME_FREE_FIELDS"]


def train(
    cfg: TrainConfig,
    source: BatchSource,
    draft: torch.nn.Module,
    target_head: torch.Tensor,
    t2d: torch.Tensor,
    store: ObjectStore,
    run_prefix: str,
    *,
    log: Callable[[str], None] = print,
    resume: bool = True,
    loss_fn: Callable | None = None,
) -> TrainResult:
    """Train `draft` in place and return it with the final metrics.

    `target_head` is the target's lm_head weight [V, H] (target logits = last @ head.T) and `t2d`
    the draft-vocab mask; both are moved to the draft's device. `loss_fn` defaults to
    training.eagle3.loss.ttt_forward. None fields of `cfg` are resolved by training.recipe from
    the source's size. With resume=True an existing checkpoint under `run_prefix` is continued (a
    finished run returns at once); resume=False deletes the run's checkpoints. Call under
    torchrun with the process group initialized for data parallel training.
    Raises FloatingPointError on a non-finite loss, naming non-finite input features when they are
    the cause.
    """
    run = _setup(cfg, source, draft, target_head, t2d, store, run_prefix.strip("/"), log, loss_fn or _default_loss_fn())
    cfg = run.cfg
    state, ck_step = _restore(run, resume)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's parameters at construction (one starting point whatever each
        # rank built) and averages gradients in buckets overlapped with backward.
        device = next(draft.parameters()).device
        run.model = DDP(draft, device_ids=[device.index] if device.type == "cuda" else None)
    state.t_start = state.last_flush = time.perf_counter()
    window = MetricsWindow(cfg.ttt_length)

    draft.train()
    while state.step < run.total:
        end = run.epoch_steps[state.epoch] * cfg.grad_accum  # micro-batches this epoch uses
        if state.pos >= end:  # an epoch too small for one step
            state.epoch, state.pos = state.epoch + 1, 0
            continue
        it = run.source.batches(cfg.max_tokens_per_batch, epoch=state.epoch, seed=cfg.seed, rank=run.rank,
                                world_size=run.world, skip=state.pos)
        while state.step < run.total:
            lr = train_step(run, state, it, window)
            wrapped = state.pos >= end
            finished = state.epoch
            if wrapped:  # a checkpoint taken now points at the start of the next epoch
                state.epoch, state.pos = state.epoch + 1, 0
            if run.heldout is not None and (wrapped or state.step == run.total):
                validate(run, state, finished)
            save_now = (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or state.step == run.total
            # A checkpoint step is also a log step: the window then never straddles a checkpoint,
            # so a resumed run logs exactly the records the uninterrupted one does.
            if state.step % cfg.log_every == 0 or save_now:
                log_metrics(run, state, window, lr)
            if save_now:
                _checkpoint(run, state)
            if wrapped:
                break  # the next epoch needs its own iterator

    if ck_step is not None and ck_step >= run.total and run.is_main:
        log(f"{run.prefix}: already trained to step {run.total}")
    exported = _load_export_weights(run, state)
    draft.eval()
    final = state.last_record or {}
    return TrainResult(
        steps=state.step, tokens_seen=state.tokens_seen, final_loss=final.get("loss", float("nan")),
        acc=final.get("acc", []), cond_acc=final.get("cond_acc", []),
        simulated_acceptance_length=final.get("simulated_acceptance_length", float("nan")),
        wall_seconds=state.wall_seconds(), draft=draft, step_losses=final.get("step_losses", []),
        resumed_from=state.resumed_from, metrics=state.history, config=cfg.to_dict(), recipe_fields=run.recipe_fields,
        validation=state.validation, exported_step=exported,
    )


def _setup(cfg, source, draft, target_head, t2d, store, prefix, log, loss_fn) -> TrainRun:
    """Resolve the recipe, hold out the validation rows, count the steps, build the optimizer."""
    rank, world = rank_world()
    device = next(draft.parameters()).device
    named = [(n, p) for n, p in draft.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the draft has no trainable parameters")
    from_recipe = derived_fields(cfg)
    hidden = getattr(getattr(draft, "cfg", None), "hidden_size", None)
    cfg = resolve(cfg, corpus_stats(source), world_size=world, hidden_size=hidden)
    source, heldout = split_validation(source, cfg.validation_rows, cfg.seed)
    # The head only scores target distributions (no gradient): in bf16 when the matmuls run in bf16
    # (half its memory, and autocast would cast it at every step), else fp32.
    bf16 = cfg.bf16_on(device.type)
    head_dtype = torch.bfloat16 if bf16 else torch.float32

    # Micro-batches per rank for each epoch (sequence-level shuffling makes packing, and so the
    # count, vary slightly by epoch); a partial optimizer step at an epoch's tail is dropped.
    micro = [source.num_batches(cfg.max_tokens_per_batch, world, epoch=e, seed=cfg.seed) for e in range(cfg.epochs)]
    if world > 1:  # every rank must take the same number of steps or the collectives hang
        n = torch.tensor(micro, dtype=torch.int64, device=comm_device())
        micro = all_reduce(n, op=dist.ReduceOp.MIN).tolist()
    epoch_steps = [m // cfg.grad_accum for m in micro]
    total = sum(epoch_steps)
    if total == 0:
        raise ValueError(f"{micro} micro-batches per rank per epoch cannot fill one step of "
                         f"grad_accum={cfg.grad_accum}; lower grad_accum or max_tokens_per_batch")
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if rank == 0:
        shown = ", ".join(f"{k}={getattr(cfg, k)}" for k in from_recipe)
        log(f"training {total} steps ({'bf16' if bf16 else 'fp32'}) over {cfg.epochs} epoch(s) "
            f"of {source.num_sequences} rows"
            + (f", {heldout.num_sequences} held out" if heldout is not None else "")
            + (f"; from the recipe: {shown}" if shown else ""))

    # Decay matrices only: weight decay on RMSNorm gains pulls them toward zero for no benefit.
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    name_of = {id(p): n for n, p in named}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda",
    )
    return TrainRun(
        cfg=cfg, recipe_fields=from_recipe, source=source, heldout=heldout, draft=draft, model=draft, named=named,
        opt=opt, opt_names=[name_of[id(p)] for p in decay + no_decay], target_head=target_head.to(device, head_dtype),
        t2d=t2d.to(device), store=store, prefix=prefix, loss_fn=loss_fn, log=log, rank=rank, world=world,
        micro=micro, epoch_steps=epoch_steps, total=total,
        warmup=warmup_steps_for(total, cfg.warmup_steps, cfg.warmup_ratio))


def _restore(run: TrainRun, resume: bool) -> tuple[TrainState, int | None]:
    """The state to start from: the run's last checkpoint (weights, optimizer and generators
    restored in place), or a fresh one (resume=False first deletes the run's checkpoints)."""
    state = TrainState()
    ck = load_checkpoint(run.store, run.prefix) if resume else None
    if not resume and run.is_main:
        clear_run(run.store, run.prefix)
        run.store.delete(run.metrics_key)
    if ck is None:
        return state, None
    _check_resumable(ck, run.cfg, run.world, run.total, run.epoch_steps, run.opt_names)
    with torch.no_grad():
        for n, p in run.named:
            p.copy_(ck.model[n].to(p.device, p.dtype))
    run.opt.load_state_dict(ck.optimizer)
    set_rng_state(ck.rng, run.rank)
    s = ck.state
    state.step, state.epoch, state.pos = s["step"], s["epoch"], s["batch_in_epoch"]
    state.tokens_seen, state.wall_before = s["tokens_seen"], s["wall_seconds"]
    state.validation = list(s.get("validation", []))
    state.resumed_from = state.step
    if run.store.exists(run.metrics_key):  # the killed run may have flushed records past its checkpoint
        lines = run.store.read_bytes(run.metrics_key).decode().splitlines()
        state.history = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= state.step]
    state.last_record = state.history[-1] if state.history else s.get("metrics")
    if run.is_main:
        run.log(f"resumed {run.prefix} from step {state.step}/{run.total} (epoch {state.epoch}, batch {state.pos})")
    return state, ck.step


def train_step(run: TrainRun, state: TrainState, batches, window: MetricsWindow) -> float:
    """One optimizer step over `grad_accum` micro-batches from `batches`; returns its lr."""
    cfg = run.cfg
    device = run.target_head.device
    lr = lr_at(state.step, base_lr=cfg.lr, warmup=run.warmup, total=run.total, min_lr_ratio=cfg.min_lr_ratio)
    for g in run.opt.param_groups:
        g["lr"] = lr
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_on(device.type))
    for j in range(cfg.grad_accum):
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"batch source ended at micro-batch {state.pos} of epoch {state.epoch}, "
                               f"but num_batches promised {run.micro[state.epoch]}")
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        # Gradients are all-reduced only on the last micro-batch of the step.
        sync = run.world == 1 or j == cfg.grad_accum - 1
        with (nullcontext() if sync else run.model.no_sync()):
            with autocast:
                out = run.loss_fn(run.model, batch, run.target_head, run.t2d, ttt_length=cfg.ttt_length,
                                  step_weight=cfg.step_weight)
            if not torch.isfinite(out.loss.detach()):
                raise nonfinite_error(out, batch, run.source, cfg, step=state.step, epoch=state.epoch,
                                      pos=state.pos, rank=run.rank, world=run.world)
            (out.loss / cfg.grad_accum).backward()
        n_tok = int(batch["input_ids"].numel())
        window.add(out, n_tok)
        state.tokens_pending += n_tok
        state.pos += 1
    if cfg.grad_clip > 0:
        state.grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in run.named], cfg.grad_clip))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    state.step += 1
    window.steps += 1
    return lr


def _checkpoint(run: TrainRun, state: TrainState) -> None:
    """Save weights, optimizer, every rank's generators and the data position (rank 0 writes)."""
    sync_tokens(run, state)
    rng = rng_state(run.world)  # collective: every rank takes part
    if not run.is_main:
        return
    cfg, total, warmup = run.cfg, run.total, run.warmup
    saved = {
        "step": state.step, "epoch": state.epoch, "batch_in_epoch": state.pos, "tokens_seen": state.tokens_seen,
        "wall_seconds": state.wall_seconds(), "total_steps": total, "epoch_steps": run.epoch_steps,
        "warmup_steps": warmup, "world_size": run.world, "config": cfg.to_dict(), "metrics": state.last_record,
        "validation": state.validation,
        "scheduler": {"kind": "warmup_cosine", "step": state.step, "base_lr": cfg.lr, "warmup": warmup,
                      "total": total, "min_lr_ratio": cfg.min_lr_ratio},
    }
    # Metrics first: once the pointer moves, the records up to this step must be stored
    # (a resume keeps the file's records <= its step and recomputes the rest).
    flush_metrics(run, state)
    save_checkpoint(run.store, run.prefix, step=state.step, model_state=dict(run.named),
                    optimizer_state=run.opt.state_dict(), param_names=run.opt_names, rng=rng,
                    state=saved, keep=cfg.keep_checkpoints)


def _load_export_weights(run: TrainRun, state: TrainState) -> int:
    """With export_checkpoint="best", put the best held-out epoch's weights back into the draft;
    returns the step whose weights the draft holds."""
    if run.world > 1:
        dist.barrier()  # rank 0's best weights are stored before any rank reads them
    if run.cfg.export_checkpoint != "best" or not state.validation:
        return state.step
    best = best_record(state.validation)
    if best["step"] != state.step:
        saved = load_best(run.store, run.prefix)
        if saved is None or saved[1]["step"] != best["step"]:
            raise RuntimeError(f"{run.prefix}: the best held-out weights (step {best['step']}) are not in the store")
        with torch.no_grad():
            for n, p in run.named:
                p.copy_(saved[0][n].to(p.device, p.dtype))
        if run.is_main:
            run.log(f"exporting the best held-out epoch: step {best['step']} (tau "
                    f"{best['simulated_acceptance_length']:.3f}) instead of the last (step {state.step})")
    return best["step"]


def _default_loss_fn():
    from training.eagle3.loss import ttt_forward

    return ttt_forward


def _check_resumable(ck, cfg: TrainConfig, world: int, total: int, epoch_steps: list[int],
                     names: list[str]) -> None:
    """Refuse a resume that could not follow the original trajectory, naming what differs."""
    s = ck.state
    # A checkpoint written before a field existed ran with that field's default (a new field's
    # default keeps the old behaviour), so it reads as the default.
    saved = {k: v for k, v in {**TrainConfig().to_dict(), **s["config"]}.items() if k not in RESUME_FREE_FIELDS}
    now = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE_FIELDS}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    problems = []
    if diff:
        problems.append("config fields " + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff))
    if s["world_size"] != world:
        problems.append(f"world size {s['world_size']} -> {world} (the data stride per rank changes)")
    if s["epoch_steps"] != epoch_steps or s["total_steps"] != total:
        problems.append(f"steps per epoch {s['epoch_steps']} -> {epoch_steps}, total {s['total_steps']} "
                        f"-> {total} (the data changed)")
    if ck.param_names != names:
        problems.append("the draft's trainable parameters differ from the checkpoint's")
    if problems:
        raise ValueError(f"cannot resume from {ck.prefix}: " + "; ".join(problems)
                         + ". Use a new run prefix, or resume=False to start over.")
