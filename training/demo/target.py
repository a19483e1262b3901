"""The embedded demo target: a small Llama trained from scratch on the demo corpus, on CPU.

It is a real HF model directory (config.json, model.safetensors, tokenizer with a ChatML-like
chat template, generation_config.json), so every backend and export path treats it exactly like a
downloaded checkpoint. Training is a fixed, seeded schedule of `max_steps` optimizer steps (about
2 minutes on the idle 2-core dev machine, longer on a busy one), never a wall-clock budget: a
busy machine must not leave an undertrained target cached for good. The whole directory appears
at once (temp folder, completion marker last, rename), so a killed run never leaves something
that looks like a finished target.
"""

import fcntl
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from training.demo.corpus import FAMILIES, generate_conversations, heldout_conversations

COMPLETE_MARKER = "DEMO_TARGET_COMPLETE"
# Written into the marker. Bump when the corpus, tokenizer or training recipe changes, so that
# ensure_demo_target replaces a cached target built by an older recipe instead of reusing it.
RECIPE_VERSION = "demo-target-v2"
QUALITY_FILE = "demo_quality.json"
CHAT_TEMPLATE = (Path(__file__).with_name("chat_template.jinja")).read_text()

PAD, BOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]  # ids 0..3 in this order
# Qwen2-style split, except that numbers are cut into chunks of up to two digits: every number
# below 100 is one token, which a small model copies as easily as a word (copying digit by digit
# takes it far longer than our budget), and larger numbers are their chunks ("33000" = 33|00|0).
# Words keep their leading space, punctuation runs stay together. Byte-level BPE runs on each piece.
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


@dataclass
class DemoTargetConfig:
    # tokenizer
    vocab_size: int = 1024  # BPE target; the corpus has few distinct words, so it may stop short
    # model: 8 layers so the EAGLE-3 aux layers (2, L//2, L-3) are distinct and not the ends
    n_layers: int = 8
    hidden: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate: int = 384
    rope_theta: float = 10000.0
    max_positions: int = 1024
    # 0.06 rather than HF's 0.02: at width 128 the smaller init leaves attention near-uniform
    # for hundreds of steps, and copying from the prompt is what this target must learn first.
    init_std: float = 0.06
    # Tied, as in small Llama/Qwen checkpoints: copying a token through attention then only needs
    # an OV map close to identity, and downstream code meets the no-lm_head.weight layout.
    tie_embeddings: bool = True
    # data
    # generate_conversations(train_rows, seed): its first 1600 rows are the default demo corpus
    # (4 shards x 400); more rows of the same generator mean fewer repeats in the budget's steps.
    train_rows: int = 4800
    # optimisation
    # Small batches: within a fixed CPU budget, more optimizer steps beat bigger ones here.
    batch_size: int = 8
    lr: float = 4e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # The schedule (warmup, cosine) runs over exactly this many steps: 700 took 114 s on the idle
    # 2-core dev machine (bench/bench_demo_target.py).
    max_steps: int = 700
    seed: int = 0
    # None: 2 threads (the demo machine's cores) while nothing else keeps the CPU busy, else 1,
    # re-checked during training: OpenMP barriers stall whenever another process takes a core,
    # and this model's small ops then run 5-20x slower than on a single thread.
    threads: int | None = None
    # held-out evaluation written to demo_quality.json
    n_eval: int = 64
    eval_max_new_tokens: int = 96  # the longest reference reply is under 70 tokens


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(rows: list[dict], vocab_size: int):
    """Byte-level BPE on the message texts, as a fast HF tokenizer carrying the chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Role names go in too: they appear in every rendered conversation.
    texts = ["system", "user", "assistant"]
    texts += [m["content"] for r in rows for m in r["messages"]]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD,
        additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE,
        model_max_length=1024, padding_side="right", clean_up_tokenization_spaces=False)


def encode_conversations(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, assistant mask) per row; the mask comes from the template's generation markers."""
    out = []
    for r in rows:
        enc = tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        out.append((list(enc["input_ids"]), list(enc["assistant_masks"])))
    return out


# ---------------------------------------------------------------------------------------------
# model and training


def build_model(cfg: DemoTargetConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    # Embedding rows rounded up to a multiple of 64, as real checkpoints do (Qwen, Llama): should
    # BPE stop short of vocab_size, config.vocab_size exceeds len(tokenizer) and downstream code
    # must size its tables from the config.
    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.hidden // cfg.n_heads,
        max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _batches(examples, batch_size: int, generator):
    """Length-bucketed, right-padded batches in a seeded random order.

    Right padding needs no attention mask: a causal model never looks right, so real tokens
    never see padding, and padded positions carry no loss.
    """
    import torch

    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for c in torch.randperm(len(chunks), generator=generator).tolist():
        idx = chunks[c]
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)  # 0 = <|pad|>
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            x, m = examples[i]
            t = torch.tensor(x)
            ids[row, :len(x)] = t
            labels[row, :len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), t, -100)
        yield ids, labels


def _free_cores(ours: int = 0) -> int:
    """2 when the 1-minute load (less our own `ours` threads) leaves both cores free, else 1."""
    return 2 if os.getloadavg()[0] - ours < 0.5 else 1


def _lr(cfg: DemoTargetConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine to min_lr_frac over progress in [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cos)


def _train_loop(model, examples, cfg: DemoTargetConfig, log) -> dict:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    t0 = time.perf_counter()
    step, epoch, loss_ema = 0, 0, None
    while True:
        for ids, labels in _batches(examples, cfg.batch_size, gen):
            if step >= cfg.max_steps:
                return {"steps": step, "epochs": epoch, "train_seconds": time.perf_counter() - t0,
                        "final_loss": loss_ema}
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step, step / cfg.max_steps)
            # lm_head only where a label exists: most positions are prompt or padding.
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            target = labels[:, 1:]
            keep = target != -100
            loss = F.cross_entropy(model.lm_head(hidden[keep]), target[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
            step += 1
            if cfg.threads is None and step % 25 == 0:
                torch.set_num_threads(_free_cores(ours=torch.get_num_threads()))
            if step % 25 == 0:
                log(f"demo target: step {step} loss {loss_ema:.3f} "
                    f"({time.perf_counter() - t0:.0f}s, {torch.get_num_threads()} threads)")
        epoch += 1


def train_demo_target(out_dir: str | Path, corpus_rows: list[dict] | None = None,
                      max_steps: int = 700, seed: int = 0, log: Callable[[str], None] = print,
                      config: DemoTargetConfig | None = None) -> Path:
    """Train tokenizer and model on corpus_rows and write the complete target to out_dir.

    out_dir is replaced atomically: built in a sibling temp folder, completion marker written
    last, renamed.
    """
    import torch

    t_start = time.perf_counter()
    cfg = config or DemoTargetConfig()
    cfg = DemoTargetConfig(**{**asdict(cfg), "max_steps": max_steps, "seed": seed})
    rows = corpus_rows if corpus_rows is not None else generate_conversations(cfg.train_rows, seed)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or _free_cores())
    try:
        torch.manual_seed(cfg.seed)
        tokenizer = train_tokenizer(rows, cfg.vocab_size)
        examples = encode_conversations(tokenizer, rows)
        model = build_model(cfg, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"demo target: vocab {len(tokenizer)}, {n_params / 1e6:.2f}M params, "
            f"{len(examples)} conversations, {sum(len(x) for x, _ in examples)} tokens, "
            f"{torch.get_num_threads()} threads")
        stats = _train_loop(model, examples, cfg, log)
        log(f"demo target: {stats['steps']} steps in {stats['train_seconds']:.1f}s, "
            f"loss {stats['final_loss']:.4f}")

        model.eval()
        model.generation_config.update(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=128)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        quality = evaluate_greedy(tmp, heldout_conversations(cfg.n_eval), model=model,
                                  tokenizer=tokenizer, max_new_tokens=cfg.eval_max_new_tokens)
        quality.update(stats, total_seconds=time.perf_counter() - t_start, n_params=n_params,
                       train_rows=len(rows), recipe=RECIPE_VERSION, config=asdict(cfg))
        (tmp / QUALITY_FILE).write_text(json.dumps(quality, indent=2) + "\n")
        # Last: its presence means everything else is there.
        (tmp / COMPLETE_MARKER).write_text(RECIPE_VERSION + "\n")
        # Move an old target aside before renaming the new one in: the gap without `out` is two
        # renames long, and readers never see a mix of old and new files.
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
        log(f"demo target: held-out exact match {quality['exact_match']} "
            f"(total {quality['total_seconds']:.1f}s) -> {out}")
        return out
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# evaluation


def _eval_prompts(conversations: list[dict]) -> list[tuple[str, list[dict], str]]:
    """(family, history up to an assistant turn, reference reply) for every assistant turn.

    Later turns get the reference history, so each turn is judged on its own.
    """
    out = []
    for conv in conversations:
        family = conv["source"].split("/", 1)[-1]
        msgs = conv["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                out.append((family, msgs[:i], m["content"]))
    return out


def _greedy_replies(model, tokenizer, items, batch_size: int, max_new_tokens: int) -> list[str]:
    """Batched greedy decoding of every item's history, cut at the first end-of-turn."""
    import torch

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    replies = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            prompts = [tokenizer.apply_chat_template(h, tokenize=True, return_dict=True,
                                                     add_generation_prompt=True)["input_ids"]
                       for _, h, _ in items[start:start + batch_size]]
            width = max(len(p) for p in prompts)
            # Left padding so every prompt ends where generation starts.
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                 pad_token_id=pad_id)
            for row in gen[:, width:].tolist():
                row = row[:row.index(eos_id)] if eos_id in row else row
                replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return replies


def _token_accuracy(model, tokenizer, items, batch_size: int) -> list[tuple[int, int]]:
    """Teacher-forced next-token accuracy on each item's reference reply: (correct, tokens).

    Smoother than exact match (one wrong digit fails a whole reply), so it tracks training
    progress where exact match still reads 0."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            encoded = [tokenizer.apply_chat_template(h + [{"role": "assistant", "content": ref}],
                                                     tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
                       for _, h, ref in items[start:start + batch_size]]
            width = max(len(e["input_ids"]) for e in encoded)
            ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.bool)
            for row, e in enumerate(encoded):  # right padding: causal rows never see it
                n = len(e["input_ids"])
                ids[row, :n] = torch.tensor(e["input_ids"])
                # The history's assistant turns are masked too; only the last reply is scored.
                start = _last_turn_start(e["assistant_masks"])
                mask[row, start:n] = torch.tensor(e["assistant_masks"][start:], dtype=torch.bool)
            pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
            hit = (pred == ids[:, 1:]) & mask[:, 1:]
            out += [(int(h), int(m)) for h, m in zip(hit.sum(1), mask[:, 1:].sum(1))]
    return out


def _last_turn_start(mask: list[int]) -> int:
    """Index where the last run of 1s in an assistant mask begins."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return start


def evaluate_greedy(model_dir: str | Path, conversations: list[dict], *, model=None,
                    tokenizer=None, batch_size: int = 64, max_new_tokens: int = 96) -> dict:
    """Per-family exact match of greedy replies against the reference assistant turns, and the
    teacher-forced token accuracy on those replies."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    items = _eval_prompts(conversations)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, _free_cores()))  # see DemoTargetConfig.threads
    try:
        replies = _greedy_replies(model, tokenizer, items, batch_size, max_new_tokens)
        token_hits = _token_accuracy(model, tokenizer, items, batch_size)
    finally:
        torch.set_num_threads(threads)
    per_family: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {}
    for (family, _, ref), got, (hit, n) in zip(items, replies, token_hits):
        per_family.setdefault(family, []).append(int(got == ref.strip()))
        acc = tokens.setdefault(family, [0, 0])
        acc[0], acc[1] = acc[0] + hit, acc[1] + n
    exact = {f: round(sum(v) / len(v), 4) for f, v in sorted(per_family.items())}
    total = [x for v in per_family.values() for x in v]
    hits, n_tokens = sum(h for h, _ in tokens.values()), sum(n for _, n in tokens.values())
    examples = [{"family": f, "prompt": h[-1]["content"], "reference": ref, "greedy": got}
                for (f, h, ref), got in list(zip(items, replies))[:12]]
    return {"exact_match": exact, "exact_match_overall": round(sum(total) / max(len(total), 1), 4),
            "token_accuracy": {f: round(h / max(n, 1), 4) for f, (h, n) in sorted(tokens.items())},
            "token_accuracy_overall": round(hits / max(n_tokens, 1), 4),
            "n_turns": {f: len(v) for f, v in sorted(per_family.items())},
            "families": list(FAMILIES), "examples": examples}


# ---------------------------------------------------------------------------------------------


def is_complete(target_dir: str | Path) -> bool:
    """A finished target built by the current recipe (see RECIPE_VERSION) that got its whole
    schedule. Targets cached before the schedule counted steps only could have been cut short by
    the wall-clock budget a busy machine hit: those are not complete, so they are trained again."""
    marker = Path(target_dir) / COMPLETE_MARKER
    if not (marker.is_file() and marker.read_text().strip() == RECIPE_VERSION):
        return False
    q = json.loads((Path(target_dir) / QUALITY_FILE).read_text())
    return q["steps"] >= q["config"]["max_steps"]


def ensure_demo_target(out_dir: str | Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """The demo target directory, trained on first use and reused afterwards.

    A file lock serialises concurrent callers (parallel Dagster steps, test workers): the first
    trains, the others wait and then find the completion marker.
    """
    if out_dir is None:
        from training.paths import data_dir
        out_dir = data_dir() / "demo" / "target"
    out = Path(out_dir)
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(out):
            return out
        cfg = DemoTargetConfig()
        rows = generate_conversations(cfg.train_rows, cfg.seed)
        return train_demo_target(out, rows, max_steps=cfg.max_steps, seed=cfg.seed, log=log, config=cfg)
