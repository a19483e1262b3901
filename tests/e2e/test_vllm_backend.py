"""`SPECDRAFT_BACKEND=vllm specdraft run`: resampling and hidden states on real vLLM (its CPU build
here), the draft evaluated by the simulator and served by vLLM, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.spec_assets.conftest import graph_env
from tests.spec_assets.small_run import SMALL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def target_128(tmp_path_factory):
    """head_dim 32: a size vLLM's CPU attention supports (the shared tiny target's 16 is not)."""
    from training.targets.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("t") / "tiny128", hidden_size=128, num_heads=4,
                             num_kv_heads=2, num_layers=8, intermediate_size=256)


@pytest.mark.timeout(1800)  # four vLLM engines (generation, features, served k=0..2) in a whole run
def test_specdraft_run_with_the_vllm_backend(tmp_path, target_128):
    from training.storage import ObjectStore

    env = {**os.environ, **graph_env(tmp_path, target_128, n_shards=1), "SPECDRAFT_BACKEND": "vllm"}
    config = json.loads(json.dumps(SMALL))
    config["ops"]["eval_report"]["config"]["served"] = True
    # Its own process group, killed at the end: vLLM's engine processes must not outlive a failed run.
    proc = subprocess.Popen([str(Path(sys.executable).parent / "specdraft"), "run", "--config-json", json.dumps(config)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=1500)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 1, err[-3000:]  # SMALL's gate (min_tau 4) fails whatever the draft
    assert "quality gate beats_prompt_lookup: FAILED" in err, err[-3000:]
    assert "served by vLLM" in err

    store = ObjectStore(env["SPECDRAFT_ROOT"])
    manifest = store.manifest(_ref(store, "resampled_corpus", "demo-00000"))
    assert manifest.summary["generator"] == f"vllm:{_identity(target_128)}"  # and so is the fingerprint's
    resampled = store.read_parquet(manifest.key("data.parquet"))
    assert resampled.num_rows > 0
    assert all(ids is not None for ids in resampled.column("completion_ids").to_pylist())  # vLLM's own token ids
    tokenized = store.manifest(_ref(store, "tokenized_shards", "demo-00000")).summary
    assert tokenized["rows_from_generated_ids"] > 0 and tokenized["conversations_out"] > 0, tokenized
    assert tokenized["conversations_retokenized"] == 0 and tokenized["generated_id_mismatches"] == 0, tokenized
    report = store.read_json(store.manifest(_ref(store, "eval_report", None)).key("report.json"))
    assert report["config"]["served_by"] == "vLLM"
    for row in report["served"]:  # greedy speculative decoding in vLLM reproduces vLLM's plain decoding
        assert row["exact_match"] == "2/2" and row["served_tau"] >= 1.0, row


def _ref(store, asset: str, partition: str | None) -> str:
    from resources.object_store import read_ref

    return read_ref(store, asset, partition).prefix


def _identity(target) -> str:
    from training.fingerprint import model_identity

    return model_identity(str(target))
