"""Shards in parallel on a PostgreSQL instance: 4-shard wall time, parallel against serial.

    .venv/bin/python bench/bench_parallel.py [--shards 4] [--rows 48] [--hidden 128] [--new-tokens 24]

Starts a throwaway PostgreSQL server (tests/pg_server.py), builds a random-weight target, writes
a demo corpus of `--shards` shards, and runs `specdraft run --select '*hidden_states'` cold
(every step computed, a fresh store each time) on the same instance:
  serial    SPECDRAFT_PARALLEL=1: one run after another, each in process (the default path);
  parallel  SPECDRAFT_PARALLEL=2: two shard runs at a time, multiprocess executor, target-loading
            steps limited by the pool `target-cpu` to SPECDRAFT_TARGET_SLOTS (1, then 2).
Prints wall times and parallel / serial (below 1 = parallel is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(env: dict, args) -> float:
    cfg = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
           "ops": {"source_corpus": {"config": {"heldout_fraction": 0.1}},
                   "resampled_corpus": {"config": {"max_new_tokens": args.new_tokens, "batch_size": 16}},
                   "tokenized_shards": {"config": {"max_length": 256}}}}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "spec_assets.cli", "run", "--select", "*hidden_states",
                          "--config-json", json.dumps(cfg)], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"specdraft run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    from tests.pg_server import PostgresServer, why_unavailable
    from training.demo.corpus import write_demo_corpus
    from training.targets.tiny import build_tiny_target

    why = why_unavailable()
    if why:
        raise SystemExit(f"bench_parallel needs PostgreSQL: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    pg = PostgresServer().start()
    try:
        target = build_tiny_target(tmp / "target", hidden_size=args.hidden, num_layers=8)
        write_demo_corpus(tmp / "corpus", n_shards=args.shards, rows_per_shard=args.rows, seed=1)
        base = {"SPECDRAFT_PG_URL": pg.url, "DAGSTER_HOME": str(tmp / "home"), "SPECDRAFT_TARGET": str(target),
                "SPECDRAFT_CORPUS": str(tmp / "corpus")}
        (tmp / "home").mkdir()
        rows = []
        for name, parallel, slots in [("serial", 1, 1), ("parallel, 1 target slot", 2, 1),
                                      ("parallel, 2 target slots", 2, 2)]:
            env = {**base, "SPECDRAFT_ROOT": (tmp / f"store-{len(rows)}").as_uri(),
                   "SPECDRAFT_PARALLEL": str(parallel), "SPECDRAFT_TARGET_SLOTS": str(slots)}
            rows.append((name, run(env, args)))
            print(f"{name:>26}: {rows[-1][1]:6.1f} s", flush=True)
        serial = rows[0][1]
        print(f"\n{args.shards} shards x {args.rows} rows, {os.cpu_count()} cores, '*hidden_states' cold:")
        for name, wall in rows[1:]:
            print(f"  {name}: {wall:.1f} s / serial {serial:.1f} s = {wall / serial:.2f}")
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
