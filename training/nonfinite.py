"""What a non-finite training loss is blamed on: the input features when they are not finite (a
target or feature-store fault, which a lower lr cannot help), else the optimization."""

from __future__ import annotations

import torch

from training.sources import describe_batch


def nonfinite_inputs(batch: dict) -> list[dict]:
    """Which input features of a micro-batch are not finite, one dict per tensor (aux per aux
    layer slot, last): {"tensor", "values" (count), "tokens", "documents" (indices in the packed
    row), "first_position"}. Empty when every feature is finite."""
    cu = batch["cu_seqlens"].tolist()
    found = []
    for name, n_blocks in (("aux", 3), ("last", 1)):
        bad = ~torch.isfinite(batch[name].float())
        if not bool(bad.any()):
            continue
        T, width = bad.shape
        bad = bad.reshape(T, n_blocks, width // n_blocks)
        for b in range(n_blocks):
            rows = torch.nonzero(bad[:, b].any(-1)).flatten().tolist()
            if rows:
                docs = sorted({next(i for i in range(len(cu) - 1) if cu[i] <= t < cu[i + 1]) for t in rows})
                found.append({"tensor": f"aux (aux layer slot {b})" if name == "aux" else "last",
                              "values": int(bad[:, b].sum()), "tokens": len(rows), "documents": docs,
                              "first_position": rows[0]})
    return found


def nonfinite_error(out, batch: dict, source, cfg, *, step: int, epoch: int, pos: int,
                    rank: int, world: int) -> FloatingPointError:
    """The error for a non-finite loss: the input features when they are not finite (a target or
    feature-store fault: a lower lr cannot help), else the optimization (lr)."""
    where = f"step {step}, epoch {epoch}, micro-batch {pos}" + (f" of rank {rank}" if world > 1 else "")
    bad = nonfinite_inputs(batch)
    if not bad:
        return FloatingPointError(f"non-finite loss {float(out.loss.detach())} at {where} with finite input features; "
                                  "resume from the last checkpoint with a lower lr")
    try:
        rows = describe_batch(source, cfg.max_tokens_per_batch, epoch=epoch, seed=cfg.seed, rank=rank,
                              world_size=world, index=pos)
    except Exception:  # naming rows is a courtesy; the tensor report below stands without it
        rows = []
    tensors = "; ".join(f"{b['tensor']}: {b['values']} non-finite values in {b['tokens']} tokens of document(s) "
                        f"{b['documents']}, first at packed position {b['first_position']}" for b in bad)
    docs = sorted({d for b in bad for d in b["documents"]})
    named_rows = "; ".join(f"document {d} = {rows[d]}" for d in docs if d < len(rows))
    return FloatingPointError(
        f"non-finite loss {float(out.loss.detach())} at {where}: the input features are not finite ({tensors})"
        + (f"; {named_rows}" if named_rows else "")
        + ". The target produced inf/NaN hidden states for these rows (or the stored features are corrupt): "
        "fix or drop them and rewrite the features; lowering the lr will not help")
