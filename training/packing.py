"""Token-budget packing shared by the hidden-state writer, its reader and the trainer.

Greedy in the given order (no sorting: the caller decides the order, e.g. a seeded shuffle), so
the same lengths always give the same batches. A batch holds sequences whose lengths sum to at
most `max_tokens`; a sequence longer than that is never split and gets a batch of its own.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def pack_stream(items: Iterable[T], max_tokens: int, length: Callable[[T], int] = len) -> Iterator[list[T]]:
    """Lazily group `items` into batches of total `length` <= max_tokens (streaming form)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    batch: list[T] = []
    total = 0
    for item in items:
        n = length(item)
        if batch and total + n > max_tokens:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += n
    if batch:
        yield batch


def pack_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices into `lengths`, grouped greedily in order into token-budget batches."""
    return list(pack_stream(range(len(lengths)), max_tokens, length=lambda i: lengths[i]))
