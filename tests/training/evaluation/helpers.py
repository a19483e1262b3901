"""Random-weight EAGLE-3 drafts for the tiny evaluation target."""

import torch

from training.eagle3.model import DraftConfig, Eagle3Draft


def make_draft(target, draft_ids: torch.Tensor | None = None, seed: int = 0, head_scale: float = 1.0):
    """A random Eagle3Draft for `target` and its vocab maps; draft_ids = the target ids the draft
    vocab keeps (default: all), so d2t offsets are non-trivial when it skips ids."""
    model = target.model
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(vocab) if draft_ids is None else torch.sort(draft_ids).values
    cfg = DraftConfig.from_target_config(model.config.to_dict(), ids.numel())
    torch.manual_seed(seed)
    draft = Eagle3Draft(cfg, model.get_input_embeddings().weight).eval()
    if head_scale != 1.0:
        with torch.no_grad():
            draft.lm_head.weight.mul_(head_scale)  # a confident (peaked) draft distribution q
    d2t = ids - torch.arange(ids.numel())  # target_id = draft_id + d2t[draft_id]
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return draft, d2t, t2d


def make_dflash(target, draft_ids: torch.Tensor | None = None, seed: int = 0, layers: int = 1, block: int = 6):
    """A random DFlashDraft for `target` (mask token: its last id) and its vocab maps, as make_draft."""
    from training.dflash.model import DFlashConfig, DFlashDraft

    model = target.model
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(vocab) if draft_ids is None else torch.sort(draft_ids).values
    cfg = DFlashConfig.from_target_config(model.config.to_dict(), ids.numel(), vocab - 1, num_layers=layers,
                                          block_size=block)
    torch.manual_seed(seed)
    draft = DFlashDraft(cfg, model.get_input_embeddings().weight).eval()
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return draft, ids - torch.arange(ids.numel()), t2d
