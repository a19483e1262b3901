"""resampled_corpus -> tokenized_shards -> vocab_map in-process on tiny targets: the target's own ids in
the rows, one chat-template setting on the target resource, and early clear failures on bad data."""

import json
import re

import dagster as dg
import pytest

from resources.generation_backend import GenerationBackendResource
from resources.target_model import TargetModelResource
from spec_assets.corpus import source_corpus
from spec_assets.partitions import corpus_shards
from spec_assets.resample import resampled_corpus
from spec_assets.tokenize import tokenized_shards, vocab_map
from tests.spec_assets.conftest import make_resources
from tests.training.test_chat_templates import QWEN3
from training.demo.corpus import write_demo_corpus

SHARD = "demo-00000"
RESAMPLE = {"max_new_tokens": 6, "batch_size": 8, "temperatures": {"0.0": 0.5, "1.0": 0.5}}


@pytest.fixture
def corpus_dir(tmp_path):
    write_demo_corpus(tmp_path / "corpus", n_shards=1, rows_per_shard=8, seed=0)
    return tmp_path / "corpus"


def resources(tmp_path, corpus_dir, target_dir, kwargs: str = ""):
    target = TargetModelResource(target=str(target_dir), device="cpu", chat_template_kwargs=kwargs)
    return make_resources(str(tmp_path / "store"), str(corpus_dir), target=target,
                          generator=GenerationBackendResource(target=target))


def run(instance, res, assets, tokenize=None, raise_on_error=True, selection=None):
    instance.add_dynamic_partitions(corpus_shards.name, [SHARD])
    config = {"ops": {"resampled_corpus": {"config": RESAMPLE}, "tokenized_shards": {"config": tokenize or {}}}}
    config["ops"] = {k: v for k, v in config["ops"].items() if any(a.key.path[-1] == k for a in selection or assets)}
    return dg.materialize(assets, instance=instance, resources=res, partition_key=SHARD, run_config=config,
                          raise_on_error=raise_on_error, selection=selection)


def meta(result, asset):
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def failure(result) -> str:
    return "\n".join(e.event_specific_data.error.message for e in result.all_events if e.event_type_value == "STEP_FAILURE")


def test_rows_hold_the_generated_ids(instance, tmp_path, corpus_dir, tiny_target):
    res = resources(tmp_path, corpus_dir, tiny_target)
    result = run(instance, res, [source_corpus, resampled_corpus, tokenized_shards])
    assert meta(result, "resampled_corpus")["rows_with_token_ids"] == meta(result, "resampled_corpus")["rows_out"] > 0
    m = meta(result, "tokenized_shards")
    assert m["generated_id_mismatches"] == 0 and m["rows_from_generated_ids"] == m["rows"] > 0
    assert m["conversations_retokenized"] == 0
    # the length histogram reads as a table (spec_assets/metadata.py), one row per power-of-two bucket
    hist = m["length_histogram"]
    assert isinstance(hist, dg.TableMetadataValue)
    assert [c.name for c in hist.schema.columns] == ["tokens_from", "tokens_to", "rows"]
    assert sum(r.data["rows"] for r in hist.records) == m["rows"]


def test_chat_template_kwargs_on_the_target_reach_generation_and_tokenization(instance, tmp_path, corpus_dir, tiny_target):
    """Qwen3-style template: generation and rows agree under the one setting; switching the setting
    after resampling rejects every row by name (prompt_mismatch) rather than training them."""
    from transformers import AutoTokenizer

    qwen = tmp_path / "qwen3-like"
    import shutil

    shutil.copytree(tiny_target, qwen)
    tok = AutoTokenizer.from_pretrained(qwen)
    tok.chat_template = QWEN3
    tok.save_pretrained(qwen)
    off = '{"enable_thinking": false}'
    res = resources(tmp_path, corpus_dir, qwen, off)
    gen = res["generator"].load()
    assert gen.chat_template_kwargs == {"enable_thinking": False}
    result = run(instance, res, [source_corpus, resampled_corpus, tokenized_shards])
    m = meta(result, "tokenized_shards")
    assert m["generated_id_mismatches"] == 0 and m["conversations_rejected"] == 0 and m["rows"] > 0
    assert "enable_thinking" in res["target"].identity()
    # tokenization alone with the setting changed (thinking back on): the prompts are not the target's
    res_on = resources(tmp_path, corpus_dir, qwen, "")
    again = run(instance, res_on, [source_corpus, resampled_corpus, tokenized_shards], raise_on_error=False,
                selection=[tokenized_shards])
    assert not again.success and "no trainable token" in failure(again) and "prompt_mismatch" in failure(again)


def test_no_trainable_token_fails_at_tokenized_shards(instance, tmp_path, corpus_dir, tiny_target):
    res = resources(tmp_path, corpus_dir, tiny_target)
    result = run(instance, res, [source_corpus, resampled_corpus, tokenized_shards], {"max_length": 8},
                 raise_on_error=False)
    text = failure(result)
    assert not result.success and f"tokenized_shards[{SHARD}]" in text
    assert re.search(r"no trainable token: all 8 conversations were rejected; reasons over their (\d+) rows: "
                     r"assistant_truncated x\1 \(e\.g\. .*max_length=8", text), text


def test_tokenizer_ids_past_the_model_vocab_fail_at_tokenized_shards(instance, tmp_path, corpus_dir, tiny_target):
    import shutil

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_target, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))  # the tokenizer has 261 ids
    res = resources(tmp_path, corpus_dir, small)
    # the corpus as is (resampling on this model would already fail embedding the prompt)
    instance.add_dynamic_partitions(corpus_shards.name, [SHARD])
    result = dg.materialize([source_corpus, resampled_corpus, tokenized_shards], instance=instance, resources=res,
                            partition_key=SHARD, raise_on_error=False,
                            run_config={"ops": {"resampled_corpus": {"config": {"resample": False}}}})
    text = failure(result)
    assert not result.success and "outside the target model's vocab_size 200" in text
    assert "the tokenizer has 261 tokens" in text and "row '" in text


def test_resource_chat_template_kwargs_parsing(monkeypatch):
    t = TargetModelResource(target="x")
    assert t.template_kwargs() == {}
    # The resource reads its field only: the variable reaches it through definitions.py.
    monkeypatch.setenv("SPECDRAFT_CHAT_TEMPLATE_KWARGS", json.dumps({"enable_thinking": False}))
    assert t.template_kwargs() == {}
    assert TargetModelResource(target="x", chat_template_kwargs='{"a": 1}').template_kwargs() == {"a": 1}
    with pytest.raises(dg.Failure, match="not JSON"):
        TargetModelResource(target="x", chat_template_kwargs="{enable_thinking: false}").template_kwargs()
    with pytest.raises(dg.Failure, match="must be a JSON object"):
        TargetModelResource(target="x", chat_template_kwargs="[1]").template_kwargs()
