"""Conversations -> tokenized Parquet rows (DESIGN.md, "Tokenized Parquet"): input_ids + loss_mask.

    result = tokenize_conversations(tokenizer, conversations, TokenizeConfig(max_length=2048))
    pq.write_table(result.table, f)            # TOKENIZED_SCHEMA
    tokenized_stats(store.duckdb(), path)      # rows, tokens, mask ratio, truncation, histogram

The loss mask marks what the target generates in each assistant turn, found by rendering with the
target tokenizer's own chat template (templates.py); masking.py maps those character spans to
tokens with one batch encode and numpy.

Resampled rows carry the target's own reply ids (`completion_ids`, `prompt_digests`: resample.py).
Those rows are not re-encoded from text: each turn is encode(prompt the target generated after) +
its generated ids + the template's end-of-turn, masked exactly on the generated ids and end-of-turn.
A later turn extends the row while its prompt's ids start with the row so far (the history re-encodes
to the same ids); otherwise the row ends there and the turn starts a row of its own, as the target saw
it. A prompt whose ids do not match the digest saved at generation (chat settings changed between
resampling and tokenization) rejects the conversation (`prompt_mismatch`); a template that renders a
reply differently from how it was generated (an empty think block inserted) is counted in `notes`.
`id_mismatches` counts rows whose masked ids differ from the generated ids + end-of-turn (0 unless
`use_generated_ids` is off, which re-encodes text as rows without ids are).

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

from training.configs import TokenizeConfig
from training.schemas import MESSAGE_FIELDS
from training.tokenization.masking import Encoded, encode_views, encoder, special_lookup
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
    "TokenizeError",
    "check_trainable",
    "REJECTS_SCHEMA",
    "TOKENIZED_SCHEMA",
    "TokenizeConfig",
    "TokenizeResult",
    "tokenize_conversations",
    "tokenized_stats",
]


class TokenizeError(ValueError):
    """The shard cannot be tokenized for this target (ids past its vocab, nothing to train on)."""


@dataclass
class TokenizeResult:
    table: pa.Table  # TOKENIZED_SCHEMA
    rejects: pa.Table  # REJECTS_SCHEMA
    n_in: int  # conversations read
    n_ok: int  # conversations with at least one row in `table`
    n_rejected: int  # conversations with no row; n_in == n_ok + n_rejected
    rows_from_generated_ids: int = 0  # rows built from the target's own reply ids
    conversations_retokenized: int = 0  # conversations encoded from text (no ids: pass-through, openai)
    id_mismatches: int = 0  # rows with generated ids whose masked ids differ from them (+ end-of-turn)
    notes: dict = field(default_factory=dict)  # reason -> turns/rows, e.g. reply_rendered_differently
    note_examples: dict = field(default_factory=dict)  # reason -> the first one's detail
    template_date: str | None = None  # the date strftime_now renders, for a template that reads the clock
    reasoning_turns: int = 0  # assistant messages with reasoning_content (rendered as the template renders it)
    tool_call_turns: int = 0  # assistant messages with tool_calls (rendered by the template, masked as replies)


def _rows(conversations) -> list[tuple[str, object, list | None, list | None, str | list | None]]:
    """(id, messages, completion_ids, prompt_digests, tools) from a list of dicts or a pyarrow Table."""
    if isinstance(conversations, pa.Table):
        cols = conversations.column_names
        if "messages" not in cols:
            raise ValueError(f"conversation table has no 'messages' column (has {cols})")
        messages = conversations.column("messages").to_pylist()
        n = len(messages)
        ids = conversations.column("id").to_pylist() if "id" in cols else range(n)
        gen, dig, tools = (conversations.column(c).to_pylist() if c in cols else [None] * n
                           for c in ("completion_ids", "prompt_digests", "tools"))
        return list(zip(map(str, ids), messages, gen, dig, tools))
    return [(str(c.get("id", n)), c.get("messages"), c.get("completion_ids"), c.get("prompt_digests"), c.get("tools"))
            for n, c in enumerate(conversations)]


def _clean(messages) -> list[dict]:
    """The messages' MESSAGE_TYPE fields that are set (templates see nothing else), or RowReject for
    malformed rows."""
    if not isinstance(messages, list) or not messages:
        raise RowReject("invalid_messages", "messages is not a non-empty list")
    out = []
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise RowReject("invalid_messages", f"message {k} needs a string role and string content, got {m!r:.120}")
        out.append({f: m[f] for f in MESSAGE_FIELDS if m.get(f) is not None})
    return out


def tokenize_conversations(tokenizer, conversations, cfg: TokenizeConfig | None = None) -> TokenizeResult:
    """Token ids and assistant loss masks for a shard of conversations (id, messages[, completion_ids,
    prompt_digests]). Raises TokenizeError if an id is >= cfg.vocab_size."""
    cfg = cfg or TokenizeConfig()
    if cfg.max_length < 1:
        raise ValueError(f"max_length must be positive, got {cfg.max_length}")
    renderer = make_renderer(tokenizer, cfg.template, cfg.chat_template_kwargs)
    backend = encoder(tokenizer)
    special = special_lookup(tokenizer)
    ctx = _Context(renderer, backend, special, cfg, len(tokenizer))

    rows = _rows(conversations)
    views, owners, chars = [], [], 0
    gen_convs, gen_chars = [], 0
    for n, (conv_id, messages, completion_ids, digests, tools) in enumerate(rows):
        try:
            messages = _clean(messages)
            ctx.reasoning_turns += sum("reasoning_content" in m for m in messages)
            ctx.tool_call_turns += sum("tool_calls" in m for m in messages)
            conv_renderer = renderer.bind(tools)  # the template's tools block for this conversation's tools
            if cfg.use_generated_ids and completion_ids is not None:
                gen_convs.append(_generated_frames(conv_renderer, n, conv_id, messages, completion_ids, digests))
                gen_chars += sum(len(f.prompt) for f in gen_convs[-1].frames)
                if gen_chars >= BATCH_CHARS:
                    ctx.tables.append(_generated_table(ctx, gen_convs))
                    gen_convs, gen_chars = [], 0
                continue
            conv_views = conv_renderer.views(messages)
            expect = _text_expectations(ctx, conv_renderer, messages, conv_views, completion_ids)
        except RowReject as exc:
            ctx.rejects.append({"id": conv_id, "reason": exc.reason, "detail": exc.detail})
            continue
        ctx.retokenized += 1
        for v, e in zip(conv_views, expect):
            views.append(v)
            owners.append((n, conv_id, v, e))
            chars += len(v.text)
        if chars >= BATCH_CHARS:
            ctx.tables.append(_text_table(ctx, views, owners))
            views, owners, chars = [], [], 0
    if views:
        ctx.tables.append(_text_table(ctx, views, owners))
    if gen_convs:
        ctx.tables.append(_generated_table(ctx, gen_convs))
    table = pa.concat_tables(ctx.tables) if ctx.tables else TOKENIZED_SCHEMA.empty_table()
    return TokenizeResult(
        table=table,
        rejects=pa.Table.from_pylist(ctx.rejects, schema=REJECTS_SCHEMA),
        n_in=len(rows),
        n_ok=len(ctx.kept),
        n_rejected=len(rows) - len(ctx.kept),
        rows_from_generated_ids=ctx.rows_from_ids,
        conversations_retokenized=ctx.retokenized,
        id_mismatches=ctx.id_mismatches,
        notes=dict(sorted(ctx.notes.items())),
        note_examples=ctx.note_examples,
        template_date=renderer.template_date,
        reasoning_turns=ctx.reasoning_turns,
        tool_call_turns=ctx.tool_call_turns,
    )


def check_trainable(result: TokenizeResult, where: str) -> None:
    """TokenizeError if conversations came in but no row has a masked token, quoting the rejects."""
    if result.n_in == 0 or result.table.num_rows > 0:
        return
    reasons: dict[str, int] = {}
    first: dict[str, str] = {}
    for r in result.rejects.to_pylist():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        first.setdefault(r["reason"], f"{r['id']}: {r['detail']}")
    listed = "; ".join(f"{k} x{v} (e.g. {first[k]})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
    raise TokenizeError(
        f"{where}: no trainable token: all {result.n_in} conversations were rejected; reasons over their "
        f"{result.rejects.num_rows} rows: {listed}. "
        "Fix the cause (e.g. raise max_length, check the template) instead of training on nothing"
    )


@dataclass
class _Context:
    """What one tokenize call accumulates across batches."""

    renderer: object
    backend: object
    special: np.ndarray
    cfg: TokenizeConfig
    tokenizer_size: int
    tables: list = field(default_factory=list)
    rejects: list = field(default_factory=list)
    kept: set = field(default_factory=set)  # indices of conversations with at least one row
    rows_from_ids: int = 0
    retokenized: int = 0
    id_mismatches: int = 0
    reasoning_turns: int = 0
    tool_call_turns: int = 0
    notes: dict = field(default_factory=dict)
    note_examples: dict = field(default_factory=dict)
    _eot: dict = field(default_factory=dict)

    def note(self, reason: str, detail: str, n: int = 1) -> None:
        self.notes[reason] = self.notes.get(reason, 0) + n
        self.note_examples.setdefault(reason, detail)

    def closing(self, after: str) -> tuple[list[int], int]:
        """(ids of the template's turn-closing text, how many of them are masked): up to and including
        its last special token (the end-of-turn), else its text without trailing whitespace."""
        if after not in self._eot:
            ids = self.backend.encode(after, add_special_tokens=False).ids if after else []
            special = [k for k, t in enumerate(ids) if t < len(self.special) and self.special[t]]
            if special:
                n_eot = special[-1] + 1
            else:
                stripped = after.rstrip()
                n_eot = len(self.backend.encode(stripped, add_special_tokens=False).ids) if stripped else 0
            self._eot[after] = (ids, n_eot)
        return self._eot[after]


@dataclass
class _Frames:
    n: int
    conv_id: str
    messages: list[dict]
    turns: list[int]  # message index of each assistant turn
    frames: list  # ReplyFrame per turn
    completion_ids: list[list[int]]
    digests: list


def _generated_frames(renderer, n, conv_id, messages, completion_ids, digests) -> _Frames:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise RowReject("no_assistant", "conversation has no assistant message")
    if len(completion_ids) != len(turns) or any(c is None for c in completion_ids):
        raise RowReject("invalid_generated_ids", f"{len(completion_ids)} completion_ids lists for {len(turns)} "
                                                 "assistant turns (one non-null list per assistant message)")
    if digests is not None and len(digests) != len(turns):
        raise RowReject("invalid_generated_ids", f"{len(digests)} prompt_digests for {len(turns)} assistant turns")
    return _Frames(n, conv_id, messages, turns, [renderer.frame(messages, i) for i in turns],
                   [list(c) for c in completion_ids], list(digests) if digests is not None else [None] * len(turns))


def _generated_table(ctx: _Context, convs: list[_Frames]) -> pa.Table:
    """Rows of conversations with generated ids: encode(prompt) + generated ids + end-of-turn per turn."""
    from training.resample import prompt_digest

    prompts = ctx.backend.encode_batch([f.prompt for c in convs for f in c.frames], add_special_tokens=False)
    k = 0
    ids_parts, mask_parts, lens, owners, expect = [], [], [], [], []
    for c in convs:
        p_encs, k = prompts[k:k + len(c.frames)], k + len(c.frames)
        rows = []  # [ids, mask, expected masked ids, message index of the last turn]
        try:
            for t, (i, frame, gen, digest, enc) in enumerate(zip(c.turns, c.frames, c.completion_ids, c.digests, p_encs)):
                p_ids = enc.ids
                if digest is not None and prompt_digest(p_ids) != digest:
                    raise RowReject(
                        "prompt_mismatch",
                        f"assistant message {i}: the target generated it after a prompt of digest {digest}, "
                        f"this template renders {prompt_digest(p_ids)}: {_mismatch_cause(ctx.renderer)}",
                    )
                if not frame.verbatim:
                    ctx.note("reply_rendered_differently",
                             f"{c.conv_id} message {i}: the template renders the reply as {frame.rendered!r:.80} "
                             f"where the target generated {c.messages[i]['content']!r:.80}; trained on the "
                             "generated ids, later turns see the template's rendering")
                after_ids, n_eot = ctx.closing(frame.after)
                reply = gen + after_ids
                reply_mask = [1] * (len(gen) + n_eot) + [0] * (len(after_ids) - n_eot)
                if rows and p_ids[:len(rows[-1][0])] == rows[-1][0]:
                    row = rows[-1]  # the history re-encodes to the row so far: one row, one more turn
                    new = p_ids[len(row[0]):]
                    row[0] = row[0] + new + reply
                    row[1] = row[1] + [0] * len(new) + reply_mask
                else:
                    if rows:
                        ctx.note("history_split",
                                 f"{c.conv_id} message {i}: its prompt does not re-encode the earlier turns as "
                                 "they were generated (template rewrites history, or a non-canonical split)")
                    row = [p_ids + reply, [0] * len(p_ids) + reply_mask, [], None]
                    rows.append(row)
                row[2] = row[2] + gen + after_ids[:n_eot]
                row[3] = i
        except RowReject as exc:
            ctx.rejects.append({"id": c.conv_id, "reason": exc.reason, "detail": exc.detail})
            continue
        for r, (ids, mask, exp, last_turn) in enumerate(rows):
            ids_parts.append(ids)
            mask_parts.append(mask)
            lens.append(len(ids))
            owners.append((c.n, c.conv_id, View("", turn=None if r == len(rows) - 1 else last_turn), exp))
    if not owners:
        return TOKENIZED_SCHEMA.empty_table()
    enc = Encoded(np.fromiter((t for p in ids_parts for t in p), dtype=np.int64, count=sum(lens)),
                  np.fromiter((m for p in mask_parts for m in p), dtype=bool, count=sum(lens)),
                  np.asarray(lens, dtype=np.int64))
    ctx.rows_from_ids += len(owners)
    return _rows_table(ctx, enc, owners)


def _mismatch_cause(renderer) -> str:
    if renderer.template_date is not None:
        return (f"the chat template reads the clock (strftime_now), which tokenization fixes at template_date "
                f"{renderer.template_date}; the prompt the target saw was rendered on another date (a server "
                "backend, vllm or openai, renders on its own clock: set the chat template setting template_date "
                "to the day it rendered, or resample with the hf backend), or the template or its settings differ")
    return ("the chat template or its settings (chat_template_kwargs, template) differ between resampling and "
            "tokenization")


def _text_expectations(ctx: _Context, renderer, messages, views: list[View], completion_ids) -> list:
    """Per view, the masked ids it should hold if the conversation has generated ids (else None):
    what id_mismatches compares re-encoded rows with."""
    if completion_ids is None:
        return [None] * len(views)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(completion_ids) != len(turns) or any(c is None for c in completion_ids):
        return [None] * len(views)
    gen = dict(zip(turns, completion_ids))
    out = []
    for v in views:
        exp = []
        for i in v.turns:
            after_ids, n_eot = ctx.closing(renderer.frame(messages, i).after)
            exp += list(gen[i]) + after_ids[:n_eot]
        out.append(exp if v.turns else None)
    return out


def _row_id(conv_id: str, view: View) -> str:
    """The conversation's id for its final view, `{id}#{k}` for a view split off at assistant message k."""
    return conv_id if view.turn is None else f"{conv_id}#{view.turn}"


def _text_table(ctx: _Context, views: list[View], owners) -> pa.Table:
    return _rows_table(ctx, encode_views(ctx.backend, views, ctx.special, ctx.renderer.extend_eot), owners)


def _rows_table(ctx: _Context, enc: Encoded, owners) -> pa.Table:
    """Rows of one batch (flat ids/mask, lens per row; owners (conversation index, id, view, expected
    masked ids or None)), cut to max_length; rows left with no masked token go to the rejects."""
    cfg = ctx.cfg
    n_views = len(owners)
    view_of = np.repeat(np.arange(n_views), enc.lens)
    starts = np.zeros(n_views, dtype=np.int64)
    np.cumsum(enc.lens[:-1], out=starts[1:])
    if cfg.vocab_size is not None and len(enc.ids) and int(enc.ids.max()) >= cfg.vocab_size:
        pos = int(np.argmax(enc.ids >= cfg.vocab_size))
        v = int(view_of[pos])
        raise TokenizeError(
            f"row {_row_id(owners[v][1], owners[v][2])!r} (conversation {owners[v][1]!r}), token {pos - starts[v]}: "
            f"id {int(enc.ids[pos])} is outside the target model's vocab_size {cfg.vocab_size} (the tokenizer has "
            f"{ctx.tokenizer_size} tokens): the tokenizer does not belong to this model, or its added tokens "
            "have no embedding rows"
        )
    for v, (_, _, _, exp) in enumerate(owners):
        if exp is not None:
            a, b = int(starts[v]), int(starts[v] + enc.lens[v])
            if enc.ids[a:b][enc.mask[a:b]].tolist() != exp:
                ctx.id_mismatches += 1
    in_window = (np.arange(len(enc.ids)) - starts[view_of]) < cfg.max_length  # truncation keeps the head
    masked_all = np.bincount(view_of, weights=enc.mask, minlength=n_views)
    masked_kept = np.bincount(view_of[in_window], weights=enc.mask[in_window], minlength=n_views)
    truncated = enc.lens > cfg.max_length
    ok = masked_kept > 0

    row_ids = []
    for v in np.flatnonzero(~ok):
        _, conv_id, view, _ = owners[v]
        if masked_all[v] > 0:
            reason, detail = "assistant_truncated", f"all assistant tokens lie beyond max_length={cfg.max_length}"
        else:
            reason, detail = "empty", f"no assistant tokens ({int(enc.lens[v])} tokens in all)"
        ctx.rejects.append({"id": _row_id(conv_id, view), "reason": reason, "detail": detail})
    for v in np.flatnonzero(ok):
        n, conv_id, view, _ = owners[v]
        ctx.kept.add(n)
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

    The histogram buckets rows by length into powers of two, one row per bucket: e.g.
    {"tokens_from": 257, "tokens_to": 512, "rows": 10} (a table in the asset's metadata).
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
        "length_histogram": [{"tokens_from": int(b) // 2 + 1, "tokens_to": int(b), "rows": int(c)} for b, c in hist],
    }
