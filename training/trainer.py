"""EAGLE-3 draft training: one loop for offline (stored hidden states) and online (target in the loop).

The loop is nanoGPT-shaped: AdamW, linear warmup + cosine decay (training/schedule.py), gradient
accumulation, global-norm clipping, fp32 on CPU and bf16 autocast over fp32 master weights on
GPU. Data comes from a `BatchSource` (hidden_states.HiddenStateDataset offline, OnlineBatchSource
here online); both yield the same packed-row dicts, so model, loss, metrics and checkpoints are
identical in both modes.

Exact resume. A checkpoint (training/checkpoint.py) holds the trainable weights, the AdamW state,
every rank's torch generator state, and the data position as (epoch, micro-batches consumed in
that epoch). Data order is a pure function of (seed, epoch) and sources can `skip` to a position,
and the lr is a pure function of the step, so a run killed after checkpoint s and resumed follows
the uninterrupted trajectory bit for bit on CPU (same seed, world size and thread count).

Distributed. Under torchrun each rank reads an equal contiguous run of every epoch's batch list
(so offline ranks read disjoint parts), and W ranks with grad_accum G take global batches of W*G
micro-batches: the same data per epoch and the same batch size as one process with grad_accum
W*G, and the very same global batches as that process reading the ranks' batches interleaved
(tests/training/test_ddp.py compares exactly that). The draft is wrapped in DistributedDataParallel
(ttt_forward calls the wrapper, so DDP sees one forward per micro-batch); accumulation
micro-batches run under no_sync and the last one all-reduces. Rank 0 alone writes checkpoints
and metrics. Backends: gloo on CPU, NCCL on GPU (train_main picks).

Large drafts and online targets: FSDP. A draft for a 70B-class target (H=8192, 28672-wide MLP,
32k draft vocab) has about 1.4B trainable parameters, ~22 GB as fp32 weights + gradients + AdamW
state; replicated per 80 GB GPU that still fits, but an online target beside it does not. There,
shard the target with FSDP2 (`torch.distributed.fsdp.fully_shard` on each decoder layer, then on
the root; forward only, under no_grad, no optimizer) so each GPU holds 1/W of it, and, if the
draft itself does not fit, `fully_shard(draft.midlayer)` then `fully_shard(draft)` with
`MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)` in place of the
DDP wrapper here (FSDP reduce-scatters gradients; the frozen embedding carries no gradient or
optimizer state either way). Checkpoints then go through torch.distributed.checkpoint
with `HuggingFaceStorageWriter` (safetensors shards + a JSON index, one writer per rank), which
keeps the no-pickle rule; resume semantics (step, epoch, batch position, RNG) stay as here.
The alternative for online targets is vLLM tensor-parallel features (targets backend `vllm`) on
separate GPUs, which keeps the draft under plain data parallel as here.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist

from training.checkpoint import clear_run, load_checkpoint, save_checkpoint
from training.schedule import lr_at, warmup_steps_for
from training.storage import ObjectStore


@dataclass
class TrainConfig:
    ttt_length: int = 7              # TTT unroll K (DESIGN.md: EAGLE-3 training semantics)
    step_weight: float = 0.8         # loss = sum_k w^k loss_k
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # cosine floor as a fraction of lr
    weight_decay: float = 0.0        # applied to matrices only (norm gains stay undecayed)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int | None = None  # explicit count wins over warmup_ratio
    warmup_ratio: float = 0.02
    epochs: int = 1
    max_steps: int | None = None     # cap on optimizer steps (the schedule spans the capped run)
    max_tokens_per_batch: int = 8192  # token budget of one packed micro-batch (per rank)
    grad_accum: int = 1
    grad_clip: float = 1.0           # global L2 norm; 0 disables
    seed: int = 0
    checkpoint_every: int = 500      # optimizer steps; a final checkpoint is always written
    log_every: int = 10
    keep_checkpoints: int = 2
    metrics_flush_seconds: float = 60.0  # metrics.jsonl is rewritten whole (S3 has no append)

    def __post_init__(self):
        for name in ("ttt_length", "epochs", "max_tokens_per_batch", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("checkpoint_every must be >= 0 (0: only the final one) and max_steps >= 1")
        self.betas = tuple(float(b) for b in self.betas)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# Fields that may differ between a checkpoint and its resume without changing the trajectory.
RESUME_FREE_FIELDS = ("checkpoint_every", "log_every", "keep_checkpoints", "metrics_flush_seconds")


class BatchSource(Protocol):
    """Packed micro-batches: dicts with aux [T,3H], last [T,H], input_ids [T], loss_mask [T], cu_seqlens [S+1].

    Contract the trainer relies on: the batches of (epoch, seed, rank, world_size) are a pure
    function of those arguments; `skip` starts at the rank's skip-th batch and yields exactly
    what the unskipped iterator would from there; num_batches is the per-rank count, the same
    for every rank (ranks take equal contiguous runs of the epoch's batch list, the remainder
    dropped: hidden_states.HiddenStateDataset and OnlineBatchSource both do).
    """

    def batches(self, max_tokens: int, *, epoch: int, seed: int, rank: int = 0,
                world_size: int = 1, skip: int = 0) -> Iterator[dict]: ...

    def num_batches(self, max_tokens: int, world_size: int = 1, *, epoch: int = 0, seed: int = 0) -> int: ...


# -- online source -------------------------------------------------------------------------------
def _read_tokenized(src, store: ObjectStore | None) -> list:
    """Tables from a pyarrow Table, a URL or store key of a tokenized Parquet file, or a store
    artifact prefix (every .parquet file its manifest lists)."""
    import pyarrow.parquet as pq

    cols = ["input_ids", "loss_mask"]
    if not isinstance(src, str):
        return [src]
    if "://" in src:
        import fsspec

        with fsspec.open(src, "rb") as f:
            return [pq.read_table(f, columns=cols)]
    if store is None:
        return [pq.read_table(src, columns=cols)]
    if not src.endswith(".parquet"):
        manifest = store.manifest(src)
        if manifest is None:
            raise FileNotFoundError(f"no tokenized data at {store.url(src)}: neither a .parquet key nor a "
                                    "complete artifact prefix")
        keys = [manifest.key(n) for n in manifest.names() if n.endswith(".parquet")]
    else:
        keys = [src]
    tables = []
    for key in keys:
        with store.open(key) as f:
            tables.append(pq.read_table(f, columns=cols))
    return tables


def _plain(t: torch.Tensor) -> torch.Tensor:
    # A target that runs under inference_mode returns inference tensors, which autograd refuses
    # to save for backward (fc's input is saved); a clone outside inference mode is a plain one.
    return t.clone() if t.is_inference() else t


class OnlineBatchSource:
    """Tokenized rows, target features computed per batch: the BatchSource of online training.

    Epoch order as HiddenStateDataset's: rows shuffled by a generator seeded with (seed, epoch),
    packed greedily into batches of <= max_tokens (a row longer than that gets a batch of its
    own), ranks take equal contiguous runs. Skipping a position skips the target forward too.
    Rows with no loss-masked token are dropped: they teach nothing and cost a target forward.
    """

    def __init__(self, target, tables: Sequence, *, aux_layer_ids: Sequence[int],
                 store: ObjectStore | None = None):
        """tables: pyarrow Tables, URLs or store keys of tokenized Parquet, or tokenized_shards
        artifact prefixes; `store` resolves keys and prefixes."""
        self.target = target
        self.aux_layer_ids = list(aux_layer_ids)
        self.input_ids: list[np.ndarray] = []
        self.loss_mask: list[np.ndarray] = []
        for table in (t for src in tables for t in _read_tokenized(src, store)):
            for ids, mask in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
                if len(ids) != len(mask):
                    raise ValueError(f"tokenized row with {len(ids)} input_ids but {len(mask)} loss_mask entries")
                if len(ids) >= 2 and any(mask):
                    self.input_ids.append(np.asarray(ids, dtype=np.int64))
                    self.loss_mask.append(np.asarray(mask, dtype=np.uint8))
        if not self.input_ids:
            raise ValueError("online training got no tokenized rows with loss-masked tokens")
        self.lengths = np.array([len(x) for x in self.input_ids])

    def plan(self, max_tokens: int, epoch: int, seed: int) -> list[np.ndarray]:
        """All batches of the epoch in order, as row indices."""
        from training.packing import pack_by_tokens

        order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(self.input_ids))
        return [order[group] for group in pack_by_tokens(self.lengths[order], max_tokens)]

    def num_batches(self, max_tokens: int, world_size: int = 1, *, epoch: int = 0, seed: int = 0) -> int:
        return len(self.plan(max_tokens, epoch, seed)) // world_size

    def batches(self, max_tokens: int, *, epoch: int, seed: int, rank: int = 0,
                world_size: int = 1, skip: int = 0) -> Iterator[dict]:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        plan = self.plan(max_tokens, epoch, seed)
        per_rank = len(plan) // world_size
        for rows in plan[rank * per_rank:(rank + 1) * per_rank][skip:]:
            yield self.features(rows)

    def features(self, rows) -> dict:
        seqs = [self.input_ids[int(i)] for i in rows]
        with torch.no_grad():
            feats = self.target.features([s.tolist() for s in seqs], self.aux_layer_ids)
        lengths = torch.tensor([0] + [len(s) for s in seqs], dtype=torch.int64)
        return {
            "aux": _plain(feats["aux"]).float(),
            "last": _plain(feats["last"]).float(),
            "input_ids": torch.from_numpy(np.concatenate(seqs)),
            "loss_mask": torch.from_numpy(np.concatenate([self.loss_mask[int(i)] for i in rows])),
            "cu_seqlens": torch.cumsum(lengths, 0),
        }


# -- metrics -------------------------------------------------------------------------------------
def acceptance_length(cond_acc: Sequence[float]) -> float:
    """Expected tokens per verification with chain drafting of len(cond_acc) tokens: the bonus
    token plus, for each depth k, the probability that drafts 0..k were all accepted."""
    tau, run = 1.0, 1.0
    for c in cond_acc:
        run *= c
        tau += run
    return tau


class _Window:
    """Metric sums over the steps since the last log line, reducible across ranks in one call."""

    def __init__(self, k: int):
        self.k = k
        self.reset()

    def reset(self) -> None:
        self.loss = 0.0
        self.micro = 0
        self.steps = 0
        self.tokens = 0
        self.step_loss = [0.0] * self.k
        self.acc = [0.0] * self.k   # sum of acc_k * n_valid_k, so the mean weights positions
        self.cond = [0.0] * self.k  # sum of cond_acc_k * n_cond_k (its exact denominator)
        self.n = [0.0] * self.k
        self.nc = [0.0] * self.k
        self.t0 = time.perf_counter()

    def add(self, out, tokens: int) -> None:
        self.loss += float(out.loss.detach())
        self.micro += 1
        self.tokens += tokens
        n_cond = getattr(out, "n_cond", None) or out.n_valid
        for i in range(self.k):
            n, nc = float(out.n_valid[i]), float(n_cond[i])
            self.step_loss[i] += float(out.step_losses[i])
            self.acc[i] += float(out.acc[i]) * n
            self.cond[i] += float(out.cond_acc[i]) * nc
            self.n[i] += n
            self.nc[i] += nc

    def summary(self, world: int) -> dict:
        vec = torch.tensor([self.loss, self.micro, self.tokens, *self.step_loss, *self.acc, *self.cond,
                            *self.n, *self.nc], dtype=torch.float64)
        if world > 1:
            vec = _all_reduce(vec)
        loss, micro, tokens = vec[0].item(), vec[1].item(), vec[2].item()
        k = self.k
        sl, acc, cond, n, nc = (vec[3 + i * k: 3 + (i + 1) * k].tolist() for i in range(5))
        cond_acc = [c / m if m else 0.0 for c, m in zip(cond, nc)]
        return {
            "loss": loss / max(micro, 1),
            "step_losses": [x / max(micro, 1) for x in sl],
            "acc": [a / m if m else 0.0 for a, m in zip(acc, n)],
            "cond_acc": cond_acc,
            "n_valid": [int(x) for x in n],
            "simulated_acceptance_length": acceptance_length(cond_acc),
            "tokens": int(tokens),
        }


@torch.no_grad()
def measure_acceptance(draft: torch.nn.Module, source: BatchSource, target_head: torch.Tensor,
                       t2d: torch.Tensor, *, ttt_length: int = 7, max_tokens_per_batch: int = 8192,
                       loss_fn: Callable | None = None) -> dict:
    """acc_k, conditional acceptance and simulated acceptance length of `draft` over one pass of
    `source` (held-out data: every row counts once), unrolled `ttt_length` steps as in training,
    so a draft trained with a shorter unroll is judged on the chain it will serve. No gradients;
    the draft's train/eval mode is restored."""
    loss_fn = loss_fn or _default_loss_fn()
    device = next(draft.parameters()).device
    target_head, t2d = target_head.to(device), t2d.to(device)
    window = _Window(ttt_length)
    was_training = draft.training
    draft.eval()
    try:
        for batch in source.batches(max_tokens_per_batch, epoch=0, seed=0):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            out = loss_fn(draft, batch, target_head, t2d, ttt_length=ttt_length)
            window.add(out, int(batch["input_ids"].numel()))
    finally:
        draft.train(was_training)
    return window.summary(world=1)


# -- distributed helpers -------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    d = _comm_device()
    x = t.to(d)
    dist.all_reduce(x)
    return x.to(t.device)


def _rng_state(world: int) -> dict[str, torch.Tensor]:
    """Every rank's torch generator state(s), gathered to all ranks (rank 0 writes them)."""
    local = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        local["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return {f"{k}.rank0": v for k, v in local.items()}
    out = {}
    for name, t in sorted(local.items()):
        # Sizes are fixed per generator type, so a plain all_gather of uint8 tensors suffices.
        x = t.to(_comm_device())
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        out.update({f"{name}.rank{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def _set_rng_state(rng: dict[str, torch.Tensor], rank: int) -> None:
    torch.set_rng_state(rng[f"torch_cpu.rank{rank}"])
    if f"cuda.rank{rank}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"])


# -- the loop ------------------------------------------------------------------------------------
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

    def summary(self) -> dict[str, Any]:
        """JSON-ready view (no model), what the asset returns as metadata."""
        # Not asdict(): it would deep-copy the draft and every metrics record.
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("draft", "metrics")}
        return out | {"log_records": len(self.metrics)}


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _default_loss_fn():
    from training.eagle3.loss import ttt_forward

    return ttt_forward


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
    training.eagle3.loss.ttt_forward. With resume=True an existing checkpoint under `run_prefix`
    is continued (a finished run returns at once); resume=False deletes the run's checkpoints.
    Call under torchrun with the process group initialized for data parallel training.
    """
    loss_fn = loss_fn or _default_loss_fn()
    rank, world = _dist()
    is_main = rank == 0
    run_prefix = run_prefix.strip("/")
    device = next(draft.parameters()).device
    target_head = target_head.to(device)
    t2d = t2d.to(device)
    named = [(n, p) for n, p in draft.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("the draft has no trainable parameters")

    # Micro-batches per rank for each epoch (sequence-level shuffling makes packing, and so the
    # count, vary slightly by epoch); a partial optimizer step at an epoch's tail is dropped.
    micro = [source.num_batches(cfg.max_tokens_per_batch, world, epoch=e, seed=cfg.seed) for e in range(cfg.epochs)]
    if world > 1:  # every rank must take the same number of steps or the collectives hang
        n = torch.tensor(micro, dtype=torch.int64, device=_comm_device())
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        micro = n.tolist()
    epoch_steps = [m // cfg.grad_accum for m in micro]
    total = sum(epoch_steps)
    if total == 0:
        raise ValueError(f"{micro} micro-batches per rank per epoch cannot fill one step of "
                         f"grad_accum={cfg.grad_accum}; lower grad_accum or max_tokens_per_batch")
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = warmup_steps_for(total, cfg.warmup_steps, cfg.warmup_ratio)

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
        _set_rng_state(ck.rng, rank)
        s = ck.state
        step, epoch, pos = s["step"], s["epoch"], s["batch_in_epoch"]
        tokens_seen, wall_before = s["tokens_seen"], s["wall_seconds"]
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
    window = _Window(cfg.ttt_length)
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
        tokens_seen += int(_all_reduce(t).item()) if world > 1 else tokens_pending
        tokens_pending = 0

    def checkpoint():
        sync_tokens()
        rng = _rng_state(world)  # collective: every rank takes part
        if not is_main:
            return
        state = {
            "step": step, "epoch": epoch, "batch_in_epoch": pos, "tokens_seen": tokens_seen,
            "wall_seconds": wall_before + time.perf_counter() - t_start,
            "total_steps": total, "epoch_steps": epoch_steps, "warmup_steps": warmup,
            "world_size": world, "config": cfg.to_dict(), "metrics": last_record,
            "scheduler": {"kind": "warmup_cosine", "step": step, "base_lr": cfg.lr, "warmup": warmup,
                          "total": total, "min_lr_ratio": cfg.min_lr_ratio},
        }
        # Metrics first: once the pointer moves, the records up to this step must be stored
        # (a resume keeps the file's records <= its step and recomputes the rest).
        flush_metrics()
        save_checkpoint(store, run_prefix, step=step, model_state=dict(named),
                        optimizer_state=opt.state_dict(), param_names=opt_names, rng=rng,
                        state=state, keep=cfg.keep_checkpoints)

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
                        raise FloatingPointError(
                            f"non-finite loss {float(out.loss)} at step {step}, epoch {epoch}, micro-batch "
                            f"{pos}; resume from the last checkpoint with a lower lr")
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
            if wrapped:  # a checkpoint taken now points at the start of the next epoch
                epoch, pos = epoch + 1, 0

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
    draft.eval()
    if world > 1:
        dist.barrier()
    final = last_record or {}
    return TrainResult(
        steps=step, tokens_seen=tokens_seen, final_loss=final.get("loss", float("nan")),
        acc=final.get("acc", []), cond_acc=final.get("cond_acc", []),
        simulated_acceptance_length=final.get("simulated_acceptance_length", float("nan")),
        wall_seconds=wall_before + time.perf_counter() - t_start, draft=draft,
        step_losses=final.get("step_losses", []), resumed_from=resumed_from, metrics=history,
    )


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
