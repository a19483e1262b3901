"""The whole graph, in-process, on a tiny random target: every stage, counts, cache hits, the gate.

A random-weight draft cannot beat prompt-lookup drafting, so this run also proves the blocking
check: eval_report's gate fails and released_draft does not run.
"""

import json
import os
import re
from pathlib import Path

import dagster as dg
import pytest

from spec_assets.cli import failure_messages, run_pipeline
from spec_assets.definitions import all_assets, build_defs
from training.demo.corpus import write_demo_corpus
from training.recipe import MIN_TRAINABLE_TOKENS, data_note, draft_width
from training.storage import ObjectStore

SMALL = {
    "ops": {
        "source_corpus": {"config": {"heldout_fraction": 0.2}},
        "resampled_corpus": {"config": {"max_new_tokens": 12, "batch_size": 8}},
        "tokenized_shards": {"config": {"max_length": 256}},
        "hidden_states": {"config": {"max_tokens_per_batch": 2048}},
        "draft_model": {"config": {"epochs": 1, "max_steps": 3, "ttt_length": 2, "max_tokens_per_batch": 2048,
                                   "checkpoint_every": 2}},
        "eval_report": {"config": {"ks": [1, 2], "temperatures": [0.0], "max_new_tokens": 6, "max_prompts": 2,
                                   "gate_k": 2, "min_tau": 4.0, "served": False}},
    }
}


@pytest.fixture
def env(tmp_path, tiny_target, monkeypatch):
    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n_shards=2, rows_per_shard=24, seed=1)
    monkeypatch.setenv("SPECDRAFT_ROOT", (tmp_path / "store").as_uri())
    monkeypatch.setenv("SPECDRAFT_TARGET", str(tiny_target))
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(corpus))
    return ObjectStore((tmp_path / "store").as_uri())


def _materializations(instance, asset):
    return [e.asset_materialization for e in instance.fetch_materializations(dg.AssetKey(asset), limit=100).records]


def test_full_graph_then_everything_is_a_cache_hit(env):
    store = env
    with dg.DagsterInstance.ephemeral() as instance:
        results = run_pipeline(run_config=SMALL, instance=instance, log=lambda _: None)
        assert [r.success for r in results] == [True, True, False]  # two shards, then the fan-ins
        (message,) = failure_messages(results[-1])
        assert message.startswith("eval_report: ") and "blocking asset check failed" in message
        assert message.endswith("eval_report: beats_prompt_lookup")
        for asset in ("source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states"):
            assert len(_materializations(instance, asset)) == 2, asset  # one per shard
        for asset in ("vocab_map", "draft_model", "eval_report"):
            assert len(_materializations(instance, asset)) == 1, asset
        # Each writer committed as the last one of its prefix: no writer record, no resampling progress left.
        left = store.list("resampled_corpus", recursive=True)
        assert left and [k for k in left if "/_progress/" in k or k.endswith("/_writer.json")] == []
        assert _materializations(instance, "released_draft") == []  # the gate blocked it

        src = {m.partition: m.metadata for m in _materializations(instance, "source_corpus")}
        for md in src.values():
            assert md["rows_read"].value == md["rows_accepted"].value + md["rows_rejected"].value
        tok = {m.partition: m.metadata for m in _materializations(instance, "tokenized_shards")}
        res = {m.partition: m.metadata for m in _materializations(instance, "resampled_corpus")}
        for shard in tok:
            assert res[shard]["rows_in"].value == src[shard]["rows_train"].value
            assert tok[shard]["conversations_in"].value == res[shard]["rows_out"].value
        draft = _materializations(instance, "draft_model")[0].metadata
        assert draft["steps"].value == 3 and draft["tokens_seen"].value > 0
        # the resolved draft shape: the tiny target is narrower than 256, so the width rule widened it
        target_config = json.loads((Path(os.environ["SPECDRAFT_TARGET"]) / "config.json").read_text())
        width = draft_width(target_config["hidden_size"], target_config["intermediate_size"])
        shape = draft["draft_width"].value
        assert (shape["hidden_size"], shape["intermediate_size"]) == width
        assert shape["target_hidden_size"] == target_config["hidden_size"] < width[0]
        # the trainable tokens are vocab_map's masked ones; a corpus this small gets the data note
        vocab = _materializations(instance, "vocab_map")[0].metadata
        assert draft["trainable_tokens"].value == vocab["masked_tokens"].value < MIN_TRAINABLE_TOKENS
        assert draft["data_note"].value == data_note(vocab["masked_tokens"].value)
        report = _materializations(instance, "eval_report")[0].metadata
        assert "data:image/png;base64," in report["report"].value
        # The draft is named by its export in the store, not by a temporary download folder.
        export_dir = re.search(r"draft `([^`]+)`", report["report"].value).group(1)
        assert export_dir.startswith(store.url("draft_model/")) and export_dir.endswith("/export")
        check = instance.get_latest_asset_check_evaluation_record(
            dg.AssetCheckKey(dg.AssetKey("eval_report"), "beats_prompt_lookup"))
        assert check is not None and check.status.value == "FAILED"

        # Nothing changed: every step is a cache hit with the same data version.
        fingerprints = {a: {m.partition: m.metadata["fingerprint"].value for m in _materializations(instance, a)}
                        for a in ("source_corpus", "tokenized_shards", "draft_model")}
        run_pipeline(run_config=SMALL, instance=instance, log=lambda _: None)
        for asset in ("source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states", "vocab_map",
                      "draft_model", "eval_report"):
            latest = _materializations(instance, asset)
            assert all(m.metadata["cache_hit"].value for m in latest[: len(latest) // 2]), asset
        again = {a: {m.partition: m.metadata["fingerprint"].value for m in _materializations(instance, a)[:2]}
                 for a in fingerprints}
        for asset, fps in fingerprints.items():
            assert all(again[asset][p] == fp for p, fp in fps.items()), asset

        # The gate's own check is what stopped the release: releasing by hand works.
        result = dg.materialize(all_assets, selection=["released_draft"], instance=instance, resources=build_defs().resources)
        assert result.success
        latest = store.read_json("releases/latest.json")
        assert set(latest["files"]) == {"config.json", "model.safetensors"}
