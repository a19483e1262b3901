"""DFlash through the one trainer (training.train_main.run, draft_family "dflash"): it learns, keeps
held-out validation, exports a DFlash directory, and a run stopped after a checkpoint resumes to the
very weights of the uninterrupted run."""

import json

import pytest
import torch

from tests.training.test_trainer import build_run_fixture, job_spec

CFG = {"lr": 3e-3, "max_steps": 4, "max_tokens_per_batch": 256, "log_every": 1, "checkpoint_every": 2,
       "warmup_steps": 1, "ttt_length": 3, "validation_rows": 8}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_run_fixture(tmp_path_factory.mktemp("dflash_trainer"))


def _job(fx, prefix, export_dir=None):
    job = job_spec(fx, prefix, CFG, export_dir=export_dir)
    job.draft_family, job.dflash_layers = "dflash", 2
    return job


def test_dflash_job_trains_validates_and_exports(fx, tmp_path):
    from training.dflash.export import load_dflash
    from training.train_main import run

    res = run(_job(fx, "runs/dflash", tmp_path / "export"), log=lambda _: None)
    assert res.steps == 4 and res.validation and len(res.acc) == 3
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["num_hidden_layers"] == 2
    assert config["block_size"] == 4
    draft, _, _, _ = load_dflash(tmp_path / "export", res.draft.embed_tokens.weight)
    assert torch.allclose(draft.fc.weight, res.draft.fc.weight, rtol=1e-2, atol=1e-3)  # bf16 export


def test_dflash_run_resumes_exactly(fx):
    from training.train_main import run

    whole = run(_job(fx, "runs/whole"), log=lambda _: None)

    def stop_after_the_step_2_checkpoint(line):
        if line.startswith("step 3/"):
            raise KeyboardInterrupt  # what a kill leaves: the checkpoint of step 2, nothing later

    with pytest.raises(KeyboardInterrupt):
        run(_job(fx, "runs/cut"), log=stop_after_the_step_2_checkpoint)
    lines = []
    resumed = run(_job(fx, "runs/cut"), log=lines.append)
    assert any("resumed runs/cut from step 2/4" in line for line in lines)
    for (n, a), (_, b) in zip(whole.draft.state_dict().items(), resumed.draft.state_dict().items()):
        assert torch.equal(a, b), n
