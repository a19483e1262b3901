"""Conversations -> tokenized Parquet rows (DESIGN.md, "Tokenized Parquet"): input_ids + loss_mask.

    result = tokenize_conversations(tokenizer, conversations, TokenizeConfig(max_length=2048))
    pq.write_table(result.table, f)            # TOKENIZED_SCHEMA
    tokenized_stats(store.duckdb(), path)      # rows, tokens, mask ratio, truncation, histogram

The loss mask marks what the target generates in each assistant turn, found by rendering with the
target tokenizer's own chat template (templates.py); masking.py maps those character spans to
tokens with one batch encode and numpy.

Counting: `n_in` conversations read = `n_ok` conversations with at least one row + `n_rejected`.
A template that rewrites earlier turns (Qwen3 drops earlier reasoning) splits a conversation into
one row per view; the final view keeps the conversation's id and an earlier one is `{id}#{k}`, k the
message index of its last assistant turn. So the table can have more rows than `n_ok`, and the
rejects table lists every dropped row, including a dropped view of a conversation kept otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from training.tokenization.masking import encode_views, encoder, special_lookup
from training.tokenization.templates import ChatTemplateError, RowReject, View, make_renderer

TOKENIZED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.uint8())),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)
from training.schemas import REJECTS_SCHEMA  # noqa: E402  (one rejects row for every stage)

# Characters per encode_batch call. One big call keeps the Rust thread pool busy (every call ends
# with a tail where one long text runs alone: 1024-row calls were 20% slower than one call), while
# the Encoding objects of a call, ~100 bytes per token, stay around 200 MB.
BATCH_CHARS = 8_000_000

__all__ = [
    "ChatTemplateError",
    "REJECTS_SCHEMA",
    "TOKENIZED_SCHEMA",
    "TokenizeConfig",
    "TokenizeResult",
    "tokenize_conversations",
    "tokenized_stats",
]


@dataclass
class TokenizeConfig:
    max_length: int = 2048
    template: str = "auto"  # auto (the chat template if the tokenizer has one, else plain) | chat | plain
    chat_template_kwargs: dict = field(default_factory=dict)  # e.g. {"enable_thinking": False}


@dataclass
class TokenizeResult:
    table: pa.Table  # TOKENIZED_SCHEMA
    rejects: pa.Table  # REJECTS_SCHEMA
    n_in: int  # conversations read
    n_ok: int  # conversations with at least one row in `table`
    n_rejected: int  # conversations with no row; n_in == n_ok + n_rejected


def _rows(conversations) -> list[tuple[str, object]]:
    """(id, messages) pairs from a list of dicts or a pyarrow Table with id and messages columns."""
    if isinstance(conversations, pa.Table):
        if "messages" not in conversations.column_names:
            raise ValueError(f"conversation table has no 'messages' column (has {conversations.column_names})")
        messages = conversations.column("messages").to_pylist()
        ids = conversations.column("id").to_pylist() if "id" in conversations.column_names else range(len(messages))
        return [(str(i), m) for i, m in zip(ids, messages)]
    return [(str(c.get("id", n)), c.get("messages")) for n, c in enumerate(conversations)]


def _clean(messages) -> list[dict]:
    """Plain {role, content} dicts (templates see nothing else), or RowReject for malformed rows."""
    if not isinstance(messages, list) or not messages:
        raise RowReject("invalid_messages", "messages is not a non-empty list")
    out = []
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise RowReject("invalid_messages", f"message {k} needs a string role and string content, got {m!r:.120}")
        out.append({"role": role, "content": content})
    return out


def tokenize_conversations(tokenizer, conversations, cfg: TokenizeConfig | None = None) -> TokenizeResult:
    """Token ids and assistant loss masks for a shard of conversations (id, messages)."""
    cfg = cfg or TokenizeConfig()
    if cfg.max_length < 1:
        raise ValueError(f"max_length must be positive, got {cfg.max_length}")
    renderer = make_renderer(tokenizer, cfg.template, cfg.chat_template_kwargs)
    backend = encoder(tokenizer)
    special = special_lookup(tokenizer)

    rows = _rows(conversations)
    rejects: list[dict] = []
    kept: set[int] = set()  # indices of conversations with at least one row
    tables = []
    views, owners, chars = [], [], 0
    for n, (conv_id, messages) in enumerate(rows):
        try:
            conv_views = renderer.views(_clean(messages))
        except RowReject as exc:
            rejects.append({"id": conv_id, "reason": exc.reason, "detail": exc.detail})
            continue
        for v in conv_views:
            views.append(v)
            owners.append((n, conv_id, v))
            chars += len(v.text)
        if chars >= BATCH_CHARS:
            tables.append(_batch_table(backend, views, owners, special, renderer.extend_eot, cfg, rejects, kept))
            views, owners, chars = [], [], 0
    if views:
        tables.append(_batch_table(backend, views, owners, special, renderer.extend_eot, cfg, rejects, kept))
    table = pa.concat_tables(tables) if tables else TOKENIZED_SCHEMA.empty_table()
    return TokenizeResult(
        table=table,
        rejects=pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
        n_in=len(rows),
        n_ok=len(kept),
        n_rejected=len(rows) - len(kept),
    )


def _row_id(conv_id: str, view: View) -> str:
    """The conversation's id for its final view, `{id}#{k}` for a view split off at assistant message k."""
    return conv_id if view.turn is None else f"{conv_id}#{view.turn}"


def _batch_table(backend, views: list[View], owners, special, extend_eot, cfg, rejects, kept) -> pa.Table:
    enc = encode_views(backend, views, special, extend_eot)
    n_views = len(views)
    view_of = np.repeat(np.arange(n_views), enc.lens)
    starts = np.zeros(n_views, dtype=np.int64)
    np.cumsum(enc.lens[:-1], out=starts[1:])
    in_window = (np.arange(len(enc.ids)) - starts[view_of]) < cfg.max_length  # truncation keeps the head
    masked_all = np.bincount(view_of, weights=enc.mask, minlength=n_views)
    masked_kept = np.bincount(view_of[in_window], weights=enc.mask[in_window], minlength=n_views)
    truncated = enc.lens > cfg.max_length
    ok = masked_kept > 0

    row_ids = []
    for v in np.flatnonzero(~ok):
        _, conv_id, view = owners[v]
        if masked_all[v] > 0:
            reason, detail = "assistant_truncated", f"all assistant tokens lie beyond max_length={cfg.max_length}"
        else:
            reason, detail = "empty", f"no assistant tokens ({int(enc.lens[v])} tokens in all)"
        rejects.append({"id": _row_id(conv_id, view), "reason": reason, "detail": detail})
    for v in np.flatnonzero(ok):
        n, conv_id, view = owners[v]
        kept.add(n)
        row_ids.append(_row_id(conv_id, view))

    take = in_window & ok[view_of]
    n_tokens = np.minimum(enc.lens[ok], cfg.max_length).astype(np.int32)
    offsets = np.zeros(len(n_tokens) + 1, dtype=np.int32)
    np.cumsum(n_tokens, out=offsets[1:])
    offsets = pa.array(offsets)
    return pa.table(
        [
            pa.array(row_ids, pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(enc.ids[take], pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(enc.mask[take].astype(np.uint8), pa.uint8())),
            pa.array(n_tokens, pa.int32()),
            pa.array(truncated[ok], pa.bool_()),
        ],
        schema=TOKENIZED_SCHEMA,
    )


def tokenized_stats(con, parquet_path) -> dict:
    """Summary of tokenized Parquet (a path, URL or list of them) straight from DuckDB.

    The histogram buckets rows by length into powers of two: (upper bound, rows), e.g. (512, 10)
    counts rows with 257..512 tokens.
    """
    src = "read_parquet(?)"
    rows, tokens, masked, truncated = con.execute(
        f"SELECT count(*), coalesce(sum(n_tokens), 0), coalesce(sum(list_sum(loss_mask)), 0), "
        f"coalesce(avg(truncated::INTEGER), 0) FROM {src}",
        [parquet_path],
    ).fetchone()
    hist = con.execute(
        f"SELECT CAST(pow(2, ceil(log2(greatest(n_tokens, 1)))) AS BIGINT) AS b, count(*) FROM {src} "
        "GROUP BY b ORDER BY b",
        [parquet_path],
    ).fetchall()
    return {
        "rows": int(rows),
        "tokens": int(tokens),
        "masked_tokens": int(masked),
        "mask_ratio": float(masked) / float(tokens) if tokens else 0.0,
        "truncation_rate": float(truncated),
        "length_histogram": [(int(b), int(c)) for b, c in hist],
    }
