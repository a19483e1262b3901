"""Aux layer ids in the serving export mean, in vLLM and in SGLang, the layers the draft was trained on.

Each engine's logic is restated below as a small function (the file and commit read are named on
it) and applied to our export's config.json: the HF `hidden_states` ids it would feed the draft
must equal the trained ones, for the default set and custom ones. Sets no engine can feed are
refused (training/aux_layers.py), here and before any hidden state is computed
(tests/training/test_hidden_states.py).
"""

from __future__ import annotations

import pytest

from training.aux_layers import AuxLayerError, check_servable, default_aux_layer_ids
from training.eagle3.model import DraftConfig
from training.export import export_config


class EngineCrash(Exception):
    """What the engine itself would raise (a TypeError or a shape mismatch at the first step)."""


def vllm_fed_hf_ids(draft_config: dict, num_layers: int) -> list[int]:
    """vLLM, vllm-project/vllm:
    - vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py @ da84445036cc (get_eagle3_aux_layers_from_config:
      `layer_ids = hf_config.eagle_aux_hidden_state_layer_ids` if present, non-empty and a list/tuple;
      else set_eagle3_aux_hidden_state_layers falls back to the model's default);
    - vllm/model_executor/models/llama.py @ e06c9ba2a6ea (LlamaForCausalLM.get_eagle3_aux_hidden_state_layers
      = (2, L//2, L-3); LlamaModel.forward: for idx, layer in enumerate(layers): `if idx in
      aux_hidden_state_layers: aux_hidden_states.append(hidden_states + residual)` then the layer runs;
      residual is None before layer 0).
    hidden_states + residual in front of layer idx is HF hidden_states[idx]."""
    ids = draft_config.get("eagle_aux_hidden_state_layer_ids")  # hf_config attribute = top-level key
    aux = tuple(ids) if ids and isinstance(ids, (list, tuple)) else (2, num_layers // 2, num_layers - 3)
    fed, residual = [], None
    for idx in range(num_layers):
        if idx in aux:
            if residual is None:
                raise EngineCrash("vLLM: hidden_states + None in front of layer 0")
            fed.append(idx)
        residual = "the layer's residual"
    if len(fed) != 3:  # fc is [H, 3H]: any other count fails its matmul
        raise EngineCrash(f"vLLM: {len(fed)} aux states for fc's 3")
    return fed


def sglang_fed_hf_ids(draft_config: dict, num_layers: int) -> list[int]:
    """SGLang, sgl-project/sglang:
    - python/sglang/srt/model_executor/model_runner.py @ 01cc04e2b5b0 (EAGLE3 target: `eagle_config =
      getattr(draft hf_config, "eagle_config", None); ids = eagle_config["eagle_aux_hidden_state_layer_ids"]`,
      None on any exception; then model.set_eagle3_layers_to_capture(ids));
    - python/sglang/srt/models/llama.py @ bf7a0e237e8d (set_eagle3_layers_to_capture: None ->
      [2, L//2, L-3], else `[val + 1 for val in layer_ids]`; LlamaModel.forward: for i in range(layers):
      `if i in layers_to_capture: aux_hidden_states.append(hidden_states + residual)` then layer i runs;
      residual is None before layer 0).
    hidden_states + residual in front of layer i is HF hidden_states[i]."""
    try:
        ids = draft_config.get("eagle_config")["eagle_aux_hidden_state_layer_ids"]
    except (TypeError, KeyError):
        ids = None
    to_capture = [2, num_layers // 2, num_layers - 3] if ids is None else [v + 1 for v in ids]
    fed, residual = [], None
    for i in range(num_layers):
        if i in to_capture:
            if residual is None:
                raise EngineCrash("SGLang: hidden_states + None in front of layer 0")
            fed.append(i)
        residual = "the layer's residual"
    if len(fed) != 3:
        raise EngineCrash(f"SGLang: {len(fed)} aux states for fc's 3")
    return fed


def target_config(num_layers: int) -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256).to_dict()


CASES = [  # (L, aux ids or None for the default, trained HF ids)
    (32, None, (2, 16, 29)),  # SpecForge's Llama-3.1-8B drafts: SGLang ids [1, 15, 28]
    (8, None, (2, 4, 5)),  # the demo target
    (6, None, (1, 3, 5)),  # (2, L//2, L-3) = (2, 3, 3) repeats a layer: small targets get (1, L//2, L-1)
    (6, (1, 3, 4), (1, 3, 4)),
    (8, (1, 2, 3), (1, 2, 3)),  # the stories260K report
    (32, (3, 10, 31), (3, 10, 31)),  # the last decoder layer's input
    (4, None, (1, 2, 3)),
]


@pytest.mark.parametrize("L,ids,trained", CASES)
def test_both_engines_feed_the_trained_layers(L, ids, trained):
    cfg = DraftConfig.from_target_config(target_config(L), 100, ids)
    assert cfg.aux_layer_ids == trained
    exported = export_config(cfg, target_config(L))
    assert vllm_fed_hf_ids(exported, L) == list(trained)
    assert sglang_fed_hf_ids(exported, L) == list(trained)
    assert exported["eagle_aux_hidden_state_layer_ids"] == list(trained)  # vLLM: HF ids
    assert exported["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [i - 1 for i in trained]  # SGLang
    assert DraftConfig.from_export_config(exported).aux_layer_ids == trained  # and back


def test_specforge_style_config_reads_as_hf_ids():
    """A draft carrying only SGLang's key (SpecForge) is read back with SGLang's meaning."""
    assert DraftConfig.from_export_config({**export_config(DraftConfig.from_target_config(target_config(32), 100),
                                                           target_config(32)),
                                           "eagle_aux_hidden_state_layer_ids": None}).aux_layer_ids == (2, 16, 29)


@pytest.mark.parametrize("ids,why", [
    ((0, 3, 4), "1..5"),  # the embeddings: both engines add a None residual
    ((1, 3, 6), "1..5"),  # HF 6 = the final post-norm state, never captured
    ((1, 3, 3), "ascending"),  # a repeat: captured once, two states for fc's three
    ((4, 1, 3), "ascending"),  # fed in layer order [1, 3, 4], not as trained
    ((1, 2, 3, 4), "hold 4 ids"),  # fc fuses three layers: the engines build it 3 x hidden wide
    ((1, 3), "hold 2 ids"),
])
def test_unservable_ids_are_refused_everywhere(ids, why):
    L = 6
    with pytest.raises(AuxLayerError, match=why):
        check_servable(ids, L)
    with pytest.raises(AuxLayerError, match=why):
        DraftConfig.from_target_config(target_config(L), 100, ids)
    # and neither engine could have served them as trained
    naive = {"eagle_aux_hidden_state_layer_ids": list(ids),
             "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in ids]}}
    for engine in (vllm_fed_hf_ids, sglang_fed_hf_ids):
        try:
            assert engine(naive, L) != list(ids)
        except EngineCrash:
            pass


def test_default_ids_are_distinct_and_servable():
    for L in range(4, 80):
        assert check_servable(default_aux_layer_ids(L), L) == default_aux_layer_ids(L)
        if L >= 7:
            assert default_aux_layer_ids(L) == (2, L // 2, L - 3)  # the engines' own default
    with pytest.raises(AuxLayerError, match="3-layer"):
        default_aux_layer_ids(3)
