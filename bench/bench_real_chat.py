"""EAGLE-3 drafts of a real chat model: held-out tau against trainable tokens and recipe (issue 21).

    PYTHONPATH=$PWD .venv/bin/python bench/bench_real_chat.py                     # the default points
    PYTHONPATH=$PWD .venv/bin/python bench/bench_real_chat.py --only "p120 r1,all r4"
    PYTHONPATH=$PWD .venv/bin/python bench/bench_real_chat.py --table             # print results.json
    PYTHONPATH=$PWD .venv/bin/python bench/bench_real_chat.py --validation-prompts --only "all r1 epochs 2"

Target: SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide, 49,152-token vocab, ChatML), built
offline by ../shared/tools/build_smollm2.sh into bench/out/real_chat/smollm2 (or
SPECDRAFT_REAL_CHAT_TARGET). Data: the fixtures' prompts and nothing else.
  * train prompts: the distinct first user turns of multiturn_messages_demo.json (297) and
    fastchat_dummy_conversation.json (52), in file order;
  * held-out prompts: MT-bench's first turns (another benchmark: writing, roleplay, reasoning,
    math, coding, extraction, STEM, humanities), never trained on; `--heldout` of them, stratified
    by category; with `--validation-prompts`, the train prompts of a point's own validation rows
    instead (the trainer's split, answered by no training row): prompts like the trained ones;
  * the MT-Bench questions not held out (both turns) are training data only in the points that say
    so (`mt_bench_replies`): prompts like the held-out ones, answered by the product's resample and
    tokenize path;
  * the fixtures' conversations as they are (their own replies, not the target's) only in the
    points that say so (`original_replies`): what resampling is worth.
Otherwise the target writes every reply (vLLM backend in bf16, `VLLMTarget.generate`, as resampled_corpus does):
reply 0 of a prompt is greedy, replies 1.. are sampled at T=1 with seeds keyed by (prompt, reply).
A training row is the rendered prompt + the reply's ids + the end-of-turn token; the loss mask
covers the reply and the end-of-turn token, as tokenized_shards masks a resampled turn.
Features: the hf target in bf16 (training.hidden_states); draft: the recipe's rule (training/recipe.py)
for everything a point does not set, trained by training.trainer.train with held-out validation
and best-epoch export; export: training.export; evaluation: training.evaluation.evaluate at k=4,
T=0 and T=1 (EAGLE-3 and prompt lookup, simulated), and served by real vLLM at T=0 on the same
prompt ids (served.py). Generated rows and features are cached under bench/out/real_chat/ by their
settings; results merge into bench/out/real_chat/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared", Path("/work/shared")) if p.exists()),
              ROOT.parent / "shared")
DATA = SHARED / "fixtures" / "data"
OUT = ROOT / "bench" / "out" / "real_chat"
TARGET = Path(os.environ.get("SPECDRAFT_REAL_CHAT_TARGET", OUT / "smollm2"))
RESULTS = OUT / "results.json"
MAX_NEW_TOKENS = 256
# The dtype vLLM writes every reply in: bf16, the model's own and what every row of the README's table
# was generated in (the vllm backend's "auto" on a CPU is fp32 since, and a reply written in fp32 forks
# from the bf16 one at near-ties), so the table reproduces. A CPU without bf16 instructions writes
# several times slower in it (bench_resample_backends --against-dtype bfloat16).
GEN_DTYPE = "bfloat16"

# name -> (prompts used (None: all), replies per prompt, train overrides; `written_prompts` and
# `mt_bench_replies` in them add target-written rows: see `written` and `mt_bench_train`;
# `original_replies` the fixtures' conversations as they are, not resampled: `original_rows`)
# The bigger points fix epochs below the recipe's (which would see 2M tokens): 2 CPU cores.
POINTS: dict[str, tuple[int | None, int, dict]] = {
    "p120 r1": (120, 1, {}),
    "p120 r1 epochs 1": (120, 1, {"epochs": 1}),
    "p120 r1 vocab 32000": (120, 1, {"draft_vocab": 32000}),
    "all r1 epochs 2": (None, 1, {"epochs": 2}),
    "all r4 epochs 1": (None, 4, {"epochs": 1}),
    # the recipe at the 50k-token scale: lr and tokens per optimizer step
    "all r1 epochs 2 lr 1e-3": (None, 1, {"epochs": 2, "lr": 1e-3}),
    "all r1 epochs 2 lr 3e-4": (None, 1, {"epochs": 2, "lr": 3e-4}),
    "all r1 epochs 2 batch 2048": (None, 1, {"epochs": 2, "max_tokens_per_batch": 2048}),
    # TTT length and draft vocabulary at the 50k-token scale
    "all r1 epochs 2 ttt 4": (None, 1, {"epochs": 2, "ttt_length": 4}),
    "all r1 epochs 2 vocab 16384": (None, 1, {"epochs": 2, "draft_vocab": 16384}),
    # prompts the target writes (resampled_corpus.written_prompts), at the token count of "all r4"
    "all r1 written 2 epochs 1": (None, 1, {"written_prompts": 2, "epochs": 1}),
    # every target-written row so far (4 replies per prompt and 2 written prompts), TTT 4 for CPU time
    "all r4 written 2 ttt 4": (None, 4, {"written_prompts": 2, "epochs": 1, "ttt_length": 4}),
    # bf16 matmuls on this CPU (TrainConfig.precision, as on GPU): the same point as "all r1 epochs 2
    # ttt 4" in fp32, then more epochs at the 208k-token scale that bf16 makes affordable
    "all r1 epochs 2 ttt 4 bf16": (None, 1, {"epochs": 2, "ttt_length": 4, "precision": "bf16"}),
    "all r4 epochs 2 ttt 4 bf16": (None, 4, {"epochs": 2, "ttt_length": 4, "precision": "bf16"}),
    # which target layers the draft fuses, at the same point: the recipe's (2, L//2, L-3) = (2, 15, 27) against
    # the last layer a serving engine can feed (29) in place of 27
    "all r1 epochs 2 ttt 4 bf16 aux 2-15-29": (None, 1, {"epochs": 2, "ttt_length": 4, "precision": "bf16",
                                                         "aux_layer_ids": [2, 15, 29]}),
    # a higher peak lr at the same point: whether the recipe's 3e-3 is short of steps' worth at this scale
    "all r1 epochs 2 ttt 4 bf16 lr 1e-2": (None, 1, {"epochs": 2, "ttt_length": 4, "precision": "bf16", "lr": 1e-2}),
    # twice the recipe's epoch cap (MAX_EPOCHS) over the same 50k tokens: 800k tokens seen, about what "the same,
    # 4 epochs" of the 187k-token point sees: whether passes over a small corpus buy what fresh tokens do
    "all r1 epochs 16 ttt 4 bf16": (None, 1, {"epochs": 16, "ttt_length": 4, "precision": "bf16"}),
    # the recipe's own choice at this size (MAX_EPOCHS): what the 16 passes above gain over it
    "all r1 epochs 8 ttt 4 bf16": (None, 1, {"epochs": 8, "ttt_length": 4, "precision": "bf16"}),
    # the same question at 18k tokens (120 prompts): 8 passes (144k tokens seen) against 16
    "p120 r1 epochs 8 ttt 4 bf16": (120, 1, {"epochs": 8, "ttt_length": 4, "precision": "bf16"}),
    "p120 r1 epochs 16 ttt 4 bf16": (120, 1, {"epochs": 16, "ttt_length": 4, "precision": "bf16"}),
    # prompts like the held-out ones: the 40 MT-Bench questions not held out (both turns, 8 replies
    # each) beside the 349 prompts' greedy replies, at about the token count of "all r4"
    "all r1 + mt-bench half r8 ttt 4 bf16": (None, 1, {"mt_bench_replies": 8, "epochs": 1, "ttt_length": 4,
                                                        "precision": "bf16"}),
    # the same data, 2, 4 and 8 epochs (8: the recipe's own choice at this size): whether more passes pay
    "all r1 + mt-bench half r8 epochs 2 ttt 4 bf16": (None, 1, {"mt_bench_replies": 8, "epochs": 2, "ttt_length": 4,
                                                                 "precision": "bf16"}),
    "all r1 + mt-bench half r8 epochs 4 ttt 4 bf16": (None, 1, {"mt_bench_replies": 8, "epochs": 4, "ttt_length": 4,
                                                                 "precision": "bf16"}),
    "all r1 + mt-bench half r8 epochs 8 ttt 4 bf16": (None, 1, {"mt_bench_replies": 8, "epochs": 8, "ttt_length": 4,
                                                                 "precision": "bf16"}),
    # the smallest: 12 prompts' greedy replies (two orders of magnitude below the largest points),
    # every setting the recipe's
    "p12 r1": (12, 1, {}),
    # whether resampling matters: the fixtures' own replies (not the target's), at the 1-epoch settings
    # of the in-domain point
    "original ttt 4 bf16": (None, 0, {"original_replies": True, "epochs": 1, "ttt_length": 4, "precision": "bf16"}),
}


def build_target() -> Path:
    if not (TARGET / "model.safetensors").exists():
        subprocess.run(["bash", str(SHARED / "tools" / "build_smollm2.sh"), str(TARGET), sys.executable], check=True)
    return TARGET


# -- prompts ---------------------------------------------------------------------------------------
def train_prompts() -> list[str]:
    seen: dict[str, None] = {}
    for c in json.loads((DATA / "multiturn_messages_demo.json").read_text()):
        first = c["messages"][0]
        if first["role"] == "user":
            seen.setdefault(first["content"], None)
    for c in json.loads((DATA / "fastchat_dummy_conversation.json").read_text()):
        first = c["conversations"][0]
        if first["from"] == "human":
            seen.setdefault(first["value"], None)
    return list(seen)


def mt_bench() -> list[dict]:
    return [json.loads(line) for line in (DATA / "mt_bench_questions.jsonl").read_text().splitlines() if line.strip()]


def heldout_prompts(n: int) -> list[dict]:
    from training.evaluation.prompts import stratified_prompts

    prompts = [{"id": f"mt-{r['question_id']}", "domain": r["category"],
                "messages": [{"role": "user", "content": r["turns"][0]}]} for r in mt_bench()]
    return stratified_prompts(prompts, n)


def mt_bench_train(store, held: list[dict], n_replies: int, log) -> list[dict]:
    """The MT-Bench questions outside `held` (the same eight categories), both turns, each
    conversation answered `n_replies` times by the product's path: resample_conversations on the vllm
    backend (replies_per_prompt, the default temperature mixture), then tokenize_conversations (the
    target's own reply ids, loss mask over both assistant turns). Rows as `replies` gives them."""
    from training.configs import ResampleConfig, TokenizeConfig
    from training.resample import ResampleProgress, resample_conversations
    from training.targets.vllm import VLLMTarget
    from training.tokenization import tokenize_conversations

    held_ids = {p["id"] for p in held}
    convs = [{"id": f"mt-{r['question_id']}", "source": "mt_bench", "tools": None,
              "messages": [m for turn in r["turns"] for m in ({"role": "user", "content": turn},
                                                               {"role": "assistant", "content": ""})]}
             for r in mt_bench() if f"mt-{r['question_id']}" not in held_ids]
    key = _key(ids=[c["id"] for c in convs], replies=n_replies, max_new=MAX_NEW_TOKENS)
    path = OUT / "replies" / f"mt-train-{key}.json"
    if not path.exists():
        cfg = ResampleConfig(max_new_tokens=MAX_NEW_TOKENS, replies_per_prompt=n_replies)
        target = VLLMTarget(str(TARGET), dtype=GEN_DTYPE)
        t0 = time.perf_counter()
        try:
            res = resample_conversations(target, convs, cfg, progress=ResampleProgress(store, f"mt-train/{key}"),
                                         log=lambda line: log(f"  {line}"))
            tok = tokenize_conversations(target.tokenizer, res.table, TokenizeConfig(vocab_size=len(target.tokenizer)))
        finally:
            target.close()
        out = [{"prompt": r["id"], "reply": "mt", "ids": r["input_ids"], "mask": r["loss_mask"]}
               for r in tok.table.to_pylist()]
        rejected = Counter(res.rejects.column("reason").to_pylist() + tok.rejects.column("reason").to_pylist())
        log(f"  MT-Bench train half: {len(convs)} questions x {n_replies} replies -> {len(out)} rows, rejects "
            f"{dict(rejected)}, {tok.id_mismatches} id mismatches ({time.perf_counter() - t0:.0f}s)")
        path.write_text(json.dumps(out))
    return json.loads(path.read_text())


def original_rows(log) -> list[dict]:
    """The fixtures' conversations as they are, not resampled (resampled_corpus `resample: false`):
    multiturn_messages_demo.json and fastchat_dummy_conversation.json read by the product's corpus
    readers and normalizer, tokenized by tokenize_conversations from their text (the target's chat
    template, loss mask over every assistant turn). The replies are other models' and people's; the
    loss still scores the target's distribution at each of their tokens. Rows as `replies` gives them."""
    from transformers import AutoTokenizer

    from training.configs import TokenizeConfig
    from training.corpus.sources import read_source
    from training.tokenization import tokenize_conversations

    files = ("multiturn_messages_demo.json", "fastchat_dummy_conversation.json")
    path = OUT / "replies" / f"original-{_key(files=files, format=1)}.json"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(str(TARGET))
        out, rejected = [], Counter()
        for name in files:  # source_corpus's reader, then tokenized_shards' pass-through path
            src = read_source(str(DATA / name))
            tok = tokenize_conversations(tokenizer, src.rows, TokenizeConfig(vocab_size=len(tokenizer)))
            rejected.update(src.reject_reasons)
            rejected.update(tok.rejects.column("reason").to_pylist())
            out += [{"prompt": r["id"], "reply": "original", "ids": r["input_ids"], "mask": r["loss_mask"]}
                    for r in tok.table.to_pylist()]
        log(f"  original replies: {len(out)} rows, rejects {dict(rejected)}")
        path.write_text(json.dumps(out))
    return json.loads(path.read_text())


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# -- data ------------------------------------------------------------------------------------------
def replies(prompts: list[str], n_replies: int, log) -> list[dict]:
    """The target's replies, cached per reply index: {"prompt", "reply", "ids", "mask", "finish"}.
    Reply index r is the same generation at every point, so a bigger point extends a smaller one."""
    from training.targets.base import SamplingParams
    from training.targets.vllm import VLLMTarget

    rows, target = [], None
    try:
        for r in range(n_replies):
            path = OUT / "replies" / f"r{r}-{_key(prompts=prompts, r=r, max_new=MAX_NEW_TOKENS)}.json"
            if not path.exists():
                target = target or VLLMTarget(str(TARGET), dtype=GEN_DTYPE)
                t0 = time.perf_counter()
                stop = target.tokenizer.convert_tokens_to_ids("<|im_end|>")
                params = [SamplingParams(temperature=0.0 if r == 0 else 1.0, max_new_tokens=MAX_NEW_TOKENS,
                                         seed=None if r == 0 else int(_key(i=i, r=r), 16) % 2**31)
                          for i in range(len(prompts))]
                gens = target.generate([[{"role": "user", "content": p}] for p in prompts], params)
                out = []
                for i, g in enumerate(gens):
                    reply = list(g.token_ids) + ([stop] if g.finish_reason == "stop" else [])
                    prompt = list(g.prompt_token_ids)
                    out.append({"prompt": i, "reply": r, "ids": prompt + reply,
                                "mask": [0] * len(prompt) + [1] * len(reply), "finish": g.finish_reason})
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(out))
                n_tok = sum(sum(x["mask"]) for x in out)
                log(f"  reply {r}: {len(out)} rows, {n_tok} reply tokens in {time.perf_counter() - t0:.0f}s "
                    f"({n_tok / (time.perf_counter() - t0):.0f} tok/s)")
            rows += json.loads(path.read_text())
    finally:
        if target is not None:
            target.close()
    return rows


def written(store, prompts: list[str], m: int, log) -> list[dict]:
    """`m` prompts the target writes per train prompt, answered greedily: the product's resampling
    driver (resample_conversations, ResampleConfig.written_prompts) on the vllm backend. The train
    prompts go in without an assistant turn, so only their written copies are generated (the rows
    themselves are settled as no_assistant_turn). Saved per batch (ResampleProgress): a killed run
    resumes. Rows as `replies` gives them; reply index "w{j}"."""
    from training.configs import ResampleConfig
    from training.resample import ResampleProgress, prompt_digest, resample_conversations
    from training.targets.base import render_prompt
    from training.targets.vllm import VLLMTarget

    key = _key(prompts=prompts, written=m, max_new=MAX_NEW_TOKENS)
    path = OUT / "replies" / f"written-{key}.json"
    if not path.exists():
        rows = [{"id": f"p{i:04d}", "messages": [{"role": "user", "content": p}], "source": "fixtures", "tools": None}
                for i, p in enumerate(prompts)]
        cfg = ResampleConfig(temperatures={0.0: 1.0}, max_new_tokens=MAX_NEW_TOKENS, written_prompts=m)
        target = VLLMTarget(str(TARGET), dtype=GEN_DTYPE)
        t0 = time.perf_counter()
        try:
            res = resample_conversations(target, rows, cfg, progress=ResampleProgress(store, f"written/{key}"),
                                         log=lambda line: log(f"  {line}"))
            stop = target.tokenizer.convert_tokens_to_ids("<|im_end|>")
            out = []
            for r in res.table.to_pylist():
                prompt = render_prompt(target.tokenizer, r["messages"][:-1])
                assert prompt_digest(prompt) == r["prompt_digests"][0], r["id"]  # the prompt the target answered
                reply = list(r["completion_ids"][0]) + ([stop] if r["finish_reason"] == "stop" else [])
                i, j = r["id"].split("~prompt")
                out.append({"prompt": int(i[1:]), "reply": f"w{j}", "ids": prompt + reply,
                            "mask": [0] * len(prompt) + [1] * len(reply), "finish": r["finish_reason"],
                            "user": r["messages"][-2]["content"]})
        finally:
            target.close()
        rejected = Counter(res.rejects.column("reason").to_pylist())
        log(f"  written prompts: {len(out)} kept, rejects {dict(rejected)} ({time.perf_counter() - t0:.0f}s)")
        path.write_text(json.dumps(out))
    return json.loads(path.read_text())


def heldout_coverage(held: list[dict], counts, vocab: int) -> dict:
    """Share of the target's greedy held-out reply tokens (first 64, as evaluated) inside the draft
    vocabulary built from `counts`, at the size the point uses and at larger ones: the draft cannot
    propose a token outside it, so this caps held-out acceptance."""
    import numpy as np

    from training.vocab import build_vocab_map, coverage
    from training.targets.base import SamplingParams
    from training.targets.vllm import VLLMTarget

    path = OUT / "replies" / f"heldout-{_key(ids=[p['id'] for p in held])}.json"
    if not path.exists():
        target = VLLMTarget(str(TARGET), dtype=GEN_DTYPE)
        try:
            gens = target.generate([p["messages"] for p in held], [SamplingParams(max_new_tokens=64)] * len(held))
        finally:
            target.close()
        path.write_text(json.dumps([list(g.token_ids) for g in gens]))
    ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in json.loads(path.read_text())])
    held_counts = np.bincount(ids, minlength=len(counts))
    return {str(n): round(coverage(held_counts, build_vocab_map(counts, n)["t2d"]), 4)
            for n in sorted({vocab, 8192, 16384, 32000, len(counts)})}


def features(store, rows: list[dict], log, aux_layer_ids: list[int] | None = None) -> tuple[str, "np.ndarray"]:
    """hidden_states of `rows` (cached): (artifact prefix, masked-token counts over the target vocab).
    aux_layer_ids: the fused layers (None: the default, training.aux_layers)."""
    import numpy as np

    from training.hidden_states import FORMAT_VERSION, write_hidden_states
    from training.targets import load_target

    aux = {"aux": list(aux_layer_ids)} if aux_layer_ids else {}  # the default's key is the one cached before
    key = _key(rows=[(r["prompt"], r["reply"]) for r in rows], max_new=MAX_NEW_TOKENS, format=FORMAT_VERSION, **aux)
    prefix = f"features/{key}"
    if store.manifest(prefix) is None:
        target = load_target(str(TARGET), backend="hf", device="cpu", dtype="bfloat16")
        t0 = time.perf_counter()
        with store.artifact(prefix, key) as writer:
            write_hidden_states(target, [(r["ids"], r["mask"]) for r in rows], writer, max_tokens_per_batch=8192,
                                dtype="bf16", aux_layer_ids=aux_layer_ids)
            counts = np.zeros(target.facts.vocab_size, dtype=np.int64)
            for r in rows:
                np.add.at(counts, np.asarray(r["ids"])[np.asarray(r["mask"], dtype=bool)], 1)
            writer.write_bytes("counts.int64.bin", counts.tobytes())
        log(f"  features of {len(rows)} rows in {time.perf_counter() - t0:.0f}s")
    m = store.manifest(prefix)
    return prefix, np.frombuffer(store.read_bytes(m.key("counts.int64.bin")), dtype=np.int64)


def train_export(store, prefixes: list[str], counts, name: str, overrides: dict, log,
                 aux_layer_ids: list[int] | None = None) -> tuple[Path, dict]:
    """Train through the product's path (TrainJob -> train_main.run, as draft_model does) on the
    features under `prefixes` and export. Checkpoints at the recipe's interval: a killed bench
    resumes where it stopped (bit for bit on CPU), and train_s is the trainer's own clock across resumes."""
    from training.job import TrainJob
    from training.train_main import run
    from training.vocab import build_vocab_map, draft_vocab_size_by_coverage, save_vocab_map

    overrides = dict(overrides)
    vocab = overrides.pop("draft_vocab", None) or draft_vocab_size_by_coverage(counts)
    prefix = "+".join(prefixes)
    vkey = f"vocab/{_key(prefix=prefix, vocab=vocab)}.safetensors"
    store.write_bytes(vkey, save_vocab_map(build_vocab_map(counts, vocab)))
    export_dir = OUT / "exports" / _key(name=name, prefix=prefix, **overrides)
    job = TrainJob(store_root=str(OUT / "store"), run_prefix=f"runs/{export_dir.name}", target={"path": str(TARGET)},
                   aux_layer_ids=aux_layer_ids, vocab_map=vkey, hidden_states=prefixes, export_dir=str(export_dir),
                   train={"log_every": 100, **overrides}, resume=True)
    done = f"{job.run_prefix}/result.json"
    if (export_dir / "model.safetensors").exists() and store.exists(done):
        log(f"  reusing the finished run {job.run_prefix} (delete it to retrain)")
        return export_dir, {"train_s": None, "draft_vocab": int(vocab), **store.read_json(done)}
    result = run(job, log=log)
    return export_dir, {"train_s": result.wall_seconds, "draft_vocab": int(vocab), **result.summary()}


def evaluate_export(export_dir: Path, prompts: list[dict], temperatures: list[float], log) -> dict:
    """Held-out tau at k=4: EAGLE-3 and prompt lookup simulated at `temperatures` (T=0 and T=1 by
    default), EAGLE-3 served by vLLM at T=0 (the CPU build's sampled speculative decoding is broken:
    README, served table)."""
    from training.evaluation import evaluate
    from training.targets import load_target

    target = load_target(str(TARGET), backend="hf", device="cpu", dtype="float32")
    res = evaluate(target, str(export_dir), prompts, ks=[4], temperatures=temperatures, max_new_tokens=64,
                   served=True, log=log)
    served = res.served_row(4, 0.0) or {}
    at = lambda method, t: res.tau(method, 4, t) if t in temperatures else None  # noqa: E731
    return {
        "tau_t0": at("eagle3", 0.0), "tau_t1": at("eagle3", 1.0),
        "pl_t0": at("prompt_lookup", 0.0), "pl_t1": at("prompt_lookup", 1.0),
        "served_tau_t0": served.get("served_tau"), "served_ratio_t0": served.get("ratio"),
    }


def validation_prompts(rows: list[dict], asked: list[str], config: dict) -> list[dict]:
    """The fixtures' prompts of the rows the run held out for validation (training.sources.validation_mask,
    the trainer's own split, over the rows in feature order) that no training row answers: prompts the
    draft never trained on, as `evaluate` takes them. Rows of written or MT-Bench prompts are left out."""
    from training.sources import validation_mask

    held = validation_mask(len(rows), config["validation_rows"], config["seed"])
    answered = lambda keep: {r["prompt"] for r, h in zip(rows, held) if h == keep and isinstance(r["reply"], int)}  # noqa: E731
    return [{"id": f"fixture-{i}", "domain": "fixtures", "messages": [{"role": "user", "content": asked[i]}]}
            for i in sorted(answered(True) - answered(False))]


def mismatch_check(store, export_dir: Path, rows: list[dict], n: int, new_tokens: int, log) -> dict:
    """Train/serve mismatch or memorization? On `n` greedy training rows, the exported draft's
    acceptance two ways: replayed along the row's own first `new_tokens` reply tokens with the
    training code (metrics.measure_acceptance over their features: teacher-forced TTT, what training
    accuracy measures), and decoded from the prompt by the simulator and by vLLM (greedy decoding of
    a greedy training prompt walks the same tokens). Equal figures: the served draft is the trained
    one, and a gap to held-out prompts is the draft not generalizing beyond its rows."""
    import torch

    from training.evaluation import evaluate
    from training.export import load_draft
    from training.hidden_states import HiddenStateDataset
    from training.metrics import measure_acceptance
    from training.targets import load_target
    from training.targets.weights import load_head_weights

    picked = [r for r in rows if r["reply"] == 0][:n]
    cut = [(r["ids"][: r["mask"].index(1) + new_tokens], r["mask"][: r["mask"].index(1) + new_tokens]) for r in picked]
    from training.hidden_states import FORMAT_VERSION

    prefix = f"features/check-{_key(rows=[r['prompt'] for r in picked], new_tokens=new_tokens, format=FORMAT_VERSION)}"
    if store.manifest(prefix) is None:
        from training.hidden_states import write_hidden_states

        target = load_target(str(TARGET), backend="hf", device="cpu", dtype="bfloat16")
        with store.artifact(prefix, prefix) as writer:
            write_hidden_states(target, cut, writer, dtype="bf16")
    embed, head = load_head_weights(str(TARGET))
    draft, _d2t, t2d, _cfg = load_draft(export_dir, embed_weight=embed)
    m = measure_acceptance(draft.float(), HiddenStateDataset(store, [store.manifest(prefix)]), head.float(), t2d,
                           ttt_length=4)
    target = load_target(str(TARGET), backend="hf", device="cpu", dtype="float32")
    prompts = [{"id": f"train-{r['prompt']}", "domain": "train", "input_ids": ids[: mask.index(1)]}
               for r, (ids, mask) in zip(picked, cut)]
    res = evaluate(target, str(export_dir), prompts, ks=[4], temperatures=[0.0], max_new_tokens=new_tokens,
                   served=True, log=log)
    served = res.served_row(4, 0.0) or {}
    # How many of the decodes walk the row's own tokens (the simulator's target decodes in float32,
    # the rows were written by vLLM in bfloat16: a near-tie can fork them).
    same = 0
    for p, (ids, _mask) in zip(prompts, cut):
        with torch.inference_mode():
            out = target.model.generate(torch.tensor([p["input_ids"]]), max_new_tokens=new_tokens, do_sample=False)
        reply = ids[len(p["input_ids"]):]
        same += int(out[0, len(p["input_ids"]):len(p["input_ids"]) + len(reply)].tolist() == reply)
    return {"rows": len(picked), "same_path": same, "replayed_tau_k4": m["replayed_acceptance_length"][3],
            "acc_0": m["acc"][0], "decoded_tau_k4": res.tau("eagle3", 4, 0.0), "served_tau_k4": served.get("served_tau")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(POINTS), help="comma-separated point names")
    ap.add_argument("--data-only", action="store_true", help="generate the replies, nothing else")
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--table", action="store_true", help="print the results so far")
    ap.add_argument("--check", action="store_true", help="also the train/serve mismatch check on training rows")
    ap.add_argument("--validation-prompts", action="store_true",
                    help="evaluate on the prompts of the point's own validation rows instead of MT-Bench")
    ap.add_argument("--temperatures", default="0,1", help="simulated temperatures (served: T=0 only)")
    args = ap.parse_args(argv)
    say = lambda s: print(s, flush=True)  # noqa: E731
    if args.table:
        print_table(json.loads(RESULTS.read_text()))
        return 0
    from training.storage import ObjectStore

    build_target()
    prompts, held = train_prompts(), heldout_prompts(args.heldout)
    store = ObjectStore(str(OUT / "store"))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    names = [n.strip() for n in args.only.split(",")]
    for name in names:
        n_prompts, n_replies, overrides = POINTS[name]
        say(f"== {name}")
        overrides = dict(overrides)
        n_written = overrides.pop("written_prompts", 0)
        asked = prompts[:n_prompts] if n_prompts else prompts  # a prefix: the same prompt ids at every size
        rows = replies(asked, n_replies, say) + (written(store, asked, n_written, say) if n_written else [])
        n_mt = overrides.pop("mt_bench_replies", 0)
        groups = [rows] + ([mt_bench_train(store, held, n_mt, say)] if n_mt else [])
        groups += [original_rows(say)] if overrides.pop("original_replies", False) else []
        groups = [g for g in groups if g]
        trainable = sum(sum(r["mask"]) for g in groups for r in g)
        say(f"  {sum(map(len, groups))} rows, {trainable} trainable tokens")
        if args.data_only:
            continue
        aux = overrides.pop("aux_layer_ids", None)  # the features' layers and the draft's (prefixes key them)
        feats = [features(store, g, say, aux) for g in groups]
        prefixes, counts = [p for p, _ in feats], sum(c for _, c in feats)
        export_dir, trained = train_export(store, prefixes, counts, name, overrides, say, aux)
        temperatures = [float(t) for t in args.temperatures.split(",")]
        if args.validation_prompts:  # added to the point's MT-Bench figures, which stay
            asked_val = validation_prompts([r for g in groups for r in g], asked, trained["config"])
            say(f"  evaluating on {len(asked_val)} prompts of its validation rows")
            results[name] = results.get(name, {}) | {"validation_prompts": {
                "prompts": len(asked_val), **evaluate_export(export_dir, asked_val, temperatures, say)}}
        else:
            cover = heldout_coverage(held, counts, trained["draft_vocab"])
            say(f"  held-out coverage by draft vocab size: {cover}")
            measured = evaluate_export(export_dir, held, temperatures, say)
            results[name] = {"rows": sum(map(len, groups)), "trainable_tokens": trainable, **measured,
                             "heldout_coverage": cover,
                             **{k: trained[k] for k in ("train_s", "draft_vocab", "steps", "exported_step")},
                             "epochs": trained["config"]["epochs"], "validation_rows": trained["config"]["validation_rows"],
                             "heldout_curve": [(r["epoch"] + 1, round(r["simulated_acceptance_length"], 3))
                                               for r in trained["validation"]],
                             "exported_epoch": next((r["epoch"] + 1 for r in trained["validation"]
                                                     if r["step"] == trained["exported_step"]), None),
                             "train_acc_0": trained["acc"][0]}
            if args.check:
                results[name]["check"] = mismatch_check(store, export_dir, rows, 24, 64, say)
        save(name, results[name])
    print_table(json.loads(RESULTS.read_text()))
    return 0


def save(name: str, result: dict) -> None:
    """Merge one point's result into RESULTS (another bench process may have written other points)."""
    print(f"   {json.dumps(result)}", flush=True)
    on_disk = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps(on_disk | {name: result}, indent=1))


def print_table(results: dict) -> None:
    f2 = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    ratio = lambda r: f"{r['served_tau_t0'] / r['pl_t0']:.2f}x" if r.get("served_tau_t0") else "-"  # noqa: E731
    print("\n| point | rows | trainable tokens | epochs (exported) | tau T=0 sim | tau T=0 served | tau T=1 sim "
          "| prompt lookup T=0 | T=1 | tau / PL (T=0, served) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "rows" in r:
            print(f"| {name} | {r['rows']} | {r['trainable_tokens']} | {r['epochs']} ({r.get('exported_epoch')}) | "
                  f"{f2(r['tau_t0'])} | {f2(r.get('served_tau_t0'))} | {f2(r['tau_t1'])} | {f2(r['pl_t0'])} | "
                  f"{f2(r['pl_t1'])} | {ratio(r)} |")
    print("\nOn the prompts of each point's own validation rows (fixtures' prompts it never trained on):\n"
          "| point | prompts | tau T=0 sim | tau T=0 served | tau T=1 sim | prompt lookup T=0 | T=1 | tau / PL (T=0, served) |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if v := r.get("validation_prompts"):
            print(f"| {name} | {v['prompts']} | {f2(v['tau_t0'])} | {f2(v.get('served_tau_t0'))} | {f2(v['tau_t1'])} | "
                  f"{f2(v['pl_t0'])} | {f2(v['pl_t1'])} | {ratio(v)} |")


if __name__ == "__main__":
    sys.exit(main())
