"""The end of `specdraft run`: tau against prompt lookup per temperature at the gate's k, the gate's
verdict, the export and the commands that serve it (the CLI tests run it on real runs)."""

from types import SimpleNamespace

import dagster as dg

from resources.object_store import ObjectStoreResource, write_ref
from resources.target_model import TargetModelResource
from spec_assets.run_summary import draft_summary, serve_commands
from tests.training.evaluation.test_report import TAUS, rows_for
from training.evaluation import write_report
from training.recipe import MIN_TRAINABLE_TOKENS, data_note
from training.storage import ArtifactRef, ObjectStore


def test_serve_commands_name_the_target_the_export_and_k():
    vllm, sglang = serve_commands("/models/llama", "/store/export", 4)
    assert vllm == ("vllm serve /models/llama --speculative-config "
                    "'{\"method\": \"eagle3\", \"model\": \"/store/export\", \"num_speculative_tokens\": 4}'")
    assert sglang == ("python -m sglang.launch_server --model-path /models/llama --speculative-algorithm EAGLE3 "
                      "--speculative-draft-model-path /store/export --speculative-num-steps 4 "
                      "--speculative-eagle-topk 1 --speculative-num-draft-tokens 5")


class FakeRun:
    """What draft_summary reads of a run's result (ExecuteInProcessResult or a parallel run's
    RunOutcome): its events, as DagsterEvents expose them."""

    def __init__(self, materialized: set, gate_passed: bool):
        self.all_events = [
            SimpleNamespace(is_step_materialization=True, asset_key=dg.AssetKey(name), event_type_value="ASSET_MATERIALIZATION")
            for name in sorted(materialized)
        ] + [SimpleNamespace(
            is_step_materialization=False, asset_key=dg.AssetKey("eval_report"), event_type_value="ASSET_CHECK_EVALUATION",
            event_specific_data=SimpleNamespace(check_name="beats_prompt_lookup", passed=gate_passed,
                                                metadata={"detail": dg.MetadataValue.text("k=3, T=0: tau 2.600")}))]


def _artifact(store, asset, fp, write):
    prefix = f"{asset}/_/{fp}"
    with store.artifact(prefix, fp) as w:
        write(w)
    write_ref(store, ArtifactRef(asset=asset, partition=None, fingerprint=fp, prefix=prefix))
    return prefix


def test_draft_summary_says_tau_the_gate_the_export_and_how_to_serve_it(tmp_path):
    store = ObjectStore((tmp_path / "store").as_uri())
    res = rows_for(TAUS, temperatures=(0.0, 0.7))
    res.config["draft"] = store.url("draft_model/_/d1/export")

    def report(w):
        w.summary = write_report(res, w, k=3)["summary"]

    _artifact(store, "eval_report", "e1", report)

    def draft(w):
        w.summary = {"trainable_tokens": 500, "data_note": data_note(500)}

    _artifact(store, "draft_model", "d1", draft)
    released = _artifact(store, "released_draft", "r1", lambda w: w.write_json("config.json", {}))
    defs = SimpleNamespace(resources={"object_store": ObjectStoreResource(root=store.root),
                                      "target": TargetModelResource(target="/models/llama")})
    assert draft_summary([FakeRun(set(), True)], defs) == []  # no evaluation in the invocation

    lines = draft_summary([FakeRun({"eval_report", "released_draft"}, True)], defs)
    text = "\n".join(lines)
    assert lines[0].startswith("draft vs prompt lookup at k=3")
    assert "T=0: EAGLE-3 tau 2.60, prompt lookup 1.40" in text and "T=0.7: EAGLE-3 tau 2.00, prompt lookup 1.20" in text
    assert "quality gate beats_prompt_lookup: PASSED (k=3, T=0: tau 2.600)" in text
    # too little data is said where the user reads the outcome, with the bench's number
    assert (f"note: the draft trained on 500 trainable tokens; drafts of a real chat model trained on "
            f"{MIN_TRAINABLE_TOKENS:,} or fewer accepted at most about what prompt lookup does") in text
    export = store.url(store.manifest(released).key("config.json")).removeprefix("file://").rsplit("/", 1)[0]
    assert export.startswith(str(tmp_path / "store" / released))
    assert f"released export: {export}" in text
    assert f"  {serve_commands('/models/llama', export, 3)[0]}" in lines

    failed = "\n".join(draft_summary([FakeRun({"eval_report"}, False)], defs))
    assert "quality gate beats_prompt_lookup: FAILED" in failed
    assert f"not released; the evaluated draft's export: {tmp_path / 'store' / 'draft_model/_/d1/export'}" in failed
    assert "(it did not pass the gate)" in failed


def test_draft_summary_names_the_compared_family_beside_the_released_one(tmp_path):
    store = ObjectStore((tmp_path / "store").as_uri())
    taus = {**TAUS, ("dflash", 1, 0.0): 1.5, ("dflash", 3, 0.0): 2.1}
    res = rows_for({k: v for k, v in taus.items() if k[2] == 0.0}, config={"draft_family": "dflash"})
    res.config["draft"] = store.url("draft_model/_/d1/export")
    _artifact(store, "eval_report", "e1", lambda w: setattr(w, "summary", write_report(res, w, k=3)["summary"]))
    _artifact(store, "draft_model", "d1", lambda w: setattr(w, "summary", {}))
    defs = SimpleNamespace(resources={"object_store": ObjectStoreResource(root=store.root),
                                      "target": TargetModelResource(target="/models/llama")})
    text = "\n".join(draft_summary([FakeRun({"eval_report"}, False)], defs))
    assert ("T=0: DFlash tau 2.10, prompt lookup 1.40; compared (simulated, not gated): EAGLE-3 tau 2.60") in text
