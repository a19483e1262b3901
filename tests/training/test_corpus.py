"""Corpus ingestion: the four formats in three containers, every reject reason, source-level errors,
listing, S3 through the real (moto) S3 API server conftest starts on loopback, and DuckDB stats."""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port, set_fields
from training.corpus import (
    CONVERSATION_SCHEMA,
    FORMATS,
    SOURCE_REJECTS_SCHEMA,
    CorpusError,
    SourceFile,
    corpus_stats,
    list_sources,
    normalize_record,
    read_source,
    shard_key,
)

def msgs(*turns: tuple[str, object]) -> list[dict]:
    """OpenAI-style turns from (role, content) pairs."""
    return [{"role": role, "content": content} for role, content in turns]


def sharegpt(*turns: tuple[str, object]) -> list[dict]:
    return [{"from": speaker, "value": value} for speaker, value in turns]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]

# The same conversation in each input format, plus a second one with its own id, so every
# container test checks content, ids, source labels and counts for each format.
RECORDS = {
    "openai": [
        {"id": "a1", "messages": CHAT},
        {"id": "a2", "messages": msgs(("user", "hi"), ("assistant", "hello"))},
    ],
    "sharegpt": [
        {"id": "a1", "conversations": sharegpt(("system", "Be brief."), ("human", "What is 2+2?"), ("gpt", "4"))},
        {"id": "a2", "conversations": sharegpt(("human", "hi"), ("gpt", "hello"))},
    ],
    "prompt_completion": [
        {"id": "a1", "system": "Be brief.", "prompt": "What is 2+2?", "completion": "4"},
        {"id": "a2", "system": None, "prompt": "hi", "completion": "hello"},
    ],
    "alpaca": [
        {"id": "a1", "system": "Be brief.", "instruction": "What is 2+2?", "input": "", "output": "4"},
        {"id": "a2", "system": "", "instruction": "hi", "input": None, "output": "hello"},
    ],
}
EXPECTED_MESSAGES = [CHAT, msgs(("user", "hi"), ("assistant", "hello"))]
# question files (MT-Bench shape, here without category): questions only, the replies left for the target
RECORDS["question"] = [{"question_id": "a1", "turns": ["What is 2+2?", "And 3+3?"]}, {"question_id": "a2", "turns": ["hi"]}]
EXPECTED = {"question": [msgs(("user", "What is 2+2?"), ("assistant", ""), ("user", "And 3+3?"), ("assistant", "")),
                         msgs(("user", "hi"), ("assistant", ""))]}


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_json(path: Path, records) -> str:
    path.write_text(json.dumps(records, indent=2))
    return str(path)


def write_parquet(path: Path, records) -> str:
    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


WRITERS = {"jsonl": write_jsonl, "json": write_json, "parquet": write_parquet}


def normalize(record, row_index=7):
    return normalize_record(record, source="f.jsonl", row_index=row_index, shard="f")


def reason_of(record) -> str:
    row, problem = normalize(record)
    assert row is None, row
    return problem[0]


def user_assistant(user="q", assistant="a"):
    return msgs(("user", user), ("assistant", assistant))


# -- formats × containers ------------------------------------------------------------------


@pytest.mark.parametrize("container", sorted(WRITERS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_in_each_container(tmp_path, fmt, container):
    url = WRITERS[container](tmp_path / f"part-{fmt}.{container}", RECORDS[fmt])
    result = read_source(url)

    assert result.rows.schema.equals(CONVERSATION_SCHEMA)
    assert result.rejects.schema.equals(SOURCE_REJECTS_SCHEMA)
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    assert (result.n_read, result.n_accepted, result.n_rejected) == (2, 2, 0)
    assert result.formats == {f: (2 if f == fmt else 0) for f in FORMATS}
    rows = result.rows.to_pylist()
    assert [set_fields(r["messages"]) for r in rows] == EXPECTED.get(fmt, EXPECTED_MESSAGES)
    assert [r["id"] for r in rows] == ["a1", "a2"]
    assert {r["source"] for r in rows} == {f"part-{fmt}.{container}:{fmt}"}


def test_sharegpt_role_aliases():
    names = ["system", "human", "gpt", "user", "assistant", "human", "chatgpt", "human", "bing", "human", "bard"]
    record = {"conversations": sharegpt(*((n, f"t{i}") for i, n in enumerate(names)))}
    row, problem = normalize(record)
    assert problem is None
    assert [m["role"] for m in row["messages"]] == ["system"] + ["user", "assistant"] * 5


def test_alpaca_joins_instruction_and_input():
    row, _ = normalize({"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    assert row["messages"] == msgs(("user", "Translate.\n\nHallo"), ("assistant", "Hello"))
    row, _ = normalize({"instruction": "", "input": "Only input", "output": "ok"})
    assert row["messages"][0] == {"role": "user", "content": "Only input"}


def test_messages_wins_over_other_fields():
    # UltraChat rows carry both `prompt` and `messages`; the full conversation is the data.
    row, _ = normalize({"prompt": "q", "completion": "x", "messages": user_assistant("q", "long answer")})
    assert row["source"] == "f.jsonl:openai"
    assert row["messages"][1]["content"] == "long answer"


def test_turn_order_rules():
    consecutive = msgs(("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d"))
    assert normalize({"messages": consecutive})[0]["messages"] == consecutive
    opens_with_assistant = msgs(("assistant", "Hi!"), ("user", "q"), ("assistant", "a"))
    assert normalize({"messages": opens_with_assistant})[1] is None
    empty_system = msgs(("system", ""), ("user", "q"), ("assistant", "a"))
    assert normalize({"messages": empty_system})[0]["messages"] == empty_system
    trailing_user = msgs(("user", "q"), ("assistant", "a"), ("user", "thanks"))
    assert normalize({"messages": trailing_user})[1] is None


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_is_kept_apart_from_the_reply(key):
    row, _ = normalize({"messages": [{"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4", key: "Two and two."}]})
    assert row["messages"][1] == {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}
    # a reply cut while reasoning: content null or empty, reasoning only
    for content in (None, ""):
        row, _ = normalize({"messages": [{"role": "user", "content": "2+2?"},
                                         {"role": "assistant", "content": content, key: "Two and"}]})
        assert row["messages"][1] == {"role": "assistant", "content": "", "reasoning_content": "Two and"}
    assert reason_of({"messages": [{"role": "user", "content": "q", key: "r"}, {"role": "assistant", "content": "a"}]}) \
        == "misplaced_reasoning"
    assert reason_of({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, key: 3}]}) \
        == "non_string_content"


def test_tool_calling_conversations_normalize():
    """OpenAI tools / tool_calls (arguments as JSON text) / tool results, and ShareGPT function-calling
    dumps (function_call / observation turns, tools as JSON text), become one shape."""
    from tests.training.test_chat_templates import ADD_TOOL, TOOL_RECORD

    call = '[{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}'
    row, _ = normalize(TOOL_RECORD)
    assert json.loads(row["tools"]) == [ADD_TOOL]
    assert row["messages"] == [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": call + ', "id": "call_1"}]'},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "assistant", "content": "2 + 2 is 4."}]
    glaive = {"tools": json.dumps([ADD_TOOL["function"]]), "conversations": [
        {"from": "human", "value": "What is 2 + 2?"},
        {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 2}}'},
        {"from": "observation", "value": "4"}, {"from": "gpt", "value": "2 + 2 is 4."}]}
    row, _ = normalize(glaive)
    assert json.loads(row["tools"]) == [ADD_TOOL]  # a bare function definition in OpenAI's shape
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": call + "}]"}


def test_content_is_kept_verbatim():
    messages = msgs(("user", "  spaced\n"), ("assistant", "\tx  "))
    assert normalize({"messages": messages})[0]["messages"] == messages


# -- ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"id": "abc"}, "abc"),
        ({"id": 42}, "42"),
        ({"question_id": 81}, "81"),
        ({"id": "x", "question_id": 81}, "x"),
        ({"id": ""}, "f:7"),
        ({}, "f:7"),
    ],
)
def test_row_id(fields, expected):
    row, _ = normalize({**fields, "messages": user_assistant()})
    assert row["id"] == expected


def test_duplicate_ids_keep_the_first_accepted(tmp_path):
    records = [
        {"id": "x", "messages": msgs(("user", "no answer"))},  # rejected, so not the "first"
        {"id": "x", "messages": user_assistant("q", "first")},
        {"id": "y", "messages": user_assistant()},
        {"id": "x", "messages": user_assistant("q", "second")},
    ]
    result = read_source(write_jsonl(tmp_path / "dups.jsonl", records))
    kept = [(r["id"], r["messages"][1]["content"]) for r in result.rows.to_pylist()]
    assert kept == [("x", "first"), ("y", "a")]
    rejects = result.rejects.to_pylist()
    assert [(r["row_index"], r["id"], r["reason"]) for r in rejects] == [
        (1, "x", "no_assistant_turn"),
        (4, "x", "duplicate_id"),
    ]
    assert "row 2" in rejects[1]["detail"]


# -- row-level rejects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "not_an_object"),
        ("text", "not_an_object"),
        ({"text": "hello", "label": 1}, "unrecognised_format"),
        ({"prompt": "only a prompt"}, "unrecognised_format"),
        ({"messages": msgs(("critic", "{}"), ("user", "q"), ("assistant", "a"))}, "unknown_role:critic"),
        ({"conversations": sharegpt(("narrator", "x"), ("gpt", "y"))}, "unknown_role:narrator"),
        ({"messages": msgs(("user", "q"), ("assistant", "a")), "tools": "not json"}, "invalid_tools"),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "invalid_tool_call"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}]}, "invalid_tool_call"),
        ({"conversations": sharegpt(("human", "q"), ("function_call", "not json"))}, "invalid_tool_call"),
        ({"messages": msgs((3, "x"))}, "unknown_role:<number>"),
        ({"messages": msgs(("user", "q"), ("assistant", "  \n"))}, "empty_content"),
        ({"messages": msgs(("user", ""), ("assistant", "a"))}, "empty_content"),
        ({"prompt": "q", "completion": ""}, "empty_content"),
        ({"instruction": "", "input": "", "output": "a"}, "empty_content"),
        ({"messages": msgs(("user", [{"type": "text", "text": "q"}]), ("assistant", "a"))}, "non_string_content"),
        ({"messages": msgs(("user", "q"), ("assistant", None))}, "non_string_content"),
        ({"prompt": 5, "completion": "a"}, "non_string_content"),
        ({"instruction": "q", "input": ["x"], "output": "a"}, "non_string_content"),
        ({"messages": msgs(("system", "s"), ("user", "q"))}, "no_assistant_turn"),
        ({"messages": msgs(("user", "q"), ("assistant", "a"), ("system", "late"))}, "misplaced_system"),
        ({"messages": []}, "empty_conversation"),
        ({"messages": "hello"}, "invalid_turns"),
        ({"messages": ["hello"]}, "invalid_turn"),
        ({"messages": [{"content": "no role"}]}, "invalid_turn"),
        ({"messages": [{"role": "user"}]}, "invalid_turn"),
        ({"id": 1.5, "messages": user_assistant()}, "invalid_id"),
        ({"id": True, "messages": user_assistant()}, "invalid_id"),
        ({"messages": user_assistant("bad \ud800 surrogate")}, "invalid_utf8"),
    ],
)
def test_reject_reasons(record, reason):
    assert reason_of(record) == reason


def test_jsonl_line_problems_are_rejected_one_by_one(tmp_path):
    good = json.dumps({"messages": user_assistant()}).encode()
    long_bad = b"{" + b"x" * 2000
    lines = [
        b"\xef\xbb\xbf" + good,  # 1: a BOM on the first line is not part of the record
        b"{not json",  # 2
        b"",  # blank lines are not records
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',  # 4: Latin-1 byte
        b"   ",
        b"[1, 2]",  # 6
        long_bad,  # 7
        good.replace(b'"a"', b'"b"'),  # 8: fallback id differs by line, so no duplicate
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\r\n".join(lines[:3]) + b"\n" + b"\n".join(lines[3:]))
    result = read_source(str(path))

    assert (result.n_read, result.n_accepted, result.n_rejected) == (6, 2, 4)
    assert result.rows.column("id").to_pylist() == ["mixed:1", "mixed:8"]
    rejects = {r["row_index"]: r for r in result.rejects.to_pylist()}
    assert {i: r["reason"] for i, r in rejects.items()} == {
        2: "malformed_json", 4: "invalid_utf8", 6: "not_an_object", 7: "malformed_json",
    }
    assert rejects[4]["raw"].startswith('{"messages"') and "\\xe9" in rejects[4]["raw"]
    assert len(rejects[7]["raw"]) == 500
    assert all(r["source_url"] == str(path) for r in rejects.values())


def test_reject_text_is_always_storable(tmp_path):
    # "\ud800" is valid JSON but not storable as UTF-8; the reject row shows it escaped.
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"id": "s1", "messages": [{"role": "\\ud800", "content": "x"}]}\n')
    result = read_source(str(path))
    reject = result.rejects.to_pylist()[0]
    assert (reject["id"], reject["reason"]) == ("s1", "unknown_role:\\ud800")
    assert "\\ud800" in reject["raw"]


def test_tables_round_trip_through_parquet(tmp_path):
    result = read_source(write_jsonl(tmp_path / "rt.jsonl", [*RECORDS["openai"], {"bad": 1}]))
    for table, schema in [(result.rows, CONVERSATION_SCHEMA), (result.rejects, SOURCE_REJECTS_SCHEMA)]:
        pq.write_table(table, tmp_path / "t.parquet")
        back = pq.read_table(tmp_path / "t.parquet")
        assert back.schema.equals(schema) and back.equals(table)


def test_json_list_element_rejects_use_positions(tmp_path):
    records = [
        {"messages": user_assistant()},
        "just text",
        {"prompt": "p", "completion": "c", "id": "z"},
        {"id": "w", "messages": []},
    ]
    result = read_source(write_json(tmp_path / "list.json", records))
    assert result.rows.column("id").to_pylist() == ["list:0", "z"]
    assert [(r["row_index"], r["id"], r["reason"], r["raw"]) for r in result.rejects.to_pylist()] == [
        (1, None, "not_an_object", '"just text"'),
        (3, "w", "empty_conversation", '{"id": "w", "messages": []}'),
    ]


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps({"messages": user_assistant()}) + "\n{oops\n")
    result = read_source(str(path))
    assert (result.n_accepted, result.n_rejected) == (1, 1)
    assert result.rejects.column("reason").to_pylist() == ["malformed_json"]


def test_parquet_mixed_formats_and_invalid_utf8_rows(tmp_path):
    # A union of columns: each row uses its non-null ones. Row 1's prompt is not UTF-8, which
    # Parquet does not check on read; only that row is rejected.
    prompts = pa.array([None, b"\xff\xfe", b"fine"], pa.binary()).view(pa.string())
    table = pa.table({
        "messages": pa.array([user_assistant(), None, None]),
        "prompt": prompts,
        "completion": ["x", "y", "z"],
        "question_id": pa.array([10, 11, 12], pa.int64()),
    })
    path = tmp_path / "mixed.parquet"
    pq.write_table(table, path)
    result = read_source(str(path))
    assert result.rows.column("id").to_pylist() == ["10", "12"]
    assert result.formats["openai"] == 1 and result.formats["prompt_completion"] == 1
    assert [(r["row_index"], r["reason"]) for r in result.rejects.to_pylist()] == [(1, "invalid_utf8")]


def test_counts_always_add_up(tmp_path):
    # Every kind of line in a pseudo-random mix: nothing may be lost or counted twice.
    kinds = [
        json.dumps({"messages": user_assistant()}),
        json.dumps({"messages": user_assistant()})[:-3],
        json.dumps({"conversations": [{"from": "human", "value": "q"}]}),
        json.dumps({"prompt": "q", "completion": "a", "id": "same"}),
        json.dumps({"instruction": "q", "output": "a"}),
        json.dumps(["no"]),
        "",
    ]
    lines = [kinds[(i * 7919) % len(kinds)] for i in range(300)]
    path = tmp_path / "many.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = read_source(str(path))
    assert result.n_read == sum(1 for line in lines if line) == result.n_accepted + result.n_rejected
    assert result.n_accepted == result.rows.num_rows and result.n_rejected == result.rejects.num_rows
    assert sum(result.formats.values()) == result.n_accepted
    assert result.reject_reasons["duplicate_id"] == lines.count(kinds[3]) - 1


# -- source-level errors -------------------------------------------------------------------


def test_missing_file(tmp_path):
    url = str(tmp_path / "nope.jsonl")
    with pytest.raises(CorpusError, match="nope.jsonl: no such file"):
        read_source(url)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("object.json", b'{\n  "data": [1, 2]\n}\n', "neither a JSON list nor JSONL"),
        ("scalar.json", b'"just a string"', "neither a JSON list nor JSONL"),
        ("broken.json", b'[{"prompt": "p", "completion": "c"},\n {"prompt": ', "malformed JSON at line 2"),
        ("latin1.json", b'[{"prompt": "caf\xe9", "completion": "c"}]', "invalid UTF-8 at byte 16"),
        ("garbage.parquet", b"PAR1 this is not parquet at all", "not a readable Parquet file"),
        ("notes.txt", b"hello", "not a corpus file"),
    ],
)
def test_unreadable_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message) as info:
        read_source(str(path))
    assert name in str(info.value)


def test_empty_files_hold_no_records(tmp_path):
    for name in ("empty.jsonl", "blank.json"):
        (tmp_path / name).write_text("\n  \n")
        result = read_source(str(tmp_path / name))
        assert (result.n_read, result.rows.num_rows, result.rejects.num_rows) == (0, 0, 0)


# -- listing -------------------------------------------------------------------------------


def test_list_sources_folder_glob_and_file(tmp_path):
    for name in ["b-01.jsonl", "a 02.parquet", "c.JSON", "notes.txt", ".hidden.jsonl", "_SUCCESS"]:
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("")

    uri = tmp_path.as_uri()
    assert list_sources(str(tmp_path)) == [
        SourceFile(f"{uri}/a 02.parquet", "a-02"),
        SourceFile(f"{uri}/b-01.jsonl", "b-01"),
        SourceFile(f"{uri}/c.JSON", "c"),
    ]
    assert list_sources(uri) == list_sources(str(tmp_path))
    assert [s.shard for s in list_sources(f"{tmp_path}/*.jsonl")] == ["b-01"]
    assert [s.shard for s in list_sources(f"{tmp_path}/**/*.jsonl")] == ["b-01", "d"]
    assert list_sources(f"{tmp_path}/*.nothing.jsonl") == []
    assert list_sources(str(tmp_path / "b-01.jsonl")) == [SourceFile(f"{uri}/b-01.jsonl", "b-01")]


def test_list_sources_errors(tmp_path):
    with pytest.raises(CorpusError, match="missing does not exist"):
        list_sources(str(tmp_path / "missing"))
    with pytest.raises(CorpusError, match="missing does not exist"):
        list_sources(str(tmp_path / "missing" / "*.jsonl"))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(CorpusError, match="not a corpus file"):
        list_sources(str(tmp_path / "notes.txt"))
    (tmp_path / "part 1.jsonl").write_text("")
    (tmp_path / "part-1.parquet").write_text("")
    with pytest.raises(CorpusError, match="both map to shard key 'part-1'"):
        list_sources(str(tmp_path))


@pytest.mark.parametrize(
    "name, key",
    [
        ("sharegpt-00003.jsonl", "sharegpt-00003"),
        ("my data (v2).parquet", "my-data-v2"),
        ("x...y.json", "x.y"),
        ("..weird..jsonl", "weird"),
        ("s3://b/p/Ünïcode_ok.JSONL", "n-code_ok"),
    ],
)
def test_shard_key_sanitizing(name, key):
    assert shard_key(name) == key


def test_shard_key_without_usable_characters():
    with pytest.raises(CorpusError, match="no usable shard key"):
        shard_key("/data/ü.jsonl")


# -- S3 (conftest's moto server on loopback) -----------------------------------------------


def test_s3_list_and_read_match_local(s3_store, tmp_path):
    local = {
        "sharegpt-00001.jsonl": write_jsonl(tmp_path / "sharegpt-00001.jsonl", [*RECORDS["sharegpt"], "bad"]),
        "alpaca.json": write_json(tmp_path / "alpaca.json", RECORDS["alpaca"]),
        "chat.parquet": write_parquet(tmp_path / "chat.parquet", RECORDS["openai"]),
    }
    for name, path in local.items():
        s3_store.write_bytes(f"in/{name}", Path(path).read_bytes())
    s3_store.write_bytes("in/readme.md", b"not corpus")
    s3_store.write_bytes("in/nested/deeper.jsonl", b"")
    prefix = s3_store.url("in")

    sources = list_sources(prefix)
    assert sources == [
        SourceFile(f"{prefix}/alpaca.json", "alpaca"),
        SourceFile(f"{prefix}/chat.parquet", "chat"),
        SourceFile(f"{prefix}/sharegpt-00001.jsonl", "sharegpt-00001"),
    ]
    assert list_sources(f"{prefix}/") == sources
    assert [s.shard for s in list_sources(f"{prefix}/*.json*")] == ["alpaca", "sharegpt-00001"]
    assert list_sources(f"{prefix}/chat.parquet") == [sources[1]]

    for source in sources:
        remote = read_source(source.url)
        here = read_source(local[source.url.rsplit("/", 1)[-1]])
        assert remote.rows.equals(here.rows)
        assert remote.rejects.drop_columns(["source_url"]).equals(here.rejects.drop_columns(["source_url"]))
        assert set(remote.rejects.column("source_url").to_pylist()) <= {source.url}
    assert read_source(sources[2].url).reject_reasons == {"not_an_object": 1}


def test_s3_missing_objects(s3_store):
    missing = s3_store.url("none.jsonl")
    with pytest.raises(CorpusError, match=f"{missing}: no such file"):
        read_source(missing)
    with pytest.raises(CorpusError, match=f"{s3_store.url('empty-prefix')} does not exist"):
        list_sources(s3_store.url("empty-prefix"))


def test_unreachable_s3_endpoint_fails_fast(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    def fails_quickly(call, url):
        start = time.monotonic()
        with pytest.raises(CorpusError, match="EndpointConnectionError") as info:
            call(url)
        assert url in str(info.value)
        assert time.monotonic() - start < 20

    fails_quickly(read_source, "s3://bucket/corpus/a.jsonl")  # the module's own retry bound
    # An AWS_MAX_ATTEMPTS the deployment sets wins over that bound (and keeps this test short).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fails_quickly(list_sources, "s3://bucket/corpus")


# -- stats ---------------------------------------------------------------------------------


def test_corpus_stats_over_written_parquet(tmp_path):
    records = [
        {"messages": CHAT},
        {"conversations": sharegpt(("human", "héllo"), ("gpt", "wörld!"), ("human", "more"), ("gpt", "ok"))},
        {"prompt": "p", "completion": "c"},
    ]
    result = read_source(write_jsonl(tmp_path / "s.jsonl", records))
    path = tmp_path / "rows.parquet"
    pq.write_table(result.rows, path)

    stats = corpus_stats(duckdb.connect(), str(path))
    turns = [m for row in result.rows.to_pylist() for m in row["messages"]]
    assistant = [m for m in turns if m["role"] == "assistant"]
    assert stats == {
        "rows": 3,
        "turns": 9,
        "system_turns": 1,
        "user_turns": 4,
        "assistant_turns": 4,
        "characters": sum(len(m["content"]) for m in turns),
        "assistant_characters": sum(len(m["content"]) for m in assistant),
        "mean_turns_per_row": 3.0,
    }
    assert stats["assistant_characters"] == len("4wörld!okc")


def test_corpus_stats_empty(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(CONVERSATION_SCHEMA.empty_table(), path)
    stats = corpus_stats(duckdb.connect(), str(path))
    assert stats["rows"] == 0 and stats["turns"] == 0 and stats["mean_turns_per_row"] == 0.0


def test_row_source_keeps_the_records_own_domain():
    from training.corpus import normalize_record

    base = {"prompt": "p", "completion": "c"}
    for extra, expected in [({}, "f.jsonl:prompt_completion"), ({"source": "demo/arithmetic"}, "demo/arithmetic"),
                            ({"category": "writing"}, "writing"), ({"domain": " math "}, "math"),
                            ({"source": ""}, "f.jsonl:prompt_completion"), ({"source": 3}, "f.jsonl:prompt_completion")]:
        row, err = normalize_record({**base, **extra}, source="f.jsonl", row_index=0, shard="f")
        assert err is None and row["source"] == expected, extra


def test_heldout_split_is_by_id_and_partitions_the_table():
    import pyarrow as pa

    from training.corpus import is_heldout, split_heldout

    ids = [f"row-{i}" for i in range(4000)]
    table = pa.table({"id": ids, "n": list(range(4000))})
    train, held = split_heldout(table, 0.1)
    assert train.num_rows + held.num_rows == 4000
    assert 300 < held.num_rows < 500
    assert not set(train.column("id").to_pylist()) & set(held.column("id").to_pylist())
    # Row order and shard composition do not matter: membership is a function of the id.
    _, held_rev = split_heldout(table.take(list(range(3999, -1, -1))), 0.1)
    assert sorted(held_rev.column("id").to_pylist()) == sorted(held.column("id").to_pylist())
    assert all(is_heldout(i, 0.1) for i in held.column("id").to_pylist())
    assert split_heldout(table, 0.0)[1].num_rows == 0
