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
