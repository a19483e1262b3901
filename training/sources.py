"""Batch sources of the training loop: the protocol, the held-out validation split, and where a
micro-batch's rows came from (for error messages).

A source is hidden_states.HiddenStateDataset (offline) or online.OnlineBatchSource (online);
`split_validation` carves a fixed set of rows out of either, so the held-out rows are never
trained on and are measured at every epoch end (trainer.train).
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np
import torch


class BatchSource(Protocol):
    """Packed micro-batches: dicts with aux [T,3H], last [T,H], input_ids [T], loss_mask [T], cu_seqlens [S+1].

    Contract the trainer relies on: the batches of (epoch, seed, rank, world_size) are a pure
    function of those arguments; `skip` starts at the rank's skip-th batch and yields exactly
    what the unskipped iterator would from there; num_batches is the per-rank count, the same
    for every rank (ranks take equal contiguous runs of the epoch's batch list, the remainder
    dropped). num_tokens and num_sequences size the recipe (training/recipe.py).
    """

    num_tokens: int
    num_sequences: int

    def batches(self, max_tokens: int, *, epoch: int, seed: int, rank: int = 0,
                world_size: int = 1, skip: int = 0) -> Iterator[dict]: ...

    def num_batches(self, max_tokens: int, world_size: int = 1, *, epoch: int = 0, seed: int = 0) -> int: ...


class HiddenStateSubset:
    """The rows of a HiddenStateDataset selected by a boolean mask over its sequences (in part
    order): the same epoch order rule (parts shuffled, rows shuffled within a part, packed), over
    the kept rows only."""

    def __init__(self, base, keep: np.ndarray):
        self.base = base
        counts = [len(p.offsets) - 1 for p in base.parts]
        if keep.shape != (sum(counts),):
            raise ValueError(f"mask of {keep.shape} for {sum(counts)} sequences")
        bounds = np.cumsum([0] + counts)
        self.keep = [keep[bounds[i]:bounds[i + 1]] for i in range(len(counts))]
        self.parts = base.parts

    @property
    def num_sequences(self) -> int:
        return int(sum(k.sum() for k in self.keep))

    @property
    def num_tokens(self) -> int:
        return int(sum(p.lengths[k].sum() for p, k in zip(self.parts, self.keep)))

    def __getattr__(self, name):  # hidden_size, aux_layer_ids, dtype, target: the base's
        return getattr(self.base, name)

    def row_name(self, row) -> str:
        p, seq = row
        return f"{self.parts[p].key} sequence {int(seq)}"

    def plan(self, max_tokens: int, epoch: int, seed: int) -> list[tuple[int, np.ndarray]]:
        from training.packing import pack_by_tokens

        rng = np.random.default_rng([int(seed), int(epoch)])
        batches = []
        for p in rng.permutation(len(self.parts)):
            order = rng.permutation(np.flatnonzero(self.keep[p]))
            for group in pack_by_tokens(self.parts[p].lengths[order], max_tokens):
                batches.append((int(p), order[group]))
        return batches

    def num_batches(self, max_tokens: int, world_size: int = 1, *, epoch: int = 0, seed: int = 0) -> int:
        return len(self.plan(max_tokens, epoch, seed)) // world_size

    def batches(self, max_tokens: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                skip: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[dict]:
        from training.hidden_states import load_part

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        plan = self.plan(max_tokens, epoch, seed)
        per_rank = len(plan) // world_size
        loaded, tensors = None, None
        for p, seqs in plan[rank * per_rank:(rank + 1) * per_rank][skip:]:
            if p != loaded:
                tensors = None  # drop the previous part before reading the next one
                tensors, loaded = load_part(self.base.store, self.parts[p].key), p
            yield self.base._gather(tensors, self.parts[p].offsets, seqs, dtype)


def validation_mask(total: int, n_rows: int, seed: int = 0) -> np.ndarray:
    """Which of `total` rows (in source order) split_validation holds out: `n_rows` drawn by (seed),
    as a bool mask. Callers use it to name the rows a run never trained on."""
    if n_rows >= total:
        raise ValueError(f"validation_rows={n_rows} leaves none of the {total} rows for training")
    held = np.zeros(total, dtype=bool)
    held[np.random.default_rng([int(seed), 0x7A11D]).choice(total, n_rows, replace=False)] = True
    return held


def split_validation(source, n_rows: int, seed: int = 0):
    """(train source, held-out source) with `n_rows` rows drawn by (seed) held out; (source, None)
    when n_rows is 0. At least one row must stay for training."""
    if n_rows <= 0:
        return source, None
    held = validation_mask(int(source.num_sequences), n_rows, seed)
    if hasattr(source, "subset"):
        return source.subset(np.flatnonzero(~held)), source.subset(np.flatnonzero(held))
    if hasattr(source, "parts"):
        return HiddenStateSubset(source, ~held), HiddenStateSubset(source, held)
    raise TypeError(f"cannot hold rows out of a {type(source).__name__}: it has neither subset() nor parts")


def describe_batch(source, max_tokens: int, *, epoch: int, seed: int, rank: int, world_size: int,
                   index: int) -> list[str]:
    """Names of the rows of the rank's index-th micro-batch of the epoch (document order), or []
    when the source cannot say. Used only to write an error message."""
    plan_fn = getattr(source, "plan", None)
    if plan_fn is None:
        return []
    plan = plan_fn(max_tokens, epoch, seed)
    per_rank = len(plan) // world_size
    entry = plan[rank * per_rank + index]
    if isinstance(entry, tuple):  # (part index, sequence indices)
        p, seqs = entry
        if hasattr(source, "row_name"):
            return [source.row_name((p, s)) for s in seqs]
        return [f"{source.parts[p].key} sequence {int(s)}" for s in seqs]
    return [source.row_name(r) if hasattr(source, "row_name") else f"row {int(r)}" for r in entry]
