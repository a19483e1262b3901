"""tokenize_conversations: table contract, truncation, rejects, template handling, stats over Parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import training.tokenization as tokenize_mod
from tests.training.test_chat_templates import (
    CASES,
    MISTRAL,
    QWEN25,
    decode,
    family_tokenizer,
    make_tokenizer,
    masked_runs,
    msg,
)
from training.tokenization import (
    REJECTS_SCHEMA,
    TOKENIZED_SCHEMA,
    ChatTemplateError,
    TokenizeConfig,
    tokenize_conversations,
    tokenized_stats,
)

# ChatML with {% generation %} markers around content + <|im_end|>, as the demo target ships it
MARKED = (
    "{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def conversations(n: int = 12) -> list[dict]:
    names = sorted(CASES)
    return [{"id": f"r{i}", "messages": CASES[names[i % len(names)]]} for i in range(n)]


@pytest.fixture(scope="module")
def chatml():
    return family_tokenizer("chatml")


def test_table_contract(chatml):
    res = tokenize_conversations(chatml, conversations(), TokenizeConfig())
    assert res.table.schema == TOKENIZED_SCHEMA and res.rejects.schema == REJECTS_SCHEMA
    assert (res.n_in, res.n_ok, res.n_rejected) == (12, 12, 0)
    assert res.table.column("id").to_pylist() == [f"r{i}" for i in range(12)]
    for row in res.table.to_pylist():
        assert len(row["input_ids"]) == len(row["loss_mask"]) == row["n_tokens"]
        assert set(row["loss_mask"]) == {0, 1}
        assert not row["truncated"]


def test_arrow_input_equals_list_input(chatml):
    convs = conversations()
    table = pa.table({
        "id": [c["id"] for c in convs],
        "messages": pa.array([c["messages"] for c in convs],
                             pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        "source": ["test"] * len(convs),
    })
    a = tokenize_conversations(chatml, convs, TokenizeConfig())
    b = tokenize_conversations(chatml, table, TokenizeConfig())
    assert a.table.equals(b.table)


def test_batches_do_not_change_results(chatml, monkeypatch):
    whole = tokenize_conversations(chatml, conversations(40), TokenizeConfig(max_length=40))
    monkeypatch.setattr(tokenize_mod, "BATCH_CHARS", 700)  # a few conversations per batch
    batched = tokenize_conversations(chatml, conversations(40), TokenizeConfig(max_length=40))
    assert batched.table.equals(whole.table) and batched.rejects.equals(whole.rejects)


def test_truncation_keeps_the_head_and_flags_it(chatml):
    messages = CASES["multi_system"]
    full = tokenize_conversations(chatml, [{"id": "a", "messages": messages}], TokenizeConfig()).table.to_pylist()[0]
    cut = tokenize_conversations(chatml, [{"id": "a", "messages": messages}], TokenizeConfig(max_length=60))
    (row,) = cut.table.to_pylist()
    assert row["truncated"] and row["n_tokens"] == 60
    assert row["input_ids"] == full["input_ids"][:60] and row["loss_mask"] == full["loss_mask"][:60]


def test_assistant_truncated_away_is_rejected(chatml):
    long_prompt = " ".join(["word"] * 300)
    rows = [{"id": "long", "messages": [msg("user", long_prompt), msg("assistant", "Short.")]},
            {"id": "ok", "messages": CASES["single"]}]
    res = tokenize_conversations(chatml, rows, TokenizeConfig(max_length=64))
    assert res.rejects.to_pylist()[0]["id"] == "long"
    assert res.rejects.column("reason").to_pylist() == ["assistant_truncated"]
    assert res.table.column("id").to_pylist() == ["ok"]
    assert (res.n_in, res.n_ok, res.n_rejected) == (2, 1, 1)


def test_row_rejects_with_reasons(chatml):
    mistral = make_tokenizer(MISTRAL, bos="<s>", eos="</s>")
    rows = [
        {"id": "no_asst", "messages": [msg("user", "Hello?")]},
        {"id": "bad", "messages": [{"role": "user", "content": None}, msg("assistant", "x")]},
        {"id": "empty", "messages": []},
        {"id": "not_alternating", "messages": [msg("user", "a"), msg("user", "b"), msg("assistant", "c")]},
        {"id": "fine", "messages": CASES["single"]},
    ]
    res = tokenize_conversations(mistral, rows, TokenizeConfig())
    reasons = {r["id"]: r["reason"] for r in res.rejects.to_pylist()}
    assert reasons == {"no_asst": "no_assistant", "bad": "invalid_messages", "empty": "invalid_messages",
                       "not_alternating": "template_error"}
    assert "alternate" in res.rejects.to_pylist()[3]["detail"]
    assert res.table.column("id").to_pylist() == ["fine"]
    assert res.n_in == res.n_ok + res.n_rejected == 5


def test_empty_result_is_rejected():
    no_eos = make_tokenizer(None, bos=None, eos=None)
    rows = [{"id": "blank", "messages": [msg("user", "Say nothing."), msg("assistant", "")]}]
    res = tokenize_conversations(no_eos, rows, TokenizeConfig(template="plain"))
    assert res.rejects.column("reason").to_pylist() == ["empty"] and res.table.num_rows == 0
    assert res.table.schema == TOKENIZED_SCHEMA


def test_template_modes(chatml):
    base = make_tokenizer(None, bos="<s>", eos="</s>")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenize_conversations(base, conversations(2), TokenizeConfig(template="chat"))
    auto = tokenize_conversations(base, conversations(2), TokenizeConfig(template="auto"))
    plain = tokenize_conversations(base, conversations(2), TokenizeConfig(template="plain"))
    assert auto.table.equals(plain.table)
    # plain on a tokenizer that has a chat template ignores the template
    res = tokenize_conversations(chatml, [{"id": "a", "messages": CASES["single"]}], TokenizeConfig(template="plain"))
    text = decode(chatml, res.table.column("input_ids")[0].as_py())
    assert text == "What is twenty plus four?The answer is twenty four.<|im_end|>"
    with pytest.raises(ValueError, match="template must be"):
        tokenize_conversations(chatml, conversations(2), TokenizeConfig(template="chatml"))


def test_template_whose_generation_prompt_is_not_the_turn_header_fails_clearly():
    broken = QWEN25.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant:\\n' }}")
    assert broken != QWEN25
    with pytest.raises(ChatTemplateError, match="generation prompt does not start assistant message"):
        tokenize_conversations(make_tokenizer(broken, eos="<|im_end|>"), conversations(2), TokenizeConfig())


def test_template_failing_on_a_plain_conversation_fails_clearly():
    raising = "{{ raise_exception('this template needs tools') }}"
    with pytest.raises(ChatTemplateError, match="needs tools"):
        tokenize_conversations(make_tokenizer(raising, eos="<|im_end|>"), conversations(2), TokenizeConfig())


def test_template_problem_on_one_row_is_a_reject():
    # renders a different header for answers starting with '#': its generation prompt cannot start them
    odd = QWEN25.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        "{%- if message.role == 'assistant' and message.content.startswith('#') %}"
        "{{- '<|im_start|>bot\\n' + message.content + '<|im_end|>\\n' }}{%- else %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}")
    tok = make_tokenizer(odd, eos="<|im_end|>")
    rows = [{"id": "hash", "messages": [msg("user", "Title?"), msg("assistant", "# Heading")]},
            {"id": "fine", "messages": CASES["single"]}]
    res = tokenize_conversations(tok, rows, TokenizeConfig())
    (rej,) = res.rejects.to_pylist()
    assert rej["id"] == "hash" and rej["reason"] == "template_mismatch" and "prefix" in rej["detail"]
    assert res.table.column("id").to_pylist() == ["fine"]


def test_generation_markers_match_transformers_assistant_mask():
    tok = make_tokenizer(MARKED, eos="<|im_end|>")
    for messages in CASES.values():
        res = tokenize_conversations(tok, [{"id": "m", "messages": messages}], TokenizeConfig())
        (row,) = res.table.to_pylist()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        ref = tok.apply_chat_template(messages[: last + 1], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert row["input_ids"] == list(ref["input_ids"])
        assert row["loss_mask"] == list(ref["assistant_masks"])
        assert masked_runs(tok, row) == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def test_generation_markers_around_content_only_still_take_the_end_of_turn():
    content_only = MARKED.replace("message['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}",
                                  "message['content'] -}}{%- endgeneration -%}{{- '<|im_end|>\n' -}}")
    assert content_only != MARKED
    tok = make_tokenizer(content_only, eos="<|im_end|>")
    messages = CASES["multi_system"]
    (row,) = tokenize_conversations(tok, [{"id": "m", "messages": messages}], TokenizeConfig()).table.to_pylist()
    assert masked_runs(tok, row) == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def test_tokenizer_truncation_settings_are_ignored_and_left_alone(chatml):
    tok = family_tokenizer("chatml")
    tok.backend_tokenizer.enable_truncation(max_length=5)
    res = tokenize_conversations(tok, conversations(3), TokenizeConfig())
    ref = tokenize_conversations(chatml, conversations(3), TokenizeConfig())
    assert res.table.equals(ref.table)
    assert tok.backend_tokenizer.truncation["max_length"] == 5


def test_stats_from_parquet_with_duckdb(chatml, tmp_path):
    import duckdb

    res = tokenize_conversations(chatml, conversations(20), TokenizeConfig(max_length=48))
    path = str(tmp_path / "tok.parquet")
    pq.write_table(res.table, path)
    stats = tokenized_stats(duckdb.connect(), path)
    n_tokens = np.asarray(res.table.column("n_tokens").to_pylist())
    masked = sum(sum(m) for m in res.table.column("loss_mask").to_pylist())
    assert stats["rows"] == res.table.num_rows
    assert stats["tokens"] == n_tokens.sum() and stats["masked_tokens"] == masked
    assert stats["mask_ratio"] == pytest.approx(masked / n_tokens.sum())
    assert stats["truncation_rate"] == pytest.approx(np.mean(res.table.column("truncated").to_pylist()))
    buckets = 2 ** np.ceil(np.log2(n_tokens)).astype(int)
    assert stats["length_histogram"] == [
        {"tokens_from": int(b) // 2 + 1, "tokens_to": int(b), "rows": int((buckets == b).sum())} for b in np.unique(buckets)]


def test_empty_input_and_empty_stats(chatml, tmp_path):
    import duckdb

    res = tokenize_conversations(chatml, [], TokenizeConfig())
    assert (res.n_in, res.n_ok, res.n_rejected, res.table.num_rows) == (0, 0, 0, 0)
    path = str(tmp_path / "empty.parquet")
    pq.write_table(res.table, path)
    stats = tokenized_stats(duckdb.connect(), path)
    assert stats == {"rows": 0, "tokens": 0, "masked_tokens": 0, "mask_ratio": 0.0, "truncation_rate": 0.0,
                     "length_histogram": []}


def test_split_conversation_counts_once():
    """A Qwen3-style split gives two rows for one conversation; the counts stay per conversation."""
    from tests.training.test_chat_templates import QWEN3

    tok = make_tokenizer(QWEN3, eos="<|im_end|>")
    messages = [msg("user", "Hi!"), msg("assistant", "<think>\nGreet.\n</think>\n\nHello."),
                msg("user", "Bye!"), msg("assistant", "<think>\nPart.\n</think>\n\nGoodbye.")]
    rows = [{"id": "q", "messages": messages}, {"id": "none", "messages": [msg("user", "?")]}]
    res = tokenize_conversations(tok, rows, TokenizeConfig())
    assert res.table.column("id").to_pylist() == ["q#1", "q"]
    assert (res.n_in, res.n_ok, res.n_rejected) == (2, 1, 1)
    # max_length cuts the final view's answer away but not the first view's: the dropped view is in
    # the rejects, and the conversation still counts as kept
    res = tokenize_conversations(tok, [{"id": "q", "messages": messages}], TokenizeConfig(max_length=18))
    assert res.table.column("id").to_pylist() == ["q#1"]
    assert [(r["id"], r["reason"]) for r in res.rejects.to_pylist()] == [("q", "assistant_truncated")]
    assert (res.n_in, res.n_ok, res.n_rejected) == (1, 1, 0)


def test_ids_past_the_model_vocab_are_an_error_naming_id_row_and_sizes(chatml):
    """A tokenizer whose added tokens have no embedding rows (ids >= the model's vocab_size) fails here,
    not later as a bare IndexError in hidden_states."""
    convs = conversations(4)
    ok = tokenize_conversations(chatml, convs, TokenizeConfig(vocab_size=len(chatml)))
    assert ok.table.num_rows == len(convs)
    row0 = ok.table["input_ids"][0].as_py()
    vocab = max(row0)  # the model has one embedding row too few for the first row's largest id
    with pytest.raises(tokenize_mod.TokenizeError) as err:
        tokenize_conversations(chatml, convs, TokenizeConfig(vocab_size=vocab))
    text = str(err.value)
    assert f"token {row0.index(vocab)}: id {vocab} " in text and f"vocab_size {vocab}" in text
    assert f"has {len(chatml)} tokens" in text and f"row '{ok.table['id'][0].as_py()}'" in text


def test_no_trainable_token_fails_quoting_the_reject_reasons(chatml):
    """max_length 8: every row is rejected as assistant_truncated; the shard must fail saying so."""
    convs = conversations(5)
    res = tokenize_conversations(chatml, convs, TokenizeConfig(max_length=4))
    assert res.table.num_rows == 0 and res.n_rejected == len(convs)
    with pytest.raises(tokenize_mod.TokenizeError, match=r"shard 7: no trainable token: all 5 conversations were "
                                                         r"rejected; reasons over their 5 rows: assistant_truncated x5 "
                                                         r"\(e\.g\. .*max_length=4"):
        tokenize_mod.check_trainable(res, "shard 7")
    tokenize_mod.check_trainable(tokenize_conversations(chatml, convs), "shard 7")  # rows: fine
    tokenize_mod.check_trainable(tokenize_conversations(chatml, []), "shard 7")  # nothing in: nothing to say


# No special token closes a turn: the mask ends at the reply's last character, whatever its bytes.
NO_EOT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
          "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.mark.parametrize("reply", ["ok 😀", "4 ✓", "答案是四", "fine 👍🏽", "done é", "plain end."])
def test_reply_ending_in_a_multi_byte_character_masks_all_its_byte_tokens(reply):
    from training.targets.tiny import build_tokenizer

    tok = build_tokenizer()  # byte-level without merges: 😀 is four byte tokens over one character
    tok.chat_template = NO_EOT
    res = tokenize_conversations(tok, [{"id": "a", "messages": [msg("user", "x"), msg("assistant", reply)]}])
    (row,) = res.table.to_pylist()
    masked = [t for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    assert tok.decode(masked) == reply
    assert masked == tok.encode(reply, add_special_tokens=False)


# Llama-3.2's system block, cut down: today's date from the clock (Mistral-Small-2501 and Granite do the same)
DATED = ("<|im_start|>system\nCutting Knowledge Date: December 2023\nToday Date: {{ strftime_now('%d %b %Y') }}"
         "<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def clock(monkeypatch):
    """Sets the wall clock transformers' strftime_now reads: clock("2026-12-31T23:59")."""
    import datetime as dt

    import transformers.utils.chat_template_utils as ctu

    def set_clock(when: str):
        class Clock(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return dt.datetime.fromisoformat(when)
        monkeypatch.setattr(ctu, "datetime", Clock)
    return set_clock


def test_a_template_that_reads_the_clock_renders_one_fixed_date_on_every_path(clock):
    from training.resample import prompt_digest
    from training.targets.base import render_prompt
    from training.targets.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = DATED
    conv = [msg("user", "2+2?"), msg("assistant", "4")]
    clock("2026-12-31T23:59")
    assert "Today Date: 31 Dec 2026" in tok.apply_chat_template(conv, tokenize=False)  # the clock as transformers reads it
    generated = render_prompt(tok, conv[:1])  # generation (hf backend) before midnight ...
    row = {"id": "a", "messages": conv, "completion_ids": [tok.encode("4", add_special_tokens=False)],
           "prompt_digests": [prompt_digest(generated)]}
    texts = []
    for now in ("2026-12-31T23:59", "2027-01-01T00:01"):  # ... tokenization before and after it
        clock(now)
        assert render_prompt(tok, conv[:1]) == generated
        res = tokenize_conversations(tok, [row, {"id": "b", "messages": conv}])
        assert res.n_ok == 2 and res.rows_from_generated_ids == 1 and res.template_date == "2026-01-01"
        texts.append(tok.decode(res.table["input_ids"][1].as_py()))
    assert texts[0] == texts[1] and "Today Date: 01 Jan 2026" in texts[0]

    # The date is a setting (part of the target identity): another one renders another prompt, and a
    # prompt generated on another date (a server renders on its own clock) is refused naming the clock.
    moved = tokenize_conversations(tok, [row], TokenizeConfig(chat_template_kwargs={"template_date": "2027-01-01"}))
    assert moved.template_date == "2027-01-01" and moved.n_rejected == 1
    (reject,) = moved.rejects.to_pylist()
    assert reject["reason"] == "prompt_mismatch" and "reads the clock (strftime_now)" in reject["detail"]
    assert "template_date 2027-01-01" in reject["detail"]
    with pytest.raises(ValueError, match="template_date='tomorrow' is not a date"):
        tokenize_conversations(tok, [row], TokenizeConfig(chat_template_kwargs={"template_date": "tomorrow"}))


def test_the_plain_template_rejects_what_it_cannot_render_instead_of_dropping_it():
    tok = make_tokenizer(None, bos="<s>", eos="</s>", add_bos=True)
    calls = '[{"type": "function", "function": {"name": "f", "arguments": {}}}]'
    rows = [{"id": "r", "messages": [msg("user", "q"), {**msg("assistant", "a"), "reasoning_content": "think"}]},
            {"id": "c", "messages": [msg("user", "q"), {**msg("assistant", ""), "tool_calls": calls}]},
            {"id": "t", "tools": '[{"type": "function", "function": {"name": "f"}}]', "messages": [msg("user", "q"), msg("assistant", "a")]},
            {"id": "ok", "messages": [msg("user", "q"), msg("assistant", "a")]}]
    res = tokenize_conversations(tok, rows, TokenizeConfig(template="plain"))
    assert (res.n_in, res.n_ok, res.n_rejected) == (4, 1, 3)
    assert {r["id"]: r["reason"] for r in res.rejects.to_pylist()} == {
        "r": "reasoning_content_unsupported", "c": "tool_calls_unsupported", "t": "tools_unsupported"}
