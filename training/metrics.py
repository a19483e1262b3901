"""Draft metrics: acc_k, conditional acceptance and the simulated acceptance length (tau) of
chain drafting, summed over a window of training steps or measured over held-out rows.

    acc_k       top-1 agreement of TTT step k with the target's argmax, over valid positions
    cond_acc_k  P(step k right | steps 0..k-1 right): the acceptance of draft position k
    tau         1 + sum_k prod_{j<=k} cond_acc_j: expected tokens per target verification
    replayed    tokens per verification of greedy chain drafting replayed along held-out text
                (replay_chain), per draft length 1..K

The simulated tau averages over every position, but a decoder drafts from the positions right
after a verification, and those follow a rejected (hard to predict) token more often than not, so
it overstates decoded tau (stories260K: 3.73 simulated at k=4, 3.40 decoded). The replay drafts
only where a decoder would; on text that is the target's greedy output it is exactly what greedy
decoding measures (tests/training/test_metrics.py; the README's recipe section).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from training.distributed import all_reduce


def acceptance_length(cond_acc: Sequence[float]) -> float:
    """Expected tokens per verification with chain drafting of len(cond_acc) tokens: the bonus
    token plus, for each depth k, the probability that drafts 0..k were all accepted."""
    tau, run = 1.0, 1.0
    for c in cond_acc:
        run *= c
        tau += run
    return tau


def replay_chain(run_lengths: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor,
                 depth: int) -> list[int]:
    """Drafts accepted per verification, in order, when greedy chain drafting of `depth` tokens is
    replayed along one packed row (tau = 1 + their mean). run_lengths [T-1] (TTTOutput.run_lengths):
    row t's count of leading right TTT steps, i.e. what drafting from position t + 1 would accept.
    Each masked span's first token comes from the target (its prefill); then, with the pending
    token at position p, a verification accepts a = min(run_lengths[p - 1], depth) drafts and
    emits a + 1 tokens, and p moves on by a + 1, as the evaluator's decoder does."""
    run, mask, cu = run_lengths.tolist(), loss_mask.bool().tolist(), cu_seqlens.tolist()
    accepted = []
    for lo, hi in zip(cu[:-1], cu[1:]):
        s = lo
        while s < hi:
            if not mask[s]:
                s += 1
                continue
            e = s
            while e < hi and mask[e]:
                e += 1
            p = s  # span [s, e): x_s from the target
            while p + 1 < e:
                a = min(run[p - 1], depth) if p > lo else 0
                accepted.append(a)
                p += a + 1
            s = e
    return accepted


class MetricsWindow:
    """Metric sums over the steps since the last log line, reducible across ranks in one call."""

    def __init__(self, k: int):
        self.k = k
        self.reset()

    def reset(self) -> None:
        self.loss = 0.0
        self.micro = 0
        self.steps = 0
        self.tokens = 0
        self.step_loss = [0.0] * self.k
        self.acc = [0.0] * self.k   # sum of acc_k * n_valid_k, so the mean weights positions
        self.cond = [0.0] * self.k  # sum of cond_acc_k * n_cond_k (its exact denominator)
        self.n = [0.0] * self.k
        self.nc = [0.0] * self.k
        self.replay_tokens = [0.0] * self.k  # per draft length 1..k
        self.replay_steps = [0.0] * self.k
        self.t0 = time.perf_counter()

    def add(self, out, tokens: int, batch: dict | None = None) -> None:
        """Fold in one micro-batch's TTTOutput (training.eagle3.loss); with its `batch`, the
        chain-drafting replay too (held-out measurement only: it walks the row in Python)."""
        if batch is not None and getattr(out, "run_lengths", None) is not None:
            for d in range(self.k):
                accepted = replay_chain(out.run_lengths, batch["loss_mask"], batch["cu_seqlens"], d + 1)
                self.replay_tokens[d] += sum(accepted) + len(accepted)
                self.replay_steps[d] += len(accepted)
        self.loss += float(out.loss.detach())
        self.micro += 1
        self.tokens += tokens
        n_cond = getattr(out, "n_cond", None) or out.n_valid
        for i in range(min(self.k, len(out.acc))):
            n, nc = float(out.n_valid[i]), float(n_cond[i])
            self.step_loss[i] += float(out.step_losses[i])
            self.acc[i] += float(out.acc[i]) * n
            self.cond[i] += float(out.cond_acc[i]) * nc
            self.n[i] += n
            self.nc[i] += nc

    def summary(self, world: int) -> dict:
        """Means over the window (and over ranks when world > 1: a collective, every rank calls it)."""
        vec = torch.tensor([self.loss, self.micro, self.tokens, *self.step_loss, *self.acc, *self.cond,
                            *self.n, *self.nc, *self.replay_tokens, *self.replay_steps], dtype=torch.float64)
        if world > 1:
            vec = all_reduce(vec)
        loss, micro, tokens = vec[0].item(), vec[1].item(), vec[2].item()
        k = self.k
        sl, acc, cond, n, nc, rt, rs = (vec[3 + i * k: 3 + (i + 1) * k].tolist() for i in range(7))
        cond_acc = [c / m if m else 0.0 for c, m in zip(cond, nc)]
        replayed = {"replayed_acceptance_length": [t / s for t, s in zip(rt, rs)]} if all(rs) else {}
        return replayed | {
            "loss": loss / max(micro, 1),
            "step_losses": [x / max(micro, 1) for x in sl],
            "acc": [a / m if m else 0.0 for a, m in zip(acc, n)],
            "cond_acc": cond_acc,
            "n_valid": [int(x) for x in n],
            "simulated_acceptance_length": acceptance_length(cond_acc),
            "tokens": int(tokens),
        }


def _default_loss_fn():
    from training.eagle3.loss import ttt_forward

    return ttt_forward


@torch.no_grad()
def measure_acceptance(draft: torch.nn.Module, source, target_head: torch.Tensor,
                       t2d: torch.Tensor, *, ttt_length: int = 7, max_tokens_per_batch: int = 8192,
                       loss_fn: Callable | None = None) -> dict:
    """acc_k, conditional acceptance and simulated acceptance length of `draft` over one pass of
    `source` (held-out data: every row counts once), unrolled `ttt_length` steps as in training,
    so a draft trained with a shorter unroll is judged on the chain it will serve. No gradients;
    the draft's train/eval mode is restored. Returns MetricsWindow.summary's dict (loss included,
    and replayed_acceptance_length per draft length 1..ttt_length)."""
    loss_fn = loss_fn or _default_loss_fn()
    device = next(draft.parameters()).device
    target_head, t2d = target_head.to(device), t2d.to(device)
    window = MetricsWindow(ttt_length)
    was_training = draft.training
    draft.eval()
    try:
        for batch in source.batches(max_tokens_per_batch, epoch=0, seed=0):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            out = loss_fn(draft, batch, target_head, t2d, ttt_length=ttt_length)
            window.add(out, int(batch["input_ids"].numel()), batch)
    finally:
        draft.train(was_training)
    return window.summary(world=1)
