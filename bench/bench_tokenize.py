"""Tokenize + loss mask throughput beside the raw fast tokenizer's batch encode of the same texts.

    .venv/bin/python bench/bench_tokenize.py [--n 3000] [--template chatml|llama3|marked|plain] [--target DIR]

The baseline encodes the already-rendered texts (no template work, no mask): the floor any
tokenize step pays. tokenize_conversations does everything from messages: render each assistant
turn's prefixes with the chat template, one batch encode, spans to tokens, the Arrow table. Goal:
ratio >= 0.7. Uses the real conversation fixtures in ../shared when present, else synthetic text.
Timings are best-of-R, alternating the two, because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.tokenization import TokenizeConfig, tokenize_conversations  # noqa: E402
from training.tokenization.templates import make_renderer  # noqa: E402

FIXTURES = Path("/work/shared/fixtures/data")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]
TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "<|im_end|>",
    ),
    "llama3": (
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "<|eot_id|>",
    ),
    "marked": (  # the demo target's style: {% generation %} markers, one render per conversation
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{- '<|im_start|>assistant\n' -}}"
        "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}{{- '\n' -}}{%- else -%}"
        "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}",
        "<|im_end|>",
    ),
    "plain": (None, "</s>"),
}


def texts_pool() -> list[str]:
    pool = []
    for name in ("multiturn_messages_demo.json", "fastchat_dummy_conversation.json"):
        path = FIXTURES / name
        if path.exists():
            for row in json.loads(path.read_text()):
                turns = row.get("messages") or row.get("conversations")  # OpenAI or ShareGPT layout
                pool += [m.get("content") or m.get("value") or "" for m in turns]
    if pool:
        return [t for t in pool if t]
    rng = random.Random(0)
    words = "the of and to in is you that it he was for on are as with his they at be this have from".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 300))) + "." for _ in range(2000)]


def conversations(n: int, pool: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        for _ in range(rng.choice([1, 1, 2, 3, 4])):
            messages.append({"role": "user", "content": rng.choice(pool)[: rng.randint(40, 1200)]})
            messages.append({"role": "assistant", "content": rng.choice(pool)[: rng.randint(80, 3000)]})
        out.append({"id": f"c{i}", "messages": messages})
    return out


def build_tokenizer(template: str, pool: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pool, trainer=trainer)
    chat_template, eos = TEMPLATES[template]
    bos = "<|begin_of_text|>" if template == "llama3" else "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>",
                                   chat_template=chat_template)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="conversations")
    ap.add_argument("--template", default="chatml", choices=sorted(TEMPLATES))
    ap.add_argument("--target", help="an HF model directory: bench its tokenizer and template instead")
    ap.add_argument("--vocab", type=int, default=16000, help="vocab of the locally trained BPE")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    pool = texts_pool()
    if args.target:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.target)
    else:
        tokenizer = build_tokenizer(args.template, pool, args.vocab)
    convs = conversations(args.n, pool)
    cfg = TokenizeConfig(max_length=1 << 30, template="plain" if args.template == "plain" else "auto")

    # the baseline's texts are exactly the ones tokenize_conversations encodes
    renderer = make_renderer(tokenizer, cfg.template)
    texts = [v.text for c in convs for v in renderer.views(c["messages"])]
    backend = tokenizer.backend_tokenizer

    def raw_backend():
        return sum(len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False))

    def raw_hf():
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])

    def ours():
        res = tokenize_conversations(tokenizer, convs, cfg)
        assert res.n_rejected == 0, res.rejects.slice(0, 3).to_pylist()
        return int(sum(res.table.column("n_tokens").to_pylist()))

    best = {"raw_backend": float("inf"), "raw_hf": float("inf"), "ours": float("inf")}
    cpu = dict(best)  # process CPU seconds (all threads): steadier than wall time on a shared machine
    tokens = {}
    for name, fn in (("raw_backend", raw_backend), ("raw_hf", raw_hf), ("ours", ours)):
        tokens[name] = fn()  # warm-up: BPE word cache, template compile
    assert len(set(tokens.values())) == 1, tokens
    for _ in range(args.repeats):
        for name, fn in (("raw_backend", raw_backend), ("raw_hf", raw_hf), ("ours", ours)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)

    n_tok = tokens["ours"]
    rate = {k: n_tok / v for k, v in best.items()}
    print(f"{args.n} conversations -> {len(texts)} rows, {n_tok} tokens; template={args.target or args.template}")
    print(f"raw backend encode_batch (ids)   {rate['raw_backend']:>12,.0f} tok/s   {best['raw_backend']:.3f} s")
    print(f"raw tokenizer(texts) batch       {rate['raw_hf']:>12,.0f} tok/s   {best['raw_hf']:.3f} s")
    print(f"tokenize_conversations + mask    {rate['ours']:>12,.0f} tok/s   {best['ours']:.3f} s")
    print(f"ratio vs encode_batch {rate['ours'] / rate['raw_backend']:.2f}   "
          f"ratio vs tokenizer(texts) {rate['ours'] / rate['raw_hf']:.2f}   (goal >= 0.7)")
    print(f"cpu-time ratio vs encode_batch {cpu['raw_backend'] / cpu['ours']:.2f}   "
          f"vs tokenizer(texts) {cpu['raw_hf'] / cpu['ours']:.2f}")


if __name__ == "__main__":
    main()
