"""Draft training throughput and memory on CPU: tokens/s and peak RSS per TTT length and precision.

    .venv/bin/python bench/bench_train.py [--hidden 512] [--seq 2048] [--ttt 1,4,7] [--steps 3] [--precision fp32,bf16]

Target: a random-weight Llama config (H=512 by default, 32k vocab; only its embedding and lm_head
exist, as random tensors). Inputs: random aux/last for one packed row of `--seq` tokens. Each
TTT length runs in its own subprocess (so ru_maxrss is that run's peak) through the real
training loop (trainer.train: ttt_forward, backward, clipping, AdamW) for 1 warm-up step plus
`--steps` timed ones. Activation memory should grow linearly in the TTT length: the head's
[T, draft_vocab] logits are recomputed in backward, so each step keeps only layer activations.
Each length runs at every `--precision` (TrainConfig.precision), side by side: the printed ratio is
bf16's tokens/s over fp32's (a CPU with native bf16 matmuls, AVX512-BF16 or AMX, gains).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def target_config(hidden: int, vocab: int) -> dict:
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    kv_heads = max(d for d in range(1, max(1, heads // 2) + 1) if heads % d == 0)  # GQA: a divisor of heads
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=16, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=int(hidden * 2.75),
                       vocab_size=vocab, max_position_embeddings=8192).to_dict()


class RandomRows:
    """One packed row of `seq` random tokens (one document) per micro-batch, fresh each batch."""

    def __init__(self, hidden: int, seq: int, vocab: int, n: int):
        self.hidden, self.seq, self.vocab, self.n = hidden, seq, vocab, n

    @property
    def num_tokens(self) -> int:
        return self.seq * self.n

    @property
    def num_sequences(self) -> int:
        return self.n

    def num_batches(self, max_tokens, world_size=1, *, epoch=0, seed=0):
        return self.n // world_size

    def batches(self, max_tokens, *, epoch, seed, rank=0, world_size=1, skip=0):
        import torch

        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for i in range(skip, self.num_batches(max_tokens, world_size)):
            yield {
                "aux": torch.randn(self.seq, 3 * self.hidden, generator=g),
                "last": torch.randn(self.seq, self.hidden, generator=g),
                "input_ids": torch.randint(0, self.vocab, (self.seq,), generator=g),
                "loss_mask": torch.ones(self.seq, dtype=torch.uint8),
                "cu_seqlens": torch.tensor([0, self.seq]),
            }


def child(args) -> dict:
    """One measurement: train `steps + 1` steps at TTT `args.child`, report tokens/s and peak RSS."""
    import torch

    from training.eagle3.model import DraftConfig, Eagle3Draft
    from training.storage import ObjectStore
    from training.trainer import TrainConfig, train

    torch.manual_seed(0)
    cfg_t = target_config(args.hidden, args.vocab)
    embed = torch.randn(args.vocab, args.hidden) * 0.02
    head = torch.randn(args.vocab, args.hidden) * 0.05
    t2d = torch.zeros(args.vocab, dtype=torch.bool)
    t2d[torch.randperm(args.vocab)[: args.draft_vocab]] = True
    draft = Eagle3Draft(DraftConfig.from_target_config(cfg_t, args.draft_vocab), embed)
    n_params = sum(p.numel() for p in draft.parameters() if p.requires_grad)
    cfg = TrainConfig(ttt_length=args.child, epochs=1, max_tokens_per_batch=args.seq, warmup_steps=1,
                      log_every=1, checkpoint_every=0, validation_rows=0, precision=args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        res = train(cfg, RandomRows(args.hidden, args.seq, args.vocab, args.steps + 1), draft, head, t2d,
                    ObjectStore(tmp), "bench", log=lambda _: None)
    timed = res.metrics[1:]  # the first step pays one-time allocation and kernel selection
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"ttt": args.child, "precision": args.precision, "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_params": n_params, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--ttt", default="1,4,7")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per TTT length")
    ap.add_argument("--precision", default="fp32,bf16", help="TrainConfig.precision values, side by side")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return

    print(f"draft training on CPU: H={args.hidden}, seq {args.seq}, target vocab {args.vocab}, "
          f"draft vocab {args.draft_vocab}, {args.steps} timed steps; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    precisions = args.precision.split(",")
    by_precision: dict[str, list[dict]] = {p: [] for p in precisions}
    for k in [int(x) for x in args.ttt.split(",")]:
        for precision in precisions:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(k)] + [
                f"--{n}={getattr(args, n.replace('-', '_'))}"
                for n in ("hidden", "seq", "vocab", "draft-vocab", "steps")] + [f"--precision={precision}"]
            out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                                 text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            by_precision[precision].append(row)
            print(f"  TTT {k} {precision}: {row['tokens_per_s']:8.0f} tokens/s  {row['s_per_step']:6.2f} s/step  "
                  f"peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
    if {"fp32", "bf16"} <= set(precisions):
        for a, b in zip(by_precision["fp32"], by_precision["bf16"]):
            print(f"TTT {a['ttt']}: bf16 / fp32 tokens/s ratio {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
    rows = by_precision[precisions[0]]
    print(f"memory over TTT lengths, {precisions[0]}:")
    base = rows[0]
    print(f"trainable parameters: {base['trainable_params'] / 1e6:.1f} M, torch threads {base['threads']}")
    print(f"{'TTT':>4} {'tokens/s':>10} {'vs first':>9} {'peak MB':>9} {'vs first':>9} {'MB/TTT step over first':>23}")
    for r in rows:
        extra = (r["peak_rss_mb"] - base["peak_rss_mb"]) / (r["ttt"] - base["ttt"]) if r["ttt"] != base["ttt"] else 0.0
        print(f"{r['ttt']:>4} {r['tokens_per_s']:>10.0f} {r['tokens_per_s'] / base['tokens_per_s']:>8.2f}x "
              f"{r['peak_rss_mb']:>9.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:>8.2f}x {extra:>23.1f}")
    if len(rows) >= 3:
        a, b, c = rows[0], rows[len(rows) // 2], rows[-1]
        s1 = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["ttt"] - a["ttt"])
        s2 = (c["peak_rss_mb"] - b["peak_rss_mb"]) / (c["ttt"] - b["ttt"])
        print(f"linearity: MB per extra TTT step {s1:.1f} (TTT {a['ttt']}->{b['ttt']}) vs {s2:.1f} "
              f"(TTT {b['ttt']}->{c['ttt']}), ratio {s2 / s1 if s1 else float('nan'):.2f} (1.00 = linear)")


if __name__ == "__main__":
    main()
