"""Speculative decoding on a tiny random HF target: greedy output is the target's greedy output
token for token (whatever the draft), both caches stay in step through accepts and rejects, and
sampled output follows the target's distribution."""

import math

import pytest
import torch

from tests.training.evaluation.helpers import make_draft
from training.eagle3.model import KVCache
from training.evaluation import prompt_ids
from training.evaluation.prompt_lookup import PromptLookupProposer
from training.evaluation.speculative import (
    DecodeConfig,
    Eagle3Proposer,
    TargetRunner,
    generate,
    verify_greedy,
    verify_sampled,
)
from training.targets import load_target

PROMPTS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "def add(a, b):"}],
    [{"role": "user", "content": "1, 2, 3, 4, 5, 6,"}],
]
NEW = 20


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding without any cache: the full sequence through the model each step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def encode(target, messages):
    return prompt_ids(target, {"id": "x", "messages": messages}, 1024)


@pytest.fixture(scope="module")
def references(target):
    return [reference_greedy(target.model, encode(target, m), NEW) for m in PROMPTS]


def chi2_critical(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at z standard deviations (~1e-4)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic over bins with enough expected mass, the rest merged into one bin."""
    n = counts.sum()
    expected = probs.double() * n
    big = expected >= min_expected
    obs = torch.cat([counts[big].double(), counts[~big].sum().double().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = float((((obs - exp) ** 2) / exp)[keep].sum())
    return stat, int(keep.sum()) - 1


# -- greedy exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_target_greedy(target, references, k):
    """A random draft (almost everything rejected) and a sub-vocab draft with offsets in d2t."""
    model = target.model
    vocab = model.get_input_embeddings().weight.shape[0]
    for draft_ids in (None, torch.arange(0, vocab, 2)):
        draft, d2t, _ = make_draft(target, draft_ids, seed=k)
        runner = TargetRunner(model, draft.cfg.aux_layer_ids)
        cfg = DecodeConfig(k=k, temperature=0.0, max_new_tokens=NEW)
        for messages, ref in zip(PROMPTS, references):
            ids = encode(target, messages)
            eagle = generate(runner, ids, cfg, Eagle3Proposer(draft, d2t))
            assert eagle.tokens == ref
            assert len(runner) <= len(ids) + NEW  # never more than the verified positions in the cache
    for messages, ref in zip(PROMPTS, references):
        ids = encode(target, messages)
        assert generate(runner, ids, DecodeConfig(k=k, max_new_tokens=NEW)).tokens == ref  # plain
        assert generate(runner, ids, DecodeConfig(k=k, max_new_tokens=NEW), PromptLookupProposer()).tokens == ref


def test_greedy_exact_on_qwen3(target_dirs):
    """Another architecture (q/k norms): same guarantee."""
    target = load_target(str(target_dirs["qwen3"]), dtype="float32", device="cpu")
    draft, d2t, _ = make_draft(target, seed=3)
    runner = TargetRunner(target.model, draft.cfg.aux_layer_ids)
    ids = encode(target, PROMPTS[0])
    got = generate(runner, ids, DecodeConfig(k=3, max_new_tokens=NEW), Eagle3Proposer(draft, d2t))
    assert got.tokens == reference_greedy(target.model, ids, NEW)


def test_stop_token_ends_generation(target, references):
    ids = encode(target, PROMPTS[0])
    ref = references[0]
    stop = ref[5]
    draft, d2t, _ = make_draft(target)
    runner = TargetRunner(target.model, draft.cfg.aux_layer_ids)
    cfg = DecodeConfig(k=3, max_new_tokens=NEW, stop_token_ids=frozenset({stop}))
    got = generate(runner, ids, cfg, Eagle3Proposer(draft, d2t)).tokens
    assert got == ref[: ref.index(stop) + 1]


# -- the accept path, with forced proposals ----------------------------------------------------------
class ForcedProposer(Eagle3Proposer):
    """Runs the real draft (chain steps, caches, crops) but proposes the reference continuation for
    the first `calls % (k+1)` positions of each step and a wrong token after: every acceptance
    count 0..k occurs, full acceptance (bonus token) included."""

    def __init__(self, draft, d2t, reference, prompt_len, vocab):
        super().__init__(draft, d2t)
        self.reference, self.prompt_len, self.vocab = reference, prompt_len, vocab
        self.calls, self.good = 0, 0

    def propose(self, context, k, temperature, generator):
        self.good = self.calls % (k + 1)
        self.calls += 1
        return super().propose(context, k, temperature, generator)

    def pick(self, logits, temperature, generator, context, j):
        super().pick(logits, temperature, generator, context, j)
        i = len(context) - self.prompt_len + j  # index of this draft token among the generated ones
        right = self.reference[i] if i < len(self.reference) else 0
        return (right if j < self.good else (right + 1) % self.vocab), None


@pytest.mark.parametrize("k", [2, 4])
def test_accepts_keep_both_caches_in_step(target, k):
    model = target.model
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = encode(target, PROMPTS[1])
    n_new = 40
    ref = reference_greedy(model, ids, n_new + k + 1)
    draft, d2t, _ = make_draft(target, seed=11)
    proposer = ForcedProposer(draft, d2t, ref, len(ids), vocab)
    runner = TargetRunner(model, draft.cfg.aux_layer_ids)
    stats = generate(runner, ids, DecodeConfig(k=k, max_new_tokens=n_new), proposer)

    assert stats.tokens == ref[:n_new]
    expected = [s % (k + 1) for s in range(stats.steps)]
    assert stats.accepted[:-1] == expected[:-1]  # the last step may run past the reference
    assert stats.proposed == [k] * stats.steps
    assert k in stats.accepted and 0 in stats.accepted
    assert stats.steps == len(stats.accepted) and sum(a + 1 for a in stats.accepted) >= n_new - 1

    # The draft's step-0 cache entries equal one step-0 pass over the whole verified sequence with
    # the target's features: what the draft would see had it never drafted anything.
    seq = ids + stats.tokens
    feats = target.features([seq], draft.cfg.aux_layer_ids)
    fresh = KVCache()
    with torch.no_grad():
        draft.step(feats["aux"][:-1], torch.tensor(seq[1:]), torch.arange(len(seq) - 1), fresh)
    n = min(proposer.n0, len(fresh))
    assert n >= len(seq) - 1 - k
    torch.testing.assert_close(proposer.cache.k[..., :n, :], fresh.k[..., :n, :], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proposer.cache.v[..., :n, :], fresh.v[..., :n, :], atol=1e-4, rtol=1e-4)


def test_verify_greedy_counts_prefix():
    logits = torch.full((4, 8), -1.0)
    for row, tok in enumerate([3, 5, 1, 7]):
        logits[row, tok] = 1.0
    assert verify_greedy(logits, [3, 5, 1]) == (3, 7)  # all accepted, bonus from the last row
    assert verify_greedy(logits, [3, 4, 1]) == (1, 5)  # correction at the first mismatch
    assert verify_greedy(logits[:1], []) == (0, 3)


# -- sampled: the output distribution is the target's -----------------------------------------------
def test_rejection_sampling_first_token_is_unbiased():
    """Small vocab, draft q far from target p: the first emitted token follows p, for sampled
    drafts, deterministic (point-mass) drafts, and the bonus path when q = p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.07, 0.03], [0.1, 0.2, 0.3, 0.2, 0.1, 0.1], [1 / 6] * 6])
    q0 = torch.tensor([0.02, 0.08, 0.10, 0.20, 0.30, 0.30])
    q1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    n = 6000
    counts = {"sampled": torch.zeros(6), "point": torch.zeros(6), "draft": torch.zeros(6)}
    for _ in range(n):
        d0 = int(torch.multinomial(q0, 1, generator=g))
        d1 = int(torch.multinomial(q1, 1, generator=g))
        a, nxt = verify_sampled(p, [d0, d1], [q0, q1], g)
        counts["sampled"][d0 if a >= 1 else nxt] += 1
        a, nxt = verify_sampled(p, [4, 2], None, g)  # prompt lookup: always proposes 4 then 2
        counts["point"][4 if a >= 1 else nxt] += 1
        counts["draft"][d0] += 1
    crit = chi2_critical(5)
    for name in ("sampled", "point"):
        stat, df = chi2(counts[name], p[0])
        assert df == 5 and stat < crit, (name, stat, crit, counts[name] / n)
    stat, _ = chi2(counts["draft"], p[0])
    assert stat > 10 * crit  # the test has power: the draft's own distribution fails it

    # q equal to p: every draft is accepted and the bonus comes from the last row
    same = [p[0], p[1]]
    bonus = torch.zeros(6)
    for _ in range(1500):
        d = [int(torch.multinomial(p[0], 1, generator=g)), int(torch.multinomial(p[1], 1, generator=g))]
        a, nxt = verify_sampled(p, d, same, g)
        assert a == 2
        bonus[nxt] += 1
    stat, df = chi2(bonus, p[2])
    assert stat < chi2_critical(df)


class MixtureProposer(Eagle3Proposer):
    """Samples its first draft from q = (p_target + uniform) / 2 (known to the test), so most drafts
    are accepted and the residual max(0, p - q) is a non-trivial distribution."""

    def __init__(self, draft, d2t, p_next):
        super().__init__(draft, d2t)
        self.p_next = p_next  # [V, V]: the target's p(y | prompt, x) for each first token x

    def pick(self, logits, temperature, generator, context, j):
        super().pick(logits, temperature, generator, context, j)
        vocab = self.p_next.shape[0]
        q = 0.5 * self.p_next[context[-1]] + 0.5 / vocab if j == 0 else torch.full((vocab,), 1.0 / vocab)
        return int(torch.multinomial(q, 1, generator=generator)), q


@pytest.mark.parametrize("kind", ["eagle3", "mixture"])
def test_sampled_generation_matches_target_distribution(target_dirs, kind):
    """End to end on the tiny target: the second generated token (the first one a draft proposes)
    has the target's marginal sum_x p(x | prompt) p(y | prompt, x)."""
    target = load_target(str(target_dirs["llama"]), dtype="float32", device="cpu")
    model = target.model
    with torch.no_grad():
        model.lm_head.weight.mul_(12)  # a peaked target, so a few hundred samples say something
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = [1, 3, 40, 41, 42]
    T = 0.8
    with torch.inference_mode():
        p1 = torch.softmax(model(torch.tensor([ids])).logits[0, -1] / T, -1)
        p2 = torch.softmax(model(torch.tensor([ids + [x] for x in range(vocab)])).logits[:, -1] / T, -1)
        marginal = p1 @ p2
    # the real draft over half the vocab (sampled q, d2t offsets), or a q close to p
    draft, d2t, _ = make_draft(target, torch.arange(0, vocab, 2), seed=5)
    proposer = Eagle3Proposer(draft, d2t) if kind == "eagle3" else MixtureProposer(draft, d2t, p2)
    runner = TargetRunner(model, draft.cfg.aux_layer_ids)
    g = torch.Generator().manual_seed(1)
    counts, accepted, n = torch.zeros(vocab), 0, 250
    for _ in range(n):
        s = generate(runner, ids, DecodeConfig(k=2, temperature=T, max_new_tokens=2), proposer, g)
        counts[s.tokens[1]] += 1
        accepted += s.accepted[0] > 0
    assert 0 < accepted < n  # both the accept and the reject path were taken
    if kind == "mixture":
        assert accepted > n // 3
    stat, df = chi2(counts, marginal)
    assert df >= 3 and stat < chi2_critical(df), (stat, df)
    wrong, wdf = chi2(counts, p1)  # power: the unconditioned first-token distribution is rejected
    assert wrong > chi2_critical(wdf)
