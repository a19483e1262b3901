"""Serving speedup of a trained EAGLE-3 draft in real vLLM (CPU build or GPU): tau and tokens/s, with and without.

    .venv/bin/python bench/bench_vllm_speedup.py [--target DIR] [--draft EXPORT_DIR] [-k 1 2 3 4] [--batch 1 16]

Defaults: the demo target and the export `releases/latest.json` of the local store points at (what
`make demo` released). Every run goes through training/evaluation/served.py, the code eval_report
uses: one vLLM engine per k (and one without a draft) in its own subprocess, a warm-up call, then
one timed `generate` over the prompts; tau = 1 + accepted / drafts from vLLM's spec-decode counters.
Each engine batch size (`--batch`: vLLM's max_num_seqs) is measured separately: at batch 1
decoding is latency-bound and speculation pays most; a large batch is compute-bound, and on CPU
plain decoding can then beat the draft. Speedup = tokens/s with the draft over without, same batch.

Prompts: --prompts takes any corpus input format (JSONL, JSON, Parquet; OpenAI messages, ShareGPT,
prompt/completion, Alpaca; local or s3://), trailing assistant turns dropped, rendered with the
target's chat template; without it the demo's held-out conversations (demo target) or a small
built-in mix of chat, code and math prompts. All runs get the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILTIN = [
    ("chat", "Explain to a new employee how our on-call rotation should work, in a friendly tone."),
    ("chat", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("chat", "What are the pros and cons of living in a big city compared to a small town?"),
    ("code", "Write a Python function that merges two sorted lists into one sorted list, with tests."),
    ("code", "Implement an LRU cache class in Python with get and put in O(1). Explain the design."),
    ("code", "Write a SQL query that returns the top 3 customers by total order value per country."),
    ("math", "Solve step by step: a train travels 180 km in 2.5 hours. What is its average speed in m/s?"),
    ("math", "Prove that the sum of the first n odd numbers is n squared."),
]


# -- prompts ------------------------------------------------------------------------------------------
def load_conversations(url: str | None, n: int, default: list[list[dict]] | None = None) -> list[list[dict]]:
    """The prompt file's conversations, else `default`, else the built-in mix."""
    if url is None:
        base = default or [[{"role": "user", "content": text}] for _, text in BUILTIN]
        return [base[i % len(base)] for i in range(n)]
    from training.corpus.formats import normalize_record
    from training.corpus.readers import iter_records

    out = []
    for rec in iter_records(url):
        row, _reject = normalize_record(rec.value, source=os.path.basename(url), row_index=rec.row_index, shard="bench")
        if row is None:
            continue
        messages = list(row["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if messages:
            out.append(messages)
        if len(out) >= n:
            break
    if not out:
        raise SystemExit(f"{url}: no usable prompt")
    return out


def render(target: str, conversations: list[list[dict]], max_prompt_tokens: int) -> list[list[int]]:
    """The target's chat template (or the `plain` rendering of a base model), as every stage renders."""
    from transformers import AutoTokenizer

    from training.targets.base import render_prompt

    tok = AutoTokenizer.from_pretrained(target)
    return [render_prompt(tok, messages)[-max_prompt_tokens:] for messages in conversations]


# -- driver -----------------------------------------------------------------------------------------
def check_export(draft: str) -> None:
    config = Path(draft) / "config.json"
    if not config.is_file():
        raise SystemExit(f"{draft}: no config.json (expected a draft serving export directory)")
    arch = json.loads(config.read_text()).get("architectures")
    if arch != ["LlamaForCausalLMEagle3"]:
        raise SystemExit(f"{draft}: architectures {arch}, expected ['LlamaForCausalLMEagle3']")


def default_draft() -> str:
    from training.paths import default_store_root
    from training.storage import ObjectStore

    latest = ObjectStore(default_store_root()).read_json("releases/latest.json")
    return latest["export_dir"].removeprefix("file://")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="target model: local HF directory (default: the demo target)")
    ap.add_argument("--draft", help="the draft's serving export directory (default: the local store's release)")
    ap.add_argument("-k", "--k", type=int, nargs="+", default=[1, 2, 3, 4], help="num_speculative_tokens values")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="engine batch sizes (max_num_seqs)")
    ap.add_argument("--prompts", help="held-out prompt file (any corpus input format)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens (equal lengths)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from training.evaluation.served import serve, vllm_missing_reason

    reason = vllm_missing_reason()
    if reason:
        raise SystemExit(f"bench_vllm_speedup: {reason}")
    default = None
    if args.target is None:
        from training.demo.corpus import heldout_conversations
        from training.demo.target import ensure_demo_target

        args.target = str(ensure_demo_target())
        # the demo's held-out conversations, their last reply dropped
        default = [c["messages"][:-1] for c in heldout_conversations(args.num_prompts)]
    draft = args.draft or default_draft()
    check_export(draft)
    ids = render(args.target, load_conversations(args.prompts, args.num_prompts, default), args.max_prompt_tokens)

    print(f"target {args.target}\ndraft  {draft}\n{len(ids)} prompts, max {args.max_tokens} new tokens, "
          f"T={args.temperature:g}")
    out = []
    for batch in args.batch:
        runs = serve(args.target, draft, ids, args.k, [args.temperature], max_new_tokens=args.max_tokens,
                     ignore_eos=args.ignore_eos, seed=args.seed, max_num_seqs=batch, warmup=True, dtype=args.dtype,
                     log=lambda s: print("  " + s, flush=True))
        base = runs[0]
        print(f"\nbatch {batch}")
        print(f"{'run':14}{'tokens/s':>10}{'speedup':>9}{'tau':>7}{'ceiling':>9}  accepted per position")
        print(f"{'no draft':14}{base.tokens_per_s:10.1f}{1.0:9.2f}{1.0:7.2f}{1:9d}")
        for r in runs[1:]:
            pos = " ".join(f"{a / r.drafts:.2f}" for a in r.accepted_per_pos) if r.drafts else ""
            print(f"{'eagle3 k=' + str(r.k):14}{r.tokens_per_s:10.1f}{r.tokens_per_s / base.tokens_per_s:9.2f}"
                  f"{r.tau or 0:7.2f}{r.k + 1:9d}  {pos}")
        out.append({"batch": batch, "runs": [{"k": r.k, "tokens_per_s": r.tokens_per_s, "tau": r.tau,
                                              "speedup": r.tokens_per_s / base.tokens_per_s} for r in runs]})
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "draft": draft, "temperature": args.temperature,
                                         "results": out}, indent=1))


if __name__ == "__main__":
    main()
