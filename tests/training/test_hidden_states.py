"""Hidden-state parts: writer, reader, storage round trips (local and loopback S3), a killed writer."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.training.manifest_check import verify_manifest
from training.aux_layers import AuxLayerError
from training.hidden_states import (
    HiddenStateDataset,
    NonFiniteFeatures,
    bytes_per_token,
    load_part,
    quantize_fp8,
    read_part_index,
    write_hidden_states,
)
from training.packing import pack_by_tokens
from training.storage import artifact_prefix
from training.targets import load_head_weights, load_target
from training.targets.tiny import build_tiny_target

H, L = 64, 8
IDS = (2, 4, 5)
BATCH = 96  # writer token budget


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: threads only add barrier waits
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return build_tiny_target(tmp_path_factory.mktemp("hs") / "llama", "llama", hidden_size=H, num_layers=L, seed=2)


@pytest.fixture(scope="module")
def target(target_dir):
    return load_target(str(target_dir))


def make_rows(n=48, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(1, max_len))
        ids = [i] + rng.integers(0, 261, length).tolist()  # first token makes every row unique
        rows.append((ids, rng.integers(0, 2, len(ids)).tolist()))
    return rows


ROWS = make_rows()


def write(store, target, rows, *, name="fp", **kw):
    prefix = artifact_prefix("hidden_states", "shard-0", name)
    with store.artifact(prefix, name) as w:
        summary = write_hidden_states(target, rows, w, aux_layer_ids=IDS, max_tokens_per_batch=BATCH, **kw)
    return store.manifest(prefix), summary


def reference_features(target, rows):
    """Features computed with the writer's own batching, per row: {first token: (aux, last)}."""
    out = {}
    for group in pack_by_tokens([len(r[0]) for r in rows], BATCH):
        feats = target.features([rows[i][0] for i in group], IDS)
        cu = feats["cu_seqlens"]
        for k, i in enumerate(group):
            out[rows[i][0][0]] = (feats["aux"][cu[k]:cu[k + 1]], feats["last"][cu[k]:cu[k + 1]])
    return out


def read_sequences(ds, max_tokens=80, dtype=torch.float32, **kw):
    """{first token: (aux, last, input_ids, loss_mask)} over one pass of the reader."""
    seqs = {}
    for b in ds.batches(max_tokens, epoch=kw.pop("epoch", 0), seed=kw.pop("seed", 0), dtype=dtype, **kw):
        cu = b["cu_seqlens"]
        assert cu[-1] == len(b["input_ids"]) == len(b["aux"]) == len(b["last"]) == len(b["loss_mask"])
        for k in range(len(cu) - 1):
            s = slice(int(cu[k]), int(cu[k + 1]))
            seqs[int(b["input_ids"][s][0])] = (b["aux"][s], b["last"][s], b["input_ids"][s], b["loss_mask"][s])
    return seqs


def test_bf16_round_trip_is_exact(store, target):
    """Local folder and loopback S3: what the reader yields is exactly the target's features in bf16."""
    manifest, summary = write(store, target, ROWS, part_bytes=60_000)
    tokens = sum(len(r[0]) for r in ROWS)
    assert summary["tokens"] == tokens and summary["sequences"] == len(ROWS) and summary["parts"] > 1
    assert manifest.summary["tokens"] == tokens and summary["bytes"] == manifest.total_bytes
    ds = HiddenStateDataset(store, [manifest])
    assert (ds.num_tokens, ds.num_sequences, ds.hidden_size, ds.aux_layer_ids) == (tokens, len(ROWS), H, IDS)
    assert ds.target == target.identity and ds.dtype == "bf16"
    got = read_sequences(ds, dtype=torch.bfloat16)
    want = reference_features(target, ROWS)
    assert sorted(got) == sorted(want)
    for ids, mask in ROWS:
        aux, last, input_ids, loss_mask = got[ids[0]]
        assert torch.equal(aux, want[ids[0]][0].to(torch.bfloat16))
        assert torch.equal(last, want[ids[0]][1].to(torch.bfloat16))
        assert input_ids.tolist() == ids and input_ids.dtype == torch.int64
        assert loss_mask.tolist() == mask
    f32 = read_sequences(ds, dtype=torch.float32)
    assert f32[0][0].dtype == torch.float32 and torch.equal(f32[0][0], got[0][0].float())


def test_aux_layer_ids_none_means_the_default(local_store, target):
    """None (what TrainJob and a caller without layers pass) is the default layers, as () is: a
    caller passing its own None through used to fail inside FeatureConfig."""
    rows = ROWS[:3]
    metas = []
    for name, ids in (("none", None), ("empty", ())):
        prefix = artifact_prefix("hidden_states", "shard-0", f"aux-{name}")
        with local_store.artifact(prefix, name) as w:
            write_hidden_states(target, rows, w, aux_layer_ids=ids, max_tokens_per_batch=BATCH)
        metas.append(read_part_index(local_store, local_store.manifest(prefix).key("part-00000.safetensors"))[0])
    assert json.loads(metas[0]["aux_layer_ids"]) == json.loads(metas[1]["aux_layer_ids"]) == list(
        target.default_aux_layer_ids())


def test_header_and_layout(local_store, target):
    manifest, _ = write(local_store, target, ROWS[:10], part_bytes=1 << 30)
    assert manifest.names() == ["part-00000.safetensors"]
    path = local_store.local_path(manifest.key("part-00000.safetensors"))
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["specdraft"])
        tokens = sum(len(r[0]) for r in ROWS[:10])
        assert json.loads(meta["aux_layer_ids"]) == list(IDS)
        assert meta["target"] == target.identity and "#" in meta["target"]
        assert (meta["dtype"], meta["hidden_size"], meta["num_tokens"], meta["num_sequences"]) == ("bf16", str(H), str(tokens), "10")
        shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    assert shapes == {
        "aux": ([tokens, 3 * H], "BF16"), "last": ([tokens, H], "BF16"), "input_ids": ([tokens], "I32"),
        "loss_mask": ([tokens], "U8"), "cu_seqlens": ([11], "I64"),
    }
    meta2, cu = read_part_index(local_store, manifest.key("part-00000.safetensors"))
    assert meta2 == meta and cu.tolist() == np.cumsum([0] + [len(r[0]) for r in ROWS[:10]]).tolist()
    # footprint: 8H+5 bytes per token, plus the header and 8 bytes per sequence
    assert manifest.total_bytes <= tokens * (8 * H + 5) + 8 * 11 + 1024


def test_parts_are_a_function_of_their_content(local_store, target):
    """Written twice, the parts are the same bytes (safetensors' writer orders several metadata keys
    at random: the facts travel as one key); a safetensors file without them is refused by name."""
    first, _ = write(local_store, target, ROWS, name="a", part_bytes=60_000)
    again, _ = write(local_store, target, ROWS, name="b", part_bytes=60_000)
    assert len(first.names("part-")) > 1
    assert {n: e["sha256"] for n, e in first.files.items()} == {n: e["sha256"] for n, e in again.files.items()}
    from safetensors.torch import save

    local_store.write_bytes("foreign.safetensors", save({"cu_seqlens": torch.zeros(1, dtype=torch.int64)},
                                                        metadata={"format": "pt"}))
    with pytest.raises(ValueError, match="foreign.safetensors: not a hidden-state part.*'specdraft'"):
        read_part_index(local_store, "foreign.safetensors")


def test_fp8_within_tolerance_and_half_the_bytes(local_store, target):
    manifest, summary = write(local_store, target, ROWS, dtype="fp8", part_bytes=60_000)
    ds = HiddenStateDataset(local_store, [manifest])
    assert ds.dtype == "fp8"
    part = load_part(local_store, manifest.key("part-00000.safetensors"))
    assert part["aux"].dtype == torch.float8_e4m3fn and part["aux_scale"].shape == (len(part["aux"]), 3)
    assert part["last_scale"].shape == (len(part["last"]),) and part["aux_scale"].dtype == torch.float32
    got, want = read_sequences(ds), reference_features(target, ROWS)
    for key, (aux, last, _, _) in got.items():
        for x, ref in ((aux.reshape(len(aux), 3, H), want[key][0].reshape(len(aux), 3, H)), (last, want[key][1])):
            amax = ref.abs().amax(-1, keepdim=True)
            # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4; tiny values hit the subnormal floor
            assert ((x - ref).abs() <= ref.abs() / 16 + amax * 2 ** -9 / 448 * 8 + 1e-12).all()
            assert torch.nn.functional.cosine_similarity(x.reshape(-1, H), ref.reshape(-1, H), dim=-1).min() > 0.995
    assert summary["bytes_per_token"] < 0.52 * (8 * H + 5) + 25  # fixed per-part costs dominate at H=64
    assert bytes_per_token(4096, 3, "fp8") / (8 * 4096 + 5) < 0.51


def test_parts_split_at_part_bytes_between_sequences(local_store, target):
    long_row = ([250] + [7] * 199, [1] * 200)  # alone bigger than a part
    rows = ROWS[:20] + [long_row] + ROWS[20:30]
    part_bytes = 40_000
    manifest, summary = write(local_store, target, rows, part_bytes=part_bytes)
    sizes = {n: e["bytes"] for n, e in manifest.files.items()}
    counts = []
    for name in manifest.names("part-"):
        meta, cu = read_part_index(local_store, manifest.key(name))
        counts.append(np.diff(cu).tolist())
        big = 200 in counts[-1]
        assert sizes[name] <= part_bytes or (big and len(counts[-1]) == 1), (name, sizes[name], counts[-1])
    assert [n for c in counts for n in c] == [len(r[0]) for r in rows]  # in order, none split
    assert summary["parts"] == len(counts) > 3
    # a part is closed only when the next sequence would not fit
    per_seq = bytes_per_token(H) * np.array([len(r[0]) for r in rows]) + 8
    assert all(sizes[n] + per_seq[sum(map(len, counts[: i + 1]))] > part_bytes - 1024
               for i, n in enumerate(manifest.names("part-")[:-1]))


def test_reader_deterministic_sharded_and_skippable(local_store, target):
    manifest, _ = write(local_store, target, ROWS, part_bytes=30_000)
    ds = HiddenStateDataset(local_store, [manifest])

    def sig(batches):
        return [tuple(b["input_ids"][b["cu_seqlens"][:-1]].tolist()) for b in batches]

    epoch0 = sig(ds.batches(70, epoch=0, seed=1))
    assert epoch0 == sig(ds.batches(70, epoch=0, seed=1))
    assert epoch0 != sig(ds.batches(70, epoch=1, seed=1)) and epoch0 != sig(ds.batches(70, epoch=0, seed=2))
    assert len(epoch0) == ds.num_batches(70, epoch=0, seed=1)
    assert Counter(t for b in epoch0 for t in b) == Counter(r[0][0] for r in ROWS)  # each sequence once
    for b in ds.batches(70, epoch=0, seed=1):
        assert len(b["input_ids"]) <= 70 or len(b["cu_seqlens"]) == 2

    ranks = [sig(ds.batches(70, epoch=0, seed=1, rank=r, world_size=3)) for r in range(3)]
    n = ds.num_batches(70, world_size=3, epoch=0, seed=1)
    assert [len(r) for r in ranks] == [n, n, n] and n == len(epoch0) // 3
    assert sum(ranks, []) == epoch0[: 3 * n]  # disjoint, equal, together the epoch minus the remainder

    assert sig(ds.batches(70, epoch=0, seed=1, skip=5)) == epoch0[5:]
    assert sig(ds.batches(70, epoch=0, seed=1, rank=1, world_size=3, skip=2)) == ranks[1][2:]


def test_skip_does_not_load_skipped_parts(local_store, target, monkeypatch):
    import training.hidden_states as hs

    manifest, _ = write(local_store, target, ROWS, part_bytes=30_000)
    ds = HiddenStateDataset(local_store, [manifest])
    plan = ds.plan(70, 0, 0)
    loaded = []
    real = hs.load_part
    monkeypatch.setattr(hs, "load_part", lambda store, key: loaded.append(key) or real(store, key))
    skip = next(i for i, (p, _) in enumerate(plan) if p != plan[0][0])  # the first batch of the second part
    next(ds.batches(70, epoch=0, seed=0, skip=skip))
    assert loaded == [ds.parts[plan[skip][0]].key]


def test_lm_head_of_stored_last_reproduces_target_logits(local_store, target, target_dir):
    manifest, _ = write(local_store, target, ROWS[:8])
    _, lm_head = load_head_weights(str(target_dir))
    for key, (_, last, input_ids, _) in read_sequences(HiddenStateDataset(local_store, [manifest])).items():
        with torch.inference_mode():
            want = target.model(input_ids[None]).logits[0]
        got = last @ lm_head.float().T
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_several_shards_one_dataset(local_store, target):
    m1, _ = write(local_store, target, ROWS[:20], name="a")
    m2, _ = write(local_store, target, ROWS[20:], name="b")
    ds = HiddenStateDataset(local_store, [m1, m2])
    assert ds.num_sequences == len(ROWS)
    assert sorted(read_sequences(ds)) == sorted(r[0][0] for r in ROWS)


def test_writer_input_checks(local_store, target):
    rows = [([1, 2, 3], [0, 1, 1]), ([], []), ([4], [1])]
    _, summary = write(local_store, target, rows)
    assert (summary["sequences"], summary["skipped_empty"]) == (2, 1)
    with pytest.raises(ValueError, match="loss_mask"):
        write(local_store, target, [([1, 2], [1])], name="bad")
    with pytest.raises(ValueError, match="dtype"):
        write(local_store, target, rows, name="bad2", dtype="fp16")
    with pytest.raises(ValueError, match="part_bytes"):
        write(local_store, target, rows, name="bad3", part_bytes=100)
    assert local_store.manifest(artifact_prefix("hidden_states", "shard-0", "bad")) is None


class FakeTarget:
    """Features without a model: random finite values, except `poison` = (row index, token, slot, value)
    written into the batch holding that row (slot k = aux layer ids[k], 3 = last)."""

    identity = "fake"

    def __init__(self, poison=None, num_layers=8, hidden=16):
        self.facts = types.SimpleNamespace(hidden_size=hidden, num_layers=num_layers)
        self.poison, self.calls, self.rows_seen = poison, 0, 0

    def default_aux_layer_ids(self):
        return (2, 4, 5)

    def features(self, sequences, aux_layer_ids):
        self.calls += 1
        H, T = self.facts.hidden_size, sum(map(len, sequences))
        g = torch.Generator().manual_seed(T)
        aux, last = torch.randn(T, 3 * H, generator=g), torch.randn(T, H, generator=g)
        if self.poison:
            row, tok, slot, value = self.poison
            if self.rows_seen <= row < self.rows_seen + len(sequences):
                t = sum(map(len, sequences[: row - self.rows_seen])) + tok
                (last[t] if slot == 3 else aux[t, slot * H:(slot + 1) * H])[5] = value
        self.rows_seen += len(sequences)
        return {"aux": aux, "last": last}


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("poison,where", [
    ((7, 3, 1, float("inf")), "row 7 (id 'doc-7'), token 3 of 12, aux layer 4"),
    ((12, 0, 3, float("nan")), "row 12 (id 'doc-12'), token 0 of 12, layer 'last'"),
    ((0, 11, 0, float("-inf")), "row 0 (id 'doc-0'), token 11 of 12, aux layer 2"),
])
def test_non_finite_features_are_refused_naming_shard_row_and_layer(local_store, dtype, poison, where):
    rows = [([i + 1] * 12, [1] * 12, f"doc-{i}") for i in range(20)]
    prefix = artifact_prefix("hidden_states", "shard-7", "fp")
    with pytest.raises(NonFiniteFeatures) as err:
        with local_store.artifact(prefix, "fp") as w:
            write_hidden_states(FakeTarget(poison), rows, w, aux_layer_ids=(2, 4, 5), max_tokens_per_batch=48,
                                dtype=dtype, shard="shard-7")
    assert "hidden_states shard-7" in str(err.value) and where in str(err.value), str(err.value)
    assert local_store.manifest(prefix) is None
    # the same rows, all finite, write (the check does not refuse good data)
    with local_store.artifact(prefix, "fp") as w:
        summary = write_hidden_states(FakeTarget(), rows, w, aux_layer_ids=(2, 4, 5), max_tokens_per_batch=48,
                                      dtype=dtype, shard="shard-7")
    assert summary["sequences"] == 20
    batch = next(HiddenStateDataset(local_store, [local_store.manifest(prefix)]).batches(1000, epoch=0, seed=0))
    assert torch.isfinite(batch["aux"]).all() and torch.isfinite(batch["last"]).all()


def test_fp8_scales_stay_finite_and_positive():
    x = torch.tensor([[[0.0, 0.0]], [[1e-44, -2e-44]], [[3e38, -1.0]], [[1.0, 0.5]]])
    q, scale = quantize_fp8(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    deq = q.float() * scale[..., None]
    assert torch.isfinite(deq).all()
    torch.testing.assert_close(deq[3], x[3], rtol=0.07, atol=0)  # an ordinary row round-trips
    torch.testing.assert_close(deq[2, 0, 0], x[2, 0, 0], rtol=0.07, atol=0)  # a huge amax stays finite
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fp8(torch.tensor([[[1.0, float("inf")]]]))


@pytest.mark.parametrize("ids,why", [((0, 4, 5), "1..7"), ((2, 4, 8), "1..7"), ((2, 4, 4), "ascending"),
                                     ((5, 2, 4), "ascending"), ((1, 2, 4, 5), "hold 4 ids"), ((2,), "hold 1 ids")])
def test_unservable_aux_ids_refused_before_any_forward(local_store, ids, why):
    fake = FakeTarget()
    with pytest.raises(AuxLayerError, match=why) as err:
        with local_store.artifact("hidden_states/shard-3/fp", "fp") as w:
            write_hidden_states(fake, [([1, 2, 3], [1, 1, 1])], w, aux_layer_ids=ids, shard="shard-3")
    assert "hidden_states shard-3" in str(err.value) and fake.calls == 0


KILLED_WRITER = textwrap.dedent("""
    import sys, time, types
    from pathlib import Path
    import torch
    from training.hidden_states import write_hidden_states
    from training.storage import ObjectStore

    class StandIn:
        # A feature source without transformers, so the subprocess starts fast; what is under
        # test is the writer's and the store's behaviour when killed, not the model.
        identity = "stand-in"
        facts = types.SimpleNamespace(hidden_size=16, num_layers=8)

        def features(self, sequences, aux_layer_ids):
            T = sum(map(len, sequences))
            g = torch.Generator().manual_seed(T)
            return {"aux": torch.randn(T, 48, generator=g), "last": torch.randn(T, 16, generator=g)}

    root, flag = sys.argv[1:3]
    store = ObjectStore(root)

    def rows():
        for i in range(1000):
            if i == 30:
                Path(flag).write_text("parts written, now hanging")
                time.sleep(600)
            yield [i + 1] * 20, [1] * 20

    with store.artifact("hidden_states/shard-0/fp", "fp") as w:
        write_hidden_states(StandIn(), rows(), w, aux_layer_ids=(2, 4, 5), max_tokens_per_batch=40, part_bytes=8_000)
""")


def test_killed_writer_leaves_no_manifest_and_rerun_completes(local_store, target, tmp_path):
    flag = tmp_path / "flag"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, local_store.root, str(flag)],
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "writer subprocess did not reach the kill point"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    prefix = "hidden_states/shard-0/fp"
    assert local_store.manifest(prefix) is None
    leftovers = local_store.list(prefix, recursive=True)
    assert sum(k.endswith(".safetensors") for k in leftovers) >= 2  # it died mid-shard, after some parts

    rows = [([i + 1] * 20, [1] * 20) for i in range(40)]
    with local_store.artifact(prefix, "fp") as w:
        summary = write_hidden_states(target, rows, w, aux_layer_ids=IDS, max_tokens_per_batch=40, part_bytes=30_000)
    manifest = local_store.manifest(prefix)
    assert manifest is not None and summary["sequences"] == 40
    assert HiddenStateDataset(local_store, [manifest]).num_tokens == 800
    attempts = {k.split("/")[3] for k in local_store.list(prefix, recursive=True) if "/attempt-" in k}
    assert len(attempts) == 1  # the dead attempt's files are gone
    verify_manifest(local_store, manifest)
