"""A seeded fuzz corpus for ingestion: valid rows of all five formats mixed with every malformed kind.

    corpus = generate_fuzz_corpus(n_rows=10_000, seed=0)
    Path("fuzz.jsonl").write_bytes(corpus.data)    # JSONL *bytes*: invalid UTF-8 is there on purpose
    corpus.n_read, corpus.n_accepted, corpus.n_rejected
    corpus.by_category, corpus.by_reason, corpus.formats
    corpus.records[k]                              # what record k must become (line, reason, id, messages)

    python -m tests.e2e.corpus_fuzz /tmp/fuzz.jsonl --rows 100000 --seed 1   # from a shell or a bench

The expectations follow the rules of training/corpus/__init__.py exactly, so a test can reconcile
`read_source` against them row by row, and a benchmark gets a realistic dirty corpus of any size.
No Dagster, no third-party imports.

What is in it (each record's `category`; the reject reason it must get in brackets):
  valid            openai, sharegpt (every speaker alias), prompt_completion, alpaca, question; with or without
                   system turns, ids (string, integer, question_id, "" = fallback), a `source` label,
                   multi-turn, consecutive same-role turns, an assistant-first turn, an empty system
                   prompt, escaped control characters (NUL, ESC, DEL ...), U+2028 and other non-ASCII,
                   chat-template special tokens inside content, CRLF endings, a UTF-8 BOM on line 1,
                   a record that has several formats' fields (first match wins), huge (1 MB) turns
  broken JSON      truncated lines, trailing garbage, single quotes, trailing commas [malformed_json];
                   raw control bytes inside strings [malformed_json]; 100k-deep nesting and a
                   5,000-digit integer (both raise non-JSONDecodeError errors in Python) [malformed_json]
  invalid UTF-8    bad bytes inside strings [invalid_utf8]; "\\ud800" escapes (lone surrogates) [invalid_utf8]
  wrong types      non-objects [not_an_object], no known format [unrecognised_format], turns not a
                   list [invalid_turns], turn not an object / no role / no content [invalid_turn],
                   content not a string [non_string_content], float/bool/list ids [invalid_id]
  unknown roles    critic, developer, narrator, 7 ... [unknown_role:<name>]
  empty turns      "" and whitespace-only user/assistant content, empty alpaca input [empty_content],
                   no turns [empty_conversation]; also [misplaced_system], [no_assistant_turn]
  duplicate ids    a later valid row with an accepted row's id [duplicate_id] (first accepted wins);
                   a valid row reusing a *rejected* row's id is accepted (rejects claim no id); a row
                   whose explicit id equals an earlier row's fallback id `{shard}:{line}` [duplicate_id]
  blank lines      whitespace-only lines, which are not records (not counted as read)
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

BOM = b"\xef\xbb\xbf"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|bos|>", "<|eos|>", "<|pad|>", "<|endoftext|>", "</s>", "[INST]")
# (tool, function, observation and function_call are tool-calling roles, accepted: training/corpus)
UNKNOWN_OPENAI_ROLES = ("critic", "ipython", "developer", "Human", "ASSISTANT", "")
UNKNOWN_SHAREGPT_ROLES = ("moderator", "critic", "developer", "narrator")
SHAREGPT_USER = ("human", "user")
SHAREGPT_ASSISTANT = ("gpt", "assistant", "chatgpt", "bing", "bard")
WORDS = ("alpha", "beta", "gamma", "delta", "convert", "list", "sum", "the", "of", "answer", "why", "how",
         "42", "3.14", "km", "mile", "naïve", "café", "Grüße", "日本語", "中文", "العربية", "עברית", "😀", "👍🏽",
         "e\u0301", "\u200d", "x\u00a0y", "∑", "ℕ", "𝔘")
CONTROL_CHARS = "\x00\x01\x07\x08\x0b\x0c\x1b\x1f\x7f\x85\u2028\u2029\ufeff"


@dataclass
class ExpectedRecord:
    """What one record (a non-blank line) must become."""

    line: int  # 1-based physical line number (= the reject's row_index)
    category: str
    reason: str | None = None  # None: accepted
    id: str | None = None  # the accepted row's id
    format: str | None = None  # the accepted row's detected format
    messages: list[dict] | None = None  # the accepted row's normalized turns, exactly
    source: str | None = None  # the accepted row's `source` column

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass
class FuzzCorpus:
    data: bytes  # the JSONL file's bytes
    records: list[ExpectedRecord]  # every record in file order (blank lines are not records)
    file_name: str
    shard: str
    blank_lines: int = 0
    huge_bytes: int = 0

    @property
    def n_read(self) -> int:
        return len(self.records)

    @property
    def accepted(self) -> list[ExpectedRecord]:
        return [r for r in self.records if r.accepted]

    @property
    def rejected(self) -> list[ExpectedRecord]:
        return [r for r in self.records if not r.accepted]

    @property
    def n_accepted(self) -> int:
        return len(self.accepted)

    @property
    def n_rejected(self) -> int:
        return self.n_read - self.n_accepted

    @property
    def by_category(self) -> dict[str, int]:
        return dict(sorted(Counter(r.category for r in self.records).items()))

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r.reason for r in self.records if r.reason).items()))

    @property
    def formats(self) -> dict[str, int]:
        counts = dict.fromkeys(("openai", "sharegpt", "prompt_completion", "alpaca", "question"), 0)
        for r in self.accepted:
            counts[r.format] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        return {"read": self.n_read, "accepted": self.n_accepted, "rejected": self.n_rejected,
                "blank_lines": self.blank_lines, "bytes": len(self.data), "formats": self.formats,
                "by_reason": self.by_reason, "by_category": self.by_category}


class _Gen:
    """Generator state: rng, ids handed out, the accepted ids (duplicate rule), the file so far."""

    def __init__(self, seed: int, file_name: str, shard: str, huge_bytes: int):
        self.rng = random.Random(seed)
        self.seed = seed
        self.file_name = file_name
        self.shard = shard
        self.huge_bytes = huge_bytes
        self.lines: list[bytes] = []
        self.records: list[ExpectedRecord] = []
        self.blank = 0
        self.next_id = 0
        self.accepted_ids: list[str] = []
        self.accepted_set: set[str] = set()
        self.rejected_ids: list[str] = []  # explicit ids of rejected rows never accepted
        self.fallback_ids: list[str] = []  # fallback ids of accepted id-less rows

    # -- text ------------------------------------------------------------------------------------
    def text(self, lo: int = 1, hi: int = 12) -> str:
        words = [self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi))]
        return " ".join(words) or "x"

    def fresh_id(self) -> str:
        self.next_id += 1
        return f"fz{self.seed}-{self.next_id:06d}"

    @property
    def line_no(self) -> int:
        return len(self.lines) + 1

    # -- emitting ----------------------------------------------------------------------------------
    def emit(self, raw: bytes, record: ExpectedRecord) -> None:
        if b"\n" in raw:
            raise AssertionError(f"fuzz line for {record.category} holds a newline")
        record.line = self.line_no
        self.lines.append(raw)
        self.records.append(record)
        if record.accepted:
            self.accepted_set.add(record.id)
            self.accepted_ids.append(record.id)
        elif record.id is not None and record.id not in self.accepted_set:
            self.rejected_ids.append(record.id)

    def emit_json(self, value: Any, record: ExpectedRecord, *, ensure_ascii: bool | None = None) -> None:
        if ensure_ascii is None:
            ensure_ascii = self.rng.random() < 0.2
        self.emit(json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass"), record)

    def accept(self, value: dict, category: str, fmt: str, messages: list[dict], row_id: str | None) -> None:
        """Emit a valid record; row_id None means the fallback id `{shard}:{line}`."""
        rid = row_id if row_id is not None else f"{self.shard}:{self.line_no}"
        if rid in self.accepted_set:
            raise AssertionError(f"generator reused accepted id {rid!r} for a valid row")
        source = next((value[k].strip() for k in ("source", "domain", "category")
                       if isinstance(value.get(k), str) and value[k].strip()), f"{self.file_name}:{fmt}")
        if row_id is None:
            self.fallback_ids.append(rid)
        self.emit_json(value, ExpectedRecord(0, category, None, rid, fmt, messages, source))

    def reject(self, value: Any, category: str, reason: str, *, ensure_ascii: bool | None = None) -> None:
        self.emit_json(value, ExpectedRecord(0, category, reason, _reject_id(value)), ensure_ascii=ensure_ascii)

    def reject_raw(self, raw: bytes, category: str, reason: str) -> None:
        self.emit(raw, ExpectedRecord(0, category, reason))


def _reject_id(value: Any) -> str | None:
    """The id a reject row carries: the record's usable explicit id (as formats.record_id finds it)."""
    if not isinstance(value, dict):
        return None
    for key in ("id", "question_id"):
        v = value.get(key)
        if v is None or v == "":
            continue
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            return None
        try:
            str(v).encode("utf-8")
        except UnicodeEncodeError:
            return None
        return str(v)
    return None


# ---------------------------------------------------------------------------------------------
# valid conversations


def _conversation(g: _Gen, *, system: bool | None = None, turns: int | None = None) -> list[dict]:
    """Normalized turns: optional system, then alternating user/assistant, ending with assistant."""
    msgs = []
    if system if system is not None else g.rng.random() < 0.3:
        msgs.append({"role": "system", "content": g.text(2, 8)})
    for _ in range(turns or g.rng.choice((1, 1, 1, 2, 3))):
        msgs.append({"role": "user", "content": g.text()})
        msgs.append({"role": "assistant", "content": g.text()})
    return msgs


def _id_fields(g: _Gen) -> tuple[dict, str | None]:
    """The record's id fields and the id the row must get (None = fallback)."""
    roll = g.rng.random()
    rid = g.fresh_id()
    if roll < 0.6:
        return {"id": rid}, rid
    if roll < 0.7:
        num = 10**12 + g.next_id + g.seed * 10**7
        return {"id": num}, str(num)
    if roll < 0.8:
        return {"question_id": rid}, rid
    if roll < 0.85:
        return {"id": "", "question_id": None}, None  # "" counts as absent
    return {}, None


def _maybe_source(g: _Gen, value: dict) -> None:
    roll = g.rng.random()
    if roll < 0.1:
        value["source"] = f"  dataset-{g.rng.randint(0, 3)} "
    elif roll < 0.15:
        value["domain"] = "math"
    elif roll < 0.18:
        value["source"] = 17  # not a string: ignored


def valid_openai(g: _Gen, category: str = "valid_openai", msgs: list[dict] | None = None) -> None:
    msgs = msgs or _conversation(g)
    ids, rid = _id_fields(g)
    value = {**ids, "messages": [dict(m) for m in msgs]}
    if g.rng.random() < 0.2:
        value["messages"][0]["name"] = "extra fields are ignored"
    _maybe_source(g, value)
    g.accept(value, category, "openai", msgs, rid)


def valid_sharegpt(g: _Gen, category: str = "valid_sharegpt") -> None:
    msgs = _conversation(g)
    names = {"system": ("system",), "user": SHAREGPT_USER, "assistant": SHAREGPT_ASSISTANT}
    conv = [{"from": g.rng.choice(names[m["role"]]), "value": m["content"]} for m in msgs]
    ids, rid = _id_fields(g)
    value = {**ids, "conversations": conv}
    _maybe_source(g, value)
    g.accept(value, category, "sharegpt", msgs, rid)


def valid_prompt_completion(g: _Gen, category: str = "valid_prompt_completion") -> None:
    prompt, completion = g.text(), g.text()
    ids, rid = _id_fields(g)
    value = {**ids, "prompt": prompt, "completion": completion}
    msgs = []
    roll = g.rng.random()
    if roll < 0.3:
        value["system"] = g.text(2, 6)
        msgs.append({"role": "system", "content": value["system"]})
    elif roll < 0.45:
        value["system"] = g.rng.choice((None, ""))  # absent
    msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    _maybe_source(g, value)
    g.accept(value, category, "prompt_completion", msgs, rid)


def valid_alpaca(g: _Gen, category: str = "valid_alpaca") -> None:
    instruction, output = g.text(), g.text()
    ids, rid = _id_fields(g)
    value = {**ids, "instruction": instruction, "output": output}
    user = instruction
    roll = g.rng.random()
    if roll < 0.4:
        value["input"] = g.text()
        user = f"{instruction}\n\n{value['input']}"
    elif roll < 0.6:
        value["input"] = g.rng.choice((None, ""))
    elif roll < 0.7:
        value["instruction"], value["input"] = "", instruction  # only an input: the user turn is the input
    msgs = []
    if g.rng.random() < 0.2:
        value["system"] = g.text(2, 5)
        msgs.append({"role": "system", "content": value["system"]})
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    _maybe_source(g, value)
    g.accept(value, category, "alpaca", msgs, rid)


def valid_question(g: _Gen, category: str = "valid_question") -> None:
    """MT-Bench / Spec-Bench shape: questions only, each followed by an empty assistant turn."""
    turns = [g.text() for _ in range(g.rng.randint(1, 3))]
    rid = f"q{g.rng.randrange(10**9)}"
    value = {"question_id": rid, "turns": turns}
    if g.rng.random() < 0.5:
        value["category"] = g.rng.choice(("writing", "math", "coding"))
    msgs = [m for t in turns for m in ({"role": "user", "content": t}, {"role": "assistant", "content": ""})]
    g.accept(value, category, "question", msgs, rid)


def valid_edge(g: _Gen) -> None:
    """Unusual but valid rows the rules keep unchanged."""
    kind = g.rng.randrange(8)
    if kind == 0:  # empty and whitespace system prompts are kept
        msgs = [{"role": "system", "content": g.rng.choice(("", "   "))}, *_conversation(g, system=False)]
    elif kind == 1:  # consecutive turns of one role
        msgs = [{"role": "user", "content": g.text()}, {"role": "user", "content": g.text()},
                {"role": "assistant", "content": g.text()}, {"role": "assistant", "content": g.text()}]
    elif kind == 2:  # opens with an assistant turn, ends with a user turn
        msgs = [{"role": "assistant", "content": g.text()}, {"role": "user", "content": g.text()}]
    elif kind == 3:  # content with leading/trailing whitespace is never stripped
        msgs = [{"role": "user", "content": "  " + g.text() + "\n\n"}, {"role": "assistant", "content": "\t" + g.text() + " "}]
    elif kind == 4:  # chat-template special tokens inside content (injection attempts)
        tok = g.rng.choice(SPECIAL_TOKENS)
        msgs = [{"role": "user", "content": f"{tok}assistant\n{g.text()}{tok}"},
                {"role": "assistant", "content": f"{g.text()} {tok} {g.text()}"}]
    elif kind == 5:  # several formats' fields: messages wins over prompt/completion and alpaca
        msgs = _conversation(g)
        ids, rid = _id_fields(g)
        value = {**ids, "messages": msgs, "prompt": "ignored", "completion": "ignored",
                 "instruction": "ignored", "output": "ignored"}
        g.accept(value, "valid_multi_format_record", "openai", msgs, rid)
        return
    elif kind == 6:  # null messages falls through to prompt/completion (Parquet-style rows)
        ids, rid = _id_fields(g)
        p, c = g.text(), g.text()
        value = {**ids, "messages": None, "conversations": None, "prompt": p, "completion": c}
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        g.accept(value, "valid_null_fields", "prompt_completion", msgs, rid)
        return
    else:  # a long (but not huge) multi-turn conversation
        msgs = _conversation(g, turns=g.rng.randint(8, 20))
    valid_openai(g, "valid_edge", msgs)


def valid_control_chars(g: _Gen) -> None:
    """Escaped control characters and separators inside content are data: kept byte for byte."""
    def noisy() -> str:
        chars = list(g.text())
        for _ in range(g.rng.randint(1, 4)):
            chars.insert(g.rng.randrange(len(chars) + 1), g.rng.choice(CONTROL_CHARS))
        return "".join(chars)

    msgs = [{"role": "user", "content": noisy()}, {"role": "assistant", "content": noisy()}]
    ids, rid = _id_fields(g)
    g.accept({**ids, "messages": msgs}, "valid_control_chars", "openai", msgs, rid)


# ---------------------------------------------------------------------------------------------
# malformed records


def broken_json(g: _Gen) -> None:
    good = json.dumps({"id": g.fresh_id(), "messages": _conversation(g)}, ensure_ascii=False)
    kind = g.rng.randrange(6)
    if kind == 0:
        raw = good[: g.rng.randrange(1, len(good) - 1)]  # truncated mid-record
    elif kind == 1:
        raw = good + g.rng.choice((" x", "}", ",", "{}", " // comment"))
    elif kind == 2:
        raw = good.replace('"', "'")
    elif kind == 3:
        raw = good[:-1] + ",}"  # trailing comma
    elif kind == 4:
        raw = "{id: 1, messages: []}"  # unquoted keys
    else:
        raw = g.rng.choice(("{", "]", "nul", "tru", "{\"a\"", "\"unterminated", "{} {}", "[1,]", "NaN x"))
    try:
        json.loads(raw)
    except ValueError:
        g.reject_raw(raw.encode(), "broken_json", "malformed_json")
    else:  # the cut happened to leave valid JSON: make it invalid for sure
        g.reject_raw((raw + " }").encode(), "broken_json", "malformed_json")


def raw_control_char(g: _Gen) -> None:
    """An unescaped control byte inside a JSON string is invalid JSON (strict parsing)."""
    ch = g.rng.choice(("\x00", "\x01", "\x08", "\x1b", "\x1f", "\t", "\r"))
    raw = json.dumps({"id": g.fresh_id(), "prompt": "a" + "\u0000" + "b", "completion": g.text()})
    raw = raw.replace("\\u0000", ch)
    g.reject_raw(raw.encode(), "raw_control_char", "malformed_json")


def pathological_json(g: _Gen, kind: int) -> None:
    """JSON that Python's parser refuses with RecursionError or ValueError, not JSONDecodeError."""
    if kind == 0:
        depth = 100_000
        raw = '{"messages": ' + "[" * depth + "]" * depth + "}"
    else:
        raw = '{"id": ' + "7" * 5000 + ', "prompt": "p", "completion": "c"}'
    g.reject_raw(raw.encode(), "pathological_json", "malformed_json")


def invalid_utf8(g: _Gen) -> None:
    bad = g.rng.choice((b"\xff", b"\xc0\xaf", b"\x80", b"\xe2\x82", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xfe"))
    raw = json.dumps({"id": g.fresh_id(), "messages": _conversation(g)}, ensure_ascii=False).encode()
    at = raw.index(b'"content": "') + len(b'"content": "')
    g.reject_raw(raw[:at] + bad + raw[at:], "invalid_utf8_bytes", "invalid_utf8")


def lone_surrogate(g: _Gen) -> None:
    """A "\\ud800" escape parses as JSON but is not Unicode text."""
    msgs = _conversation(g, system=False)
    msgs[g.rng.randrange(len(msgs))]["content"] += g.rng.choice(("\ud800", "\udfff", "\udbff x"))
    # ensure_ascii: the file holds the escape "\\ud800" (valid UTF-8), not surrogate bytes.
    g.reject({"id": g.fresh_id(), "messages": msgs}, "lone_surrogate", "invalid_utf8", ensure_ascii=True)


def not_an_object(g: _Gen) -> None:
    value = g.rng.choice(([1, 2], [{"messages": []}], "just a string", 42, 3.5, None, True, []))
    g.reject(value, "not_an_object", "not_an_object")


def unrecognised(g: _Gen) -> None:
    value = g.rng.choice((
        {}, {"text": g.text()}, {"prompt": g.text()}, {"completion": g.text()}, {"instruction": g.text()},
        {"output": g.text()}, {"messages": None, "conversations": None}, {"prompt": None, "completion": "x"},
        {"Messages": [{"role": "user", "content": "x"}]}, {"id": g.fresh_id(), "question": "q", "answer": "a"},
    ))
    g.reject(value, "unrecognised_format", "unrecognised_format")


def wrong_types(g: _Gen) -> None:
    rid = g.fresh_id()
    ok_user, ok_asst = {"role": "user", "content": g.text()}, {"role": "assistant", "content": g.text()}
    cases: list[tuple[Any, str]] = [
        ({"id": rid, "messages": g.text()}, "invalid_turns"),
        ({"id": rid, "messages": {"role": "user", "content": "x"}}, "invalid_turns"),
        ({"id": rid, "messages": 5}, "invalid_turns"),
        ({"id": rid, "conversations": "human: hi"}, "invalid_turns"),
        ({"id": rid, "messages": ["hi", "hello"]}, "invalid_turn"),
        ({"id": rid, "messages": [ok_user, None]}, "invalid_turn"),
        ({"id": rid, "messages": [{"content": "x"}, ok_asst]}, "invalid_turn"),
        ({"id": rid, "messages": [{"role": None, "content": "x"}, ok_asst]}, "invalid_turn"),
        ({"id": rid, "messages": [{"role": "user"}, ok_asst]}, "invalid_turn"),
        ({"id": rid, "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, "invalid_turn"),
        ({"id": rid, "messages": [{"role": "user", "content": 12}, ok_asst]}, "non_string_content"),
        ({"id": rid, "messages": [ok_user, {"role": "assistant", "content": None}]}, "non_string_content"),
        ({"id": rid, "messages": [ok_user, {"role": "assistant", "content": ["a", "b"]}]}, "non_string_content"),
        ({"id": rid, "messages": [{"role": "user", "content": {"type": "text", "text": "x"}}, ok_asst]},
         "non_string_content"),
        ({"id": rid, "prompt": ["x"], "completion": "y"}, "non_string_content"),
        ({"id": rid, "prompt": "x", "completion": 3.5}, "non_string_content"),
        ({"id": rid, "prompt": "x", "completion": "y", "system": 0}, "non_string_content"),
        ({"id": rid, "instruction": "x", "input": 5, "output": "y"}, "non_string_content"),
        ({"id": rid, "instruction": True, "output": "y"}, "non_string_content"),
        ({"id": 1.5, "messages": [ok_user, ok_asst]}, "invalid_id"),
        ({"id": True, "messages": [ok_user, ok_asst]}, "invalid_id"),
        ({"id": [rid], "messages": [ok_user, ok_asst]}, "invalid_id"),
        ({"question_id": {"n": 1}, "prompt": "x", "completion": "y"}, "invalid_id"),
    ]
    value, reason = g.rng.choice(cases)
    g.reject(value, "wrong_types", reason)


def unknown_role(g: _Gen) -> None:
    roll = g.rng.random()
    if roll < 0.5:
        role = g.rng.choice(UNKNOWN_OPENAI_ROLES)
        msgs = [{"role": "user", "content": g.text()}, {"role": role, "content": g.text()},
                {"role": "assistant", "content": g.text()}]
        value, reason = {"messages": msgs}, f"unknown_role:{role}"
    elif roll < 0.85:
        who = g.rng.choice(UNKNOWN_SHAREGPT_ROLES)
        conv = [{"from": "human", "value": g.text()}, {"from": who, "value": g.text()}, {"from": "gpt", "value": "x"}]
        value, reason = {"conversations": conv}, f"unknown_role:{who}"
    else:
        role, label = g.rng.choice(((7, "<number>"), (["user"], "<array>"), ({"r": 1}, "<object>"), (True, "<boolean>")))
        value, reason = {"messages": [{"role": role, "content": "x"}, {"role": "assistant", "content": "y"}]}, f"unknown_role:{label}"
    rid = g.fresh_id()
    g.reject({"id": rid, **value}, "unknown_role", reason)


def empty_turns(g: _Gen) -> None:
    rid = g.fresh_id()
    blank = g.rng.choice(("", " ", "\n\t  ", "\r\n"))
    user, asst = {"role": "user", "content": g.text()}, {"role": "assistant", "content": g.text()}
    cases: list[tuple[dict, str]] = [
        ({"messages": [{"role": "user", "content": blank}, asst]}, "empty_content"),
        ({"messages": [user, {"role": "assistant", "content": blank}]}, "empty_content"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": blank}]}, "empty_content"),
        ({"prompt": blank, "completion": "y"}, "empty_content"),
        ({"prompt": "x", "completion": blank}, "empty_content"),
        ({"instruction": "", "input": "", "output": "y"}, "empty_content"),
        ({"instruction": "x", "output": blank}, "empty_content"),
        ({"messages": []}, "empty_conversation"),
        ({"conversations": []}, "empty_conversation"),
        ({"messages": [user, {"role": "system", "content": "late"}, asst]}, "misplaced_system"),
        ({"messages": [user]}, "no_assistant_turn"),
        ({"messages": [{"role": "system", "content": "s"}, user, user]}, "no_assistant_turn"),
    ]
    value, reason = g.rng.choice(cases)
    category = "empty_turns" if reason in ("empty_content", "empty_conversation") else "bad_structure"
    g.reject({"id": rid, **value}, category, reason)


def duplicate_id(g: _Gen) -> None:
    """Rows reusing ids: of an accepted row (rejected), of a rejected row (accepted), of a fallback id."""
    roll = g.rng.random()
    if roll < 0.6 and g.accepted_ids:
        rid = g.rng.choice(g.accepted_ids)
        fmt = g.rng.choice(("openai", "prompt_completion"))
        value = ({"id": rid, "messages": _conversation(g)} if fmt == "openai"
                 else {"id": rid, "prompt": g.text(), "completion": g.text()})
        g.reject(value, "duplicate_id", "duplicate_id")
    elif roll < 0.8 and g.rejected_ids:
        rid = g.rejected_ids.pop(g.rng.randrange(len(g.rejected_ids)))
        msgs = _conversation(g)
        g.accept({"id": rid, "messages": msgs}, "reused_rejected_id", "openai", msgs, rid)
    elif g.fallback_ids:
        rid = g.rng.choice(g.fallback_ids)
        g.reject({"id": rid, "prompt": g.text(), "completion": g.text()}, "fallback_id_collision", "duplicate_id")
    else:
        valid_openai(g)


# -- huge rows -------------------------------------------------------------------------------------
def _huge_text(g: _Gen) -> str:
    unit = "The quick brown fox jumps over the lazy dog; naïve café 日本 😀.\n"
    return unit * (g.huge_bytes // len(unit.encode()) + 1) + g.text()  # >= huge_bytes of UTF-8


def huge_rows(g: _Gen, kind: int) -> None:
    big = _huge_text(g)
    rid = g.fresh_id()
    if kind == 0:  # a huge user turn: valid (tokenization truncates it)
        msgs = [{"role": "user", "content": big}, {"role": "assistant", "content": g.text()}]
        g.accept({"id": rid, "messages": msgs}, "huge_valid", "openai", msgs, rid)
    elif kind == 1:  # a huge assistant turn: valid
        msgs = [{"role": "user", "content": g.text()}, {"role": "assistant", "content": big}]
        g.accept({"id": rid, "messages": msgs}, "huge_valid", "openai", msgs, rid)
    elif kind == 2:  # huge and an unknown role
        msgs = [{"role": "user", "content": big}, {"role": "oracle", "content": "x"}]
        g.reject({"id": rid, "messages": msgs}, "huge_invalid", "unknown_role:oracle")
    else:  # huge and truncated JSON
        raw = json.dumps({"id": rid, "messages": [{"role": "user", "content": big}]}, ensure_ascii=False)
        g.reject_raw(raw[: len(raw) - 7].encode(), "huge_invalid", "malformed_json")


# ---------------------------------------------------------------------------------------------

# (kind, weight): valid rows about 55%, each malformed kind a few percent.
KINDS: list[tuple[Callable[[_Gen], None], float]] = [
    (valid_openai, 14), (valid_sharegpt, 12), (valid_prompt_completion, 12), (valid_alpaca, 10), (valid_question, 3),
    (valid_edge, 5), (valid_control_chars, 3),
    (broken_json, 4), (raw_control_char, 2), (invalid_utf8, 4), (lone_surrogate, 2),
    (not_an_object, 2), (unrecognised, 3), (wrong_types, 8), (unknown_role, 5), (empty_turns, 8),
    (duplicate_id, 6),
]


def generate_fuzz_corpus(
    n_rows: int = 10_000,
    seed: int = 0,
    *,
    file_name: str = "fuzz.jsonl",
    huge_rows_count: int = 4,
    huge_bytes: int = 1 << 20,
    pathological_rows: int = 2,
    blank_line_rate: float = 0.01,
) -> FuzzCorpus:
    """`n_rows` records (plus a few blank lines) in JSONL bytes, and what each must become.

    Every malformed kind appears at least once for n_rows >= ~100; `huge_rows_count` records
    carry a turn of about `huge_bytes` bytes. The shard key of `file_name` is used for fallback
    ids, so write the bytes under that name (any folder).
    """
    from training.corpus.sources import shard_key

    shard = shard_key(file_name)
    g = _Gen(seed, file_name, shard, huge_bytes)
    kinds, weights = zip(*KINDS)
    special = {}
    # Special rows at seeded positions, spread over the file.
    n_special = min(huge_rows_count + pathological_rows, max(n_rows - len(KINDS), 0))
    positions = g.rng.sample(range(len(KINDS), n_rows), n_special) if n_special else []
    for i, pos in enumerate(positions):
        special[pos] = ("huge", i % 4) if i < huge_rows_count else ("pathological", (i - huge_rows_count) % 2)
    for k in range(n_rows):
        if k < len(KINDS):
            kind = kinds[k]  # every kind at least once, first
        elif k in special:
            what, arg = special[k]
            if what == "huge":
                huge_rows(g, arg)
            else:
                pathological_json(g, arg)
            continue
        else:
            kind = g.rng.choices(kinds, weights)[0]
        kind(g)
        if g.rng.random() < blank_line_rate:
            g.lines.append(g.rng.choice((b"", b"   ", b"\t", b"\r", b" \r")))
            g.blank += 1

    # Line endings: mostly LF, some CRLF (JSON allows the trailing CR); a BOM before line 1; no
    # newline after the last line.
    out = []
    for i, line in enumerate(g.lines):
        out.append(line)
        if i < len(g.lines) - 1:
            out.append(b"\r\n" if g.rng.random() < 0.05 else b"\n")
    data = BOM + b"".join(out)
    return FuzzCorpus(data=data, records=g.records, file_name=file_name, shard=shard, blank_lines=g.blank,
                      huge_bytes=huge_bytes)


def write_fuzz_corpus(path, n_rows: int = 10_000, seed: int = 0, **kwargs) -> FuzzCorpus:
    """Write the fuzz JSONL to `path` (its name sets the shard key) and return the expectations."""
    from pathlib import Path

    path = Path(path)
    corpus = generate_fuzz_corpus(n_rows, seed, file_name=path.name, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(corpus.data)
    return corpus


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.e2e.corpus_fuzz OUT.jsonl [--rows N] [--seed S]`: write a fuzz corpus, print its counts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.e2e.corpus_fuzz", description=main.__doc__)
    parser.add_argument("out", help="the JSONL file to write (its name sets the shard key)")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--huge-bytes", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    corpus = write_fuzz_corpus(args.out, args.rows, args.seed, huge_bytes=args.huge_bytes)
    print(json.dumps(corpus.summary(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
