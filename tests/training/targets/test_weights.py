"""load_head_weights reads only the embedding and lm_head, from one file or a sharded checkpoint."""

import json

import pytest
import torch
from safetensors.torch import save_file

from training.targets import TargetError, load_head_weights, load_target
from training.targets.tiny import build_tiny_target
from training.targets.weights import load_final_norm, weight_map


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {
        "untied": build_tiny_target(root / "untied", "llama", num_layers=2, seed=3),
        "tied": build_tiny_target(root / "tied", "qwen3", num_layers=2, tie_word_embeddings=True, seed=4),
    }


def test_single_file_untied(dirs):
    model = load_target(str(dirs["untied"])).model
    embed, head = load_head_weights(str(dirs["untied"]))
    assert torch.equal(embed, model.get_input_embeddings().weight)
    assert torch.equal(head, model.get_output_embeddings().weight)
    assert not torch.equal(embed, head)
    assert torch.equal(load_final_norm(str(dirs["untied"])), model.get_decoder().norm.weight)


def test_tied_embeddings_give_lm_head_equal_embed(dirs):
    embed, head = load_head_weights(str(dirs["tied"]))
    assert "lm_head.weight" not in weight_map(dirs["tied"])
    assert torch.equal(embed, head)
    assert torch.equal(embed, load_target(str(dirs["tied"])).model.get_output_embeddings().weight)


def test_sharded_index_opens_only_the_needed_shards(tmp_path):
    embed, head, norm = torch.randn(10, 4), torch.randn(10, 4), torch.randn(4)
    save_file({"model.embed_tokens.weight": embed, "model.layers.0.w": torch.randn(3)}, tmp_path / "model-00001-of-00003.safetensors")
    save_file({"model.norm.weight": norm}, tmp_path / "model-00002-of-00003.safetensors")
    save_file({"lm_head.weight": head}, tmp_path / "model-00003-of-00003.safetensors")
    index = {"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00003.safetensors",
        "model.layers.0.w": "model-00001-of-00003.safetensors",
        "model.norm.weight": "model-00002-of-00003.safetensors",
        "lm_head.weight": "model-00003-of-00003.safetensors",
    }}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    # A corrupt shard nobody needs must not be touched.
    (tmp_path / "model-00002-of-00003.safetensors").write_bytes(b"garbage")
    e, h = load_head_weights(str(tmp_path))
    assert torch.equal(e, embed) and torch.equal(h, head)


def test_missing_embedding_raises(tmp_path):
    save_file({"something.else": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(TargetError, match="embedding"):
        load_head_weights(str(tmp_path))


def test_untied_target_without_lm_head_is_refused(dirs, tmp_path):
    """tie_word_embeddings false and no lm_head tensor: a clear error naming the model, not the
    embedding silently used as the head."""
    import shutil

    from safetensors.torch import load_file

    broken = tmp_path / "untied-no-head"
    shutil.copytree(dirs["untied"], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    assert json.loads((broken / "config.json").read_text())["tie_word_embeddings"] is False
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, str(broken / "model.safetensors"))
    with pytest.raises(TargetError, match="tie_word_embeddings false") as err:
        load_head_weights(str(broken))
    assert str(broken) in str(err.value) and "lm_head" in str(err.value)
    # the same checkpoint declared tied loads, with the embedding as its head
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    embed, head = load_head_weights(str(broken))
    assert torch.equal(embed, head)
    # a Llama config that leaves the flag out is untied (LlamaConfig's default), so refused too
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "tie_word_embeddings"}))
    with pytest.raises(TargetError, match="tie_word_embeddings false"):
        load_head_weights(str(broken))
    # no config.json at all: nothing says the head is the embedding
    (broken / "config.json").unlink()
    with pytest.raises(TargetError, match="no config.json"):
        load_head_weights(str(broken))
