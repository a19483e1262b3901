"""Resampling: regenerate every assistant turn with the target, so the draft learns the target's
own distribution instead of whoever wrote the corpus.

A conversation is replayed turn by turn: the j-th assistant reply is generated from the messages
before it, where earlier assistant turns are the target's OWN replies (as stored in the output),
system and user turns are the corpus's. So every assistant turn in the output is exactly what the
target says after the messages that precede it in the output.

Batching goes by turn index: for a batch of rows, all rows that have a j-th assistant turn are
generated in one `target.generate` call, so a batch costs (max turns) calls, not rows * turns.

Everything random is keyed by row id, never by position: a row's temperature is drawn from the
configured mixture by hash(seed, id) and each turn's sampling seed by hash(seed, id, turn). So a
re-run, a resume after a kill, or a different batch size reproduces the same rows (given a
backend whose output per row does not depend on its batch neighbours, as the hf backend's).

Progress is persisted per batch in the object store as small Parquet chunks keyed by row id; a
killed run resumes where it stopped, and the final table is assembled in input order, exactly
once per row.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from training.schemas import MESSAGE_FIELDS, MESSAGE_TYPE, REJECTS_SCHEMA

RESAMPLED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("source", pa.string()),
        ("tools", pa.string()),  # the corpus row's tool schemas (JSON text), shown to the target as given
        ("finish_reason", pa.string()),  # "stop" | "length" (any turn cut) | "source" (pass-through)
        ("temperature", pa.float64()),  # null for pass-through
        ("generator", pa.string()),  # target identity, or "corpus" for pass-through
        # Per assistant message, in order: the reply's token ids as the target sampled them (no stop
        # token), and prompt_digest() of the ids it was generated after. Null when any turn's ids are
        # unknown (pass-through, a backend that returns none, reasoning stripped from the text):
        # tokenization then re-encodes the text and says so.
        ("completion_ids", pa.list_(pa.list_(pa.int32()))),
        ("prompt_digests", pa.list_(pa.string())),
    ]
)

# What a progress chunk holds per row: the output row, or the reject, plus the tokens it cost.
PROGRESS_SCHEMA = pa.schema(
    [
        *RESAMPLED_SCHEMA,
        ("n_tokens", pa.int64()),
        ("reject_reason", pa.string()),  # null for a kept row
        ("reject_detail", pa.string()),
    ]
)

DEFAULT_TEMPERATURES = {0.0: 0.4, 0.7: 0.3, 1.0: 0.3}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE), re.DOTALL)
_CHUNK_NAME = re.compile(r"chunk-(\d+)\.parquet$")


def batch_size(cfg: "ResampleConfig", backend_default: int | None) -> int:
    """Rows per resampling batch: the config's, else the backend's generation_batch_size, else 32."""
    return int(cfg.batch_size or backend_default or 32)


def prompt_digest(ids) -> str:
    """`{n}:{sha256 of the int32 little-endian ids, 16 hex}`: lets tokenization check that the prompt
    it puts before a generated reply is, token for token, the one the target saw."""
    import numpy as np

    arr = np.asarray(list(ids), dtype="<i4")
    return f"{arr.size}:{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"


class ResampleError(RuntimeError):
    """Resampling cannot go on (the backend failed, bad config); finished batches stay saved."""


@dataclass
class ResampleConfig:
    """The one place resampling defaults live (spec_assets' ResampledCorpusConfig mirrors it, tested)."""

    temperatures: dict[float, float] = field(default_factory=lambda: dict(DEFAULT_TEMPERATURES))  # temperature -> share of rows
    max_new_tokens: int = 160
    top_p: float = 1.0
    # A row with a turn cut at max_new_tokens: "flag" keeps it (finish_reason "length"), "drop" rejects it.
    on_length: str = "flag"
    keep_reasoning: bool = True  # False strips <think>...</think> from replies (and drops their token ids)
    batch_size: int | None = None  # rows per batch (the unit progress is saved in); None: the backend's own
    seed: int = 0

    def __post_init__(self):
        # Keys arrive as strings from Dagster/JSON config; normalise once here.
        self.temperatures = check_mixture(self.temperatures)
        if self.on_length not in ("drop", "flag"):
            raise ResampleError(f"on_length must be 'drop' or 'flag', got {self.on_length!r}")
        if self.max_new_tokens < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ResampleError("max_new_tokens and batch_size must be at least 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ResampleError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class ResampleResult:
    table: pa.Table  # RESAMPLED_SCHEMA, rows in input order
    rejects: pa.Table  # REJECTS_SCHEMA
    n_in: int
    n_ok: int
    n_rejected: int
    n_resumed: int  # rows taken from saved progress instead of generated by this call
    finish_reasons: dict[str, int]  # row-level finish_reason over every generated row, kept or rejected
    tokens_generated: int  # over all rows of the result, resumed ones included (so it does not depend on kills)


# ---------------------------------------------------------------------------------------------
# seeding: a pure function of (seed, row id[, turn]), independent of batch order


def _hash_u64(*parts: Any) -> int:
    # sha256, not hash(): Python's str hash is salted per process, so it would not reproduce.
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def check_mixture(mixture: dict) -> dict[float, float]:
    """{temperature: share} with float keys, non-negative shares summing to 1."""
    if not mixture:
        raise ResampleError("the temperature mixture is empty")
    out: dict[float, float] = {}
    for t, w in mixture.items():
        t, w = float(t), float(w)
        if t < 0 or w < 0:
            raise ResampleError(f"temperature {t} with share {w}: both must be >= 0")
        out[t] = out.get(t, 0.0) + w
    total = sum(out.values())
    if total <= 0:
        raise ResampleError("the temperature mixture's shares sum to 0")
    return {t: w / total for t, w in sorted(out.items())}


def draw_temperature(row_id: str, mixture: dict[float, float], seed: int) -> float:
    """The row's sampling temperature, drawn from `mixture` by hash(seed, id)."""
    mixture = check_mixture(mixture)
    u = _hash_u64("temperature", seed, row_id) / 2.0**64
    cum = 0.0
    for t, w in mixture.items():
        cum += w
        if u < cum:
            return t
    return next(t for t, w in reversed(mixture.items()) if w > 0)  # u within rounding of 1.0


def turn_seed(row_id: str, turn: int, seed: int) -> int:
    """Sampling seed of one assistant turn; 31 bits so every backend (int32 seeds included) takes it."""
    return _hash_u64("sample", seed, row_id, turn) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# reply post-processing


def strip_reasoning(text: str) -> str:
    """Drop <think>...</think> blocks, a reasoning prefix whose <think> was in the prompt (templates
    that open the block themselves), and an unclosed block cut by max_new_tokens."""
    out = _THINK_BLOCK.sub("", text)
    if THINK_CLOSE in out:
        out = out.split(THINK_CLOSE, 1)[1]
    if THINK_OPEN in out:
        out = out.split(THINK_OPEN, 1)[0]
    return out.strip() if out != text else text


# ---------------------------------------------------------------------------------------------
# progress: Parquet chunks keyed by row id


class ResampleProgress:
    """Finished rows (kept and rejected) of a resampling run, saved per batch under `prefix`.

    Each batch becomes one `chunk-NNNNNN.parquet`, written whole (write_bytes is atomic per
    object), so a kill leaves either the whole chunk or none of it. Reading takes the first copy
    of an id, so a chunk written twice (a kill between write and bookkeeping) is harmless.
    """

    def __init__(self, store, prefix: str):
        self.store = store
        self.prefix = prefix.strip("/")

    def __repr__(self) -> str:
        return f"ResampleProgress({self.store.url(self.prefix)!r})"

    def chunk_keys(self) -> list[str]:
        keys = [k for k in self.store.list(self.prefix) if _CHUNK_NAME.search(k.rsplit("/", 1)[-1])]
        return sorted(keys, key=lambda k: int(_CHUNK_NAME.search(k).group(1)))

    def load(self) -> dict[str, dict]:
        """id -> saved row (PROGRESS_SCHEMA fields), first copy wins."""
        import pyarrow.parquet as pq

        rows: dict[str, dict] = {}
        for key in self.chunk_keys():
            try:
                table = pq.read_table(io.BytesIO(self.store.read_bytes(key)))
            except FileNotFoundError:
                continue  # deleted between list and read (a concurrent clear)
            except pa.ArrowException as exc:
                # Cannot happen with atomic writes; if a store breaks that, say where, don't guess.
                raise ResampleError(f"corrupt progress chunk {self.store.url(key)}: {exc}; delete it to redo its rows") from exc
            for row in table.to_pylist():
                rows.setdefault(row["id"], row)
        return rows

    def append(self, rows: list[dict]) -> str | None:
        """Save one batch's finished rows as the next chunk; returns its key."""
        import pyarrow.parquet as pq

        if not rows:
            return None
        # Number from the listing each time, so a second writer or a resumed run never reuses a name
        # of a chunk it can see.
        keys = self.chunk_keys()
        n = int(_CHUNK_NAME.search(keys[-1]).group(1)) + 1 if keys else 1
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=PROGRESS_SCHEMA), buf)
        key = f"{self.prefix}/chunk-{n:06d}.parquet"
        self.store.write_bytes(key, buf.getvalue())
        return key


# ---------------------------------------------------------------------------------------------
# resampling


def _as_rows(rows) -> list[dict]:
    """Input rows as dicts with id, messages (MESSAGE_TYPE fields), source, tools (other fields ignored)."""
    if isinstance(rows, pa.Table):
        cols = [c for c in ("id", "messages", "source", "tools") if c in rows.column_names]
        rows = rows.select(cols).to_pylist()
    out = []
    for r in rows:
        messages = [{**{f: m[f] for f in MESSAGE_FIELDS if m.get(f) is not None},
                     "role": str(m["role"]), "content": m.get("content") or ""} for m in (r.get("messages") or [])]
        out.append({"id": str(r["id"]), "messages": messages, "source": r.get("source"), "tools": r.get("tools")})
    return out


def generator_name(target) -> str:
    """What each generated row records as its generator: the target's identity."""
    for attr in ("identity", "name", "spec"):
        value = getattr(target, attr, None)
        if isinstance(value, str) and value:
            return value
    return type(target).__name__


def _reject(row: dict, reason: str, detail: str, **extra) -> dict:
    return {"id": row["id"], "messages": None, "source": row["source"], "tools": row["tools"], "finish_reason": None, "temperature": None,
            "generator": None, "n_tokens": 0, "reject_reason": reason, "reject_detail": detail, **extra}


def _template_of(target):
    """The target's prompt renderer (tokenization/templates.py prompt_renderer), or None for a
    target without a local tokenizer (an openai server given none): its server is then the only judge."""
    from training.targets.base import TargetError
    from training.tokenization.templates import prompt_renderer

    try:
        tokenizer = target.tokenizer
    except TargetError:
        return None
    return prompt_renderer(tokenizer, getattr(target, "chat_template_kwargs", None))


def _refused(renderer, conversation: list[dict], tools) -> tuple[str, str] | None:
    """(reason, detail) when the target's template will not render this generation prompt."""
    from training.tokenization.templates import RowReject

    if renderer is None:
        return None
    try:
        renderer.bind(tools).render(conversation, add_generation_prompt=True)
    except RowReject as exc:
        return exc.reason, exc.detail
    return None


def resample_batch(target, batch: list[dict], cfg: ResampleConfig, generator: str, batch_no: int) -> list[dict]:
    """Generate every assistant turn of `batch`, one generate call per turn index; returns progress rows.

    A prompt the target's template refuses (raise_exception: a system role it does not support, roles
    that do not alternate) rejects its row (`template_error`) before the generate call; the rest go on."""
    from training.targets.base import SamplingParams

    renderer = _template_of(target)
    takes_tools = getattr(target, "supports_tools", False)
    states = []
    for row in batch:
        turns = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
        states.append({
            "row": row, "turns": turns, "messages": [dict(m) for m in row["messages"]],
            "temperature": draw_temperature(row["id"], cfg.temperatures, cfg.seed),
            "finish": None, "cut": [], "n_tokens": 0, "reject": None,
            "ids": [None] * len(turns), "digests": [None] * len(turns), "tools": row.get("tools"),
        })
        if not takes_tools and (row.get("tools") or any(m.get("tool_calls") for m in row["messages"])):
            states[-1]["reject"] = ("tools_unsupported", f"the {getattr(target, 'backend', type(target).__name__)} "
                                    "backend cannot show the target this conversation's tools and calls")

    for j in range(max(len(s["turns"]) for s in states)):
        active = []
        for s in states:
            if j < len(s["turns"]) and s["reject"] is None:
                refused = _refused(renderer, s["messages"][: s["turns"][j]], s["tools"])
                if refused is not None:
                    s["reject"] = (refused[0], f"assistant turn {j + 1}: {refused[1]}")
                else:
                    active.append(s)
        if not active:
            break  # every row is done or rejected: none has a later turn left
        # The conversation so far: corpus system/user turns, the target's own earlier replies.
        convs = [s["messages"][: s["turns"][j]] for s in active]
        params = [
            SamplingParams(temperature=s["temperature"], top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                           seed=turn_seed(s["row"]["id"], j, cfg.seed))
            for s in active
        ]
        try:
            if any(s["tools"] for s in active):
                gens = target.generate(convs, params, tools=[s["tools"] for s in active])
            else:
                gens = target.generate(convs, params)
        except Exception as exc:
            ids = [s["row"]["id"] for s in active]
            raise ResampleError(
                f"generation failed in batch {batch_no}, assistant turn {j + 1} ({len(ids)} rows, {ids[0]} .. {ids[-1]}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if len(gens) != len(active):
            raise ResampleError(f"batch {batch_no}, turn {j + 1}: the backend returned {len(gens)} replies "
                                f"for {len(active)} conversations")

        for s, gen in zip(active, gens):
            text, reasoning = gen.text or "", gen.reasoning or None
            if not cfg.keep_reasoning:
                text, reasoning = strip_reasoning(text), None
            # The ids stand for the reply only while the stored text is the generated text.
            if (gen.token_ids is not None and gen.prompt_token_ids is not None and text == (gen.text or "")
                    and reasoning == (gen.reasoning or None)):
                s["ids"][j] = [int(t) for t in gen.token_ids]
                s["digests"][j] = prompt_digest(gen.prompt_token_ids)
            # The target's reply replaces the corpus's, reasoning included; the next turn sees exactly what we store.
            reply = s["messages"][s["turns"][j]]
            reply["content"] = text
            for key, value in (("reasoning_content", reasoning), ("tool_calls", gen.tool_calls)):
                reply.pop(key, None)
                if value is not None:
                    reply[key] = value
            s["finish"] = str(gen.finish_reason)
            s["n_tokens"] += int(gen.n_tokens or 0)
            if gen.finish_reason == "length":
                s["cut"].append(j + 1)
                if cfg.on_length == "drop":
                    s["reject"] = ("length_limit", f"assistant turn {j + 1} reached max_new_tokens={cfg.max_new_tokens}")
                    continue  # rejecting: later turns would be wasted work
            if not text.strip() and not reasoning and not gen.tool_calls:  # reasoning or a call alone is a reply
                why = "" if cfg.keep_reasoning else " after stripping reasoning"
                s["reject"] = ("empty_reply", f"assistant turn {j + 1} is empty{why}")

    out = []
    for s in states:
        row = s["row"]
        finish = "length" if s["cut"] else s["finish"]
        common = {"finish_reason": finish, "temperature": s["temperature"], "generator": generator, "n_tokens": s["n_tokens"]}
        if s["reject"] is not None:
            out.append(_reject(row, *s["reject"], **common))
        else:
            known = all(d is not None for d in s["digests"])
            out.append({"id": row["id"], "messages": s["messages"], "source": row["source"], "tools": row["tools"], **common,
                        "completion_ids": s["ids"] if known else None,
                        "prompt_digests": s["digests"] if known else None,
                        "reject_reason": None, "reject_detail": None})
    return out


def _assemble(rows: list[dict], done: dict[str, dict], n_resumed: int) -> ResampleResult:
    """Output and rejects in input order, each input row exactly once."""
    kept, rejects, finish_reasons, tokens = [], [], {}, 0
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            rejects.append({"id": row["id"], "reason": "duplicate_id", "detail": "an earlier row has the same id"})
            continue
        seen.add(row["id"])
        rec = done[row["id"]]
        tokens += int(rec["n_tokens"] or 0)
        if rec["finish_reason"] is not None:
            finish_reasons[rec["finish_reason"]] = finish_reasons.get(rec["finish_reason"], 0) + 1
        if rec["reject_reason"] is not None:
            rejects.append({"id": rec["id"], "reason": rec["reject_reason"], "detail": rec["reject_detail"]})
        else:
            kept.append({k: rec.get(k) for k in RESAMPLED_SCHEMA.names})  # .get: chunks saved before a column existed
    return ResampleResult(
        table=pa.Table.from_pylist(kept, schema=RESAMPLED_SCHEMA),
        rejects=pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
        n_in=len(rows), n_ok=len(kept), n_rejected=len(rejects), n_resumed=n_resumed,
        finish_reasons=dict(sorted(finish_reasons.items())), tokens_generated=tokens,
    )


def _check_saved(rec: dict, generator: str, cfg: ResampleConfig, progress: ResampleProgress) -> dict:
    """A saved row must come from this target and config; mixing runs would corrupt the output quietly."""
    t = draw_temperature(rec["id"], cfg.temperatures, cfg.seed)
    if rec["generator"] != generator or rec["temperature"] != t:
        raise ResampleError(
            f"{progress} holds row {rec['id']!r} from generator {rec['generator']!r} at temperature "
            f"{rec['temperature']}, but this run is {generator!r} at {t}: key the progress prefix by the "
            f"step's fingerprint (config + target), or clear it"
        )
    return rec


@dataclass
class LocalBatches:
    """Batches generated one after another by `target` in this process (a TargetModel)."""

    target: Any

    def __post_init__(self):
        self.generator = generator_name(self.target)
        self.generation_batch_size = getattr(self.target, "generation_batch_size", None)

    def describe(self) -> str:
        return "here"

    def run(self, batches: list[tuple[int, list[dict]]], cfg: ResampleConfig) -> Iterator[tuple[int, list[dict], str]]:
        for no, batch in batches:
            yield no, resample_batch(self.target, batch, cfg, self.generator, no), ""


def resample_rows(
    batches,
    rows: list[dict] | pa.Table,
    cfg: ResampleConfig,
    progress: ResampleProgress | None = None,
    log: Callable[[str], Any] = print,
) -> ResampleResult:
    """The resampling driver: rows in, the kept table, rejects and progress out. n_in = n_ok + n_rejected.

    `batches` generates: LocalBatches here, or training.ray_pool.PoolBatches on Ray actors. It has
    `generator` (the name rows record), `generation_batch_size` (None: 32), `describe()` and
    `run(batches, cfg)`, which yields (batch number, resample_batch's rows, where it ran) as each
    batch finishes, in any order. So settling, deduplication, resuming, batching, progress and
    assembly are one code path whoever generates, and the result does not depend on who did.

    With `progress`, each finished batch is saved as it returns (progress is keyed by row id) and
    rows already saved are skipped, so a killed run resumes without redoing or skipping rows. A
    backend error stops the run with ResampleError (finished batches stay saved); rows are never
    silently dropped.
    """
    rows = _as_rows(rows)
    done: dict[str, dict] = {}
    pending: list[dict] = []
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            continue  # a repeated id (progress is keyed by id): _assemble rejects the later copies
        seen.add(row["id"])
        # Rows that need no generation are settled here and never saved: they are free to redo.
        if not any(m["role"] == "assistant" for m in row["messages"]):
            done[row["id"]] = _reject(row, "no_assistant_turn", "the conversation has no assistant turn to regenerate")
        else:
            pending.append(row)
    n_resumed = 0
    if progress is not None:
        saved = progress.load()
        for row in pending:
            if row["id"] in saved:
                done[row["id"]] = _check_saved(saved[row["id"]], batches.generator, cfg, progress)
                n_resumed += 1
        pending = [r for r in pending if r["id"] not in saved]
        log(f"resample: {n_resumed} rows resumed from {progress}, {len(pending)} to generate {batches.describe()}")

    size = batch_size(cfg, batches.generation_batch_size)
    work = [(b + 1, pending[i:i + size]) for b, i in enumerate(range(0, len(pending), size))]
    t0, n_tok_all = time.perf_counter(), 0
    for finished, (no, out, where) in enumerate(batches.run(work, cfg), start=1):
        if progress is not None:
            progress.append(out)  # saved as it returns: a kill loses at most the batches in flight
        for rec in out:
            done[rec["id"]] = rec
        n_tok = sum(r["n_tokens"] for r in out)
        n_tok_all += n_tok
        dt = time.perf_counter() - t0
        log(f"resample: batch {no}/{len(work)}{where}: {len(out)} rows, "
            f"{sum(r['reject_reason'] is not None for r in out)} rejected, {n_tok} tokens; "
            f"{finished}/{len(work)} done in {dt:.1f}s ({n_tok_all / max(dt, 1e-9):.0f} tok/s)")

    result = _assemble(rows, done, n_resumed)
    log(f"resample: {result.n_in} rows in, {result.n_ok} kept, {result.n_rejected} rejected, "
        f"finish reasons {result.finish_reasons}, {result.tokens_generated} tokens")
    return result


def resample_conversations(target, rows: list[dict] | pa.Table, cfg: ResampleConfig,
                           progress: ResampleProgress | None = None, log: Callable[[str], Any] = print) -> ResampleResult:
    """resample_rows with `target` (a TargetModel) generating here."""
    return resample_rows(LocalBatches(target), rows, cfg, progress=progress, log=log)


def passthrough(rows: list[dict] | pa.Table) -> ResampleResult:
    """`resample: false`: the corpus rows unchanged, marked finish_reason "source", generator "corpus".

    A row with an empty assistant turn (a question file: MT-Bench/Spec-Bench `turns` have no answers)
    has nothing to train on without generation: rejected as `needs_generation`.
    """
    import pyarrow.compute as pc

    if not isinstance(rows, pa.Table) or rows.schema.field("messages").type != RESAMPLED_SCHEMA.field("messages").type:
        rows = pa.Table.from_pylist(_as_rows(rows), schema=pa.schema(list(RESAMPLED_SCHEMA)[:4]))
    msgs = pc.list_flatten(rows["messages"])
    parent = pc.list_parent_indices(rows["messages"])
    # an assistant turn with no content, no reasoning and no tool call (reasoning or a call alone is a reply)
    empty = pc.and_(pc.equal(pc.struct_field(msgs, "role"), "assistant"),
                    pc.and_(pc.equal(pc.utf8_length(pc.fill_null(pc.struct_field(msgs, "content"), "")), 0),
                            pc.and_(pc.is_null(pc.struct_field(msgs, "reasoning_content")),
                                    pc.is_null(pc.struct_field(msgs, "tool_calls")))))
    bad = sorted(set(pc.filter(parent, empty).to_pylist())) if msgs.length() else []
    rejects = [{"id": str(rows["id"][i].as_py()), "reason": "needs_generation",
                "detail": "an assistant turn is empty (a question file has no answers): set resample: true "
                          "to have the target write them"} for i in bad]
    if bad:
        drop = set(bad)
        rows = rows.filter(pa.array([i not in drop for i in range(rows.num_rows)]))
    n = rows.num_rows
    source, tools = (rows[c].cast(pa.string()) if c in rows.column_names else pa.nulls(n, pa.string())
                     for c in ("source", "tools"))
    table = pa.table(
        [rows["id"].cast(pa.string()), rows["messages"], source, tools, pa.array(["source"] * n, pa.string()),
         pa.nulls(n, pa.float64()), pa.array(["corpus"] * n, pa.string()),
         pa.nulls(n, RESAMPLED_SCHEMA.field("completion_ids").type), pa.nulls(n, pa.list_(pa.string()))],
        schema=RESAMPLED_SCHEMA,
    )
    return ResampleResult(
        table=table, rejects=pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), n_in=n + len(bad),
        n_ok=n, n_rejected=len(bad), n_resumed=0, finish_reasons={"source": n} if n else {}, tokens_generated=0,
    )
