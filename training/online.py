"""Online training's batch source: tokenized rows, target features computed per batch with the
target in the loop (no stored hidden states)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from training.storage import ObjectStore


def read_tokenized(src, store: ObjectStore | None) -> list:
    """Tables from a pyarrow Table, a URL or store key of a tokenized Parquet file, or a store
    artifact prefix (every .parquet file its manifest lists)."""
    import pyarrow.parquet as pq

    cols = ["input_ids", "loss_mask"]
    if not isinstance(src, str):
        return [src]
    if "://" in src or store is None:  # a URL, or a local path
        from training.filesystem import filesystem

        fs, path = filesystem(src)
        with fs.open(path, "rb") as f:
            return [pq.read_table(f, columns=cols)]
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
        for table in (t for src in tables for t in read_tokenized(src, store)):
            for ids, mask in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
                if len(ids) != len(mask):
                    raise ValueError(f"tokenized row with {len(ids)} input_ids but {len(mask)} loss_mask entries")
                if len(ids) >= 2 and any(mask):
                    self.input_ids.append(np.asarray(ids, dtype=np.int64))
                    self.loss_mask.append(np.asarray(mask, dtype=np.uint8))
        if not self.input_ids:
            raise ValueError("online training got no tokenized rows with loss-masked tokens")
        self.lengths = np.array([len(x) for x in self.input_ids])

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_sequences(self) -> int:
        return len(self.input_ids)

    def subset(self, rows: Sequence[int]) -> OnlineBatchSource:
        """A source over rows `rows` (indices into this one's), sharing the target."""
        out = object.__new__(OnlineBatchSource)
        out.target, out.aux_layer_ids = self.target, self.aux_layer_ids
        out.input_ids = [self.input_ids[int(i)] for i in rows]
        out.loss_mask = [self.loss_mask[int(i)] for i in rows]
        if not out.input_ids:
            raise ValueError("an online source subset needs at least one row")
        out.lengths = self.lengths[np.asarray(rows, dtype=np.int64)]
        return out

    def row_name(self, row) -> str:
        return f"tokenized row {int(row)}"

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
