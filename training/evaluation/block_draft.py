"""Block drafting simulated on the HF target: a DFlash draft proposes all k tokens in ONE forward.

    runner = TargetRunner(hf_model, draft.cfg.aux_layer_ids)
    stats = generate(runner, prompt_ids, DecodeConfig(k=3), DFlashProposer(draft, d2t))

State, as vLLM's DFlashProposer keeps it: the context keys and values of every verified position
(the prompt after prefill, then the pending token and accepted drafts of each verification, from the
aux states that forward captured). A step drafts from [pending token, MASK x k] at the next k+1
positions; slot j's argmax (or a sample) is draft j. Verification is speculative.py's.
"""

from __future__ import annotations

import torch

from training.dflash.model import DFlashDraft
from training.vocab import draft_to_target


class DFlashProposer:
    name = "dflash"
    needs_aux = True

    def __init__(self, draft: DFlashDraft, d2t: torch.Tensor, argmax_draft: bool = False):
        self.draft = draft.eval()
        self.device = draft.fc.weight.device
        self.draft_to_target = draft_to_target(d2t, self.device)
        self.target_vocab = draft.cfg.target_vocab_size
        self.argmax_draft = argmax_draft  # vLLM drafts each slot's argmax at every temperature
        self.ctx = None
        self.n = 0  # verified positions in the context

    def start(self, prompt_ids, first_token, aux) -> None:
        self.ctx, self.n = self.draft.extend_context(None, aux, 0), aux.shape[0]

    def propose(self, context, k, temperature, generator):
        if len(context) - 1 != self.n:
            raise RuntimeError(f"draft context holds {self.n} positions, the pending token is at {len(context) - 1}")
        logits = self.draft.draft(self.ctx, context[-1], k).float()
        if temperature <= 0 or self.argmax_draft:
            return self.draft_to_target[logits.argmax(-1)].tolist(), None
        q_draft = torch.softmax(logits / temperature, dim=-1)
        picks = torch.multinomial(q_draft, 1, generator=generator).squeeze(1)
        qs = [torch.zeros(self.target_vocab, device=self.device).index_copy_(0, self.draft_to_target, q) for q in q_draft]
        return self.draft_to_target[picks].tolist(), qs

    def accept(self, aux, tokens, start) -> None:
        # aux: the pending token's and the accepted drafts' rows; the last emitted token is pending.
        if start != self.n:
            raise RuntimeError(f"draft context holds {self.n} positions, verified tokens start at {start}")
        self.ctx = self.draft.extend_context(self.ctx, aux, start)
        self.n += aux.shape[0]
