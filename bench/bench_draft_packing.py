"""TTT forward+backward on packed rows: per-document attention layout vs the whole-row [T, T] mask.

A training row packs many documents (cu_seqlens). The "dense" layout (the former implementation,
kept as Eagle3Draft.ttt_layout = "dense") runs the step-0 attention and its log-sum-exp over the
whole row behind a [T, T] block-causal mask: O(T^2). The "per_doc" layout (the default) gathers the
documents into padded groups of similar length and attends per document: O(sum_d L_d^2).
Both run in this one process, interleaved iteration by iteration so machine load hits both alike;
the best of --iters timed iterations (after --warmup) is reported, with tokens/s side by side and
the speed-up, in wall-clock time and in process CPU time (steadier on a shared machine; equal to
wall-clock work at --threads 1). Each case also checks that both layouts give the same loss and
gradients.

Cases (random weights, H=128, 4 heads / 2 kv heads, head_dim 32, vocab 1024, TTT length K):
  packed-100   T=4000 as 40 documents of 100 tokens (the measured training-batch shape)
  mixed        T~4000 as documents of 1..600 tokens (uneven lengths: several padded groups)
  single-2048  one document of 2048 tokens (no packing: both layouts run plain causal SDPA)

    .venv/bin/python bench/bench_draft_packing.py [--k 7] [--iters 2] [--warmup 1] [--threads N] [--cases ...]

On a shared, busy CPU prefer --threads 1: many small ops on oversubscribed cores wait for each
other at every parallel region, which distorts both layouts (the per-document one more).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see training/__init__.py
import torch  # noqa: E402

H, V = 128, 1024


def make_case(name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "packed-100":
        lens = [100] * 40
    elif name == "mixed":
        lens, total = [], 0
        while total < 4000:
            n = int(torch.randint(1, 601, (1,), generator=g))
            n = min(n, 4000 - total)
            lens.append(n)
            total += n
    elif name == "single-2048":
        lens = [2048]
    else:
        raise ValueError(name)
    T = sum(lens)
    cu = torch.cumsum(torch.tensor([0, *lens]), 0).to(torch.int64)
    batch = {
        "aux": torch.randn(T, 3 * H, generator=g),
        "last": torch.randn(T, H, generator=g),
        "input_ids": torch.randint(0, V, (T,), generator=g),
        "loss_mask": torch.ones(T, dtype=torch.uint8),
        "cu_seqlens": cu,
    }
    return lens, batch


def make_draft():
    from training.eagle3.model import DraftConfig, Eagle3Draft

    torch.manual_seed(0)
    cfg = DraftConfig(
        hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=384,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
        target_vocab_size=V, draft_vocab_size=V, aux_layer_ids=(2, 4, 5),
    )  # fmt: skip
    return Eagle3Draft(cfg, torch.randn(V, H))


def step(draft, batch, head, t2d, k, layout):
    from training.eagle3.loss import ttt_forward

    draft.ttt_layout = layout
    draft.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    out = ttt_forward(draft, batch, head, t2d, ttt_length=k)
    out.loss.backward()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    grads = {n: p.grad for n, p in draft.named_parameters() if p.grad is not None}
    return dt, cpu, out.loss.detach(), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=7, help="TTT length")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per layout (best is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=["packed-100", "mixed", "single-2048"])
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from training.eagle3.attention import PackedDocs

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, H={H} heads=4/2 head_dim=32 V={V} K={args.k}")
    print(f"{'case':<12} {'T':>5} {'docs':>5} {'groups':>6} {'dense s':>8} {'per_doc s':>9} {'dense tok/s':>11} "
          f"{'per_doc tok/s':>13} {'speed-up':>8} {'cpu-time speed-up':>17}  same result")  # fmt: skip
    for name in args.cases:
        lens, batch = make_case(name)
        T = sum(lens)
        groups = len(PackedDocs.from_cu_seqlens(batch["cu_seqlens"], T).truncate(T - 1).groups)
        draft = make_draft()
        head, t2d = torch.randn(V, H), torch.ones(V, dtype=torch.bool)
        wall = {"dense": float("inf"), "per_doc": float("inf")}
        cpu = dict(wall)
        res = {}
        for i in range(args.warmup + args.iters):
            for layout in ("per_doc", "dense"):
                dt, ct, loss, grads = step(draft, batch, head, t2d, args.k, layout)
                res[layout] = (loss, grads)
                if i >= args.warmup:
                    wall[layout], cpu[layout] = min(wall[layout], dt), min(cpu[layout], ct)
        (la, ga), (lb, gb) = res["per_doc"], res["dense"]
        same = torch.allclose(la, lb, rtol=1e-5, atol=1e-6) and all(
            torch.allclose(ga[n], gb[n], rtol=1e-3, atol=1e-6) for n in ga
        )
        d, p = wall["dense"], wall["per_doc"]
        print(f"{name:<12} {T:>5} {len(lens):>5} {groups:>6} {d:>8.3f} {p:>9.3f} {T / d:>11.0f} {T / p:>13.0f} "
              f"{d / p:>7.2f}x {cpu['dense'] / cpu['per_doc']:>16.2f}x  {same}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
