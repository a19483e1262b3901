"""Ingestion under a fuzzed corpus (tests/e2e/corpus_fuzz.py): 10,000 seeded records mixing valid rows of
all four formats with every malformed kind, in one JSONL file of raw bytes.

Reconciled record by record, not only in totals: read = accepted + rejected; every reject has the
reason the rules give (and the line it came from); accepted rows are exactly the expected ids,
formats, sources and turns (content never rewritten); duplicate ids follow "first accepted wins";
the source_corpus asset reports the same counts; tokenizing the accepted rows accounts for each.
"""

from __future__ import annotations

from collections import Counter

import dagster as dg
import pytest

from training.corpus import read_source
from tests.conftest import set_fields
from tests.e2e.corpus_fuzz import generate_fuzz_corpus, write_fuzz_corpus
from training.corpus.schema import RAW_CHARS
from tests.training.manifest_check import verify_manifest

pytestmark = pytest.mark.timeout(120)

N_ROWS = 10_000
SEED = 1234


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-corpus")
    corpus = write_fuzz_corpus(folder / "fuzz-00000.jsonl", N_ROWS, seed=SEED)
    return folder / "fuzz-00000.jsonl", corpus


@pytest.fixture(scope="module")
def ingested(fuzz):
    path, _ = fuzz
    return read_source(str(path))


def test_generator_is_seeded_and_covers_every_kind(fuzz):
    _, corpus = fuzz
    again = generate_fuzz_corpus(N_ROWS, seed=SEED, file_name="fuzz-00000.jsonl")
    assert again.data == corpus.data  # same seed, same bytes
    assert generate_fuzz_corpus(200, seed=SEED + 1).data != generate_fuzz_corpus(200, seed=SEED).data
    assert corpus.n_read == N_ROWS and corpus.blank_lines > 0
    categories = set(corpus.by_category)
    assert {"valid_openai", "valid_sharegpt", "valid_prompt_completion", "valid_alpaca", "valid_edge",
            "valid_control_chars", "valid_multi_format_record", "valid_null_fields", "broken_json",
            "raw_control_char", "pathological_json", "invalid_utf8_bytes", "lone_surrogate", "not_an_object",
            "unrecognised_format", "wrong_types", "unknown_role", "empty_turns", "bad_structure", "duplicate_id",
            "reused_rejected_id", "fallback_id_collision", "huge_valid", "huge_invalid"} <= categories
    reasons = set(corpus.by_reason)
    assert {"malformed_json", "invalid_utf8", "not_an_object", "unrecognised_format", "invalid_turns",
            "invalid_turn", "non_string_content", "invalid_id", "empty_content", "empty_conversation",
            "misplaced_system", "no_assistant_turn", "duplicate_id", "unknown_role:critic"} <= reasons
    assert all(n > 0 for n in corpus.formats.values())
    assert corpus.data.startswith(b"\xef\xbb\xbf") and b"\r\n" in corpus.data
    with pytest.raises(UnicodeDecodeError):
        corpus.data.decode("utf-8")  # invalid UTF-8 really is in the file
    assert sum(1 for r in corpus.records if r.category.startswith("huge")) == 4
    assert max(len(line) for line in corpus.data.split(b"\n")) > corpus.huge_bytes  # 1 MB turns


def test_read_source_reconciles_record_by_record(fuzz, ingested):
    path, corpus = fuzz
    r = ingested
    assert (r.n_read, r.n_accepted, r.n_rejected) == (corpus.n_read, corpus.n_accepted, corpus.n_rejected)
    assert r.n_read == r.n_accepted + r.n_rejected == r.rows.num_rows + r.rejects.num_rows
    assert r.formats == corpus.formats
    assert r.reject_reasons == corpus.by_reason

    # Every reject: the right line, the right reason, a detail, the record's id when it has one,
    # and at most RAW_CHARS of the raw line.
    rejects = r.rejects.to_pylist()
    assert all(row["reason"] and row["detail"] for row in rejects)
    assert all(row["source_url"] == str(path) for row in rejects)
    assert all(len(row["raw"]) <= RAW_CHARS for row in rejects)
    got = {row["row_index"]: (row["reason"], row["id"]) for row in rejects}
    want = {e.line: (e.reason, e.id) for e in corpus.rejected}
    assert len(got) == len(rejects)  # one reject per line
    wrong = [(line, want.get(line), got.get(line)) for line in sorted(set(got) | set(want)) if got.get(line) != want.get(line)]
    assert not wrong, wrong[:10]

    # Accepted rows: exactly the expected ids, in file order, with untouched turns and sources.
    rows = r.rows.to_pylist()
    assert [row["id"] for row in rows] == [e.id for e in corpus.accepted]
    for row, e in zip(rows, corpus.accepted):
        assert set_fields(row["messages"]) == e.messages, (e.line, e.category)
        assert row["source"] == e.source, (e.line, e.category)


def test_duplicate_ids_first_accepted_wins(fuzz, ingested):
    _, corpus = fuzz
    rows = ingested.rows.to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids))  # unique within the shard
    first_line = {}
    for e in corpus.accepted:
        first_line.setdefault(e.id, e.line)
    dups = [row for row in ingested.rejects.to_pylist() if row["reason"] == "duplicate_id"]
    assert dups and len(dups) == corpus.by_reason["duplicate_id"]
    for row in dups:
        # The kept row is the earlier one; the detail names where it was first accepted.
        assert first_line[row["id"]] < row["row_index"]
        assert f"first accepted at row {first_line[row['id']]}" in row["detail"]
    # A rejected row claims no id: a later valid row with that id is accepted.
    reused = [e for e in corpus.accepted if e.category == "reused_rejected_id"]
    rejected_ids = {row["id"] for row in ingested.rejects.to_pylist() if row["reason"] != "duplicate_id"}
    assert reused and all(e.id in rejected_ids and e.id in set(ids) for e in reused)
    # An explicit id equal to an earlier row's fallback id "{shard}:{line}" is a duplicate too.
    collisions = [e for e in corpus.records if e.category == "fallback_id_collision"]
    assert collisions and all(e.reason == "duplicate_id" and e.id.startswith(f"{corpus.shard}:") for e in collisions)


def test_control_characters_and_huge_turns_survive_unchanged(fuzz, ingested):
    _, corpus = fuzz
    by_id = {row["id"]: row for row in ingested.rows.to_pylist()}
    controls = [e for e in corpus.accepted if e.category == "valid_control_chars"]
    assert controls
    for e in controls:
        assert set_fields(by_id[e.id]["messages"]) == e.messages  # NUL, ESC, DEL, U+2028, BOM: data, kept as is
    huge = [e for e in corpus.accepted if e.category == "huge_valid"]
    assert len(huge) == 2
    for e in huge:
        assert max(len(m["content"].encode()) for m in by_id[e.id]["messages"]) >= corpus.huge_bytes


def test_same_rows_from_s3(fuzz, ingested, s3_bucket):
    """The same bytes read through the loopback S3 API server give the same rows and rejects."""
    import s3fs

    path, corpus = fuzz
    url = f"{s3_bucket}/corpus/{path.name}"
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(url, corpus.data)
    r = read_source(url)
    assert (r.n_read, r.n_accepted, r.n_rejected) == (ingested.n_read, ingested.n_accepted, ingested.n_rejected)
    assert r.rows.equals(ingested.rows)
    assert r.rejects.drop(["source_url"]).equals(ingested.rejects.drop(["source_url"]))


def test_tokenization_of_accepted_rows_reconciles(fuzz, ingested):
    from training import tokenization
    from training.targets.tiny import build_tokenizer

    _, corpus = fuzz
    max_length = 512
    result = tokenization.tokenize_conversations(
        build_tokenizer(), ingested.rows, tokenization.TokenizeConfig(max_length=max_length))
    assert result.n_in == ingested.n_accepted
    assert result.n_in == result.n_ok + result.n_rejected
    table = result.table.to_pylist()
    kept = {row["id"] for row in table}
    dropped = {row["id"] for row in result.rejects.to_pylist()}
    assert kept.isdisjoint(dropped) and kept | dropped == {e.id for e in corpus.accepted}
    assert len(kept) == result.n_ok and result.rejects.num_rows == result.n_rejected
    assert all(row["reason"] and row["detail"] for row in result.rejects.to_pylist())
    for row in table:
        assert len(row["input_ids"]) == len(row["loss_mask"]) == row["n_tokens"] <= max_length
        assert sum(row["loss_mask"]) > 0
    # The huge turns: a 1 MB prompt leaves no assistant token inside max_length (a reject with its
    # reason); a 1 MB reply is kept, truncated to max_length.
    huge = [e for e in corpus.accepted if e.category == "huge_valid"]
    huge_prompt = next(e for e in huge if len(e.messages[0]["content"]) > corpus.huge_bytes // 2)
    huge_reply = next(e for e in huge if len(e.messages[-1]["content"]) > corpus.huge_bytes // 2)
    assert dict((row["id"], row["reason"]) for row in result.rejects.to_pylist())[huge_prompt.id] == "assistant_truncated"
    reply_row = next(row for row in table if row["id"] == huge_reply.id)
    assert reply_row["truncated"] and reply_row["n_tokens"] == max_length
    assert Counter(row["reason"] for row in result.rejects.to_pylist()) == {"assistant_truncated": result.n_rejected}


def test_source_corpus_asset_reconciles(fuzz, tmp_path):
    """The Dagster asset over the fuzz file: finishes, and its metadata and tables add up."""
    from spec_assets.corpus import source_corpus
    from spec_assets.metadata import top_counts
    from spec_assets.partitions import corpus_shards
    from tests.spec_assets.conftest import make_resources
    from training.storage import ObjectStore

    path, corpus = fuzz
    root = (tmp_path / "store").as_uri()
    resources = make_resources(root, str(path.parent))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(corpus_shards.name, [corpus.shard])
        result = dg.materialize([source_corpus], instance=instance, resources=resources, partition_key=corpus.shard)
        assert result.success
        (mat,) = result.asset_materializations_for_node("source_corpus")
    md = {k: v.value for k, v in mat.metadata.items()}
    assert (md["rows_read"], md["rows_accepted"], md["rows_rejected"]) == (corpus.n_read, corpus.n_accepted, corpus.n_rejected)
    assert md["rows_train"] + md["rows_heldout"] == corpus.n_accepted
    assert md["formats"] == corpus.formats
    # The metadata keeps the most frequent reasons and folds the rest (spec_assets.metadata.top_counts);
    # rejects.parquet below keeps every row's own reason.
    assert md["rejects_by_reason"] == top_counts(dict(corpus.by_reason))

    store = ObjectStore(root)
    ref = result.output_for_node("source_corpus")
    manifest = store.manifest(ref.prefix)
    verify_manifest(store, manifest)
    train = store.read_parquet(manifest.key("data.parquet"))
    heldout = store.read_parquet(manifest.key("heldout.parquet"))
    rejects = store.read_parquet(manifest.key("rejects.parquet"))
    assert train.num_rows + heldout.num_rows == corpus.n_accepted
    assert set(train.column("id").to_pylist()) | set(heldout.column("id").to_pylist()) == {e.id for e in corpus.accepted}
    assert sorted(rejects.column("row_index").to_pylist()) == sorted(e.line for e in corpus.rejected)
    assert Counter(rejects.column("reason").to_pylist()) == corpus.by_reason
    assert manifest.summary["characters"] > 2 * corpus.huge_bytes  # the huge turns are in the stats
