"""The conversations people train on, through `specdraft run --select ...` on tiny targets whose chat
templates have the real shapes (issue 22): a template that refuses rows (Gemma-style raise_exception),
one that reads the clock (strftime_now), Qwen3-style reasoning_content, OpenAI tool calls through a
Qwen2.5 tools block, gpt-oss harmony replies, a reply ending in an emoji under a template without a
special end-of-turn, and an aux-layer list that is not three ids. Each stage's counts reconcile.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import dagster as dg
import pytest

from resources.object_store import read_ref
from spec_assets.cli import main
from tests.conftest import run_events
from tests.spec_assets.conftest import new_dagster_home
from tests.training.test_chat_templates import GEMMA_STYLE, QWEN3, QWEN25_TOOLS, TOOL_RECORD
from tests.training.test_resample import harmony_target
from tests.training.test_tokenize import DATED, NO_EOT
from training.storage import ObjectStore

pytestmark = pytest.mark.slow

CONFIG = {"ops": {
    "source_corpus": {"config": {"heldout_fraction": 0.0}},
    "resampled_corpus": {"config": {"max_new_tokens": 8, "batch_size": 4, "temperatures": {"0.0": 1.0}}},
    "tokenized_shards": {"config": {"max_length": 2048}},
}}
PASS_THROUGH = {"ops": {**CONFIG["ops"], "resampled_corpus": {"config": {"resample": False}}}}


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **fields):
    return {"role": "assistant", "content": text, **fields}


@pytest.fixture
def pipeline(tmp_path, tiny_target, monkeypatch):
    """run(template, records, config, select, target) -> Run: the tiny target with `template` as its
    chat template (or another `target` directory), `records` as the one corpus shard, and
    `specdraft run --select` on them."""

    from transformers import AutoTokenizer

    def run(template, records, config=CONFIG, select="*tokenized_shards", target=None):
        if target is None:
            target = tmp_path / "target"
            if not target.exists():
                shutil.copytree(tiny_target, target)
            tok = AutoTokenizer.from_pretrained(target)
            tok.chat_template = template
            tok.save_pretrained(target)
        corpus = tmp_path / "corpus"
        corpus.mkdir(exist_ok=True)
        (corpus / "shapes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        for key, value in {"DAGSTER_HOME": str(new_dagster_home(tmp_path / "home")),
                           "SPECDRAFT_ROOT": (tmp_path / "store").as_uri(), "SPECDRAFT_TARGET": str(target),
                           "SPECDRAFT_CORPUS": str(corpus)}.items():
            monkeypatch.setenv(key, value)
        code = main(["run", "--select", select, "--config-json", json.dumps(config)])
        with dg.DagsterInstance.get() as instance:
            meta = {}
            for asset in ("source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states"):
                records_ = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
                if records_:
                    meta[asset] = {k: v.value for k, v in records_[0].asset_materialization.metadata.items()}
            failures = [_messages(e.dagster_event.event_specific_data.error)
                        for r in instance.get_runs() for e in run_events(instance, r.run_id)
                        if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_FAILURE"]
        return Run(code, meta, failures, ObjectStore((tmp_path / "store").as_uri()), AutoTokenizer.from_pretrained(target))

    return run


def _messages(error) -> str:
    """A step failure's message with its causes (the library's exception is the step error's cause)."""
    out = []
    while error is not None:
        out.append(error.message.strip())
        error = error.cause
    return " <- ".join(out)


@dataclass
class Run:
    code: int
    meta: dict  # asset -> its latest materialization's metadata
    failures: list[str]  # step failure messages
    store: ObjectStore
    tokenizer: object  # the target's

    def ok(self):
        assert self.code == 0, self.failures
        return self

    def rows(self, asset: str) -> list[dict]:
        ref = read_ref(self.store, asset, "shapes")
        return self.store.read_parquet(self.store.manifest(ref.prefix).key("data.parquet")).to_pylist()

    def masked(self) -> dict[str, list[str]]:
        """Tokenized row id -> its masked runs, decoded."""
        out = {}
        for r in self.rows("tokenized_shards"):
            runs, cur = [], []
            for t, m in zip(r["input_ids"], r["loss_mask"]):
                if m:
                    cur.append(t)
                elif cur:
                    runs.append(cur)
                    cur = []
            out[r["id"]] = [self.tokenizer.decode(c) for c in runs + ([cur] if cur else [])]
        return out


def reconcile(run: Run, n_records: int):
    """Every record is a row or a reject at every stage: (source, resampled, tokenized) metadata."""
    src, res, tok = (run.meta[a] for a in ("source_corpus", "resampled_corpus", "tokenized_shards"))
    assert src["rows_read"] == n_records == src["rows_accepted"] + src["rows_rejected"]
    assert src["rows_train"] == src["rows_accepted"] == res["rows_in"] == res["rows_out"] + res["rows_rejected"]
    assert tok["conversations_in"] == res["rows_out"] == tok["conversations_out"] + tok["conversations_rejected"]
    return src, res, tok


def test_rows_a_strict_template_refuses_are_rejected_and_the_shard_goes_on(pipeline):
    good = [{"id": f"ok{i}", "messages": [user(f"question {i}"), assistant("an answer")]} for i in range(5)]
    refused = [{"id": "sys", "messages": [{"role": "system", "content": "be brief"}, user("hi"), assistant("hello")]},
               {"id": "twice", "messages": [user("a"), user("b"), assistant("c")]}]
    run = pipeline(GEMMA_STYLE, good + refused).ok()
    src, res, tok = reconcile(run, 7)
    assert (res["rows_out"], res["rows_rejected"], res["reject_reasons"]) == (5, 2, {"template_error": 2})
    assert tok["conversations_out"] == 5 and tok["rows_from_generated_ids"] == 5


def test_a_template_that_reads_the_clock_renders_one_date_across_midnight(pipeline, monkeypatch):
    import datetime as dt

    import transformers.utils.chat_template_utils as ctu

    def clock(when):
        class Clock(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return dt.datetime.fromisoformat(when)
        monkeypatch.setattr(ctu, "datetime", Clock)

    records = [{"id": f"r{i}", "messages": [user(f"what day is it {i}"), assistant("today")]} for i in range(4)]
    clock("2026-12-31T23:59")
    pipeline(DATED, records, select="*resampled_corpus").ok()
    clock("2027-01-01T00:01")  # tokenized after midnight, with a changed max_length
    config = {"ops": {**CONFIG["ops"], "tokenized_shards": {"config": {"max_length": 400}}}}
    run = pipeline(DATED, records, config=config, select="tokenized_shards").ok()
    src, res, tok = reconcile(run, 4)
    assert tok["conversations_out"] == 4 and tok["rows_from_generated_ids"] == 4 and "reject_reasons" not in tok
    assert tok["template_date"] == "2026-01-01"
    assert all("Today Date: 01 Jan 2026" in run.tokenizer.decode(r["input_ids"]) for r in run.rows("tokenized_shards"))


def test_reasoning_content_is_rendered_masked_and_counted(pipeline):
    records = [
        {"id": "r1", "messages": [user("What is 12 + 30?"),
                                  assistant("The sum is 42.", reasoning_content="Ones first, then tens.")]},
        {"id": "cut", "messages": [user("And doubled?"), assistant(None, reasoning_content="42 + 42 is")]},
        {"id": "plain", "messages": [user("Hi"), assistant("Hello.")]},
    ]
    run = pipeline(QWEN3, records, config=PASS_THROUGH).ok()
    src, res, tok = reconcile(run, 3)
    assert tok["conversations_out"] == 3 and tok["reasoning_turns"] == 2
    assert run.masked() == {
        "r1": ["<think>\nOnes first, then tens.\n</think>\n\nThe sum is 42.<|im_end|>"],
        "cut": ["<think>\n42 + 42 is\n</think>\n\n<|im_end|>"],
        "plain": ["<think>\n\n</think>\n\nHello.<|im_end|>"],  # Qwen3 writes an empty think block
    }


def test_openai_tool_calls_render_with_the_tools_block_and_train_on_the_calls(pipeline):
    records = [TOOL_RECORD, {"id": "plain", "messages": [user("Hi"), assistant("Hello.")]}]
    run = pipeline(QWEN25_TOOLS, records, config=PASS_THROUGH).ok()
    src, res, tok = reconcile(run, 2)
    assert tok["tool_call_turns"] == 1
    masked = run.masked()
    assert masked["t1"] == ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>',
                            "2 + 2 is 4.<|im_end|>"]
    (row,) = [r for r in run.rows("tokenized_shards") if r["id"] == "t1"]
    assert "# Tools" in run.tokenizer.decode(row["input_ids"])
    # resampled by the hf target, shown the tools block: both rows kept, with their tools
    run = pipeline(QWEN25_TOOLS, records).ok()
    src, res, tok = reconcile(run, 2)
    assert res["rows_out"] == 2 and [r["tools"] is not None for r in run.rows("resampled_corpus")] == [True, False]


def test_harmony_replies_keep_their_channels_apart(pipeline, tmp_path):
    from training.demo.corpus import generate_conversations

    target = harmony_target(tmp_path)
    records = [{"id": r["id"], "messages": r["messages"]} for r in generate_conversations(8, seed=3)]
    config = {"ops": {**CONFIG["ops"], "resampled_corpus": {"config": {
        "max_new_tokens": 24, "batch_size": 4, "temperatures": {"1.0": 1.0}}}}}
    run = pipeline(None, records, config=config, target=target.name_or_path).ok()
    src, res, tok = reconcile(run, 8)
    replies = [m for r in run.rows("resampled_corpus") for m in r["messages"] if m["role"] == "assistant"]
    assert not any(k in m["content"] for m in replies for k in ("<|", "analysis", "final"))
    assert tok["reasoning_turns"] == sum(bool(m["reasoning_content"]) for m in replies) > 0
    assert tok["rows_from_generated_ids"] == tok["rows"] and tok["generated_id_mismatches"] == 0


def test_a_reply_ending_in_an_emoji_is_masked_whole(pipeline):
    replies = ["ok 😀", "fine 👍🏽", "答案是四", "done é", "check ✓", "plain."]
    records = [{"id": f"e{i}", "messages": [user("x"), assistant(r)]} for i, r in enumerate(replies)]
    run = pipeline(NO_EOT, records, config=PASS_THROUGH).ok()
    reconcile(run, 6)
    assert run.masked() == {f"e{i}": [r] for i, r in enumerate(replies)}


def test_an_aux_layer_list_that_is_not_three_ids_is_refused_before_the_feature_pass(pipeline):
    records = [{"id": f"r{i}", "messages": [user(f"q {i}"), assistant("a")]} for i in range(3)]
    config = {"ops": {**PASS_THROUGH["ops"], "hidden_states": {"config": {"aux_layer_ids": [1, 2, 4, 5]}}}}
    run = pipeline(NO_EOT, records, config=config, select="*hidden_states")
    assert run.code == 1 and "hidden_states" not in run.meta and "tokenized_shards" in run.meta
    assert any("hold 4 ids" in f for f in run.failures), run.failures
