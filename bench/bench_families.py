"""Draft families side by side: EAGLE-3 chain drafts against DFlash block drafts on the same data.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_families.py                  # demo target, ~15 min on 2 cores
    PYTHONPATH=$PWD .venv/bin/python bench/bench_families.py --steps 300 --dflash-layers 2
    PYTHONPATH=$PWD .venv/bin/python bench/bench_families.py --target stories260k   # ~55 min on 2 shared cores

Targets (`--target`):
- demo: the embedded demo target (training/demo; H=128, 8 layers). Data: `--rows` (600) demo
  conversations (the target's own training distribution), tokenized with its chat template;
  held-out prompts from the demo's held-out namespace (never trained on).
- stories260k: the real pretrained stories260K of ../shared/fixtures/models (H=64, 5 layers,
  head_dim 8, 512-token vocab, no chat template), on ../shared/fixtures/data/tinystories_train.jsonl
  as bench_recipe prepares it (its split_rows and generate_rows): the file's last `--prompts` rows
  held out by id, the others (or the first `--rows` of them) resampled by the target with
  ResampleConfig's defaults, each row the prompt's ids + the target's continuation, the loss mask
  over the continuation; held-out prompts given as the prompt's ids. Simulated only: vLLM's CPU
  attention serves head sizes 32..512 (vllm/v1/attention/backends/cpu_attn.py,
  get_supported_head_sizes), not stories260K's 8, so neither draft can be served on this machine.
Both drafts get the same draft vocab (vocab_map's rule), the same TrainConfig (`--steps` optimizer
steps, ttt_length = k) and the trainer's held-out validation with best-epoch export; each family
at its default shape (EAGLE-3 widened by recipe.draft_width, DFlash the target's width,
`--dflash-layers` layers) reads the features its family needs (training/aux_layers.py: EAGLE-3 3
layers; DFlash 5, or L-1 of an L-layer target: stories260K's 1..4). Then training.evaluation.evaluate
decodes the held-out prompts with the HF target: the DFlash draft and, beside it (compare), the
EAGLE-3 draft and prompt lookup, at k = 1..K and T = 0 and 1 (sampled drafts, the textbook
rejection rule). Printed per family and k: tau (tokens per target forward), draft forwards per step,
c (one draft forward's time over one verification forward's, measured in this simulator) and the
estimated speedup tau / (1 + n c). Results go to bench/out/families/<target>/results.json (`--out`
names another folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "families"


def features(target, store, name, rows, family):
    from training.hidden_states import HiddenStateDataset, write_hidden_states

    with store.artifact(f"hidden_states/{name}-{family}", "fp") as w:
        write_hidden_states(target, rows, w, max_tokens_per_batch=4096, draft_family=family)
    return HiddenStateDataset(store, [store.manifest(f"hidden_states/{name}-{family}")])


def train_family(family, target_dir, source, vmap, store, args):
    """A draft of `family` trained by the one trainer -> (export dir, seconds, best held-out record)."""
    from training.job import TrainJob
    from training.train_main import build_draft, family_loss
    from training.targets.weights import load_head_weights
    from training.trainer import TrainConfig, train

    cfg_t = json.loads((target_dir / "config.json").read_text())
    embed, head = load_head_weights(str(target_dir))
    job = TrainJob(store_root=store.root, run_prefix=f"runs/{family}", target={"path": str(target_dir)},
                   vocab_map="unused", hidden_states=["unused"], draft_family=family, dflash_layers=args.dflash_layers,
                   train=TrainConfig(ttt_length=args.k, lr=4e-3, epochs=50, max_steps=args.steps,
                                     max_tokens_per_batch=2048, warmup_ratio=0.05, log_every=max(args.steps // 4, 1)))
    draft, _ = build_draft(job, cfg_t, embed, head.float(), vmap["t2d"], vmap, tuple(source.aux_layer_ids), "cpu")
    t0 = time.perf_counter()
    result = train(job.train, source, draft, head.float(), vmap["t2d"], store, job.run_prefix, log=print,
                   resume=False, loss_fn=family_loss(family))
    seconds = time.perf_counter() - t0
    out = args.out / f"export-{family}"
    if family == "dflash":
        from training.dflash.export import export_dflash

        export_dflash(draft, vmap["d2t"], vmap["t2d"], cfg_t, out)
    else:
        from training.export import export_draft

        export_draft(draft, vmap["d2t"], vmap["t2d"], cfg_t, out)
    return out, seconds, result.best


def demo_data(args):
    """(target dir, target -> (training rows, held-out prompts)) of the embedded demo target: its own training
    distribution, tokenized with its chat template; prompts from the demo's held-out namespace."""
    from transformers import AutoTokenizer

    from training.demo.corpus import generate_conversations, heldout_conversations
    from training.demo.target import ensure_demo_target
    from training.tokenization import tokenize_conversations

    target_dir = ensure_demo_target()
    convs = generate_conversations(args.rows or 600, seed=0)
    table = tokenize_conversations(AutoTokenizer.from_pretrained(target_dir), convs).table
    rows = list(zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()))
    prompts = [{"id": c["id"], "domain": c.get("source"), "messages": c["messages"]}
               for c in heldout_conversations(args.prompts)]
    return target_dir, lambda target: (rows, prompts)


def stories_data(args):
    """(target dir, target -> (training rows, held-out prompts)) of stories260K on TinyStories, as bench_recipe
    prepares them: the file's last `--prompts` rows held out (by id), the rest resampled by the
    target with ResampleConfig's defaults (plain prompt + its continuation, the loss mask over the
    continuation; no chat template)."""
    from bench.bench_recipe import DATA, TARGET, generate_rows, split_rows
    from training.resample import ResampleConfig

    if not TARGET.exists() or not DATA.exists():
        raise SystemExit(f"--target stories260k needs the shared fixtures: {TARGET} and {DATA} (../shared/fixtures)")
    train_rows, heldout = split_rows(args.prompts)
    train_rows = train_rows[:args.rows]
    rc = ResampleConfig()

    def prepare(target):
        t0 = time.perf_counter()
        rows = generate_rows(target, [r["prompt"] for r in train_rows], rc.max_new_tokens, rc.temperatures)
        print(f"resampled {len(rows)} rows, {sum(len(r[0]) for r in rows)} tokens in {time.perf_counter() - t0:.0f}s")
        # plain text: a held-out prompt's ids as a resampled row starts (generate_rows encodes alike)
        prompts = [{"id": r["id"], "domain": "tinystories", "input_ids": target.tokenizer(r["prompt"])["input_ids"]}
                   for r in heldout]
        return rows, prompts

    return TARGET, prepare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", choices=("demo", "stories260k"), default="demo")
    ap.add_argument("--rows", type=int, default=None,
                    help="rows to train on: demo conversations (600), TinyStories prompts (all but the held-out)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dflash-layers", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out_dir = args.out = (args.out or OUT / args.target).resolve()

    from training.evaluation import evaluate
    from training.storage import ObjectStore
    from training.targets import load_target
    from training.vocab import build_vocab_map

    out_dir.mkdir(parents=True, exist_ok=True)
    target_dir, prepare = (demo_data if args.target == "demo" else stories_data)(args)
    target = load_target(str(target_dir), backend="hf", device="cpu", dtype="float32")
    rows, prompts = prepare(target)
    store = ObjectStore((out_dir / "store").as_uri())
    counts = np.zeros(target.facts.vocab_size, dtype=np.int64)
    for ids, mask in rows:
        np.add.at(counts, np.asarray(ids)[np.asarray(mask, dtype=bool)], 1)
    vmap = build_vocab_map(counts, None)

    trained = {}
    for family in ("eagle3", "dflash"):
        source = features(target, store, "train", rows, family)
        trained[family] = train_family(family, target_dir, source, vmap, store, args)
        print(f"{family}: trained in {trained[family][1]:.0f}s, best held-out simulated tau "
              f"{trained[family][2]['simulated_acceptance_length']:.3f}" if trained[family][2] else "")

    result = evaluate(target, str(trained["dflash"][0]), prompts, compare=[str(trained["eagle3"][0])],
                      ks=list(range(1, args.k + 1)), temperatures=[0.0, 1.0], max_new_tokens=args.max_new,
                      served=False, log=print)
    (out_dir / "results.json").write_text(json.dumps({
        "args": {**vars(args), "out": str(out_dir)}, "train_seconds": {f: t[1] for f, t in trained.items()},
        "draft_vocab": int(vmap["t2d"].sum()), "eval": result.to_json()}, indent=1))
    print(f"\n{args.target} target, {len(rows)} rows, {args.steps} steps per family, {len(prompts)} held-out prompts, "
          f"{args.max_new} new tokens; DFlash {args.dflash_layers} layer(s); c measured in the HF simulator")
    print("| T | k | method | tau | draft forwards/step | c | est. speedup |")
    print("|---|---|---|---|---|---|---|")
    for t in result.temperatures:
        for k in result.ks:
            for m in ("eagle3", "dflash", "prompt_lookup"):
                r = result.row(m, k, t)
                print(f"| {t:g} | {k} | {m} | {r.tau:.3f} | {r.forwards if m != 'prompt_lookup' else 0} | "
                      f"{r.c:.3f} | {r.est_speedup:.2f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
