"""Data-parallel helpers of the training loop: rank/world, the collective device, all-reduce and
the generator states a checkpoint stores per rank. Backends: gloo on CPU, NCCL on GPU
(train_main picks); everything here also works in one process without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) of `t` over ranks, returned on t's device."""
    x = t.to(comm_device())
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x.to(t.device)


def rng_state(world: int) -> dict[str, torch.Tensor]:
    """Every rank's torch generator state(s), gathered to all ranks (rank 0 writes them)."""
    local = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        local["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return {f"{k}.rank0": v for k, v in local.items()}
    out = {}
    for name, t in sorted(local.items()):
        # Sizes are fixed per generator type, so a plain all_gather of uint8 tensors suffices.
        x = t.to(comm_device())
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        out.update({f"{name}.rank{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def set_rng_state(rng: dict[str, torch.Tensor], rank: int) -> None:
    torch.set_rng_state(rng[f"torch_cpu.rank{rank}"])
    if f"cuda.rank{rank}" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"])
