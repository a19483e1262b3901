"""Prompt-lookup (n-gram) drafting: the no-draft-model baseline a trained draft has to beat.

Match the last n tokens of the context (prompt + generated so far, n from max_n down to min_n)
against an earlier place in the same context and propose the k tokens that followed it there.
Like vLLM's `ngram` method and transformers' prompt-lookup decoding, the longest matching n wins
and, for that n, the earliest occurrence (the longest continuation); nothing matches -> no
proposal, and the step is a plain decoding step. Pure numpy: no model, cost is a scan.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def propose_ngram(context: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens that followed the earliest earlier occurrence of the context's last n tokens."""
    if k <= 0:
        return []
    ctx = np.asarray(context, dtype=np.int64)
    L = ctx.shape[0]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        if n <= 0:
            break
        suffix = ctx[L - n:]
        # Windows starting at 0..L-n-1: every occurrence except the suffix itself, so a match
        # always has at least one following token.
        windows = np.lib.stride_tricks.sliding_window_view(ctx[: L - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return ctx[start: start + k].tolist()
    return []


class PromptLookupProposer:
    """The proposer interface of `speculative.generate` for n-gram drafting (deterministic proposals:
    the draft distribution q is a point mass, so sampled verification accepts x with prob p(x))."""

    name = "prompt_lookup"
    needs_aux = False

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def start(self, prompt_ids, first_token, aux) -> None:
        pass  # stateless: everything it needs is in the context

    def propose(self, context, k, temperature, generator):
        return propose_ngram(context, k, self.max_n, self.min_n), None

    def accept(self, aux, tokens, start) -> None:
        pass
