"""Prompt-lookup drafting: the continuation of the longest, earliest match, and tau > 1 on
repetitive text."""


from training.evaluation.prompt_lookup import PromptLookupProposer, propose_ngram
from training.evaluation.report import MethodStats
from training.evaluation.speculative import DecodeConfig, TargetRunner, generate


def test_proposes_what_followed_the_match():
    ctx = [5, 1, 2, 3, 4, 9, 1, 2, 3]
    assert propose_ngram(ctx, 3) == [4, 9, 1]  # trigram 1 2 3 matched at 1
    assert propose_ngram(ctx, 10) == [4, 9, 1, 2, 3]  # capped by the end of the context
    assert propose_ngram(ctx, 0) == []
    # the longest n wins over an earlier shorter match: bigram (7, 8) at 4, not unigram 8 at 0
    assert propose_ngram([8, 6, 0, 0, 7, 8, 5, 7, 8], 2) == [5, 7]
    # the earliest occurrence of the longest match
    assert propose_ngram([1, 2, 7, 1, 2, 8, 1, 2], 1) == [7]
    assert propose_ngram([4, 5, 6], 3) == []  # no earlier occurrence of 6
    assert propose_ngram([3], 3) == []
    assert propose_ngram([3, 3], 3) == [3]
    assert propose_ngram([1, 2, 3, 4, 2, 3], 2, max_n=1) == [4, 2]  # unigram 3 at 2
    assert propose_ngram([1, 9, 2, 1, 2], 2, min_n=2) == []  # (1, 2) never occurred before


def test_tau_above_one_on_repetitive_prompt(target):
    """A random target does not copy the prompt's pattern, but its greedy output repeats itself
    (here it settles into one token), and from then on prompt lookup drafts it: tau > 1, fewer
    target forwards, and the output is still exactly the target's greedy output."""
    pattern = [40, 41, 42, 43, 44, 45]
    prompt = [1] + pattern * 6
    runner = TargetRunner(target.model)
    cfg = DecodeConfig(k=4, max_new_tokens=24)
    plain = generate(runner, prompt, cfg)
    stats = generate(runner, prompt, cfg, PromptLookupProposer())
    assert stats.tokens == plain.tokens
    assert stats.proposed and max(stats.proposed) == 4
    row = MethodStats("prompt_lookup", 4, 0.0, "all")
    row.add(stats)
    assert row.tau > 1.0
    assert row.steps < plain.steps
