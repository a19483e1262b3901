"""Both draft families through `specdraft run` on one instance and one corpus (tiny target, two training
steps): EAGLE-3 first, then DFlash. The second eval_report evaluates (and gates) the DFlash draft and
simulates the EAGLE-3 one beside it; a DFlash draft_model on EAGLE-3 features fails naming both settings."""

from __future__ import annotations

import copy
import json

from spec_assets.cli import main
from tests.spec_assets.conftest import graph_env
from tests.spec_assets.small_run import SMALL


def _config(draft_model: str, hidden_states: str) -> str:
    config = copy.deepcopy(SMALL)
    config["ops"]["hidden_states"] = {"config": {"draft_family": hidden_states}}
    config["ops"]["draft_model"]["config"]["draft_family"] = draft_model
    return json.dumps(config)


def test_eval_report_shows_both_families_trained_on_the_same_data(tmp_path, tiny_target, monkeypatch, capsys):
    for key, value in graph_env(tmp_path, tiny_target, n_shards=1).items():
        monkeypatch.setenv(key, value)
    from resources.object_store import read_ref
    from training.evaluation import load_result
    from training.storage import ObjectStore

    store = ObjectStore((tmp_path / "store").as_uri())

    def report():
        manifest = store.manifest(read_ref(store, "eval_report").prefix)
        return load_result(store.read_json(manifest.key("report.json"))), manifest.summary

    # SMALL's gate (min_tau 4 at k=2, above the ceiling) fails whatever the draft: exit 1, report written
    assert main(["run", "--config-json", _config("eagle3", "eagle3")]) == 1
    first, summary = report()
    assert first.drafted == ["eagle3"] and summary["compared_families"] == []
    assert first.config["compare_note"].startswith("No dflash draft trained on the same data")
    eagle3 = read_ref(store, "draft_model").fingerprint

    # draft_model's family must be the features': a clear failure before training, nothing trained
    assert main(["run", "--select", "draft_model", "--config-json", _config("dflash", "eagle3")]) == 1
    err = capsys.readouterr().err
    assert "draft_model's draft_family is 'dflash' but hidden_states [demo-00000] stored the target layers of " \
           "'eagle3': set hidden_states' draft_family to 'dflash' as well" in err
    assert read_ref(store, "draft_model").fingerprint == eagle3

    assert main(["run", "--config-json", _config("dflash", "dflash")]) == 1
    out = capsys.readouterr()
    second, summary = report()
    assert second.draft_method == "dflash" and second.drafted == ["dflash", "eagle3"]
    assert summary["compared_drafts"] == {"eagle3": eagle3} and summary["compared_families"] == ["eagle3"]
    for k in (1, 2):
        assert second.row("eagle3", k).forwards == k and second.row("dflash", k).forwards == 1
    # the gate and the run's closing lines are the DFlash draft's; EAGLE-3 is named as compared only
    assert "T=0: DFlash tau " in out.err and "compared (simulated, not gated): EAGLE-3 tau " in out.err
    assert f"quality gate beats_prompt_lookup: FAILED (FAILED k=2, T=0: tau {second.tau('dflash', 2):.3f}" in out.err
