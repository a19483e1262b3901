"""Demo target: wall-clock of a fresh training run (its fixed step schedule) against the 180 s
limit, and its held-out greedy exact match and teacher-forced token accuracy per task family.

Trains into a temporary folder (never the cached target), so the time is a real cold run:
    .venv/bin/python bench/bench_demo_target.py [--keep DIR]
or reads the numbers an existing target recorded when it was trained:
    .venv/bin/python bench/bench_demo_target.py --dir data/demo/target
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

LIMIT_S = 180.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="report an existing target instead of training")
    ap.add_argument("--keep", type=Path, help="copy the freshly trained target here")
    args = ap.parse_args()

    from training.demo.target import QUALITY_FILE, train_demo_target

    if args.dir:
        q = json.loads((args.dir / QUALITY_FILE).read_text())
        wall = q["total_seconds"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = train_demo_target(Path(tmp) / "target", log=lambda s: print("  " + s, flush=True))
            wall = time.perf_counter() - t0
            q = json.loads((out / QUALITY_FILE).read_text())
            if args.keep:
                shutil.rmtree(args.keep, ignore_errors=True)
                shutil.copytree(out, args.keep)

    print(f"\n{'':24}{'measured':>12}{'limit':>10}{'ratio':>8}")
    print(f"{'train loop (s)':24}{q['train_seconds']:12.1f}{LIMIT_S:10.0f}"
          f"{q['train_seconds'] / LIMIT_S:8.2f}")
    print(f"{'whole call (s)':24}{wall:12.1f}{LIMIT_S:10.0f}{wall / LIMIT_S:8.2f}")
    print(f"steps {q['steps']}, epochs {q['epochs']}, final loss {q['final_loss']:.4f}, "
          f"{q['n_params'] / 1e6:.2f}M params, {q['train_rows']} conversations\n")
    print(f"{'held-out family':24}{'exact match':>12}{'token acc':>10}{'turns':>8}")
    for family, em in q["exact_match"].items():
        print(f"{family:24}{em:12.3f}{q['token_accuracy'][family]:10.3f}{q['n_turns'][family]:8d}")
    print(f"{'overall':24}{q['exact_match_overall']:12.3f}{q['token_accuracy_overall']:10.3f}")
    for e in q["examples"][:4]:
        print(f"\n[{e['family']}] {e['prompt']}\n  reference: {e['reference']}\n  greedy:    {e['greedy']}")


if __name__ == "__main__":
    main()
