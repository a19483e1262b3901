"""What incremental recomputation saves: an unchanged re-run and a new shard, as fractions of a cold run.

    .venv/bin/python bench/bench_incremental.py [--shards 4] [--rows 48] [--hidden 128] [--max-steps 20]

On a fresh persistent instance (a temp DAGSTER_HOME, a random-weight target built locally), it runs
`specdraft run --select '*eval_report'` cold, then side by side:
  (a) the same run again, nothing changed: `specdraft run` (every step a cache hit) and
      `specdraft run --only-stale-or-missing` (no run launched at all);
  (b) one new source file: `specdraft run` (its shard's steps and the fan-ins recompute, every
      other shard's steps are cache hits) and `--only-stale-or-missing` (other shards not launched).
Each row: wall time and this process's CPU time (steadier on a shared machine), each with its
fraction of the cold run, steps recomputed (materializations that were not cache hits) out of
steps executed, and runs launched. released_draft is left out: a random
draft cannot pass eval_report's gate. Goals: (a) under 10% of the cold run's wall time; (b) about
(1 shard + fan-ins) of the work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def config(args) -> dict:
    return {
        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},  # the table, not the gate failure
        "ops": {
            "source_corpus": {"config": {"heldout_fraction": 0.1}},
            "resampled_corpus": {"config": {"max_new_tokens": args.new_tokens, "batch_size": 16}},
            "tokenized_shards": {"config": {"max_length": 256}},
            "draft_model": {"config": {"epochs": 1, "max_steps": args.max_steps, "ttt_length": 3,
                                       "max_tokens_per_batch": 2048}},
            "eval_report": {"config": {"ks": [1, 2, 3], "temperatures": [0.0], "max_new_tokens": 16,
                                       "max_prompts": 4, "gate_k": 2}},
        },
    }


def measure(label: str, instance, cfg: dict, **kwargs) -> dict:
    from spec_assets.cli import failure_messages, run_pipeline

    t0, c0 = time.perf_counter(), time.process_time()
    results = run_pipeline(select="*eval_report", run_config=cfg, instance=instance, log=lambda _: None, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    failures = [line for r in results for line in failure_messages(r)]
    if any(not line.startswith("eval_report: ") for line in failures):
        raise SystemExit(f"{label}: a step failed: {failures}")
    steps = [e.materialization for r in results for e in r.get_asset_materialization_events()]
    recomputed = sum(not m.metadata["cache_hit"].value for m in steps)
    return {"label": label, "wall": wall, "cpu": cpu, "steps": len(steps), "recomputed": recomputed, "runs": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=48, help="conversations per shard")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the random target")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24, help="resampling: max new tokens per turn")
    parser.add_argument("--max-steps", type=int, default=20, help="draft training steps")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (instance, store) and print it")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        home = root / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
        corpus = root / "corpus"
        os.environ.update(DAGSTER_HOME=str(home), SPECDRAFT_ROOT=(root / "store").as_uri(),
                          SPECDRAFT_CORPUS=str(corpus))

        import dagster as dg

        from training.demo.corpus import write_demo_corpus
        from training.targets.tiny import build_tiny_target

        target = build_tiny_target(root / "target", hidden_size=args.hidden, num_layers=args.layers,
                                   intermediate_size=args.hidden * 2)
        os.environ["SPECDRAFT_TARGET"] = str(target)
        write_demo_corpus(corpus, n_shards=args.shards, rows_per_shard=args.rows, seed=1)
        write_demo_corpus(root / "extra", n_shards=2, rows_per_shard=args.rows, seed=2)
        cfg = config(args)

        rows = []
        with dg.DagsterInstance.get() as instance:
            print(f"cold run: {args.shards} shards x {args.rows} conversations, target H={args.hidden} "
                  f"L={args.layers}, draft {args.max_steps} steps ...", flush=True)
            full = measure(f"cold run, {args.shards} shards", instance, cfg)
            rows.append(full)
            rows.append(measure("(a) unchanged: specdraft run", instance, cfg))
            rows.append(measure("(a) unchanged: --only-stale-or-missing", instance, cfg, only_stale_or_missing=True))
            shutil.copy(root / "extra" / "demo-00000.jsonl", corpus / "new-00000.jsonl")
            rows.append(measure("(b) +1 shard: specdraft run", instance, cfg))
            shutil.copy(root / "extra" / "demo-00001.jsonl", corpus / "new-00001.jsonl")
            rows.append(measure("(b) +1 shard: --only-stale-or-missing", instance, cfg, only_stale_or_missing=True))

        print()
        print(f"{'':42} {'wall s':>8} {'of cold':>8} {'cpu s':>8} {'of cold':>8} {'steps recomputed':>17} "
              f"{'of cold':>8} {'runs':>5}")
        for r in rows:
            print(f"{r['label']:42} {r['wall']:8.1f} {r['wall'] / full['wall']:8.1%} "
                  f"{r['cpu']:8.1f} {r['cpu'] / full['cpu']:8.1%} "
                  f"{r['recomputed']:>8}/{r['steps']:<8} {r['recomputed'] / full['recomputed']:8.1%} {r['runs']:5}")
        per_shard = 4  # source_corpus, resampled_corpus, tokenized_shards, hidden_states
        fan_in = full["steps"] - per_shard * args.shards
        print(f"\nexpected for (b): {per_shard} steps of the new shard + {fan_in} fan-ins = {per_shard + fan_in} "
              f"recomputed; goal for (a): under 10% of the cold run's wall time")
        if args.keep:
            print(f"kept: {root}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
