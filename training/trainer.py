"""EAGLE-3 draft training: one loop for offline (stored hidden states) and online (target in the loop).

The loop is nanoGPT-shaped: AdamW, linear warmup + cosine decay (training/schedule.py), gradient
accumulation, global-norm clipping, fp32 on CPU and bf16 autocast over fp32 master weights on
GPU. Data comes from a BatchSource (training/sources.py: hidden_states.HiddenStateDataset
offline, online.OnlineBatchSource online); both yield the same packed-row dicts, so model, loss,
metrics (training/metrics.py) and checkpoints are identical in both modes.

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
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
import torch.distributed as dist

from training.checkpoint import clear_run, load_best, load_checkpoint, save_best, save_checkpoint
from training.distributed import all_reduce, comm_device, rank_world, rng_state, set_rng_state
from training.metrics import MetricsWindow, acceptance_length, measure_acceptance  # noqa: F401 (re-exported)
from training.online import OnlineBatchSource  # noqa: F401 (re-exported)
from training.recipe import RESUME_FREE_FIELDS, TrainConfig, corpus_stats, derived_fields, resolve
from training.schedule import lr_at, warmup_steps_for
from training.sources import BatchSource, describe_batch, split_validation
from training.storage import ObjectStore

__all__ = ["TrainConfig", "TrainResult", "train", "measure_acceptance", "acceptance_length", "OnlineBatchSource",
           "BatchSource", "RESUME_FREE_FIELDS"]


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
        return max(self.validation, key=lambda r: r["simulated_acceptance_length"], default=None)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def nonfinite_inputs(batch: dict) -> list[dict]:
    """Which input features of a micro-batch are not finite, one dict per tensor (aux per aux
    layer slot, last): {"tensor", "values" (count), "tokens", "documents" (indices in the packed
    row), "first_position"}. Empty when every feature is finite."""
    cu = batch["cu_seqlens"].tolist()
    found = []
    for name, n_blocks in (("aux", 3), ("last", 1)):
        bad = ~torch.isfinite(batch[name].float())
        if not bool(bad.any()):
            continue
        T, width = bad.shape
        bad = bad.reshape(T, n_blocks, width // n_blocks)
        for b in range(n_blocks):
            rows = torch.nonzero(bad[:, b].any(-1)).flatten().tolist()
            if rows:
                docs = sorted({next(i for i in range(len(cu) - 1) if cu[i] <= t < cu[i + 1]) for t in rows})
                found.append({"tensor": f"aux (aux layer slot {b})" if name == "aux" else "last",
                              "values": int(bad[:, b].sum()), "tokens": len(rows), "documents": docs,
                              "first_position": rows[0]})
    return found


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
    loss_fn = loss_fn or _default_loss_fn()
    rank, world = rank_world()
    is_main = rank == 0
    run_prefix = run_prefix.strip("/")
    device = next(draft.parameters()).device
    target_head = target_head.to(device)
    t2d = t2d.to(device)
    named = [(n, p) for n, p in draft.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("the draft has no trainable parameters")

    from_recipe = derived_fields(cfg)
    hidden = getattr(getattr(draft, "cfg", None), "hidden_size", None)
    cfg = resolve(cfg, corpus_stats(source), world_size=world, hidden_size=hidden)
    source, heldout = split_validation(source, cfg.validation_rows, cfg.seed)

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
    warmup = warmup_steps_for(total, cfg.warmup_steps, cfg.warmup_ratio)
    if is_main:
        shown = ", ".join(f"{k}={getattr(cfg, k)}" for k in from_recipe)
        log(f"training {total} steps over {cfg.epochs} epoch(s) of {source.num_sequences} rows"
            + (f", {heldout.num_sequences} held out" if heldout is not None else "")
            + (f"; from the recipe: {shown}" if shown else ""))

    # Decay matrices only: weight decay on RMSNorm gains pulls them toward zero for no benefit.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    ordered = decay + no_decay
    name_of = {id(p): n for n, p in named}
    opt_names = [name_of[id(p)] for p in ordered]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda",
    )

    step, epoch, pos, tokens_seen, wall_before = 0, 0, 0, 0, 0.0
    history: list[dict] = []
    validation: list[dict] = []
    resumed_from = None
    metrics_key = f"{run_prefix}/metrics.jsonl"
    ck = load_checkpoint(store, run_prefix) if resume else None
    if not resume and is_main:
        clear_run(store, run_prefix)
        store.delete(metrics_key)
    if ck is not None:
        _check_resumable(ck, cfg, world, total, epoch_steps, opt_names)
        with torch.no_grad():
            for n, p in named:
                p.copy_(ck.model[n].to(p.device, p.dtype))
        opt.load_state_dict(ck.optimizer)
        set_rng_state(ck.rng, rank)
        s = ck.state
        step, epoch, pos = s["step"], s["epoch"], s["batch_in_epoch"]
        tokens_seen, wall_before = s["tokens_seen"], s["wall_seconds"]
        validation = list(s.get("validation", []))
        resumed_from = step
        if store.exists(metrics_key):  # the killed run may have flushed records past its checkpoint
            lines = store.read_bytes(metrics_key).decode().splitlines()
            history = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= step]
        if is_main:
            log(f"resumed {run_prefix} from step {step}/{total} (epoch {epoch}, batch {pos})")
    model = draft
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's parameters at construction (one starting point whatever each
        # rank built) and averages gradients in buckets overlapped with backward.
        model = DDP(draft, device_ids=[device.index] if device.type == "cuda" else None)

    t_start = time.perf_counter()
    last_flush = t_start
    window = MetricsWindow(cfg.ttt_length)
    last_record = history[-1] if history else (ck.state.get("metrics") if ck is not None else None)
    tokens_pending = 0
    grad_norm = 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def flush_metrics():
        if is_main:
            store.write_bytes(metrics_key, "".join(json.dumps(r) + "\n" for r in history).encode())

    def sync_tokens():
        # Token counts are summed over ranks only here (log and checkpoint), not every step.
        nonlocal tokens_seen, tokens_pending
        t = torch.tensor([tokens_pending], dtype=torch.int64)
        tokens_seen += int(all_reduce(t).item()) if world > 1 else tokens_pending
        tokens_pending = 0

    def checkpoint():
        sync_tokens()
        rng = rng_state(world)  # collective: every rank takes part
        if not is_main:
            return
        state = {
            "step": step, "epoch": epoch, "batch_in_epoch": pos, "tokens_seen": tokens_seen,
            "wall_seconds": wall_before + time.perf_counter() - t_start,
            "total_steps": total, "epoch_steps": epoch_steps, "warmup_steps": warmup,
            "world_size": world, "config": cfg.to_dict(), "metrics": last_record, "validation": validation,
            "scheduler": {"kind": "warmup_cosine", "step": step, "base_lr": cfg.lr, "warmup": warmup,
                          "total": total, "min_lr_ratio": cfg.min_lr_ratio},
        }
        # Metrics first: once the pointer moves, the records up to this step must be stored
        # (a resume keeps the file's records <= its step and recomputes the rest).
        flush_metrics()
        save_checkpoint(store, run_prefix, step=step, model_state=dict(named),
                        optimizer_state=opt.state_dict(), param_names=opt_names, rng=rng,
                        state=state, keep=cfg.keep_checkpoints)

    def validate(finished_epoch: int):
        # Every rank measures the whole held-out set: identical numbers, no collective.
        m = measure_acceptance(draft, heldout, target_head, t2d, ttt_length=cfg.ttt_length,
                               max_tokens_per_batch=cfg.max_tokens_per_batch, loss_fn=loss_fn)
        record = {"step": step, "epoch": finished_epoch, "loss": m["loss"], "acc": m["acc"],
                  "cond_acc": m["cond_acc"], "simulated_acceptance_length": m["simulated_acceptance_length"],
                  "replayed_acceptance_length": m.get("replayed_acceptance_length"), "tokens": m["tokens"]}
        best = max((r["simulated_acceptance_length"] for r in validation), default=-math.inf)
        validation.append(record)
        if is_main:
            acc = " ".join(f"{a:.2f}" for a in m["acc"])
            log(f"held-out after epoch {finished_epoch} (step {step}): loss {m['loss']:.4f} acc [{acc}] "
                f"tau {m['simulated_acceptance_length']:.3f}"
                + (f" replayed {m['replayed_acceptance_length'][-1]:.3f}" if m.get("replayed_acceptance_length") else "")
                + (" (best)" if m["simulated_acceptance_length"] > best else ""))
            if m["simulated_acceptance_length"] > best:
                save_best(store, run_prefix, step=step, model_state=dict(named), record=record)

    draft.train()
    while step < total:
        end = epoch_steps[epoch] * cfg.grad_accum  # micro-batches this epoch uses
        if pos >= end:  # an epoch too small for one step
            epoch, pos = epoch + 1, 0
            continue
        it = source.batches(cfg.max_tokens_per_batch, epoch=epoch, seed=cfg.seed, rank=rank,
                            world_size=world, skip=pos)
        while step < total:
            lr = lr_at(step, base_lr=cfg.lr, warmup=warmup, total=total, min_lr_ratio=cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            for j in range(cfg.grad_accum):
                batch = next(it, None)
                if batch is None:
                    raise RuntimeError(f"batch source ended at micro-batch {pos} of epoch {epoch}, "
                                       f"but num_batches promised {micro[epoch]}")
                batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                # Gradients are all-reduced only on the last micro-batch of the step.
                sync = world == 1 or j == cfg.grad_accum - 1
                with (nullcontext() if sync else model.no_sync()):
                    with autocast:
                        out = loss_fn(model, batch, target_head, t2d, ttt_length=cfg.ttt_length,
                                      step_weight=cfg.step_weight)
                    if not torch.isfinite(out.loss.detach()):
                        raise _nonfinite_error(out, batch, source, cfg, step=step, epoch=epoch, pos=pos,
                                               rank=rank, world=world)
                    (out.loss / cfg.grad_accum).backward()
                n_tok = int(batch["input_ids"].numel())
                window.add(out, n_tok)
                tokens_pending += n_tok
                pos += 1
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            window.steps += 1
            wrapped = pos >= end
            finished = epoch
            if wrapped:  # a checkpoint taken now points at the start of the next epoch
                epoch, pos = epoch + 1, 0
            if heldout is not None and (wrapped or step == total):
                validate(finished)

            save_now = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total
            # A checkpoint step is also a log step: the window then never straddles a checkpoint,
            # so a resumed run logs exactly the records the uninterrupted one does.
            if step % cfg.log_every == 0 or save_now:
                m = window.summary(world)
                sync_tokens()
                dt = time.perf_counter() - window.t0
                eta = (total - step) * dt / max(window.steps, 1)
                last_record = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": grad_norm, **m,
                               "tokens_per_s": m["tokens"] / max(dt, 1e-9), "tokens_seen": tokens_seen,
                               "elapsed_s": wall_before + time.perf_counter() - t_start, "eta_s": eta}
                history.append(last_record)
                if is_main:
                    acc = " ".join(f"{a:.2f}" for a in m["acc"])
                    log(f"step {step}/{total} ep {epoch} loss {m['loss']:.4f} acc [{acc}] "
                        f"tau {m['simulated_acceptance_length']:.2f} lr {lr:.2e} gnorm {grad_norm:.2f} "
                        f"tok/s {last_record['tokens_per_s']:.0f} eta {_fmt_eta(eta)}")
                window.reset()
                if time.perf_counter() - last_flush > cfg.metrics_flush_seconds:
                    flush_metrics()
                    last_flush = time.perf_counter()
            if save_now:
                checkpoint()
            if wrapped:
                break  # the next epoch needs its own iterator

    if ck is not None and ck.step >= total and is_main:
        log(f"{run_prefix}: already trained to step {total}")
    if world > 1:
        dist.barrier()  # rank 0's best weights are stored before any rank reads them
    exported = step
    if cfg.export_checkpoint == "best" and validation:
        best = max(validation, key=lambda r: r["simulated_acceptance_length"])
        if best["step"] != step:
            saved = load_best(store, run_prefix)
            if saved is None or saved[1]["step"] != best["step"]:
                raise RuntimeError(f"{run_prefix}: the best held-out weights (step {best['step']}) are not in the store")
            with torch.no_grad():
                for n, p in named:
                    p.copy_(saved[0][n].to(p.device, p.dtype))
            if is_main:
                log(f"exporting the best held-out epoch: step {best['step']} (tau "
                    f"{best['simulated_acceptance_length']:.3f}) instead of the last (step {step})")
        exported = best["step"]
    draft.eval()
    final = last_record or {}
    return TrainResult(
        steps=step, tokens_seen=tokens_seen, final_loss=final.get("loss", float("nan")),
        acc=final.get("acc", []), cond_acc=final.get("cond_acc", []),
        simulated_acceptance_length=final.get("simulated_acceptance_length", float("nan")),
        wall_seconds=wall_before + time.perf_counter() - t_start, draft=draft,
        step_losses=final.get("step_losses", []), resumed_from=resumed_from, metrics=history,
        config=cfg.to_dict(), recipe_fields=from_recipe, validation=validation, exported_step=exported,
    )


def _default_loss_fn():
    from training.eagle3.loss import ttt_forward

    return ttt_forward


def _nonfinite_error(out, batch: dict, source, cfg: TrainConfig, *, step: int, epoch: int, pos: int,
                     rank: int, world: int) -> FloatingPointError:
    """The error for a non-finite loss: the input features when they are not finite (a target or
    feature-store fault: a lower lr cannot help), else the optimization (lr)."""
    where = f"step {step}, epoch {epoch}, micro-batch {pos}" + (f" of rank {rank}" if world > 1 else "")
    bad = nonfinite_inputs(batch)
    if not bad:
        return FloatingPointError(f"non-finite loss {float(out.loss.detach())} at {where} with finite input features; "
                                  "resume from the last checkpoint with a lower lr")
    try:
        rows = describe_batch(source, cfg.max_tokens_per_batch, epoch=epoch, seed=cfg.seed, rank=rank,
                              world_size=world, index=pos)
    except Exception:  # naming rows is a courtesy; the tensor report below stands without it
        rows = []
    tensors = "; ".join(f"{b['tensor']}: {b['values']} non-finite values in {b['tokens']} tokens of document(s) "
                        f"{b['documents']}, first at packed position {b['first_position']}" for b in bad)
    docs = sorted({d for b in bad for d in b["documents"]})
    named_rows = "; ".join(f"document {d} = {rows[d]}" for d in docs if d < len(rows))
    return FloatingPointError(
        f"non-finite loss {float(out.loss.detach())} at {where}: the input features are not finite ({tensors})"
        + (f"; {named_rows}" if named_rows else "")
        + ". The target produced inf/NaN hidden states for these rows (or the stored features are corrupt): "
        "fix or drop them and rewrite the features; lowering the lr will not help")


def _check_resumable(ck, cfg: TrainConfig, world: int, total: int, epoch_steps: list[int],
                     names: list[str]) -> None:
    """Refuse a resume that could not follow the original trajectory, naming what differs."""
    s = ck.state
    saved = {k: v for k, v in s["config"].items() if k not in RESUME_FREE_FIELDS}
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
