"""Block drafting (DFlash) in the simulator: greedy output is the target's whatever the draft, the
proposer's context stays in step with the verified positions, and evaluate puts both families side
by side, counting one draft forward per DFlash step."""

import pytest
import torch

from tests.training.evaluation.helpers import make_dflash, make_draft
from tests.training.evaluation.test_speculative import NEW, PROMPTS, encode, reference_greedy
from training.evaluation import evaluate
from training.evaluation.block_draft import DFlashProposer
from training.evaluation.speculative import DecodeConfig, TargetRunner, generate


class _Oracle(DFlashProposer):
    """Drafts the reference continuation for the first `right` slots, then a wrong token."""

    def __init__(self, draft, d2t, reference, prompt_len, right):
        super().__init__(draft, d2t)
        self.reference, self.prompt_len, self.right = reference, prompt_len, right

    def propose(self, context, k, temperature, generator):
        super().propose(context, k, temperature, generator)  # runs the block forward, checks the context
        done = len(context) - self.prompt_len
        want = self.reference[done: done + k]
        return [t if j < self.right else (t + 1) % 50 for j, t in enumerate(want)], None


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_block_drafting_equals_target_greedy(target, k):
    model = target.model
    vocab = model.get_input_embeddings().weight.shape[0]
    for draft_ids in (None, torch.arange(0, vocab, 2)):
        draft, d2t, _ = make_dflash(target, draft_ids, seed=k)
        runner = TargetRunner(model, draft.cfg.aux_layer_ids)
        for messages in PROMPTS:
            ids = encode(target, messages)
            got = generate(runner, ids, DecodeConfig(k=k, max_new_tokens=NEW), DFlashProposer(draft, d2t))
            assert got.tokens == reference_greedy(model, ids, NEW)


@pytest.mark.parametrize("right", [0, 2, 5])
def test_context_follows_accepts_and_rejects(target, right):
    draft, d2t, _ = make_dflash(target)
    runner = TargetRunner(target.model, draft.cfg.aux_layer_ids)
    ids = encode(target, PROMPTS[2])
    ref = reference_greedy(target.model, ids, NEW + 6)
    proposer = _Oracle(draft, d2t, ref, len(ids), right)
    got = generate(runner, ids, DecodeConfig(k=5, max_new_tokens=NEW), proposer)
    assert got.tokens == ref[:NEW]
    assert all(a == min(right, 5) for a in got.accepted[:-1])
    assert proposer.n == len(ids) + got.steps + sum(got.accepted)  # context = every verified position


def test_evaluate_puts_both_families_side_by_side(target):
    dflash = make_dflash(target, seed=1)
    eagle = make_draft(target, seed=1)
    prompts = [{"id": str(i), "domain": "d", "messages": m} for i, m in enumerate(PROMPTS)]
    result = evaluate(target, dflash, prompts, compare=[eagle], ks=[1, 3], temperatures=[0.0], max_new_tokens=8,
                      warmup=False, served=False)
    assert result.draft_method == "dflash" and result.config["compared_families"] == ["eagle3"]
    assert result.drafted == ["dflash", "eagle3"]
    for k in (1, 3):
        d, e = result.row("dflash", k), result.row("eagle3", k)
        assert d.exact_match == e.exact_match == len(prompts)
        assert d.forwards == 1 and e.forwards == k
        assert d.est_speedup == pytest.approx(d.tau / (1 + d.c))
    summary = result.summary(k=3)
    assert summary["draft_family"] == "dflash" and "eagle3_tau" in summary["tau_by_k"][0]
    from training.evaluation.report import report_markdown

    assert "## Draft families side by side" in report_markdown(result)
    with pytest.raises(ValueError, match="other families"):
        evaluate(target, dflash, prompts, compare=[make_dflash(target, seed=2)], ks=[1], temperatures=[0.0],
                 max_new_tokens=4, warmup=False, served=False)
