"""vocab_map on a multimodal target whose vocab_size lives under text_config (Gemma-3 style): it
raised `AttributeError: ... no attribute 'vocab_size'`; it reads the LM's vocab through the one
config parser (training/targets/config.py)."""

from __future__ import annotations

import json


def test_vocab_map_reads_the_vocab_of_a_gemma3_style_target(tmp_path):
    import dagster as dg
    import pyarrow as pa
    import pyarrow.parquet as pq

    from resources.object_store import ObjectStoreResource
    from resources.target_model import TargetModelResource
    from spec_assets.tokenize import VocabMapConfig, vocab_map
    from tests.training.targets.test_config import GEMMA3
    from training.storage import ArtifactRef, ObjectStore

    target_dir = tmp_path / "gemma3"
    target_dir.mkdir()
    (target_dir / "config.json").write_text(json.dumps(GEMMA3))  # vocab 300 under text_config only
    root = (tmp_path / "store").as_uri()
    store = ObjectStore(root)
    table = pa.table({"id": ["a", "b"], "input_ids": pa.array([[2, 7, 299, 7], [5, 6]], pa.list_(pa.int32())),
                      "loss_mask": pa.array([[0, 1, 1, 1], [1, 1]], pa.list_(pa.uint8())),
                      "n_tokens": pa.array([4, 2], pa.int32()), "truncated": [False, False]})
    prefix = "tokenized_shards/s0/fp0"
    with store.artifact(prefix, "fp0") as w:
        with w.open("data.parquet") as f:
            pq.write_table(table, f)
    out = vocab_map(dg.build_asset_context(), VocabMapConfig(draft_vocab_size=4),
                    {"s0": ArtifactRef("tokenized_shards", "s0", "fp0", prefix)},
                    ObjectStoreResource(root=root), TargetModelResource(target=str(target_dir)))
    assert out.metadata["target_vocab_size"].value == 300
    assert out.metadata["draft_vocab_size"].value == 4
    assert out.metadata["masked_tokens"].value == 5
