"""Served as trained, DFlash: a block draft of the demo target decoded by real vLLM (CPU build, method
"dflash") reproduces plain decoding and accepts what the block-drafting simulator says it would.

The draft is trained offline by the one trainer (loss training.dflash.loss.dflash_forward) on the demo
target's stored features, exported, simulated with the HF target (training.evaluation.block_draft) on
held-out prompts, and served by vLLM at each k; tau from vLLM's spec-decode counters must be the
simulator's within 5%, and greedy output identical to vLLM's plain decoding.
"""

import json

import pytest
import torch

from tests.e2e.test_draft_quality import build_demo_features
from training.demo.corpus import heldout_conversations
from training.trainer import TrainConfig, train

KS = [1, 2, 3, 4]
N_PROMPTS = 12
MAX_NEW = 48


def trained_dflash(fx, out_dir, *, steps: int = 80, num_layers: int = 1):
    """A DFlash draft of the demo target trained offline, and its export directory."""
    from training.dflash.export import export_dflash
    from training.dflash.loss import dflash_forward
    from training.dflash.model import DFlashConfig, DFlashDraft, mask_token_for
    from training.targets.weights import load_head_weights

    cfg_t = json.loads((fx["target_dir"] / "config.json").read_text())
    embed, head = load_head_weights(str(fx["target_dir"]))
    torch.manual_seed(0)
    dcfg = DFlashConfig.from_target_config(cfg_t, int(fx["t2d"].sum()), mask_token_for(fx["t2d"].int()),
                                           num_layers=num_layers, block_size=max(KS) + 1)
    draft = DFlashDraft(dcfg, embed)
    draft.init_head_from_target(head, fx["t2d"])
    cfg = TrainConfig(ttt_length=max(KS), lr=4e-3, epochs=50, max_steps=steps, max_tokens_per_batch=2048,
                      warmup_ratio=0.05, log_every=steps)
    train(cfg, fx["train"], draft, head.float(), fx["t2d"], fx["store"], f"runs/dflash{num_layers}",
          log=lambda s: None, resume=False, loss_fn=dflash_forward)
    return draft, export_dflash(draft, fx["d2t"], fx["t2d"], cfg_t, out_dir)


@pytest.fixture(scope="module")
def dflash_features(demo_target_dir, tmp_path_factory):
    """The demo target's stored features with the layers a DFlash draft fuses."""
    return build_demo_features(demo_target_dir, tmp_path_factory.mktemp("dflash"), "dflash")


@pytest.mark.timeout(1800)  # training, 4 simulated ks and 5 vLLM engines: minutes on 2 shared cores
def test_vllm_serves_the_dflash_draft_as_simulated(dflash_features, tmp_path):
    from transformers import AutoTokenizer

    from training.dflash.export import load_dflash
    from training.evaluation.block_draft import DFlashProposer
    from training.evaluation.served import serve
    from training.evaluation.speculative import DecodeConfig, TargetRunner, generate
    from training.targets import load_target
    from training.targets.base import render_prompt

    fx = dflash_features
    _, export = trained_dflash(fx, tmp_path / "export")
    target = load_target(str(fx["target_dir"]), backend="hf", device="cpu", dtype="float32")
    draft, d2t, _, config = load_dflash(export, target.model.get_input_embeddings().weight)
    assert config["architectures"] == ["DFlashDraftModel"] and config["dflash_config"]["causal"] is False
    tok = AutoTokenizer.from_pretrained(fx["target_dir"])
    prompts = [render_prompt(tok, [m for m in c["messages"] if m["role"] != "assistant"][:1])
               for c in heldout_conversations(N_PROMPTS)]
    stops = sorted(target.stop_token_ids())
    runner = TargetRunner(target.model, draft.cfg.aux_layer_ids)

    def simulated_tau(k):
        gens = [generate(runner, p, DecodeConfig(k=k, max_new_tokens=MAX_NEW, stop_token_ids=frozenset(stops)),
                         DFlashProposer(draft, d2t)) for p in prompts]
        return 1 + sum(sum(g.accepted) for g in gens) / sum(g.steps for g in gens), gens  # report.MethodStats.tau

    runs = serve(str(fx["target_dir"]), str(export), prompts, KS, [0.0], max_new_tokens=MAX_NEW,
                 stop_token_ids=stops, log=print)
    plain = next(r for r in runs if r.k == 0)
    for r in runs:
        if not r.k:
            continue
        tau, gens = simulated_tau(r.k)
        print(f"k={r.k}: served tau {r.tau:.3f}, simulated {tau:.3f}, ratio {r.tau / tau:.3f}")
        assert r.tokens == plain.tokens  # greedy speculative decoding = plain decoding, token for token
        # The simulator decodes with HF's float32 kernels, vLLM with its CPU ones: a near-tie can fork
        # their texts (as in test_served, acceptance is compared, not the text)
        assert tau > 1.3  # a draft that accepts, so the ratio means something
        assert 0.95 <= r.tau / tau <= 1.05
