"""SIGKILL at the worst moments, with real subprocesses, then a rerun: nothing half-done is ever
trusted, nothing finished is redone, and the result equals an uninterrupted run.

- resampling: killed after some progress chunks; the rerun resumes (generates only the rows that
  were not saved) and its table equals an uninterrupted run's;
- hidden-state writing: killed in the middle of writing a part (a truncated file is on disk); no
  manifest, readers refuse the artifact; the rerun's parts equal an uninterrupted run's bitwise;
- training, at the Dagster level: a `specdraft run` process SIGKILLed while materializing
  draft_model (after a checkpoint); the rerun resumes from that checkpoint and finishes
  (bitwise-exact resume of the trainer itself: tests/e2e/test_resume.py);
- export: killed while writing a serving export and right after swapping it in; the directory is
  always either absent (first export) or a complete export, old or new; a rerun works.

This module is also the victims' script: `python -m tests.e2e.test_kill_recovery MODE SPEC.json`.
Victims run in their own session (start_new_session) and are killed by their process group id.
Each victim stalls at its kill point (after N progress chunks, inside a part write, after the
checkpoint of step N, after the weights or the swap of an export) and writes a marker file; the test
polls for the marker and SIGKILLs. So the kill always lands where intended, on a fast or a loaded
machine, and the victim can never finish first. The `specdraft run` victim is started once per
module and works in the background while the other tests run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.training.manifest_check import verify_manifest

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[2]


# -- victims (run in the subprocess) ------------------------------------------------------------------
def _victim_resample(spec: dict) -> None:
    import torch

    from training import resample
    from training.storage import ObjectStore
    from training.targets import load_target

    torch.set_num_threads(1)
    target = load_target(spec["target"], backend="hf", device="cpu", dtype="float32")
    progress = resample.ResampleProgress(ObjectStore(spec["root"]), spec["prefix"])
    generate = target.generate

    def generate_or_stall(*args, **kwargs):
        # Once `stall_after` chunks are saved, the next batch never finishes: the kill lands
        # between chunks, deterministically, however fast or loaded the machine is.
        if len(progress.chunk_keys()) >= spec["stall_after"]:
            Path(spec["marker"]).write_text("stalled")
            time.sleep(600)
        return generate(*args, **kwargs)

    target.generate = generate_or_stall
    rows = json.loads(Path(spec["rows"]).read_text())
    resample.resample_conversations(target, rows, resample.ResampleConfig(**spec["cfg"]), progress=progress, log=print)


def _victim_specdraft(spec: dict) -> None:
    """`specdraft run` (spec_assets.cli.main), stalled right after a given training checkpoint is saved."""
    import training.checkpoint as checkpoint
    import training.trainer as trainer

    save = checkpoint.save_checkpoint

    def save_then_stall(store, run_prefix, *, step, **kwargs):
        prefix = save(store, run_prefix, step=step, **kwargs)
        if step >= spec["stall_at_step"]:
            Path(spec["marker"]).write_text(str(step))
            time.sleep(600)
        return prefix

    trainer.save_checkpoint = save_then_stall
    from spec_assets.cli import main

    sys.exit(main(spec["argv"]))


def _victim_hidden(spec: dict) -> None:
    import torch

    from training.hidden_states import write_hidden_states
    from training.storage import ArtifactWriter, ObjectStore
    from training.targets import load_target

    torch.set_num_threads(1)
    open_ = ArtifactWriter.open

    def pausing_open(self, name):
        w = open_(self, name)
        if name == spec["pause_in"]:
            write = w.write

            def write_half_then_pause(data):
                # The part arrives as one buffer (safetensors' bytes): half of it on disk, the rest not.
                write(memoryview(data)[: len(data) // 2])
                w._f.flush()
                Path(spec["marker"]).write_text(str(w.bytes))
                time.sleep(600)

            w.write = write_half_then_pause
        return w

    ArtifactWriter.open = pausing_open
    target = load_target(spec["target"], backend="hf", device="cpu", dtype="float32")
    rows = json.loads(Path(spec["rows"]).read_text())
    with ObjectStore(spec["root"]).artifact(spec["prefix"], "fp") as writer:
        write_hidden_states(target, rows, writer, **spec["kwargs"])


def _victim_export(spec: dict) -> None:
    import shutil

    import safetensors.torch
    import torch

    import training.export as export

    torch.set_num_threads(1)
    draft, tc, d2t, t2d = _draft(spec["seed"], spec["tc"])
    marker = Path(spec["marker"])

    def pause(what: str) -> None:
        marker.write_text(what)
        time.sleep(600)

    if spec["stage"] == "writing":  # the weights are in the temporary directory, config.json is not
        save_file = safetensors.torch.save_file

        def save_then_pause(*args, **kwargs):
            save_file(*args, **kwargs)
            pause("writing")

        safetensors.torch.save_file = save_then_pause
    elif spec["stage"] == "swapped":  # the new export is in place; the old one not yet removed
        rmtree = shutil.rmtree

        def pause_then_rmtree(path, *args, **kwargs):
            pause(f"swapped {path}")
            rmtree(path, *args, **kwargs)

        export.shutil.rmtree = pause_then_rmtree
    export.export_draft(draft, d2t, t2d, tc, spec["out"])


def _draft(seed: int, tc: dict):
    """A small EAGLE-3 draft for target config `tc` (no transformers import: victims start fast)."""
    import torch

    from training.eagle3.model import DraftConfig, Eagle3Draft

    embed = torch.randn(tc["vocab_size"], tc["hidden_size"], generator=torch.Generator().manual_seed(123))
    torch.manual_seed(seed)
    draft = Eagle3Draft(DraftConfig.from_target_config(tc, 64, None), embed)
    ids = torch.randperm(tc["vocab_size"], generator=torch.Generator().manual_seed(0))[:64].sort().values
    t2d = torch.zeros(tc["vocab_size"], dtype=torch.bool)
    t2d[ids] = True
    return draft, tc, ids - torch.arange(64), t2d


VICTIMS = {"resample": _victim_resample, "hidden": _victim_hidden, "export": _victim_export,
           "specdraft": _victim_specdraft}


# -- driving them ---------------------------------------------------------------------------------------
def _launch(tmp_path: Path, mode: str, spec: dict, name: str | None = None, env: dict | None = None) -> subprocess.Popen:
    name = name or mode
    spec_path = tmp_path / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = open(tmp_path / f"{name}.log", "wb")
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.test_kill_recovery", mode, str(spec_path)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = tmp_path / f"{name}.log"
    return proc


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """Poll `ready()`; when it holds, SIGKILL the victim's process group (only what we started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"victim exited ({proc.returncode}) before the kill:\n{_tail(proc)}")
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            assert proc.returncode == -signal.SIGKILL
            return
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    raise AssertionError(f"kill condition not reached in {timeout}s:\n{_tail(proc)}")


def _tail(proc) -> str:
    return Path(proc.log_path).read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training.targets.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("target") / "tiny", hidden_size=64, num_layers=4)


@pytest.fixture
def one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the victims: bitwise-comparable CPU results
    yield
    torch.set_num_threads(old)


# -- resampling -----------------------------------------------------------------------------------------
def _resample_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {i}: what is {i} + {i}?"},
                {"role": "assistant", "content": "an old answer"}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "and doubled?"}, {"role": "assistant", "content": "old"}]
        rows.append({"id": f"r{i:03d}", "messages": msgs, "source": "kill-test"})
    return rows


def test_resample_killed_after_some_chunks_resumes_without_redoing_rows(tmp_path, tiny, one_thread):
    from training import resample
    from training.storage import ObjectStore
    from training.targets import load_target

    root = (tmp_path / "store").as_uri()
    store = ObjectStore(root)
    rows = _resample_rows(20)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    cfg = {"max_new_tokens": 6, "batch_size": 4, "seed": 3}
    prefix = "resampled_corpus/s0/fp/_progress"
    progress = resample.ResampleProgress(store, prefix)
    marker = tmp_path / "stalled"
    victim = _launch(tmp_path, "resample", {"root": root, "prefix": prefix, "target": str(tiny), "stall_after": 2,
                                            "rows": str(tmp_path / "rows.json"), "cfg": cfg, "marker": str(marker)})
    # While the victim starts: the uninterrupted reference run, in this process.
    target = load_target(str(tiny), backend="hf", device="cpu", dtype="float32")
    reference = resample.resample_conversations(target, rows, resample.ResampleConfig(**cfg), log=lambda _: None)

    _kill_when(victim, marker.exists)  # two chunks saved, the third batch under way
    saved = progress.load()
    assert len(progress.chunk_keys()) == 2 and len(saved) == 8  # whole chunks only (5 batches in all)

    row_of = {r["messages"][0]["content"]: r["id"] for r in rows}  # the first user turn names the row
    generated: set[str] = set()
    generate = target.generate

    def counting_generate(convs, params):
        generated.update(row_of[c[0]["content"]] for c in convs)
        return generate(convs, params)

    target.generate = counting_generate
    resumed = resample.resample_conversations(target, rows, resample.ResampleConfig(**cfg), progress=progress,
                                              log=lambda _: None)
    assert resumed.n_resumed == len(saved)
    assert generated.isdisjoint(saved)  # nothing redone
    assert generated | set(saved) == {r["id"] for r in rows}  # nothing skipped
    assert resumed.table.equals(reference.table)
    assert resumed.rejects.equals(reference.rejects)
    assert (resumed.n_in, resumed.n_ok, resumed.n_rejected) == (reference.n_in, reference.n_ok, reference.n_rejected)
    assert resumed.tokens_generated == reference.tokens_generated
    assert resumed.finish_reasons == reference.finish_reasons


# -- hidden states --------------------------------------------------------------------------------------
def _token_rows(n: int, vocab: int = 200, seed: int = 0) -> list[list[list[int]]]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(12, 48)
        rows.append([[rng.randrange(5, vocab) for _ in range(length)], [0] * (length // 3) + [1] * (length - length // 3)])
    return rows


def test_hidden_states_killed_mid_part_leave_nothing_readable_and_rerun_is_bitwise_equal(tmp_path, tiny, one_thread):
    from training.hidden_states import HiddenStateDataset, write_hidden_states
    from training.storage import ObjectStore
    from training.targets import load_target
    from training.train_main import build_offline_source

    root = (tmp_path / "store").as_uri()
    store = ObjectStore(root)
    rows = _token_rows(30)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    kwargs = {"max_tokens_per_batch": 96, "part_bytes": 40_000}
    prefix = "hidden_states/s0/fp"
    marker = tmp_path / "paused"
    victim = _launch(tmp_path, "hidden", {"root": root, "prefix": prefix, "target": str(tiny), "rows": str(tmp_path / "rows.json"),
                                          "kwargs": kwargs, "pause_in": "part-00003.safetensors", "marker": str(marker)})
    _kill_when(victim, marker.exists)

    # What the kill left: finished parts and a truncated one in an attempt folder, and no manifest.
    left = store.list(prefix, recursive=True)
    assert left and all("/attempt-" in k for k in left), left
    partial = [k for k in left if k.endswith("part-00003.safetensors")]
    partial_size = store.size(partial[0]) if len(partial) == 1 else None
    assert partial_size == int(marker.read_text())
    assert store.manifest(prefix) is None
    with pytest.raises(FileNotFoundError, match="has no manifest"):
        build_offline_source([prefix], store)  # the trainer refuses it

    # An uninterrupted run elsewhere, then the rerun at the killed prefix.
    target = load_target(str(tiny), backend="hf", device="cpu", dtype="float32")
    with store.artifact("hidden_states/ref/fp", "fp") as w:
        write_hidden_states(target, rows, w, **kwargs)
    with store.artifact(prefix, "fp") as w:
        write_hidden_states(target, rows, w, **kwargs)
    ref, rerun = store.manifest("hidden_states/ref/fp"), store.manifest(prefix)
    assert len(ref.names("part-")) > 4
    assert {n: e["sha256"] for n, e in rerun.files.items()} == {n: e["sha256"] for n, e in ref.files.items()}
    assert rerun.files["part-00003.safetensors"]["bytes"] > partial_size  # the killed part was truncated
    verify_manifest(store, rerun)
    assert not store.exists(partial[0])  # the dead attempt is gone
    data = HiddenStateDataset(store, [rerun])
    assert data.num_sequences == len(rows) and data.num_tokens == sum(len(r[0]) for r in rows)


# -- export ---------------------------------------------------------------------------------------------
def test_export_killed_never_leaves_a_half_directory(tmp_path, one_thread):
    from safetensors.torch import load_file

    from training.export import export_draft, load_draft

    def complete(d: Path) -> bool:
        if sorted(p.name for p in d.iterdir()) != ["config.json", "model.safetensors"]:
            return False
        json.loads((d / "config.json").read_text())
        load_file(str(d / "model.safetensors"))
        return True

    from tests.training.eagle3.helpers import tiny_target

    old_draft, tc, d2t, t2d = _draft(0, tiny_target()[1])
    cases = {  # name: (previous export?, stage)
        "first": (False, "writing"),
        "replace_writing": (True, "writing"),
        "replace_swapped": (True, "swapped"),
    }
    victims = {}
    for name, (previous, stage) in cases.items():
        out = tmp_path / name / "export"
        if previous:
            export_draft(old_draft, d2t, t2d, tc, out)
        marker = tmp_path / f"{name}.paused"
        spec = {"seed": 1, "tc": tc, "stage": stage, "out": str(out), "marker": str(marker)}
        victims[name] = (_launch(tmp_path, "export", spec, name=name), marker, out)
    old_weights = (tmp_path / "replace_writing" / "export" / "model.safetensors").read_bytes()
    try:
        for name, (victim, marker, out) in victims.items():
            _kill_when(victim, marker.exists)
            previous, stage = cases[name]
            visible = [p for p in out.parent.iterdir() if not p.name.startswith(".")]
            if not previous:
                assert visible == []  # a first export killed midway: no directory at all
            else:
                assert visible == [out] and complete(out)  # always a complete export: old or new
                is_new = (out / "model.safetensors").read_bytes() != old_weights
                assert is_new == (stage == "swapped")
            # Rerun: the export completes and loads.
            new_draft, *_ = _draft(1, tc)
            export_draft(new_draft, d2t, t2d, tc, out)
            assert complete(out)
            load_draft(out, embed_weight=new_draft.embed_tokens.weight)  # the export has no embedding by default
            # What a kill leaves besides is hidden (dot-named) scratch, never a second export.
            assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == ["export"]
    finally:
        for victim, _, _ in victims.values():  # none outlives the test, whatever failed
            if victim.poll() is None:
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait(30)


# -- training, through Dagster ---------------------------------------------------------------------------
DRAFT_STEPS, STALL_AT = 15, 10


@pytest.fixture(scope="module")
def specdraft_victim(tmp_path_factory, tiny):
    """A `specdraft run` of the graph up to draft_model, started once for the module so it works in
    the background while the library-level kill tests run; it stalls right after the training
    checkpoint of step STALL_AT (so the kill cannot miss its moment) until the test kills it."""
    from training.demo.corpus import write_demo_corpus

    tmp = tmp_path_factory.mktemp("specdraft")
    corpus = tmp / "corpus"
    write_demo_corpus(corpus, n_shards=1, rows_per_shard=16, seed=1)
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {"DAGSTER_HOME": str(home), "SPECDRAFT_ROOT": (tmp / "store").as_uri(), "SPECDRAFT_TARGET": str(tiny),
           "SPECDRAFT_CORPUS": str(corpus)}
    config = {"ops": {
        "source_corpus": {"config": {"heldout_fraction": 0.25}},
        "resampled_corpus": {"config": {"resample": False}},
        "tokenized_shards": {"config": {"max_length": 128}},
        "hidden_states": {"config": {"max_tokens_per_batch": 1024}},
        "draft_model": {"config": {"epochs": 100, "max_steps": DRAFT_STEPS, "ttt_length": 2,
                                   "max_tokens_per_batch": 256, "checkpoint_every": 5, "log_every": 5}},
    }}
    argv = ["run", "--config-json", json.dumps(config)]
    marker = tmp / "stalled"
    victim = _launch(tmp, "specdraft", {"argv": [*argv, "--select", "*draft_model"], "stall_at_step": STALL_AT,
                                        "marker": str(marker)}, env=env)
    yield {"proc": victim, "marker": marker, "tmp": tmp, "env": env, "argv": argv}
    if victim.poll() is None:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(30)


pytestmark = [pytestmark, pytest.mark.usefixtures("specdraft_victim")]


def test_specdraft_killed_while_training_resumes_from_its_checkpoint(specdraft_victim):
    from training.storage import ObjectStore

    v = specdraft_victim
    store = ObjectStore(v["env"]["SPECDRAFT_ROOT"])
    _kill_when(v["proc"], v["marker"].exists, timeout=130)
    (fp_prefix,) = store.list("draft_model/_")
    pointer = store.read_json(f"{fp_prefix}/_run/checkpoints/latest.json")
    assert pointer["step"] == STALL_AT < DRAFT_STEPS
    assert store.manifest(fp_prefix) is None  # killed mid-training: nothing published

    # The same command again (only draft_model now: its inputs are done): it resumes.
    log = open(v["tmp"] / "rerun.log", "wb")
    rerun = subprocess.Popen([sys.executable, "-m", "spec_assets.cli", *v["argv"], "--select", "draft_model"], cwd=ROOT,
                             env={**os.environ, **v["env"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rerun.log_path = v["tmp"] / "rerun.log"
    try:
        assert rerun.wait(180) == 0, _tail(rerun)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
    out = Path(rerun.log_path).read_text()
    assert f"resumed {fp_prefix}/_run from step {STALL_AT}/{DRAFT_STEPS}" in out, out[-3000:]
    manifest = store.manifest(fp_prefix)
    assert manifest is not None and manifest.summary["steps"] == DRAFT_STEPS
    assert set(manifest.names("export/")) == {"export/config.json", "export/model.safetensors"}
    verify_manifest(store, manifest)
    attempts = [k.rsplit("/", 1)[-1] for k in store.list(fp_prefix) if "attempt-" in k]
    assert attempts == [manifest.files["export/config.json"]["path"].split("/")[0]]  # the killed attempt is gone


if __name__ == "__main__":
    VICTIMS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
