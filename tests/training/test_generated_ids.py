"""Training rows of resampled turns carry exactly the target's own reply ids, per template family.

A scripted target answers through the real prompt rendering (targets/base.py render_prompt) and the
real reply decoding (targets/hf.py reply_text) with chosen ids: the first reply in its canonical
encoding, later ones split into one token per character (a sampled non-canonical split, which
re-encoding the text would merge back), and on the sentencepiece-style tokenizer a word-start token
after the prompt ("▁She" after "room."), which re-encoding the text glues into other tokens. Then the
real resampler and tokenizer run; every row's masked ids must be the generated ids + end-of-turn, and
the ids before each reply must be the prompt the target generated it after.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.training.test_chat_templates import FAMILIES, QWEN3, family_tokenizer, make_tokenizer, msg
from training.resample import ResampleConfig, passthrough, resample_conversations
from training.targets.base import Generation, TargetModel, render_prompt
from training.targets.hf import reply_text
from training.tokenization import TokenizeConfig, tokenize_conversations
from training.tokenization.masking import special_lookup

REPLIES = ["Hello, how can I help you today?", "The answer is twenty four.", "Water."]


class ScriptedTarget(TargetModel):
    """Replies REPLIES[turn] with chosen ids; records (prompt ids, reply ids) of every call."""

    backend = "scripted"

    def __init__(self, tokenizer, chat_template_kwargs=None, word_start: bool = False):
        super().__init__("scripted")
        self._tokenizer = tokenizer
        self.chat_template_kwargs = chat_template_kwargs
        self.word_start = word_start
        self.calls: list[tuple[list[int], list[int]]] = []

    @property
    def identity(self) -> str:
        return "scripted"

    def reply_ids(self, turn: int) -> list[int]:
        text = REPLIES[turn % len(REPLIES)]
        tok = self.tokenizer
        if self.word_start:  # sentencepiece: the reply's first token carries the word-start space
            return tok.encode(" " + text, add_special_tokens=False)
        if turn == 0:
            return tok.encode(text, add_special_tokens=False)
        return [i for ch in text for i in tok.encode(ch, add_special_tokens=False)]  # non-canonical

    def generate(self, conversations, sampling):
        out = []
        for conv in conversations:
            prompt = render_prompt(self.tokenizer, conv, self.chat_template_kwargs)
            ids = self.reply_ids(sum(m["role"] == "assistant" for m in conv))
            self.calls.append((prompt, ids))
            out.append(Generation(reply_text(self.tokenizer, prompt, ids), "stop", len(ids) + 1, tuple(ids), tuple(prompt)))
        return out


CONVERSATIONS = [
    {"id": "one", "source": "t", "messages": [msg("user", "What is twenty plus four?"), msg("assistant", "x")]},
    {"id": "three", "source": "t", "messages": [
        msg("system", "You are a helpful assistant."), msg("user", "Hello there!"), msg("assistant", "x"),
        msg("user", "Write one word."), msg("assistant", "x"), msg("user", "And one more?"), msg("assistant", "x")]},
    {"id": "found", "source": "t", "messages": [
        msg("user", "One day, a little girl named Lily found a needle in her room."), msg("assistant", "x")]},
]


def resample(target, conversations=CONVERSATIONS):
    res = resample_conversations(target, conversations, ResampleConfig(temperatures={0.0: 1.0}), log=lambda _: None)
    assert res.n_ok == len(conversations)
    return res.table


def check_rows(tok, table, result, target):
    """Masked ids = generated ids + end-of-turn per row; each reply follows its own prompt's ids."""
    assert result.id_mismatches == 0 and result.rejects.num_rows == 0
    assert result.rows_from_generated_ids == result.table.num_rows and result.conversations_retokenized == 0
    rows = result.table.to_pylist()
    masked = [np.asarray(r["input_ids"])[np.asarray(r["loss_mask"], dtype=bool)].tolist() for r in rows]
    for prompt, ids in target.calls:
        # some row holds prompt + reply verbatim, and its masked ids hold the reply at that place
        hits = [r for r in rows if r["input_ids"][: len(prompt) + len(ids)] == prompt + ids]
        assert hits, f"no row starts with the prompt + reply of {tok.decode(ids)!r}"
    # every masked run is one reply's generated ids followed by the template's end-of-turn ids
    replies = sorted((ids for _, ids in target.calls), key=len, reverse=True)
    special = special_lookup(tok)
    for m in masked:
        pos = 0
        while pos < len(m):
            match = [ids for ids in replies if m[pos:pos + len(ids)] == ids]
            assert match, f"masked ids {m[pos:pos + 12]} are no generated reply"
            pos += len(match[0])
            while pos < len(m) and special[m[pos]]:
                pos += 1  # the end-of-turn
    return rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_carry_the_generated_ids(family):
    tok = family_tokenizer(family)
    target = ScriptedTarget(tok)
    table = resample(target)
    assert table["completion_ids"].null_count == 0 and table["prompt_digests"].null_count == 0
    result = tokenize_conversations(tok, table, TokenizeConfig())
    check_rows(tok, table, result, target)
    # re-encoding the text instead (what rows without ids get) would train other ids: the
    # character-split replies merge back into canonical tokens
    again = tokenize_conversations(tok, table, TokenizeConfig(use_generated_ids=False))
    assert again.id_mismatches > 0 and again.conversations_retokenized == len(CONVERSATIONS)


def test_generation_marker_template():
    """A template declaring its assistant spans with {% generation %} (as the demo target's does):
    rows from ids do not depend on the markers."""
    from tests.training.test_tokenize import MARKED

    tok = make_tokenizer(MARKED, eos="<|im_end|>")
    target = ScriptedTarget(tok)
    table = resample(target)
    check_rows(tok, table, tokenize_conversations(tok, table), target)
    assert tokenize_conversations(tok, table, TokenizeConfig(use_generated_ids=False)).id_mismatches > 0


def test_plain_sentencepiece_word_start_reply():
    """stories260K's case: after "...in her room." the target emits "▁She"; the row must hold it,
    not the "S", "he" that gluing the reply's text onto the prompt encodes to."""
    tok = make_tokenizer(None, bos="<s>", eos="</s>", add_bos=True, kind="metaspace")
    target = ScriptedTarget(tok, word_start=True)
    table = resample(target)
    found = next(r for r in table.to_pylist() if r["id"] == "found")
    assert found["messages"][1]["content"].startswith(" Hello")  # decoded after its prompt: space kept
    result = tokenize_conversations(tok, table)
    rows = check_rows(tok, table, result, target)
    row = next(r for r in rows if r["id"] == "found")
    ids = np.asarray(row["input_ids"])
    first = ids[np.asarray(row["loss_mask"], dtype=bool)][0]
    assert tok.convert_ids_to_tokens(int(first)) == "▁Hello" and row["input_ids"][0] == tok.bos_token_id
    # The replies decoded alone (as before: the word-start space is lost) glue onto the prompt's text:
    # re-encoded, "room.Hello" is other ids; built from the ids, the rows stay exact.
    import pyarrow as pa

    alone = [{**r, "messages": [m if m["role"] != "assistant" else {**m, "content": tok.decode(ids)}
                                for m, ids in zip(r["messages"], _per_message(r))]} for r in table.to_pylist()]
    alone = pa.Table.from_pylist(alone, schema=table.schema)
    assert tokenize_conversations(tok, alone, TokenizeConfig(use_generated_ids=False)).id_mismatches > 0
    from_ids = tokenize_conversations(tok, alone)
    assert next(r for r in from_ids.table.to_pylist() if r["id"] == "found") == row
    # where the stored history is not the text the target saw, later prompts are not its prompts
    assert set(from_ids.rejects["reason"].to_pylist()) == {"prompt_mismatch"}


def _per_message(row):
    """completion_ids spread over the row's messages (None for non-assistant ones)."""
    it = iter(row["completion_ids"])
    return [next(it) if m["role"] == "assistant" else None for m in row["messages"]]


def test_plain_prompt_is_the_generation_prompt():
    """One plain layout: generation renders exactly the text tokenization puts before the reply."""
    tok = family_tokenizer("plain")
    conv = CONVERSATIONS[1]["messages"]
    from training.tokenization.templates import PlainRenderer

    r = PlainRenderer(tok)
    for i in (2, 4, 6):
        assert render_prompt(tok, conv[:i]) == tok(r.frame(conv, i).prompt, add_special_tokens=False)["input_ids"]
        assert r.views(conv[: i + 1])[0].text.startswith(r.frame(conv, i).prompt)


def qwen3():
    return make_tokenizer(QWEN3, bos=None, eos="<|im_end|>")


def test_qwen3_settings_shared_by_generation_and_tokenization():
    """enable_thinking=False at generation and tokenization: prompts end with the empty think block the
    template adds, the rows put nothing the target did not generate before the reply."""
    tok = qwen3()
    kwargs = {"enable_thinking": False}
    target = ScriptedTarget(tok, chat_template_kwargs=kwargs)
    table = resample(target)
    assert all(tok.decode(p).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for p, _ in target.calls)
    result = tokenize_conversations(tok, table, TokenizeConfig(chat_template_kwargs=kwargs))
    check_rows(tok, table, result, target)
    assert "reply_rendered_differently" not in result.notes


def test_qwen3_settings_differ_between_generation_and_tokenization():
    """Generated without the setting, tokenized with it: the prompt is not the one the target saw, so
    the conversation is rejected by name, never trained with a think block the target did not see."""
    tok = qwen3()
    table = resample(ScriptedTarget(tok))
    result = tokenize_conversations(tok, table, TokenizeConfig(chat_template_kwargs={"enable_thinking": False}))
    assert result.table.num_rows == 0 and result.n_rejected == len(CONVERSATIONS)
    assert set(result.rejects["reason"].to_pylist()) == {"prompt_mismatch"}
    assert "chat_template_kwargs" in result.rejects["detail"][0].as_py()


def test_qwen3_template_inserting_a_think_block_is_reported():
    """Thinking on, replies without reasoning: Qwen3 renders each such reply with an empty think block
    the target never generated. Rows train the generated ids and the rendering is counted in notes."""
    tok = qwen3()
    target = ScriptedTarget(tok)
    table = resample(target)
    result = tokenize_conversations(tok, table)
    check_rows(tok, table, result, target)
    assert result.notes["reply_rendered_differently"] == len(target.calls)
    assert "<think>" in result.note_examples["reply_rendered_differently"]
    for r in result.table.to_pylist():
        masked = np.asarray(r["input_ids"])[np.asarray(r["loss_mask"], dtype=bool)]
        assert "<think>" not in tok.decode(masked.tolist())


def test_rows_without_ids_are_retokenized_and_counted():
    tok = family_tokenizer("chatml")
    rows = [{"id": c["id"], "source": "t", "messages": [m if m["role"] != "assistant" else msg("assistant", "Sure.")
                                                        for m in c["messages"]]} for c in CONVERSATIONS]
    result = tokenize_conversations(tok, passthrough(rows).table)
    assert result.conversations_retokenized == len(rows) and result.rows_from_generated_ids == 0
    assert result.id_mismatches == 0 and result.table.num_rows == len(rows)
