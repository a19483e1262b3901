"""Ray overhead per shard: the per-shard stages of one shard on a two-node Ray cluster (loopback,
one CPU per node, one actor per node) against the local path, same shard, same config.

    .venv/bin/python bench/bench_ray.py [--rows 64] [--hidden 128] [--new-tokens 32]

Starts the cluster (tests/ray_cluster.py) and a random-weight target; runs source_corpus,
resampled_corpus, tokenized_shards and hidden_states for one shard locally, then with
SPECDRAFT_RAY_ADDRESS's resource pointed at the cluster (a fresh store each time, so nothing is a
cache hit), and prints both wall times and ray / local. The Ray path pays ray.init and one target
load per actor per run; on this 2-core machine its two one-CPU actors have no more cores than
the local process, so the ratio is the overhead, not a speedup.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    from tests.ray_cluster import RayCluster, why_unavailable
    from tests.resources.test_ray_cluster import files, materialize
    from training.demo.corpus import write_demo_corpus
    from training.targets.tiny import build_tiny_target

    why = why_unavailable()
    if why:
        raise SystemExit(f"bench_ray needs Ray: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    cluster = RayCluster(num_cpus=1).start()
    try:
        target = build_tiny_target(tmp / "target", hidden_size=args.hidden, num_layers=8)
        write_demo_corpus(tmp / "corpus", n_shards=1, rows_per_shard=args.rows, seed=1)
        env = {"SPECDRAFT_TARGET": str(target), "SPECDRAFT_CORPUS": str(tmp / "corpus")}
        cfg = {"ops": {"source_corpus": {"config": {"heldout_fraction": 0.1}},
                       "resampled_corpus": {"config": {"max_new_tokens": args.new_tokens, "batch_size": 8}},
                       "tokenized_shards": {"config": {"max_length": 256}},
                       "hidden_states": {"config": {"max_tokens_per_batch": 1024}}}}
        local, _, local_wall = materialize(env, tmp / "local", "", cfg)
        remote, _, ray_wall = materialize(env, tmp / "ray", cluster.address, cfg)
        assert local.success and remote.success
        same = all(files(tmp / "ray", a) == files(tmp / "local", a) for a in ("resampled_corpus", "hidden_states"))
        print(f"one shard of {args.rows} rows, per-shard stages cold: local {local_wall:.1f} s, "
              f"ray (2 nodes x 1 CPU) {ray_wall:.1f} s; ray / local = {ray_wall / local_wall:.2f}; "
              f"outputs identical: {same}")
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
