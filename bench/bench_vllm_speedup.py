"""Serving speedup of a trained EAGLE-3 draft under vLLM (GPU only): tau and tokens/s, with and without.

    .venv/bin/python bench/bench_vllm_speedup.py --target /models/Llama-3.1-8B-Instruct \
        --draft data/.../draft_model/_/<fingerprint>/export -k 1 3 5 [--prompts held_out.jsonl]

The target runs in vLLM's offline `LLM` once without speculation and once per k with
speculative_config={"method": "eagle3", "model": DRAFT, "num_speculative_tokens": k}. Each run is
its own subprocess, so every engine starts fresh and gives its GPU memory back before the next.
A run generates once untimed (warm-up: CUDA graphs, allocator), then times `generate` over the
prompts and differences vLLM's spec-decode counters around the timed call (`LLM.get_metrics()`,
with stats logging on): tau = 1 + accepted / drafts (tokens per target forward, DESIGN.md's
definition), per-position acceptance = accepted_at_pos / drafts. Output tokens/s = generated
tokens / wall time of the timed call; the speedup is its ratio to the run without a draft.

Prompts: --prompts takes any corpus input format (JSONL, JSON, Parquet; OpenAI messages, ShareGPT,
prompt/completion, Alpaca; local or s3://), trailing assistant turns dropped, rendered with the
target's chat template; without it a small built-in mix of chat, code and math prompts is used.
All runs get the same token ids. Without vllm or a GPU it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "
ROOT = Path(__file__).resolve().parents[1]

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


def gpu_missing_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'specdraft[gpu]')"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


# -- prompts ------------------------------------------------------------------------------------------
def load_conversations(url: str | None, n: int) -> list[list[dict]]:
    if url is None:
        base = [[{"role": "user", "content": text}] for _, text in BUILTIN]
        return [base[i % len(base)] for i in range(n)]
    sys.path.insert(0, str(ROOT))
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
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    ids = []
    for messages in conversations:
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            row = tok(text, add_special_tokens=False)["input_ids"]  # the template already has BOS
        else:
            row = tok("\n\n".join(m["content"] for m in messages))["input_ids"]
        ids.append(list(row)[-max_prompt_tokens:])
    return ids


# -- one engine (child process) ---------------------------------------------------------------------
def spec_counters(llm) -> dict:
    """vLLM's cumulative spec-decode counters (names as LLM.get_metrics() reports them)."""
    from vllm.v1.metrics.reader import Counter, Vector

    out = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0, "per_pos": []}
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for m in llm.get_metrics():
        name = m.name[: -len("_total")] if m.name.endswith("_total") else m.name
        if name in names and isinstance(m, Counter):
            out[names[name]] += m.value  # summed over engines (data parallel) when several report
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos" and isinstance(m, Vector):
            vals = list(m.values)
            acc = out["per_pos"]
            acc.extend([0.0] * (len(vals) - len(acc)))
            for i, v in enumerate(vals):
                acc[i] += v
    return out


def run_engine(args) -> dict:
    from vllm import LLM, SamplingParams

    spec = json.loads(args.spec) if args.spec else None
    prompts = [{"prompt_token_ids": ids} for ids in json.loads(Path(args.prompt_file).read_text())]
    llm = LLM(
        model=args.target,
        speculative_config=spec,
        disable_log_stats=False,  # the spec-decode counters are only kept with stats on
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
    )
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                            seed=args.seed if args.temperature > 0 else None)
    llm.generate(prompts[: max(1, min(len(prompts), args.max_num_seqs))],
                 SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)  # warm-up, untimed
    before = spec_counters(llm) if spec else None
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"k": spec["num_speculative_tokens"] if spec else 0, "tokens": tokens, "wall_s": wall,
              "tokens_per_s": tokens / wall, "n_prompts": len(prompts)}
    if spec:
        after = spec_counters(llm)
        drafts = after["drafts"] - before["drafts"]
        accepted = after["accepted"] - before["accepted"]
        draft_tokens = after["draft_tokens"] - before["draft_tokens"]
        per_pos = [a - (before["per_pos"][i] if i < len(before["per_pos"]) else 0.0)
                   for i, a in enumerate(after["per_pos"])]
        result.update(
            drafts=drafts, accepted=accepted, draft_tokens=draft_tokens,
            tau=1.0 + accepted / drafts if drafts else None,
            acceptance_rate=accepted / draft_tokens if draft_tokens else None,
            # P(position i accepted) per draft; its conditional form divides by position i-1's
            accepted_per_pos=[v / drafts for v in per_pos] if drafts else [],
        )
    return result


# -- driver -----------------------------------------------------------------------------------------
def child(args, prompt_file: str, spec: dict | None) -> dict:
    cmd = [sys.executable, __file__, "--_child", "--target", args.target, "--prompt-file", prompt_file,
           "--max-tokens", str(args.max_tokens), "--temperature", str(args.temperature),
           "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--seed", str(args.seed)]
    if spec:
        cmd += ["--spec", json.dumps(spec)]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (vLLM's logs) passes through
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"vLLM run {'k=' + str(spec['num_speculative_tokens']) if spec else 'baseline'} "
                         f"failed (exit {proc.returncode}); its log is above")
    return json.loads(lines[-1][len(RESULT_TAG):])


def check_export(draft: str) -> None:
    config = Path(draft) / "config.json"
    if not config.is_file():
        raise SystemExit(f"{draft}: no config.json (expected a draft serving export directory)")
    arch = json.loads(config.read_text()).get("architectures")
    if arch != ["LlamaForCausalLMEagle3"]:
        raise SystemExit(f"{draft}: architectures {arch}, expected ['LlamaForCausalLMEagle3']")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="target model: local HF directory or hub id")
    ap.add_argument("--draft", help="the draft's serving export directory")
    ap.add_argument("-k", "--k", type=int, nargs="+", default=[3], help="num_speculative_tokens values")
    ap.add_argument("--prompts", help="held-out prompt file (any corpus input format); default: built-in mix")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate max-tokens (equal lengths)")
    ap.add_argument("--max-num-seqs", type=int, default=1, help="engine batch; 1 = latency-bound decoding, "
                    "where speculation pays most")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._child:
        print(RESULT_TAG + json.dumps(run_engine(args)), flush=True)
        return
    reason = gpu_missing_reason()
    if reason:
        print(f"bench_vllm_speedup: {reason}; nothing to measure. "
              "The CPU simulator (training.evaluation.evaluate) gives tau without vLLM.")
        return
    if not args.target or not args.draft:
        ap.error("--target and --draft are required")
    check_export(args.draft)

    import tempfile

    conversations = load_conversations(args.prompts, args.num_prompts)
    ids = render(args.target, conversations, args.max_prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = os.path.join(tmp, "prompts.json")
        Path(prompt_file).write_text(json.dumps(ids))
        base = child(args, prompt_file, None)
        runs = [child(args, prompt_file, {"method": "eagle3", "model": os.path.abspath(args.draft),
                                          "num_speculative_tokens": k}) for k in args.k]

    print(f"\ntarget {args.target}\ndraft  {args.draft}\n{len(ids)} prompts, max {args.max_tokens} new tokens, "
          f"T={args.temperature:g}, batch {args.max_num_seqs}\n")
    print(f"{'run':14}{'tokens/s':>10}{'ratio':>8}{'tau':>7}{'ceiling':>9}  accepted per position")
    print(f"{'no draft':14}{base['tokens_per_s']:10.1f}{1.0:8.2f}{1.0:7.2f}{1:9d}")
    for r in runs:
        pos = " ".join(f"{a:.2f}" for a in r.get("accepted_per_pos", []))
        tau = f"{r['tau']:7.2f}" if r.get("tau") is not None else f"{'–':>7}"
        print(f"{'eagle3 k=' + str(r['k']):14}{r['tokens_per_s']:10.1f}{r['tokens_per_s'] / base['tokens_per_s']:8.2f}"
              f"{tau}{r['k'] + 1:9d}  {pos}")
    if args.json:
        args.json.write_text(json.dumps({"baseline": base, "eagle3": runs, "target": args.target,
                                         "draft": args.draft, "temperature": args.temperature,
                                         "max_num_seqs": args.max_num_seqs}, indent=1))


if __name__ == "__main__":
    main()
