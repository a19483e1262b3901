"""eval_report in-process on a tiny target: the newest draft of each other family trained on the same
data is simulated beside the evaluated one (like with like), the gate stays the evaluated family's, and
a report without another family says so.

draft_model and vocab_map are stand-ins here (same asset keys, real Dagster materializations and
provenance, exports written from random drafts): training is not what is under test.
"""

from pathlib import Path

import dagster as dg
import pytest
import torch

from resources.object_store import ObjectStoreResource
from resources.target_model import TargetModelResource
from spec_assets.artifact_step import materialize_artifact
from spec_assets.corpus import source_corpus
from spec_assets.evaluation import GATE_CHECK, eval_report
from spec_assets.partitions import corpus_shards
from tests.spec_assets.conftest import make_resources
from training.demo.corpus import write_demo_corpus
from training.evaluation import load_result
from training.storage import ArtifactRef

SHARD = "demo-00000"
EVAL = {"ks": [1, 2], "temperatures": [0.0], "max_new_tokens": 4, "max_prompts": 2, "gate_k": 2, "min_tau": 1.0,
        "served": False, "warmup": False}


class VocabStandIn(dg.Config):
    data: str = "A"  # which tokenized data: another value is other data


class DraftStandIn(dg.Config):
    export: str
    family: str


@dg.asset(name="vocab_map", io_manager_key="artifact_refs", code_version="1")
def vocab_stand_in(context, config: VocabStandIn, object_store: ObjectStoreResource):
    def build(writer):
        writer.write_json("data.json", {"data": config.data})

    return materialize_artifact(context, object_store.store(), build=build, upstream={}, config=config.model_dump())


@dg.asset(name="draft_model", io_manager_key="artifact_refs", code_version="1")
def draft_stand_in(context, config: DraftStandIn, vocab_map: ArtifactRef, object_store: ObjectStoreResource):
    """An export of `family` written as draft_model writes its own (export/..., draft_family in the summary)."""
    def build(writer):
        for f in sorted(Path(config.export).iterdir()):
            writer.write_bytes(f"export/{f.name}", f.read_bytes())
        writer.summary = {"draft_family": config.family}

    return materialize_artifact(context, object_store.store(), build=build,
                                upstream={"vocab_map": vocab_map.fingerprint}, config=config.model_dump())


@pytest.fixture(scope="module")
def exports(tiny_target, tmp_path_factory):
    """An EAGLE-3 and a DFlash export of random drafts of the tiny target (and a second EAGLE-3 one)."""
    from tests.training.evaluation.helpers import make_dflash, make_draft
    from training.dflash.export import export_dflash
    from training.export import export_draft
    from training.targets import load_target

    target = load_target(str(tiny_target), dtype="float32", device="cpu")
    root = tmp_path_factory.mktemp("exports")
    config = target.facts.config
    return {
        "eagle3": export_draft(*make_draft(target, seed=1), config, root / "eagle3", dtype=torch.float32),
        "eagle3_b": export_draft(*make_draft(target, seed=2), config, root / "eagle3_b", dtype=torch.float32),
        "dflash": export_dflash(*make_dflash(target, seed=1, block=3), config, root / "dflash", dtype=torch.float32),
    }


@pytest.fixture
def env(instance, tmp_path, tiny_target):
    """Resources on a fresh store, and one source_corpus shard whose held-out rows are the prompts."""
    write_demo_corpus(tmp_path / "corpus", n_shards=1, rows_per_shard=16, seed=1)
    res = make_resources((tmp_path / "store").as_uri(), str(tmp_path / "corpus"),
                         target=TargetModelResource(target=str(tiny_target), device="cpu"))
    instance.add_dynamic_partitions(corpus_shards.name, [SHARD])
    dg.materialize([source_corpus], instance=instance, resources=res, partition_key=SHARD,
                   run_config={"ops": {"source_corpus": {"config": {"heldout_fraction": 0.3}}}})
    return instance, res


def train(env, export, family: str, data: str = "A") -> str:
    """A draft_model materialization of `family` on `data`; its fingerprint."""
    instance, res = env
    result = dg.materialize([vocab_stand_in, draft_stand_in], instance=instance, resources=res, run_config={"ops": {
        "vocab_map": {"config": {"data": data}}, "draft_model": {"config": {"export": str(export), "family": family}}}})
    (mat,) = result.asset_materializations_for_node("draft_model")
    return mat.metadata["fingerprint"].value


def run_eval_report(env, **config):
    """eval_report on the latest draft_model: (report.json's result, metadata, gate check)."""
    instance, res = env
    result = dg.materialize([vocab_stand_in, draft_stand_in, source_corpus, eval_report], selection=["eval_report"],
                            instance=instance, resources=res, raise_on_error=False,  # a random draft fails the gate
                            run_config={"ops": {"eval_report": {"config": {**EVAL, **config}}}})
    (mat,) = result.asset_materializations_for_node("eval_report")
    (check,) = result.get_asset_check_evaluations()
    store = res["object_store"].store()
    report = store.manifest(store.read_json("_refs/eval_report/_.json")["prefix"])
    return load_result(store.read_json(report.key("report.json"))), mat.metadata, check


def test_eval_report_puts_the_other_familys_newest_draft_of_the_same_data_beside_it(env, exports):
    train(env, exports["eagle3"], "eagle3")
    alone, meta, _ = run_eval_report(env)
    # no other family yet: the report says so in one line, nothing fails
    assert alone.drafted == ["eagle3"] and "No dflash draft trained on the same data" in alone.config["compare_note"]
    assert "## Draft families side by side\n\nNo dflash draft" in meta["report"].value
    assert meta["compared_families"].value == [] and meta["compared_drafts"].value == {}

    newest = train(env, exports["eagle3_b"], "eagle3")  # the newest EAGLE-3 draft of data A ...
    other_data = train(env, exports["eagle3"], "eagle3", data="B")  # ... and a newer one of other data
    assert other_data != newest
    train(env, exports["dflash"], "dflash")
    result, meta, check = run_eval_report(env)
    assert result.draft_method == "dflash" and result.drafted == ["dflash", "eagle3"]
    assert result.config["compared_families"] == ["eagle3"] and not result.config["compare_note"]
    compared = result.config["compared_drafts"]["eagle3"]  # named by its place in the store
    assert f"/draft_model/_/{newest}/" in compared and compared.endswith("/export")
    for k in EVAL["ks"]:  # like with like: each family's forwards per step, c and est. speedup at every k
        d, e = result.row("dflash", k), result.row("eagle3", k)
        assert d.forwards == 1 and e.forwards == k and e.c > 0 and d.c > 0
        assert e.exact_match == d.exact_match == result.config["n_prompts"]  # greedy: the target's tokens
    # metadata: what was compared, on which data, and the compared family's tau at gate_k
    assert meta["compared_drafts"].value == {"eagle3": newest}
    assert meta["compared_on_vocab_map"].value and meta["compared_families"].value == ["eagle3"]
    assert meta["eagle3_tau"].value == pytest.approx(result.row("eagle3", EVAL["gate_k"]).tau, rel=1e-3)
    assert "| EAGLE-3 draft |" in meta["report"].value
    # the gate is the evaluated (released) family's: its detail quotes DFlash's tau, not EAGLE-3's
    assert f"tau {result.row('dflash', EVAL['gate_k']).tau:.3f}" in check.metadata["detail"].text
    assert check.check_name == GATE_CHECK

    # compare_families off: the DFlash draft alone, with its own fingerprint (the compared draft is upstream)
    off, meta_off, _ = run_eval_report(env, compare_families=False)
    assert off.drafted == ["dflash"] and "compare_families: false" in off.config["compare_note"]
    assert meta_off["fingerprint"].value != meta["fingerprint"].value
