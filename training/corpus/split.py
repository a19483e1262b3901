"""The held-out split: evaluation prompts that training never sees.

A row is held out by a hash of its id alone, so the split is the same on every machine, in any
shard order, and when more data arrives (a row never moves between train and held-out).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from training.configs import SplitConfig


def is_heldout(row_id: str, fraction: float, seed: int = 0) -> bool:
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_heldout(table: pa.Table, fraction: float, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(train rows, held-out rows) of a conversation table; the two partition it exactly."""
    SplitConfig(fraction, seed)  # the one range check
    mask = pa.array([is_heldout(i, fraction, seed) for i in table.column("id").to_pylist()], type=pa.bool_())
    return table.filter(pc.invert(mask)), table.filter(mask)
