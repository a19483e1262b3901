"""Do training rows hold the ids the target generated? Resample real prompts with a real target, tokenize,
and count rows whose masked ids differ from the generated ids (+ end-of-turn).

    .venv/bin/python bench/bench_generated_ids.py [--target DIR] [--prompts FILE] [--n 96] [--max-new-tokens 64]

Defaults: stories260K (a real Llama, no chat template: the `plain` template) on the TinyStories
prompts of ../shared/fixtures, then the demo target (data/demo/target, ChatML) when present. Each
target is tokenized three ways: from the generated ids (what tokenized_shards does), from the reply
text decoded after its prompt (rows without ids), and from the reply decoded alone (the text before
this fix kept). Rows built from the generated ids hold those ids by construction (the mask and the
expected ids come from one list), so their mismatch column is 0 whatever happens; what can fail is
the prompt: each row's prompt is re-rendered by the template and must equal the ids the target
generated after (their digest), else the row is rejected as prompt_mismatch. The goal is 0 of those.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from training.corpus import read_source  # noqa: E402
from training.resample import ResampleConfig, resample_conversations  # noqa: E402
from training.targets import load_target  # noqa: E402
from training.tokenization import TokenizeConfig, tokenize_conversations  # noqa: E402

SHARED = Path("/work/shared/fixtures")
ROOT = Path(__file__).resolve().parents[1]


def decoded_alone(table: pa.Table, tokenizer) -> pa.Table:
    """The resampled rows with each reply's text decoded without its prompt (the old behaviour)."""
    rows = table.to_pylist()
    for r in rows:
        it = iter(r["completion_ids"])
        r["messages"] = [m if m["role"] != "assistant" else {**m, "content": tokenizer.decode(next(it), skip_special_tokens=True)}
                         for m in r["messages"]]
    return pa.Table.from_pylist(rows, schema=table.schema)


def run(target_dir: str, prompts: str, n: int, max_new_tokens: int) -> int:
    """Prints the table; returns how many rows tokenized_shards rejects (prompt_mismatch; goal 0)."""
    t0 = time.perf_counter()
    target = load_target(target_dir, "hf", device="cpu")
    rows = read_source(prompts).rows.slice(0, n)
    cfg = ResampleConfig(max_new_tokens=max_new_tokens, batch_size=32)  # the default temperature mixture
    res = resample_conversations(target, rows, cfg, log=lambda _: None)
    t1 = time.perf_counter()
    tok = target.tokenizer
    kind = "chat" if getattr(tok, "chat_template", None) else "plain"
    print(f"\n{Path(target_dir).name} ({kind} template): {res.n_ok} rows resampled, {res.tokens_generated} tokens "
          f"in {t1 - t0:.1f}s; temperatures {sorted(set(res.table['temperature'].to_pylist()))}")
    print(f"{'rows built from':<34}{'rows':>6}{'mismatched':>12}{'rejected':>10}")
    found = []
    for label, table, cfg in (
        ("generated ids (tokenized_shards)", res.table, TokenizeConfig()),
        ("text decoded after its prompt", res.table, TokenizeConfig(use_generated_ids=False)),
        ("text decoded alone (before)", decoded_alone(res.table, tok), TokenizeConfig(use_generated_ids=False)),
    ):
        out = tokenize_conversations(tok, table, cfg)
        print(f"{label:<34}{out.table.num_rows:>6}{out.id_mismatches:>12}{out.n_rejected:>10}   notes {out.notes}")
        found.append(out.n_rejected)
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", action="append")
    ap.add_argument("--prompts", default=str(SHARED / "data" / "tinystories_train.jsonl"))
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    targets = args.target or [str(SHARED / "models" / "stories260K"), str(ROOT / "data" / "demo" / "target")]
    if not Path(args.prompts).exists():
        print(f"{args.prompts}: not present, skipped")
        return
    bad = 0
    for t in targets:
        if Path(t).exists():
            bad += run(t, args.prompts, args.n, args.max_new_tokens)
        else:
            print(f"\n{t}: not present, skipped")
    print(f"\nrows from generated ids rejected (their prompt re-renders to other ids than the target saw): {bad} (goal 0)")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
