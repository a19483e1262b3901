"""DFlash training objective over one packed hidden-state row (DESIGN.md, "DFlash training semantics").

Anchors. An anchor a is a position where a decoder could start a block: the token x_a is known
(the target's own token after a verification), the context is the target's fused layers at
positions s < a of a's document, and x_{a+1} is a token the draft learns (loss_mask[a+1] == 1,
inside the document). Training samples at most MAX_TRAIN_ANCHORS anchors per row (from torch's
default generator, which checkpoints store, so a resumed run draws the same ones); measurement
without gradients takes every anchor, so the chain-drafting replay sees every place a decoder drafts.

Block slot j = 1..K (K = ttt_length, the block holds K + 1 slots) drafts x_{a+j}; its target is the
target model's next-token distribution at position a+j-1 restricted to the draft vocab, trained iff
x_{a+j} is in the document, loss_mask[a+j] == 1 and the target's full-vocab argmax is a draft token.
Slot j's loss is the soft cross-entropy over its valid anchors divided by their count; the total is
sum_j w^(j-1) loss_j (w = step_weight: the published recipes' decaying weights, exp(-(j-1)/gamma)).
"""

from __future__ import annotations

import torch

from training.eagle3.attention import doc_layout
from training.eagle3.loss import TTTOutput, step_statistics, target_distribution

MAX_TRAIN_ANCHORS = 256  # per packed row and step: bounds the [heads, anchors*B, T] attention scores


def anchor_candidates(doc: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions a with context (a is not its document's first token) whose next token is learned."""
    T = doc.numel()
    ok = torch.zeros(T, dtype=torch.bool, device=doc.device)
    if T >= 3:
        ok[1 : T - 1] = (doc[:-2] == doc[1:-1]) & (doc[2:] == doc[1:-1]) & loss_mask[2:]
    return ok.nonzero().squeeze(1)


def pick_anchors(candidates: torch.Tensor, training: bool) -> torch.Tensor:
    if not training or candidates.numel() <= MAX_TRAIN_ANCHORS:
        return candidates
    chosen = torch.randperm(candidates.numel())[:MAX_TRAIN_ANCHORS].sort().values
    return candidates[chosen.to(candidates.device)]


def slot_valid(j: int, anchors, doc, loss_mask, in_draft) -> torch.Tensor:
    """Anchors whose slot j (drafting x_{a+j}) carries loss."""
    T = doc.numel()
    u = anchors + j
    inside = u < T
    u = u.clamp(max=T - 1)
    return inside & (doc[u] == doc[anchors]) & loss_mask[u] & in_draft[u - 1]


def dflash_forward(draft, batch: dict, target_head: torch.Tensor, t2d: torch.Tensor, ttt_length: int = 7,
                   step_weight: float = 0.8) -> TTTOutput:
    """One packed row -> block loss and per-slot statistics (TTTOutput, as training.eagle3.loss
    gives for TTT steps: slot j plays step j-1). `draft` may be a DFlashDraft or a DDP wrapper."""
    model = getattr(draft, "module", draft)
    dev = model.fc.weight.device
    if ttt_length + 1 != model.cfg.block_size:
        raise ValueError(f"ttt_length {ttt_length} drafts a block of {ttt_length + 1}; the draft was built "
                         f"for blocks of {model.cfg.block_size}")
    ids = batch["input_ids"].to(dev).long()
    T = ids.numel()
    doc, _ = doc_layout(batch["cu_seqlens"].to(dev), T)
    p, top, in_draft = target_distribution(batch["last"].to(dev), target_head.to(dev), t2d)
    if p.shape[1] != model.cfg.draft_vocab_size:
        raise ValueError(f"t2d selects {p.shape[1]} tokens, the draft has {model.cfg.draft_vocab_size}")
    loss_mask = batch["loss_mask"].to(dev).bool()
    anchors = pick_anchors(anchor_candidates(doc, loss_mask), torch.is_grad_enabled() and model.training)

    valids = [slot_valid(j, anchors, doc, loss_mask, in_draft) for j in range(1, ttt_length + 1)]
    rows = [(anchors + j - 1).clamp(max=T - 1) for j in range(1, ttt_length + 1)]
    targets = [(p[r], v) for r, v in zip(rows, valids)]
    results = draft(batch["aux"].to(dev), ids, batch["cu_seqlens"].to(dev), anchors, targets)
    out = step_statistics(results, valids, [top[r] for r in rows], anchors.numel(), ttt_length, step_weight)
    # Replay (training.metrics.replay_chain) reads run_lengths[p - 1] for a decoder drafting at pending p.
    run = torch.zeros(max(T - 1, 0), dtype=torch.long, device=dev)
    run[anchors - 1] = out.run_lengths
    out.run_lengths = run
    return out

