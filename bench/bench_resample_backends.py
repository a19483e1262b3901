"""Resampling throughput: the vllm backend against the hf backend and against bare vLLM, side by side.

    .venv/bin/python bench/bench_resample_backends.py [--target DIR] [--corpus FILE] [--n 64] [--max-new-tokens 96]
        [--against-dtype bfloat16]

The same conversations are resampled three ways, greedy, every assistant turn in order:
  hf       resample_conversations on the hf backend (transformers, batched generate);
  vllm     resample_conversations on the vllm backend (what resampled_corpus runs with SPECDRAFT_BACKEND=vllm);
  bare     vLLM's own `LLM.chat` on the very engine the vllm backend holds, one call per turn index over
           every conversation at once: the engine with nothing of ours around it.
Output tokens per second of each, and the ratios vllm/hf and vllm/bare (goal: vllm within 10% of bare).
Both backends run at `--dtype` (default "auto": each backend's own choice on this machine, fp32 on a CPU);
`--against-dtype` also resamples on the vllm backend at that dtype and prints the ratio (on vLLM's CPU
build, "auto" against the bf16 that vLLM's own rule takes from a bf16 config).
Defaults: the demo target (trained on first use) on demo conversations; --corpus takes any corpus file.
The vLLM engine starts once, untimed (a warm-up call), and is shared by `vllm` and `bare`, which run
interleaved `--repeats` times from an empty prefix cache each (the best of each is kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conversations(corpus: str | None, n: int) -> list[dict]:
    if corpus:
        from training.corpus import read_source

        return read_source(corpus).rows.slice(0, n).to_pylist()
    from training.demo.corpus import generate_conversations

    return generate_conversations(n, seed=11)


def bare_chat(llm, rows: list[dict], max_new_tokens: int) -> int:
    """Every assistant turn regenerated with LLM.chat, one call per turn index; returns tokens generated."""
    from vllm import SamplingParams

    convs = [[dict(m) for m in r["messages"]] for r in rows]
    turns = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in convs]
    tokens = 0
    for j in range(max(len(t) for t in turns)):
        active = [(c, t[j]) for c, t in zip(convs, turns) if j < len(t)]
        outs = llm.chat([c[:i] for c, i in active], SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
                        use_tqdm=False)
        for (c, i), out in zip(active, outs):
            c[i]["content"] = out.outputs[0].text
            tokens += len(out.outputs[0].token_ids)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="HF target directory (default: the demo target)")
    ap.add_argument("--corpus", help="conversations to resample (default: demo conversations)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=None, help="resample batch size (default: ResampleConfig's)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--against-dtype", help="also the vllm backend at this dtype, and the ratio")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of bare and vllm, interleaved (best kept)")
    args = ap.parse_args()

    from training.resample import ResampleConfig, batch_size, resample_conversations
    from training.targets import load_target

    if args.target is None:
        from training.demo.target import ensure_demo_target

        args.target = str(ensure_demo_target())
    rows = conversations(args.corpus, args.n)
    cfg = ResampleConfig(temperatures={0.0: 1.0}, max_new_tokens=args.max_new_tokens,
                         **({"batch_size": args.batch_size} if args.batch_size else {}))
    results = {}

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        tokens = fn()
        wall = time.perf_counter() - t0
        if name not in results or tokens / wall > results[name][0] / results[name][1]:
            results[name] = (tokens, wall)
        print(f"{name:5} {tokens:7d} tokens in {wall:6.1f}s: {tokens / wall:7.1f} tok/s", flush=True)

    def resample(target) -> int:
        return resample_conversations(target, rows, cfg, log=lambda _: None).tokens_generated

    hf = load_target(args.target, "hf", device="cpu", dtype=args.dtype)
    timed("hf", lambda: resample(hf))
    hf.close()

    vllm = load_target(args.target, "vllm", dtype=args.dtype)
    engine = vllm.generation_engine()  # started here, untimed
    bare_chat(engine, rows[:2], 8)  # warm-up
    for _ in range(args.repeats):  # interleaved, each from an empty prefix cache; the best of each kept
        for name, fn in (("bare", lambda: bare_chat(engine, rows, args.max_new_tokens)), ("vllm", lambda: resample(vllm))):
            engine.reset_prefix_cache()
            timed(name, fn)
    vllm.close()
    if args.against_dtype:
        other = load_target(args.target, "vllm", dtype=args.against_dtype)
        other.generation_engine()  # started here, untimed
        timed(other.dtype, lambda: resample(other))
        other.close()

    rate = {name: tokens / wall for name, (tokens, wall) in results.items()}
    print(f"\n{len(rows)} conversations, greedy, max {args.max_new_tokens} new tokens per turn, "
          f"resample batch hf {batch_size(cfg, hf.generation_batch_size)} / vllm "
          f"{batch_size(cfg, vllm.generation_batch_size)}, target {args.target}")
    print(f"vllm backend / hf backend: {rate['vllm'] / rate['hf']:.2f}x")
    print(f"vllm backend / bare vLLM:  {rate['vllm'] / rate['bare']:.2f}  (goal >= 0.90)")
    if args.against_dtype:
        print(f"vllm backend at {vllm.dtype} / at {other.dtype}: {rate['vllm'] / rate[other.dtype]:.2f}x")


if __name__ == "__main__":  # vLLM spawns its engine process
    main()
