"""EAGLE-3 training-time-test loss over one packed hidden-state row (DESIGN.md semantics).

Alignment. Row t of TTT step k consumed x_{t+1+k} and predicts x_{t+2+k}; its target is the
target model's next-token distribution at position u = t+1+k, i.e. softmax(last_u @ head.T)
restricted to the draft vocab. Row (t, k) is trained iff
  * x_{t+2+k}, the token it predicts, is in t's document (so are all its inputs),
  * loss_mask[t+2+k] == 1 (the predicted token is one the draft learns: assistant content/EOT),
  * the target's full-vocab argmax at u is a draft token (else the draft cannot agree with it).
Step k's loss is the soft cross-entropy summed over its valid rows divided by their count; the
total is sum_k w^k loss_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from training.eagle3.attention import doc_layout

# Elements of fp32 target logits computed at once: rows are chunked so T x V never exists.
_TARGET_CHUNK = 1 << 24


@dataclass
class TTTOutput:
    loss: torch.Tensor  # sum_k w^k loss_k (scalar, differentiable)
    step_losses: list[float]
    acc: list[float]  # acc_k: top-1 agreement with the target argmax over valid rows
    cond_acc: list[float]  # P(step k correct | steps 0..k-1 correct)
    n_valid: list[int]
    n_cond: list[int] = field(default_factory=list)  # cond_acc denominators, to aggregate batches exactly
    # [T-1] per row t: how many leading TTT steps were right (steps 0..r-1), the draft length chain
    # drafting from t would have accepted; metrics.replay_chain walks it like a decoder would.
    run_lengths: torch.Tensor | None = None

    def simulated_acceptance_length(self) -> float:
        """Expected tokens per verification, 1 + sum_k prod_{j<=k} cond_acc_j (the bonus token
        plus each draft position accepted while all before it were)."""
        total, run = 1.0, 1.0
        for c in self.cond_acc:
            run *= c
            total += run
        return total


@torch.no_grad()
def target_distribution(last: torch.Tensor, target_head: torch.Tensor, t2d: torch.Tensor):
    """Per position u: the target's next-token distribution over the draft vocab [T, Vd] fp32
    (draft order = ascending target id, as the vocab map sorts it), its argmax as a draft id [T],
    and whether the full-vocab argmax is a draft token [T]."""
    t2d = t2d.to(device=last.device, dtype=torch.bool)
    draft_ids = t2d.nonzero().squeeze(1)
    T, V = last.shape[0], target_head.shape[0]
    p = torch.empty(T, draft_ids.numel(), dtype=torch.float32, device=last.device)
    top = torch.empty(T, dtype=torch.long, device=last.device)
    in_draft = torch.empty(T, dtype=torch.bool, device=last.device)
    rows = max(1, _TARGET_CHUNK // V)
    for i in range(0, T, rows):
        logits = (last[i : i + rows].to(target_head.dtype) @ target_head.T).float()
        in_draft[i : i + rows] = t2d[logits.argmax(-1)]
        sub = logits[:, draft_ids]
        p[i : i + rows] = torch.softmax(sub, dim=-1)
        top[i : i + rows] = sub.argmax(-1)
    return p, top, in_draft


def step_valid(k: int, doc: torch.Tensor, loss_mask: torch.Tensor, in_draft: torch.Tensor) -> torch.Tensor:
    """Rows t in [0, T-1-k) of step k that carry loss (see the module docstring)."""
    T = doc.numel()
    n = T - 1 - k
    valid = torch.zeros(n, dtype=torch.bool, device=doc.device)
    if n >= 2:  # the last row predicts x_{T+1}: never valid
        valid[: n - 1] = (doc[2 + k :] == doc[: n - 1]) & loss_mask[2 + k :] & in_draft[1 + k : T - 1]
    return valid


def ttt_forward(
    draft,
    batch: dict,
    target_head: torch.Tensor,
    t2d: torch.Tensor,
    ttt_length: int = 7,
    step_weight: float = 0.8,
) -> TTTOutput:
    """One packed row -> TTT loss and per-step statistics. `draft` may be an Eagle3Draft or a
    DDP/FSDP wrapper around one (it is called, so wrappers see a forward)."""
    model = getattr(draft, "module", draft)
    dev = model.fc.weight.device
    ids = batch["input_ids"].to(dev).long()
    T = ids.numel()
    if T < 2:
        raise ValueError("a packed row needs at least 2 tokens")
    doc, _ = doc_layout(batch["cu_seqlens"].to(dev), T)
    p, top, in_draft = target_distribution(batch["last"].to(dev), target_head.to(dev), t2d)
    if p.shape[1] != model.cfg.draft_vocab_size:
        raise ValueError(f"t2d selects {p.shape[1]} tokens, the draft has {model.cfg.draft_vocab_size}")
    loss_mask = batch["loss_mask"].to(dev).bool()

    steps = min(ttt_length, T - 1)
    valids = [step_valid(k, doc, loss_mask, in_draft) for k in range(steps)]
    targets = [(p[1 + k : T], valids[k]) for k in range(steps)]
    results = draft(batch["aux"].to(dev), ids, batch["cu_seqlens"].to(dev), targets)

    return step_statistics(results, valids, [top[1 + k : T] for k in range(steps)], T - 1, ttt_length, step_weight)


def step_statistics(results, valids, tops, rows: int, ttt_length: int, step_weight: float) -> TTTOutput:
    """Per-step loss and statistics of a chain of draft positions (EAGLE-3's TTT steps, DFlash's
    block slots). results[k] = (CE summed over step k's valid rows, draft argmax per row); valids[k]
    and tops[k] (the target argmax as a draft id) per row. Step k covers the first len(valids[k])
    of `rows` rows; run_lengths[r] counts row r's leading right steps."""
    dev = tops[0].device if tops else torch.device("cpu")
    loss = torch.zeros((), device=dev)
    chain = torch.ones(rows, dtype=torch.bool, device=dev)  # rows whose steps so far were all right
    run = torch.zeros(rows, dtype=torch.long, device=dev)
    stats = []  # tensors, turned into floats with one device sync at the end
    for k, ((ce_sum, draft_top), valid, top) in enumerate(zip(results, valids, tops)):
        n = valid.numel()
        n_valid = valid.sum()
        step_loss = ce_sum / n_valid.clamp(min=1)
        loss = loss + step_weight**k * step_loss
        correct = (draft_top == top) & valid
        prev = chain[:n]
        n_cond = (prev & valid).sum()
        stats.append(
            torch.stack(
                [
                    step_loss.detach().float(),
                    correct.sum() / n_valid.clamp(min=1),
                    (prev & correct).sum() / n_cond.clamp(min=1),
                    n_valid.float(),
                    n_cond.float(),
                ]
            )
        )
        chain = prev & correct
        run[:n] += chain
    table = torch.stack(stats).tolist() if stats else []
    pad = [[0.0] * 5] * (ttt_length - len(table))  # fixed length: steps a short row could not run
    cols = list(zip(*(table + pad))) if ttt_length else [()] * 5
    return TTTOutput(
        loss=loss,
        step_losses=list(cols[0]),
        acc=list(cols[1]),
        cond_acc=list(cols[2]),
        n_valid=[int(x) for x in cols[3]],
        n_cond=[int(x) for x in cols[4]],
        run_lengths=run,
    )
