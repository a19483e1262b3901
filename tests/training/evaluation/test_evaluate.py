"""evaluate() end to end: a serving export on disk, held-out prompts in two domains, greedy and
sampled, three methods; then the report and the gate on the real result."""

import pytest
import torch

from tests.training.evaluation.helpers import make_draft
from training.evaluation import ALL, evaluate, gate, prompt_ids, write_report
from training.export import export_draft

PROMPTS = [
    {"id": "c1", "domain": "chat", "messages": [{"role": "user", "content": "hello there, how are you?"}]},
    {"id": "c2", "domain": "chat", "messages": [
        {"role": "user", "content": "name three colours"}, {"role": "assistant", "content": "red, green, blue"}]},
    {"id": "k1", "domain": "code", "messages": [{"role": "user", "content": "for i in range(10): print(i)"}]},
]


@pytest.fixture(scope="module")
def export_dir(target, tmp_path_factory):
    vocab = target.model.get_input_embeddings().weight.shape[0]
    draft, d2t, t2d = make_draft(target, torch.arange(0, vocab, 3), seed=2)
    out = tmp_path_factory.mktemp("draft") / "export"
    # no embedding in the export: evaluate must hand the target's to load_draft
    return export_draft(draft, d2t, t2d, target.facts.config, out, dtype=torch.float32, include_embed=False)


def test_prompt_ids_drop_the_reply_and_keep_the_tail(target):
    full = prompt_ids(target, PROMPTS[1], 4096)
    without = prompt_ids(target, {"messages": PROMPTS[1]["messages"][:1]}, 4096)
    assert full == without  # the held-out assistant reply is not part of the prompt
    assert prompt_ids(target, PROMPTS[1], 5) == full[-5:]
    assert prompt_ids(target, {"input_ids": [1, 2, 3]}, 2) == [2, 3]
    with pytest.raises(ValueError):
        prompt_ids(target, {"id": "x", "messages": [{"role": "assistant", "content": "hi"}]}, 10)


def test_evaluate_end_to_end(target, export_dir):
    lines = []
    res = evaluate(target, export_dir, PROMPTS, ks=[1, 3], temperatures=[0.0, 0.9], max_new_tokens=12,
                   seed=0, log=lines.append, ignore_eos=True, served=False)  # vLLM's half: tests/e2e/test_served.py
    assert res.ks == [1, 3] and res.temperatures == [0.0, 0.9] and res.domains == ["chat", "code"]
    assert res.config["n_prompts"] == 3 and res.config["draft"] == str(export_dir)
    assert any("tau" in line for line in lines)
    for t in res.temperatures:
        plain = res.row("plain", 0, t)
        assert plain.tau == 1.0 and plain.tokens == 3 * 12 and plain.wall_speedup == pytest.approx(1.0)
        for k in res.ks:
            for method in ("eagle3", "prompt_lookup"):
                r = res.row(method, k, t)
                assert r.n_prompts == 3 and r.tokens == 3 * 12
                assert 1.0 <= r.tau <= k + 1
                rates = r.acceptance_rate
                assert all(a >= b for a, b in zip(rates, rates[1:]))
                assert r.tau == pytest.approx(1 + sum(rates))
                assert r.wall_speedup is not None and r.wall_speedup > 0
                assert r.c >= 0 and r.est_speedup <= r.tau
                # domains partition the prompts
                parts = [res.row(method, k, t, d) for d in res.domains]
                assert sum(p.steps for p in parts) == r.steps and sum(p.n_prompts for p in parts) == 3
                if t == 0.0:
                    assert r.exact_match == 3  # greedy speculative output == plain greedy output
    e = res.row("eagle3", 3, 0.0)
    assert e.draft_time > 0 and e.target_time > 0 and e.c > 0

    ok, detail = gate(res, 3, 1.0)
    assert isinstance(ok, bool) and "k=3" in detail

    files = {}

    class W:
        def write_bytes(self, name, data):
            files[name] = data

        def write_json(self, name, obj):
            import json

            files[name] = json.dumps(obj).encode()

    out = write_report(res, W())
    assert "report.md" in files and out["summary"]["k"] == 3


def test_sampled_runs_are_reproducible(target, export_dir):
    kw = dict(ks=[2], temperatures=[1.0], max_new_tokens=8, seed=3, warmup=False, served=False)
    a = evaluate(target, export_dir, PROMPTS[:1], **kw)
    b = evaluate(target, export_dir, PROMPTS[:1], **kw)
    for method in ("eagle3", "prompt_lookup", "plain"):
        ra, rb = a.row(method, 2, 1.0, ALL), b.row(method, 2, 1.0, ALL)
        assert (ra.steps, ra.tokens, ra.accepted, ra.accepted_at) == (rb.steps, rb.tokens, rb.accepted, rb.accepted_at)


def test_rejects_a_draft_for_another_target(target):
    from training.eagle3.model import DraftConfig, Eagle3Draft

    vocab = target.model.get_input_embeddings().weight.shape[0]
    config = dict(target.model.config.to_dict(), hidden_size=32, head_dim=8)  # a narrower model
    cfg = DraftConfig.from_target_config(config, vocab)
    draft = Eagle3Draft(cfg, torch.zeros(vocab, 32))
    d2t, t2d = torch.zeros(vocab, dtype=torch.long), torch.ones(vocab, dtype=torch.bool)
    with pytest.raises(ValueError, match="not built for this target"):
        evaluate(target, (draft, d2t, t2d), PROMPTS[:1], ks=[1], max_new_tokens=2)
    with pytest.raises(TypeError, match="backend 'hf'"):
        evaluate(object(), (draft, d2t, t2d), PROMPTS[:1], ks=[1], max_new_tokens=2)


def test_prompts_the_template_refuses_are_rejected_with_their_reason(target_dirs, export_dir):
    """A Gemma-style template raises on a system role and on roles that do not alternate: those prompts
    are left out with the template's reason, counted, and the rest are evaluated."""
    from tests.training.test_chat_templates import GEMMA_STYLE
    from training.targets import load_target

    strict = load_target(str(target_dirs["llama"]), dtype="float32", device="cpu")
    strict.tokenizer.chat_template = GEMMA_STYLE
    refused = [
        {"id": "sys", "domain": "chat", "messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hello"}]},
        {"id": "twice", "domain": "chat", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    ]
    res = evaluate(strict, export_dir, [*PROMPTS, *refused], ks=[1], temperatures=[0.0], max_new_tokens=4,
                   warmup=False, served=False)
    assert res.config["n_prompts"] == 3 and res.config["prompts_rejected"] == 2
    why = {r["id"]: (r["reason"], r["detail"]) for r in res.config["prompt_rejects"]}
    assert why["sys"][0] == why["twice"][0] == "template_error"
    assert "System role not supported" in why["sys"][1] and "must alternate" in why["twice"][1]
    with pytest.raises(ValueError, match="refuses all 2 prompts"):
        evaluate(strict, export_dir, refused, ks=[1], temperatures=[0.0], max_new_tokens=4, served=False)
