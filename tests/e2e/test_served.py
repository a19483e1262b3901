"""Served as trained: drafts of the demo target decoded by real vLLM (CPU build) match the simulator.

Two drafts are trained offline on the demo target's stored features, one at the target's width
(128) and one at the width rule's (256 wide, 2,048-wide MLP: vLLM then keeps the draft's own
embedding), exported, and evaluated by `training.evaluation.evaluate` on held-out prompts, which
simulates chain drafting with the HF target and then decodes the same prompt ids in vLLM at each k.
Greedy speculative decoding must reproduce vLLM's plain decoding token for token, and vLLM's tau
(from its spec-decode counters) must be the simulator's within 5%.
"""

import json

import pytest
import torch

from tests.e2e.test_draft_quality import demo_features  # noqa: F401  (the fixture: stored demo features)
from training.demo.corpus import heldout_conversations
from training.trainer import TrainConfig, train

KS = [1, 2, 3, 4]
N_PROMPTS = 12


def _trained_export(fx, tmp_path, hidden_size: int | None, intermediate_size: int | None):
    from training.eagle3.model import DraftConfig, Eagle3Draft
    from training.export import export_draft
    from training.targets.weights import load_head_weights

    cfg_t = json.loads((fx["target_dir"] / "config.json").read_text())
    embed, head = load_head_weights(str(fx["target_dir"]))
    torch.manual_seed(0)
    dcfg = DraftConfig.from_target_config(cfg_t, int(fx["t2d"].sum()), hidden_size=hidden_size,
                                          intermediate_size=intermediate_size)
    draft = Eagle3Draft(dcfg, embed)
    cfg = TrainConfig(ttt_length=4, lr=4e-3, epochs=50, max_steps=80, max_tokens_per_batch=2048,
                      warmup_ratio=0.05, log_every=80)
    train(cfg, fx["train"], draft, head.float(), fx["t2d"], fx["store"], f"runs/w{dcfg.hidden_size}",
          log=lambda s: None, resume=False)
    return export_draft(draft, fx["d2t"], fx["t2d"], cfg_t, tmp_path / f"export{dcfg.hidden_size}")


@pytest.fixture(scope="module")
def hf_target(demo_features):  # noqa: F811
    from training.targets import load_target

    return load_target(str(demo_features["target_dir"]), backend="hf", device="cpu", dtype="float32")


@pytest.mark.timeout(1800)  # training, 4 simulated ks and 5 vLLM engines: minutes on 2 shared cores
@pytest.mark.parametrize("width", [(None, None), (256, 2048)], ids=["target-width", "wider"])
def test_vllm_serves_the_draft_as_simulated(demo_features, hf_target, tmp_path, width):  # noqa: F811
    from training.evaluation import evaluate

    export = _trained_export(demo_features, tmp_path, *width)
    prompts = [{"id": c["id"], "domain": c.get("source"), "messages": c["messages"]}
               for c in heldout_conversations(N_PROMPTS)]
    result = evaluate(hf_target, str(export), prompts, ks=KS, temperatures=[0.0], max_new_tokens=48, warmup=False,
                      log=print)
    assert result.config["served_by"] == "vLLM"
    for k in KS:
        row = result.served_row(k, 0.0)
        assert row["exact_match"] == f"{N_PROMPTS}/{N_PROMPTS}", row
        assert row["simulated_tau"] > 1.3, row  # a draft that accepts, so the ratio means something
        assert 0.95 <= row["ratio"] <= 1.05, row
