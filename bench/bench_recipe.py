"""The training recipe, measured: held-out tau at T=0 and T=1 per ablation, and the recipe against
a deliberately plain baseline (issue 12, items 1, 2 and 5).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_recipe.py                 # defaults against the baseline
    PYTHONPATH=$PWD .venv/bin/python bench/bench_recipe.py --all           # every ablation (hours on 2 cores)
    PYTHONPATH=$PWD .venv/bin/python bench/bench_recipe.py --only "epochs 3,lr 1e-2"

Target: stories260K (shared/fixtures/models; H=64, 5 layers, 512-token vocab). Corpus: the 1600
TinyStories prompts of shared/fixtures/data/tinystories_train.jsonl; the last `--heldout` (64)
are held out for evaluation and never trained on. The rest are resampled by the target as
resampled_corpus does by default (ResampleConfig's temperature mixture and max_new_tokens) unless
a variant says otherwise, their features written with training.hidden_states, the draft vocab
built with training.vocab, and each variant trained by training.trainer.train (the recipe rule of
training/recipe.py fills every field a variant does not set, the draft's widths included
(recipe.draft_width); head_init as draft_model's default). Each trained draft then decodes the
held-out prompts with training.evaluation's chain speculative decoder (k=4, 120 new tokens) at
T=0 and T=1, and the
table reports tau = tokens per target forward, beside the exported epoch's held-out simulated and
replayed tau (results.json).

Generated data and features are cached under bench/out/ keyed by their settings, so a rerun
trains and evaluates only. Results merge into bench/out/recipe/results.json, so variants can run
in separate processes side by side (`--threads 1` each).

Training rows are the prompt ids + the generated ids, exactly what a tokenized row of a
resampled turn carries (tokenized_shards keeps the generated ids; bench_generated_ids.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET = Path(os.environ.get("SPECDRAFT_BENCH_TARGET", ROOT.parent.parent / "shared/fixtures/models/stories260K"))
DATA = Path(os.environ.get("SPECDRAFT_BENCH_DATA", ROOT.parent.parent / "shared/fixtures/data/tinystories_train.jsonl"))
if not TARGET.exists():
    TARGET = Path("/work/shared/fixtures/models/stories260K")
    DATA = Path("/work/shared/fixtures/data/tinystories_train.jsonl")
OUT = ROOT / "bench" / "out" / "recipe"

# name -> (data settings, train overrides, draft vocab size or None for the recipe's rule)
# Data settings: max_new_tokens of resampling and the temperature mixture.
GREEDY = {0.0: 1.0}
BASELINE = dict(max_tokens_per_batch=1, lr=3e-3, warmup_ratio=0.3, min_lr_ratio=0.0, epochs=2,
                validation_rows=0, head_init="random")


def variants() -> dict[str, tuple[dict, dict, int | None]]:
    from training.resample import ResampleConfig

    rc = ResampleConfig()  # "defaults" resamples as resampled_corpus does by default
    d = {"max_new_tokens": rc.max_new_tokens, "temperatures": rc.temperatures}
    greedy = {**d, "temperatures": GREEDY}
    tc = json.loads((TARGET / "config.json").read_text())
    # The target's own widths (64 / 172), the EAGLE-3 convention: the draft before the width rule.
    # The training ablations were measured at them, so their rows keep them.
    own = {"draft_hidden_size": tc["hidden_size"], "draft_intermediate_size": tc["intermediate_size"]}
    return {
        "defaults": (d, {}, None),
        # 12.5: one sequence per optimizer step, no recipe rule (nor its width rule: the target's
        # widths), AdamW 3e-3 one-cycle (linear warmup over 30%, cosine to 0), the same model and loss code.
        "baseline": (d, {**BASELINE, **own}, None),
        # the draft's width (recipe.draft_width)
        "target width (64, MLP 172)": (d, own, None),
        "draft MLP 4x wider (688)": (d, {**own, "draft_intermediate_size": 688}, None),
        "draft MLP 8x wider (1376)": (d, {**own, "draft_intermediate_size": 1376}, None),
        "draft MLP 16x wider (2752)": (d, {**own, "draft_intermediate_size": 2752}, None),
        "draft hidden 2x (128)": (d, {"draft_hidden_size": 128, "draft_intermediate_size": 344}, None),
        "draft hidden 2x (128) + MLP 1376": (d, {"draft_hidden_size": 128, "draft_intermediate_size": 1376}, None),
        "draft hidden 4x (256) + MLP 2752": (d, {"draft_hidden_size": 256, "draft_intermediate_size": 2752}, None),
        # training and data ablations, at the target's width
        "epochs 3": (d, {**own, "epochs": 3}, None),
        "epochs x2": (d, {**own, "epochs": "x2"}, None),
        "batch 256 tok": (d, {**own, "max_tokens_per_batch": 256}, None),
        "batch 1024 tok": (d, {**own, "max_tokens_per_batch": 1024}, None),
        "batch 4096 tok": (d, {**own, "max_tokens_per_batch": 4096}, None),
        "lr 3e-4 (old default)": (d, {**own, "lr": 3e-4}, None),
        "lr 1e-2": (d, {**own, "lr": 1e-2}, None),
        "schedule: constant after warmup": (d, {**own, "min_lr_ratio": 1.0}, None),
        "ttt 3": (d, {**own, "ttt_length": 3}, None),
        "ttt 5": (d, {**own, "ttt_length": 5}, None),
        "step weight 1.0": (d, {**own, "step_weight": 1.0}, None),
        "step weight 0.6": (d, {**own, "step_weight": 0.6}, None),
        "head init random": (d, {**own, "head_init": "random"}, None),
        "aux layers 2-3-4": ({**d, "aux_layer_ids": (2, 3, 4)}, own, None),
        "draft vocab 128": (d, own, 128),
        "draft vocab 512 (all)": (d, own, 512),
        "resample 100 new tokens": ({**d, "max_new_tokens": 100}, own, None),
        "resample 320 new tokens": ({**d, "max_new_tokens": 320}, own, None),
        "resample 3 rows per prompt": ({**d, "samples_per_prompt": 3}, own, None),
        "resample greedy only": (greedy, own, None),
        "resample greedy only + 200 new tokens": ({**greedy, "max_new_tokens": 200}, own, None),
    }


# -- data ------------------------------------------------------------------------------------------
def split_rows(n_heldout: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) of DATA ({id, prompt, completion}): the last `n_heldout` rows
    are held out. Ids must be unique, so no held-out prompt is also trained on under another row."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    seen: set = set()
    dup = [r["id"] for r in rows if r["id"] in seen or seen.add(r["id"])]
    if dup:
        raise ValueError(f"{DATA}: {len(dup)} duplicate ids, e.g. {dup[0]!r}")
    if not 0 < n_heldout < len(rows):
        raise ValueError(f"{DATA}: cannot hold out {n_heldout} of its {len(rows)} rows")
    return rows[:-n_heldout], rows[-n_heldout:]


def load_prompts(n_heldout: int) -> tuple[list[str], list[str]]:
    train, heldout = split_rows(n_heldout)
    return [r["prompt"] for r in train], [r["prompt"] for r in heldout]


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def generate_rows(target, prompts: list[str], max_new_tokens: int, temperatures: dict, seed: int = 0,
                  batch: int = 64) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) per prompt: the prompt's ids (masked out) + the target's own
    generated ids, EOS included when it stopped (masked in). A row's temperature is drawn from
    the mixture by training.resample.draw_temperature, as resampling does."""
    from training.resample import check_mixture, draw_temperature

    mix = check_mixture(temperatures)
    tok, model = target.tokenizer, target.model
    eos = tok.eos_token_id
    enc = [tok(p)["input_ids"] for p in prompts]
    temps = [draw_temperature(f"row-{i}", mix, seed) for i in range(len(prompts))]
    out: list = [None] * len(prompts)
    for t in sorted(set(temps)):
        idx = [i for i in range(len(prompts)) if temps[i] == t]
        idx.sort(key=lambda i: len(enc[i]))
        for s in range(0, len(idx), batch):
            rows = idx[s:s + batch]
            P = max(len(enc[i]) for i in rows)
            ids = torch.full((len(rows), P), eos, dtype=torch.long)
            mask = torch.zeros((len(rows), P), dtype=torch.long)
            for b, i in enumerate(rows):
                ids[b, P - len(enc[i]):] = torch.tensor(enc[i])
                mask[b, P - len(enc[i]):] = 1
            torch.manual_seed(seed * 7919 + s)
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=t > 0, temperature=t if t > 0 else None, top_p=None, top_k=None,
                                     pad_token_id=eos, eos_token_id=eos)
            for b, i in enumerate(rows):
                g = gen[b, P:].tolist()
                if eos in g:
                    g = g[:g.index(eos) + 1]
                out[i] = (enc[i] + g, [0] * len(enc[i]) + [1] * len(g))
    return out


def prepare(target, store, prompts: list[str], data: dict, log) -> tuple[str, np.ndarray]:
    """Resampled rows and their features, cached: (hidden_states artifact prefix, masked-token counts)."""
    from training.hidden_states import write_hidden_states

    key = _key(n=len(prompts), **{k: (sorted(v.items()) if isinstance(v, dict) else v) for k, v in data.items()})
    prefix = f"features/{key}"
    if store.manifest(prefix) is None:
        t0 = time.perf_counter()
        # samples_per_prompt n: n rows per prompt, each drawn from the mixture with its own seed
        rows = [r for seed in range(data.get("samples_per_prompt", 1))
                for r in generate_rows(target, prompts, data["max_new_tokens"], data["temperatures"], seed=seed)]
        log(f"  generated {len(rows)} rows, {sum(len(r[0]) for r in rows)} tokens in {time.perf_counter() - t0:.0f}s")
        with store.artifact(prefix, key) as writer:
            write_hidden_states(target, rows, writer, max_tokens_per_batch=8192, dtype="bf16",
                                aux_layer_ids=data.get("aux_layer_ids"))
            counts = np.zeros(target.facts.vocab_size, dtype=np.int64)
            for ids, mask in rows:
                np.add.at(counts, np.asarray(ids)[np.asarray(mask, dtype=bool)], 1)
            writer.write_bytes("counts.int64.bin", counts.tobytes())
    m = store.manifest(prefix)
    return prefix, np.frombuffer(store.read_bytes(m.key("counts.int64.bin")), dtype=np.int64)


# -- train and evaluate ----------------------------------------------------------------------------
def heldout_tau(target, draft, d2t, prompts: list[str], temperatures=(0.0, 1.0), k: int = 4,
                max_new_tokens: int = 120) -> dict[float, float]:
    """tau (tokens per target verification) of chain drafting on the held-out prompts."""
    from training.evaluation.report import MethodStats
    from training.evaluation.speculative import DecodeConfig, Eagle3Proposer, TargetRunner, generate

    runner = TargetRunner(target.model, draft.cfg.aux_layer_ids)
    proposer = Eagle3Proposer(draft, d2t)
    stops = frozenset(target.stop_token_ids())
    out = {}
    for t in temperatures:
        stats = MethodStats(method="eagle3", k=k, temperature=t, domain="all")
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(1000 + i)
            cfg = DecodeConfig(k=k, temperature=t, max_new_tokens=max_new_tokens, stop_token_ids=stops)
            stats.add(generate(runner, target.tokenizer(p)["input_ids"], cfg, proposer, g))
        out[t] = stats.tau
    return out


def train_variant(target, store, prefix: str, counts: np.ndarray, overrides: dict, vocab: int | None,
                  run: str, log) -> tuple:
    from training import recipe
    from training.eagle3.model import DraftConfig, Eagle3Draft
    from training.hidden_states import HiddenStateDataset
    from training.job import TrainJob
    from training.targets.weights import load_head_weights
    from training.trainer import TrainConfig, train
    from training.vocab import build_vocab_map, draft_vocab_size_by_coverage

    n_vocab = vocab or draft_vocab_size_by_coverage(counts)
    vmap = build_vocab_map(counts, n_vocab)
    source = HiddenStateDataset(store, [store.manifest(prefix)])
    overrides = dict(overrides)
    head_init = overrides.pop("head_init", TrainJob.head_init)  # draft_model's default unless a variant says
    # the draft's widths: recipe.draft_width's rule unless a variant sets them, as train_main does
    tc = json.loads((TARGET / "config.json").read_text())
    width, mlp_width = recipe.draft_width(tc["hidden_size"], tc["intermediate_size"],
                                          overrides.pop("draft_hidden_size", None),
                                          overrides.pop("draft_intermediate_size", None))
    if overrides.get("epochs") == "x2":  # twice what the rule picks for this corpus
        overrides["epochs"] = 2 * recipe.resolve(TrainConfig(), recipe.corpus_stats(source)).epochs
    cfg = TrainConfig(**overrides, log_every=10_000, checkpoint_every=0)
    embed, head = load_head_weights(str(TARGET))
    dcfg = DraftConfig.from_target_config(tc, int(vmap["t2d"].sum()), source.aux_layer_ids, mlp_width, width)
    torch.manual_seed(0)
    draft = Eagle3Draft(dcfg, embed)
    if head_init == "target":
        draft.init_head_from_target(head, vmap["t2d"])
    result = train(cfg, source, draft, head.float(), vmap["t2d"], store, f"runs/{run}", log=log, resume=False)
    return draft, vmap["d2t"], result, n_vocab


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="defaults,baseline", help="comma-separated variant names")
    ap.add_argument("--all", action="store_true", help="every variant")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from training.storage import ObjectStore
    from training.targets import load_target

    OUT.mkdir(parents=True, exist_ok=True)
    store = ObjectStore(str(OUT / "store"))
    target = load_target(str(TARGET), backend="hf", device="cpu")
    train_prompts, eval_prompts = load_prompts(args.heldout)
    todo = variants()
    if not args.all:
        names = [n.strip() for n in args.only.split(",")]
        missing = [n for n in names if n not in todo]
        if missing:
            raise SystemExit(f"unknown variants {missing}; known: {list(todo)}")
        todo = {n: todo[n] for n in names}
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    say = lambda s: print(s, flush=True)  # noqa: E731
    for name, (data, overrides, vocab) in todo.items():
        say(f"== {name}")
        prefix, counts = prepare(target, store, train_prompts, data, say)
        t0 = time.perf_counter()
        draft, d2t, res, n_vocab = train_variant(target, store, prefix, counts, overrides, vocab,
                                                 _key(name=name), lambda s: None)
        train_s = time.perf_counter() - t0
        tau = heldout_tau(target, draft, d2t, eval_prompts)
        results[name] = {
            "tau_t0": tau[0.0], "tau_t1": tau[1.0], "steps": res.steps, "train_s": train_s,
            "batch_tokens": res.config["max_tokens_per_batch"], "epochs": res.config["epochs"],
            "lr": res.config["lr"], "draft_vocab": n_vocab, "final_loss": res.final_loss,
            "draft_width": [draft.cfg.hidden_size, draft.cfg.intermediate_size],
            # the exported (best) epoch's held-out figures: simulated over K steps, replayed at k=4
            "heldout_sim_tau": res.best["simulated_acceptance_length"] if res.best else None,
            "heldout_replayed_tau_k4": (res.best.get("replayed_acceptance_length") or [None] * 4)[3] if res.best else None,
        }
        say(f"   {json.dumps(results[name])}")
        # Merge into the file as it is now: several invocations may run side by side.
        on_disk = json.loads(results_path.read_text()) if results_path.exists() else {}
        results = on_disk | {name: results[name]}
        results_path.write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print("\n| variant | tau k=4 T=0 | tau k=4 T=1 | steps | batch tok | epochs | lr | draft vocab | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tau_t0']:.2f} | {r['tau_t1']:.2f} | {r['steps']} | {r['batch_tokens']} | "
              f"{r['epochs']} | {r['lr']:.0e} | {r['draft_vocab']} | {r['train_s']:.0f} |")
    if "defaults" in results and "baseline" in results:
        d, b = results["defaults"], results["baseline"]
        print(f"\ntau(defaults)/tau(baseline) at k=4: T=0 {d['tau_t0'] / b['tau_t0']:.2f}x "
              f"({d['tau_t0']:.2f} vs {b['tau_t0']:.2f}), T=1 {d['tau_t1'] / b['tau_t1']:.2f}x "
              f"({d['tau_t1']:.2f} vs {b['tau_t1']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
