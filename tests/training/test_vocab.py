"""Vocab map: DuckDB counts over tokenized Parquet on the store, top-N selection, d2t/t2d, safetensors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.tokenization import TOKENIZED_SCHEMA
from training.vocab import (
    MAX_DRAFT_VOCAB,
    draft_vocab_size_by_coverage,
    build_vocab_map,
    check_vocab_map,
    count_masked_tokens,
    coverage,
    load_vocab_map,
    read_vocab_map,
    save_vocab_map,
)

VOCAB = 50


def shard_table(seed: int, rows: int = 30) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(rows):
        n = int(rng.integers(1, 40))
        ids.append(rng.zipf(1.5, n).clip(max=VOCAB) - 1)  # skewed, like real token frequencies
        masks.append(rng.random(n) < 0.6)
    return pa.table(
        {
            "id": [f"s{seed}-{i}" for i in range(rows)],
            "input_ids": pa.array([a.astype(np.int32) for a in ids], pa.list_(pa.int32())),
            "loss_mask": pa.array([m.astype(np.uint8) for m in masks], pa.list_(pa.uint8())),
            "n_tokens": pa.array([len(a) for a in ids], pa.int32()),
            "truncated": [False] * rows,
        },
        schema=TOKENIZED_SCHEMA,
    )


def numpy_counts(table: pa.Table) -> np.ndarray:
    ids = np.concatenate([np.asarray(a) for a in table.column("input_ids").to_pylist()])
    mask = np.concatenate([np.asarray(m) for m in table.column("loss_mask").to_pylist()]).astype(bool)
    return np.bincount(ids[mask], minlength=VOCAB).astype(np.int64)


def put(store, key: str, table: pa.Table) -> str:
    with store.open(key, "wb") as f:
        pq.write_table(table, f)
    return store.duckdb_path(key)


def test_duckdb_counts_equal_numpy_counts_on_the_store(store):
    table = shard_table(0)
    counts = count_masked_tokens(store.duckdb(), put(store, "tok/s0.parquet", table), VOCAB)
    assert counts.dtype == np.int64 and counts.shape == (VOCAB,)
    np.testing.assert_array_equal(counts, numpy_counts(table))
    from training.tokenization import tokenized_stats

    stats = tokenized_stats(store.duckdb(), store.duckdb_path("tok/s0.parquet"))
    assert stats["rows"] == table.num_rows and stats["masked_tokens"] == counts.sum()


def test_shard_counts_sum_independent_of_order(local_store):
    tables = [shard_table(s) for s in range(3)]
    paths = [put(local_store, f"tok/s{s}.parquet", t) for s, t in enumerate(tables)]
    con = local_store.duckdb()
    per_shard = [count_masked_tokens(con, p, VOCAB) for p in paths]
    forward = build_vocab_map(sum(per_shard), 10)
    backward = build_vocab_map(sum(reversed(per_shard)), 10)
    for key in ("d2t", "t2d", "counts"):
        assert torch.equal(forward[key], backward[key])
    # the same as counting all shards at once
    np.testing.assert_array_equal(sum(per_shard), count_masked_tokens(con, paths, VOCAB))


def test_d2t_semantics_on_a_hand_built_case():
    counts = np.array([0, 5, 1, 7, 0, 3], dtype=np.int64)
    vmap = build_vocab_map(counts, 3)
    # top 3: id 3 (7), id 1 (5), id 5 (3) -> draft ids 0, 1, 2 map to target ids 1, 3, 5
    assert vmap["d2t"].tolist() == [1, 2, 3]
    assert vmap["t2d"].tolist() == [False, True, False, True, False, True]
    draft_ids = torch.arange(3)
    assert (draft_ids + vmap["d2t"][draft_ids]).tolist() == [1, 3, 5]
    assert vmap["counts"].tolist() == counts.tolist()
    assert vmap["d2t"].dtype == torch.int64 and vmap["t2d"].dtype == torch.bool


def test_ties_go_to_the_lower_id():
    counts = np.array([2, 4, 4, 1, 4, 2], dtype=np.int64)
    assert torch.nonzero(build_vocab_map(counts, 2)["t2d"]).flatten().tolist() == [1, 2]
    assert torch.nonzero(build_vocab_map(counts, 4)["t2d"]).flatten().tolist() == [0, 1, 2, 4]


def test_identity_when_draft_vocab_covers_target():
    counts = np.array([3, 0, 1, 0], dtype=np.int64)
    for n in (4, 10):
        vmap = build_vocab_map(counts, n)
        assert vmap["d2t"].tolist() == [0, 0, 0, 0] and vmap["t2d"].all()
        assert coverage(vmap["counts"], vmap["t2d"]) == 1.0


def test_coverage():
    counts = np.array([0, 5, 1, 7, 0, 3], dtype=np.int64)
    vmap = build_vocab_map(counts, 2)  # ids 1 and 3: 12 of 16 masked tokens
    assert coverage(counts, vmap["t2d"]) == pytest.approx(12 / 16)
    assert coverage(vmap["counts"], vmap["t2d"]) == pytest.approx(12 / 16)  # tensors work too
    with pytest.raises(ValueError, match="0 masked tokens"):  # nothing covered is not full coverage
        coverage(np.zeros(4, dtype=np.int64), np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="no loss-masked tokens.*reject_reasons"):
        build_vocab_map(np.zeros(4, dtype=np.int64), 2)


def test_safetensors_round_trip(tmp_path):
    vmap = build_vocab_map(np.array([0, 5, 1, 7, 0, 3]), 3)
    data = save_vocab_map(vmap)
    loaded = load_vocab_map(data)
    assert set(loaded) == {"d2t", "t2d", "counts"}
    for key in loaded:
        assert torch.equal(loaded[key], vmap[key]) and loaded[key].dtype == vmap[key].dtype
    path = tmp_path / "vocab_map.safetensors"
    with open(path, "wb") as f:
        assert save_vocab_map(vmap, f) == data
    with open(path, "rb") as f:
        assert torch.equal(load_vocab_map(f)["d2t"], vmap["d2t"])


def test_read_vocab_map_from_a_key_or_an_artifact_prefix(local_store):
    vmap = build_vocab_map(np.array([0, 5, 1, 7, 0, 3]), 3)
    with local_store.artifact("vocab_map/_/fp1", "fp1") as w:
        w.write_bytes("vocab_map.safetensors", save_vocab_map(vmap))
    manifest = local_store.manifest("vocab_map/_/fp1")
    for key in ("vocab_map/_/fp1", manifest.key("vocab_map.safetensors")):
        loaded = read_vocab_map(local_store, key)
        assert all(torch.equal(loaded[k], vmap[k]) for k in vmap)
    with pytest.raises(FileNotFoundError, match="vocab_map/_/nothing"):
        read_vocab_map(local_store, "vocab_map/_/nothing")
    with local_store.artifact("vocab_map/_/two", "two") as w:
        w.write_bytes("a.safetensors", save_vocab_map(vmap))
        w.write_bytes("b.safetensors", save_vocab_map(vmap))
    with pytest.raises(ValueError, match="expected one safetensors file"):
        read_vocab_map(local_store, "vocab_map/_/two")
    bad = save_vocab_map(vmap).replace(b"d2t", b"x2t")  # same length: a map without d2t
    with local_store.artifact("vocab_map/_/bad", "bad") as w:
        w.write_bytes("vocab_map.safetensors", bad)
    with pytest.raises(ValueError, match="vocab_map/_/bad.*lacks"):
        read_vocab_map(local_store, "vocab_map/_/bad")


def test_inconsistent_maps_are_refused():
    vmap = build_vocab_map(np.array([0, 5, 1, 7, 0, 3]), 3)
    bad = dict(vmap, d2t=vmap["d2t"] + 1)
    with pytest.raises(ValueError, match="d2t"):
        check_vocab_map(bad)
    with pytest.raises(ValueError, match="d2t"):
        save_vocab_map(bad)


def test_ids_outside_the_vocab_are_an_error(local_store):
    path = put(local_store, "tok/s0.parquet", shard_table(0))
    with pytest.raises(ValueError, match="outside the target vocab"):
        count_masked_tokens(local_store.duckdb(), path, 5)


def test_counts_over_real_tokenized_rows(local_store):
    """End to end: tokenize, write to the store, count with DuckDB, compare with the table itself."""
    from tests.training.test_chat_templates import CASES, family_tokenizer
    from training.tokenization import TokenizeConfig, tokenize_conversations

    tok = family_tokenizer("chatml")
    res = tokenize_conversations(tok, [{"id": k, "messages": v} for k, v in CASES.items()], TokenizeConfig())
    counts = count_masked_tokens(local_store.duckdb(), put(local_store, "tok/chat.parquet", res.table), len(tok))
    ids = np.concatenate([np.asarray(a) for a in res.table.column("input_ids").to_pylist()])
    mask = np.concatenate([np.asarray(m) for m in res.table.column("loss_mask").to_pylist()]).astype(bool)
    np.testing.assert_array_equal(counts, np.bincount(ids[mask], minlength=len(tok)))
    n_turns = sum(m["role"] == "assistant" for v in CASES.values() for m in v)
    assert counts[tok.convert_tokens_to_ids("<|im_end|>")] == n_turns  # one end-of-turn per assistant turn


def test_draft_vocab_size_by_coverage_covers_the_corpus_not_the_target():
    counts = np.zeros(50_000, dtype=np.int64)
    counts[:10] = 1000  # ten ids carry almost everything
    counts[10:300] = 1   # a long tail
    n = draft_vocab_size_by_coverage(counts, coverage=0.97)
    assert n == 64  # the 10 frequent ids already reach 97%; rounded up to the multiple
    tail = draft_vocab_size_by_coverage(counts, coverage=1.0)
    assert tail == 320 and tail >= int((counts > 0).sum())  # full coverage needs every used id
    assert draft_vocab_size_by_coverage(np.ones(100, dtype=np.int64)) == 100  # never above the target vocabulary
    assert draft_vocab_size_by_coverage(np.ones(100_000, dtype=np.int64)) == MAX_DRAFT_VOCAB
    with pytest.raises(ValueError, match="no masked tokens"):
        draft_vocab_size_by_coverage(np.zeros(10, dtype=np.int64))
    assert build_vocab_map(counts, None)["d2t"].numel() == draft_vocab_size_by_coverage(counts)  # None: by coverage
