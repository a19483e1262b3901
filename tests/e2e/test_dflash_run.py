"""`specdraft run` with draft_family: dflash on the demo target: the graph stores the DFlash layers,
trains a block draft, and eval_report simulates it and has real vLLM (CPU build, method "dflash") serve
the export, with served tau / simulated tau in [0.95, 1.05] and greedy output equal to plain decoding.
"""

from __future__ import annotations

import json

import pytest

from spec_assets.cli import main
from tests.spec_assets.conftest import new_dagster_home
from training.demo.corpus import write_demo_corpus

KS = [1, 2, 3]
CONFIG = {
    "ops": {
        "source_corpus": {"config": {"heldout_fraction": 0.05}},
        "resampled_corpus": {"config": {"resample": False}},
        "hidden_states": {"config": {"draft_family": "dflash"}},
        "draft_model": {"config": {"draft_family": "dflash", "ttt_length": max(KS), "max_steps": 80, "epochs": 50,
                                   "lr": 4e-3, "max_tokens_per_batch": 2048}},
        "eval_report": {"config": {"ks": KS, "temperatures": [0.0], "max_new_tokens": 48, "max_prompts": 8,
                                   "gate_k": 3, "min_tau": 1.0, "warmup": False}},
    }
}


@pytest.mark.timeout(2400)  # features, 80 steps, the simulator and 4 vLLM engines on 2 shared cores
def test_specdraft_run_trains_and_serves_a_dflash_draft(demo_target_dir, tmp_path, monkeypatch, capsys):
    write_demo_corpus(tmp_path / "corpus", n_shards=1, rows_per_shard=400, seed=0)
    for key, value in {"DAGSTER_HOME": str(new_dagster_home(tmp_path / "home")),
                       "SPECDRAFT_ROOT": (tmp_path / "store").as_uri(), "SPECDRAFT_TARGET": str(demo_target_dir),
                       "SPECDRAFT_CORPUS": str(tmp_path / "corpus")}.items():
        monkeypatch.setenv(key, value)
    assert main(["run", "--config-json", json.dumps(CONFIG)]) == 0
    out = capsys.readouterr().out  # a run that passed says what it made on stdout
    assert "T=0: DFlash tau " in out and "\"method\": \"dflash\"" in out

    from resources.object_store import read_ref
    from training.evaluation import load_result
    from training.storage import ObjectStore

    store = ObjectStore((tmp_path / "store").as_uri())
    features = store.manifest(read_ref(store, "hidden_states", "demo-00000").prefix)
    assert features.summary["aux_layer_ids"] == [1, 2, 4, 5, 7]  # the DFlash layer set of an 8-layer target
    report = store.manifest(read_ref(store, "eval_report").prefix)
    result = load_result(store.read_json(report.key("report.json")))
    assert result.draft_method == "dflash" and result.config["served_by"] == "vLLM"
    for k in KS:
        row = result.served_row(k, 0.0)
        n = result.config["n_prompts"]
        assert row["exact_match"] == f"{n}/{n}", row
        assert row["simulated_tau"] > 1.3, row
        assert 0.95 <= row["ratio"] <= 1.05, row
        assert result.row("dflash", k, 0.0).forwards == 1  # one block forward per step, whatever k
