"""The training recipe: TrainConfig (the one place training defaults live) and the rule that
derives the corpus-dependent ones from the corpus size.

A field left None is "the recipe decides"; a value set explicitly always wins. `resolve` turns a
config into a fully specified one for a corpus of `CorpusStats` (tokens, rows), so the same
config gives a 300k-token corpus and a 300M-token corpus each a good run:

    epochs      enough passes that the run sees MIN_TOKENS_SEEN tokens (small corpora repeat,
                large ones take one pass), capped at MAX_EPOCHS
    batch       tokens per optimizer step so that the run takes about TARGET_STEPS steps, a power
                of two in [MIN_BATCH_TOKENS, MAX_BATCH_TOKENS] (split over ranks x grad_accum)
    lr          BASE_LR (AdamW), scaled down as 1/sqrt(H / 1024) for drafts wider than 1024
    warmup      WARMUP_RATIO of the steps; cosine decay to min_lr_ratio of lr after it
    validation  a held-out slice of the training rows at every corpus size (VALIDATION_SHARE,
                at least MIN_VALIDATION_ROWS but at most a tenth of the rows, at most
                MAX_VALIDATION_ROWS; none under MIN_ROWS_FOR_VALIDATION rows), measured at every
                epoch end; the best epoch's weights are exported (export_checkpoint). Small corpora
                need it most: they overfit within a few epochs (bench_real_chat)

and `draft_vocab_size` caps the draft vocabulary by what the corpus uses; `draft_width` sizes the
draft layer (the target's own shape from MIN_DRAFT_HIDDEN up, wider below it). The constants are the
measured ones: bench/bench_recipe.py (stories260K, 1536 TinyStories prompts resampled greedily,
held-out tau at T=0 and T=1) and the README's recipe table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from training.configs import setting


MIN_TOKENS_SEEN = 2_000_000   # a run sees at least this many tokens (epochs over a small corpus)
# Passes beyond this buy little for their cost (best-epoch export keeps overfitting out of the export):
# 16 instead of 8 gave +0.01..0.02 held-out tau at twice the training on a real chat model at 18k and 50k
# tokens (bench_real_chat), +0.05 on stories260K at 277k (bench_recipe).
MAX_EPOCHS = 8
TARGET_STEPS = 4000           # optimizer steps the batch size aims at
MIN_BATCH_TOKENS = 256
MAX_BATCH_TOKENS = 65536      # tokens per optimizer step over all ranks
BASE_LR = 3e-3
LR_REFERENCE_WIDTH = 1024
WARMUP_RATIO = 0.05
VALIDATION_SHARE = 0.05
MAX_VALIDATION_ROWS = 256
MIN_VALIDATION_ROWS = 8
MIN_ROWS_FOR_VALIDATION = 10
# The smallest draft layer: a target narrower than this gets a draft this wide (see draft_width).
MIN_DRAFT_HIDDEN = 256
MIN_DRAFT_INTERMEDIATE = 2048

# At or below this many loss-masked (trainable) tokens, drafts of a real chat model accepted at most
# about what greedy prompt lookup does on prompts unlike their training rows (bench_real_chat,
# SmolLM2-135M-Instruct, MT-Bench tau at k=4 and T=0 against prompt lookup's 1.39: 17,887, 50,313 and
# 208,540 tokens gave 1.24 / 1.22 / 1.27, and 187,033 tokens over the recipe's 8 epochs 1.41, the
# best: 0.80x to 1.01x; README "A real chat target"): data_note says so in draft_model's metadata and
# at the end of `specdraft run`.
MIN_TRAINABLE_TOKENS = 200_000

# The fields the recipe fills when they are None.
DERIVED = ("epochs", "max_tokens_per_batch", "lr", "warmup_ratio", "validation_rows")


@dataclass
class TrainConfig:
    """draft_model's training settings (None: the recipe decides from the corpus size; explicit wins)."""

    ttt_length: int = setting(7, "TTT unroll K (DESIGN.md: EAGLE-3 training semantics).")
    step_weight: float = setting(0.8, "loss = sum_k w^k loss_k.")
    lr: float | None = setting(None, f"Peak AdamW lr; None: the recipe ({BASE_LR:g}, scaled by "
                                         f"1/sqrt(H/{LR_REFERENCE_WIDTH}) above H={LR_REFERENCE_WIDTH}).")
    min_lr_ratio: float = setting(0.1, "Cosine floor as a fraction of lr.")
    weight_decay: float = setting(0.0, "Applied to matrices only (norm gains stay undecayed).")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas.")
    eps: float = setting(1e-8, "AdamW eps.")
    warmup_steps: int | None = setting(None, "Warmup steps; an explicit count wins over warmup_ratio.")
    warmup_ratio: float | None = setting(None, f"Warmup share of the steps; None: the recipe ({WARMUP_RATIO:.0%}).")
    epochs: int | None = setting(None, f"None: the recipe, enough to see {MIN_TOKENS_SEEN:,} tokens, at most "
                                          f"{MAX_EPOCHS}.")
    max_steps: int | None = setting(None, "Cap on optimizer steps (the schedule spans the capped run).")
    max_tokens_per_batch: int | None = setting(None, "Token budget of one packed micro-batch per rank; None: the "
                                                     f"recipe (about {TARGET_STEPS:,} optimizer steps).")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.")
    grad_clip: float = setting(1.0, "Global L2 norm; 0 disables.")
    seed: int = setting(0, "The run's random seed.")
    validation_rows: int | None = setting(None, "Rows held out of training and measured each epoch; None: the "
                                                f"recipe ({VALIDATION_SHARE:.0%}, at most {MAX_VALIDATION_ROWS}, none "
                                                f"under {MIN_ROWS_FOR_VALIDATION} rows).")
    export_checkpoint: str = setting("best", "best: the epoch with the highest held-out simulated tau; last.")
    precision: str = setting("auto", "Matmul precision of training: bf16 (autocast over fp32 master weights; the "
                                     "target head scores in bf16), fp32, or auto: bf16 on CUDA, fp32 on CPU. A CPU "
                                     "with native bf16 (AVX512-BF16, AMX) trains faster in bf16 (bench_train).")
    checkpoint_every: int = setting(500, "Optimizer steps between checkpoints; a final one is always written.")
    log_every: int = setting(10, "Optimizer steps between logged records.")
    keep_checkpoints: int = setting(2, "Checkpoints kept.")
    metrics_flush_seconds: float = setting(60.0, "metrics.jsonl is rewritten whole (S3 has no append) this often.")

    def __post_init__(self):
        for name in ("ttt_length", "epochs", "max_tokens_per_batch", "grad_accum", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
        if self.checkpoint_every < 0 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("checkpoint_every must be >= 0 (0: only the final one) and max_steps >= 1")
        if self.validation_rows is not None and self.validation_rows < 0:
            raise ValueError(f"TrainConfig.validation_rows must be >= 0, got {self.validation_rows}")
        if self.export_checkpoint not in ("best", "last"):
            raise ValueError(f"TrainConfig.export_checkpoint must be 'best' or 'last', got {self.export_checkpoint!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        self.betas = tuple(float(b) for b in self.betas)

    def bf16_on(self, device_type: str) -> bool:
        """Whether training on a `device_type` ("cuda", "cpu", ...) runs its matmuls in bf16."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")

    @property
    def resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in DERIVED)

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
RESUME_FREE_FIELDS = ("checkpoint_every", "log_every", "keep_checkpoints", "metrics_flush_seconds",
                      "export_checkpoint")


@dataclass(frozen=True)
class CorpusStats:
    """What the rule reads: token and row counts of the training rows (before any hold-out)."""

    tokens: int
    rows: int

    def __post_init__(self):
        if self.tokens < 1 or self.rows < 1:
            raise ValueError(f"an empty corpus ({self.rows} rows, {self.tokens} tokens) cannot be trained on")


def corpus_stats(source) -> CorpusStats:
    """CorpusStats of a BatchSource with num_tokens and num_sequences (every source here has them)."""
    return CorpusStats(tokens=int(source.num_tokens), rows=int(source.num_sequences))


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def resolve(cfg: TrainConfig, stats: CorpusStats, *, world_size: int = 1, hidden_size: int | None = None) -> TrainConfig:
    """cfg with every None field of DERIVED filled for this corpus; explicit fields are kept.

    Pure and deterministic (a resumed run resolves to the same config). The batch rule counts
    tokens per optimizer step over all ranks and accumulation micro-batches, so the per-rank
    max_tokens_per_batch shrinks as world_size x grad_accum grows.
    """
    epochs = cfg.epochs
    if epochs is None:
        epochs = int(min(MAX_EPOCHS, max(1, math.ceil(MIN_TOKENS_SEEN / stats.tokens))))
    batch = cfg.max_tokens_per_batch
    if batch is None:
        per_step = _pow2_floor(stats.tokens * epochs / TARGET_STEPS)
        per_step = min(MAX_BATCH_TOKENS, max(MIN_BATCH_TOKENS, per_step))
        batch = max(1, per_step // (world_size * cfg.grad_accum))
    lr = cfg.lr
    if lr is None:
        lr = BASE_LR
        if hidden_size and hidden_size > LR_REFERENCE_WIDTH:
            lr = BASE_LR / math.sqrt(hidden_size / LR_REFERENCE_WIDTH)
    warmup_ratio = WARMUP_RATIO if cfg.warmup_ratio is None else cfg.warmup_ratio
    validation = cfg.validation_rows
    if validation is None:
        validation = 0 if stats.rows < MIN_ROWS_FOR_VALIDATION else min(
            MAX_VALIDATION_ROWS, max(min(MIN_VALIDATION_ROWS, stats.rows // 10), round(VALIDATION_SHARE * stats.rows)))
    return replace(cfg, epochs=epochs, max_tokens_per_batch=batch, lr=float(lr), warmup_ratio=warmup_ratio,
                   validation_rows=int(validation))


def draft_width(hidden_size: int, intermediate_size: int, draft_hidden_size: int | None = None,
                draft_intermediate_size: int | None = None) -> tuple[int, int]:
    """The draft layer's (hidden_size, intermediate_size) for a target of widths (hidden_size,
    intermediate_size). Explicit draft widths win; a draft_hidden_size alone scales the target's
    MLP width with it; with neither, the rule:

    The target's own (the EAGLE-3 convention) from MIN_DRAFT_HIDDEN up, i.e. for every real LLM.
    A narrower target gets the smallest power-of-two multiple of its width that reaches
    MIN_DRAFT_HIDDEN, and an MLP of at least MIN_DRAFT_INTERMEDIATE: a one-layer draft that narrow
    is capacity-bound (bench_recipe on stories260K, H=64: tau at k=4 rose with every widening), while
    on a GPU a layer that small costs kernel launches, not FLOPs, so the width is free at decode time.
    A power-of-two multiple keeps whole query heads per KV head (DraftConfig.from_target_config)."""
    h, inter = int(hidden_size), int(intermediate_size)
    if draft_hidden_size is not None:
        width = int(draft_hidden_size)
        return width, int(draft_intermediate_size or inter * width // h)
    if h >= MIN_DRAFT_HIDDEN:
        return h, int(draft_intermediate_size or inter)
    width = h << math.ceil(math.log2(MIN_DRAFT_HIDDEN / h))
    return width, int(draft_intermediate_size or max(inter * width // h, MIN_DRAFT_INTERMEDIATE))


def data_note(trainable_tokens: int) -> str | None:
    """What to tell a user whose corpus is too small for the draft to generalize; None when it is not."""
    if trainable_tokens > MIN_TRAINABLE_TOKENS:
        return None
    return (f"the draft trained on {trainable_tokens:,} trainable tokens; drafts of a real chat model trained on "
            f"{MIN_TRAINABLE_TOKENS:,} or fewer accepted at most about what prompt lookup does at T=0 (0.80x to 1.01x) "
            "on prompts unlike their training rows (bench_real_chat). More prompts, several target replies per prompt "
            "(resampled_corpus.replies_per_prompt) or prompts the target writes (resampled_corpus.written_prompts) "
            "raise it.")


def derived_fields(cfg: TrainConfig) -> list[str]:
    """The DERIVED fields the recipe will fill (None in cfg): what metadata marks as 'from the rule'."""
    return [name for name in DERIVED if getattr(cfg, name) is None]
