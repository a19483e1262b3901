"""Peak memory and throughput of one EAGLE-3 TTT forward+backward at TTT lengths 1, 4, 7.

Each length runs in a fresh subprocess (random weights, H=512, one packed row of 2048 tokens in
4 documents). CPU: peak resident set growth over the step, read from /proc (VmHWM is reset just
before the step; glibc's mmap threshold is pinned so freed tensors leave the resident set).
CUDA: torch.cuda.max_memory_allocated under bf16 autocast. Prints (mem(K) - mem(1)) / (K - 1),
the memory each extra TTT step costs: constant per step = linear in K.

    .venv/bin/python bench/bench_draft_memory.py [--device cuda] [--seq 2048] [--steps 1 4 7]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    import torch

    from training.eagle3 import DraftConfig, Eagle3Draft, ttt_forward

    torch.manual_seed(0)
    dev = torch.device(args.device)
    H, T, V, Vd = args.hidden, args.seq, args.vocab, args.draft_vocab
    target = {
        "hidden_size": H, "num_attention_heads": H // 64, "num_key_value_heads": max(1, H // 256),
        "intermediate_size": 3 * H, "num_hidden_layers": 16, "vocab_size": V,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "max_position_embeddings": 8192,
    }  # fmt: skip
    cfg = DraftConfig.from_target_config(target, Vd)
    draft = Eagle3Draft(cfg, torch.randn(V, H) * 0.02).to(dev)
    head = (torch.randn(V, H, device=dev) * 0.05).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    t2d = torch.zeros(V, dtype=torch.bool, device=dev)
    t2d[torch.randperm(V, device=dev)[:Vd]] = True
    batch = {
        "aux": torch.randn(T, 3 * H, device=dev).to(torch.bfloat16),  # the store's dtype
        "last": torch.randn(T, H, device=dev).to(torch.bfloat16),
        "input_ids": torch.randint(0, V, (T,), device=dev, dtype=torch.int32),
        "loss_mask": torch.ones(T, dtype=torch.uint8, device=dev),
        "cu_seqlens": torch.linspace(0, T, 5, device=dev).long(),
    }
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda")

    def run():
        with autocast:
            out = ttt_forward(draft, batch, head, t2d, ttt_length=args.k)
        out.loss.backward()
        draft.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        run()  # warm-up: kernels, cuBLAS workspaces
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            peak = None
        except OSError:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # fallback: lifetime peak
        run()
        peak = rss_bytes("VmHWM") - base if peak is None else peak - base
    t0 = time.perf_counter()
    for _ in range(args.iters):
        run()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.iters
    return {"k": args.k, "peak_bytes": peak, "tokens_per_s": T / dt, "step_s": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4, 7])
    ap.add_argument("--iters", type=int, default=1, help="timed iterations after the measured one")
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)  # set in the per-length subprocess
    args = ap.parse_args()
    if args.k is not None:
        print(json.dumps(child(args)))
        return

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(root))
    rows = []
    for k in args.steps:
        cmd = [sys.executable, __file__, "--k", str(k), *sys.argv[1:]]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"device={args.device} H={args.hidden} T={args.seq} vocab={args.vocab} draft_vocab={args.draft_vocab}")
    print(f"{'TTT K':>6} {'peak MiB':>10} {'per extra step MiB':>19} {'tokens/s':>10} {'s/iter':>8}")
    for r in rows:
        dk = r["k"] - base["k"]
        extra = (r["peak_bytes"] - base["peak_bytes"]) / dk / MiB if dk else float("nan")
        mib, tps, sec = r["peak_bytes"] / MiB, r["tokens_per_s"], r["step_s"]
        print(f"{r['k']:>6} {mib:>10.1f} {extra:>19.1f} {tps:>10.0f} {sec:>8.2f}")
    heads = args.hidden // 64
    for r in rows[1:]:
        naive = heads * args.seq * args.seq * r["k"] * 4 / MiB
        print(f"  for scale: fp32 scores over concatenated keys at K={r['k']} alone would be {naive:.0f} MiB per step")


if __name__ == "__main__":
    main()
