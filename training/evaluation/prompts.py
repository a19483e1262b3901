"""Which held-out conversations the evaluation runs on."""

from __future__ import annotations

from collections import defaultdict
from itertools import zip_longest
from typing import Iterable


def stratified_prompts(rows: Iterable[dict], n: int) -> list[dict]:
    """Up to `n` prompts {id, domain, messages}, round-robin over domains (each sorted by id), so a
    small budget still covers every domain and the choice does not depend on shard order."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_domain[row.get("source") or "all"].append(
            {"id": row["id"], "domain": row.get("source") or "all", "messages": row["messages"]}
        )
    columns = [sorted(v, key=lambda r: r["id"]) for _, v in sorted(by_domain.items())]
    interleaved = [p for group in zip_longest(*columns) for p in group if p is not None]
    return interleaved[:n]
