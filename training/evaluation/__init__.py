"""Acceptance evaluation of a trained draft, EAGLE-3 or DFlash (DESIGN.md, "Evaluation").

    from training.evaluation import evaluate, write_report, gate
    result = evaluate(target, export_dir, prompts, ks=[1, 3, 5], temperatures=[0.0, 0.7])
    report = write_report(result, artifact_writer)      # report.json, report.md, 3 PNGs
    passed, detail = gate(result, k=3, min_tau=1.6)

For every temperature, each prompt is decoded three ways with the same HF target: plain decoding
(the timing reference, tau = 1), speculative decoding with the draft (chain or block), and prompt-lookup
(n-gram) drafting with the same k (the no-draft-model baseline). Results are split by the prompts'
`domain` and aggregated over all of them (domain "all").

Importing this package loads no torch (report.py is torch-free); `evaluate` imports it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict
from typing import Any, Callable, Sequence

from training.configs import EvalConfig
from training.evaluation.report import (
    ALL,
    PLOTS,
    EvalResult,
    MethodStats,
    gate,
    load_result,
    render_plots,
    report_markdown,
    write_report,
)


def prompt_ids(target, prompt: dict, max_tokens: int) -> list[int]:
    """Token ids of a held-out prompt: `input_ids` as given, else its messages up to the last
    non-assistant turn rendered with the target's chat template and a generation prompt."""
    if prompt.get("input_ids") is not None:
        ids = [int(t) for t in prompt["input_ids"]]
    else:
        from training.targets.base import render_prompt

        messages = list(prompt["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()  # a held-out conversation: its reply is what the models must produce
        if not messages:
            raise ValueError(f"prompt {prompt.get('id')!r} has no non-assistant message")
        ids = render_prompt(target.tokenizer, messages, getattr(target, "chat_template_kwargs", None), prompt.get("tools"))
    if not ids:
        raise ValueError(f"prompt {prompt.get('id')!r} renders to no tokens")
    return ids[-max_tokens:]


def _load_draft(draft, model, device):
    """(draft, d2t, description) from an export directory (either family) or a (draft, d2t, t2d) tuple."""
    if isinstance(draft, (str, os.PathLike)):
        from safetensors import safe_open

        from training.dflash.export import is_dflash_export, load_dflash

        if is_dflash_export(draft):  # shares the target's embedding, as vLLM does
            d, d2t, _t2d, _cfg = load_dflash(draft, model.get_input_embeddings().weight.detach(), device=device)
            return d, d2t, os.fspath(draft)

        from training.export import WEIGHTS, load_draft

        with safe_open(os.path.join(os.fspath(draft), WEIGHTS), framework="pt") as f:
            has_embed = "embed_tokens.weight" in f.keys()
        # An export without the embedding shares the target's (as vLLM does).
        embed = None if has_embed else model.get_input_embeddings().weight.detach()
        d, d2t, _t2d, _cfg = load_draft(draft, embed_weight=embed, device=device)
        return d, d2t, os.fspath(draft)
    d, d2t = draft[0], draft[1]
    d = getattr(d, "module", d)
    return d.to(device), d2t, f"{type(d).__name__} (in memory)"


def _check_pair(draft, model) -> None:
    cfg, tc = draft.cfg, model.config.get_text_config()
    vocab = model.get_input_embeddings().weight.shape[0]
    if cfg.target_hidden_size != tc.hidden_size or cfg.target_vocab_size != vocab:
        raise ValueError(
            f"draft (H={cfg.target_hidden_size}, vocab={cfg.target_vocab_size}) was not built for this target "
            f"(H={tc.hidden_size}, vocab={vocab})"
        )
    if max(cfg.aux_layer_ids) > tc.num_hidden_layers:
        raise ValueError(f"draft aux layers {cfg.aux_layer_ids} beyond the target's {tc.num_hidden_layers} layers")


def family_of(draft) -> str:
    """The draft family of a loaded draft: "dflash" for a DFlashDraft, else "eagle3"."""
    from training.dflash.model import DFlashDraft

    return "dflash" if isinstance(draft, DFlashDraft) else "eagle3"


def _proposer(draft, d2t, argmax_draft: bool):
    from training.evaluation.block_draft import DFlashProposer
    from training.evaluation.speculative import Eagle3Proposer

    return (DFlashProposer if family_of(draft) == "dflash" else Eagle3Proposer)(draft, d2t, argmax_draft=argmax_draft)


def evaluate(
    target,
    draft,
    prompts: Sequence[dict],
    log: Callable[[str], None] | None = None,
    compare: Sequence = (),
    **options: Any,
) -> EvalResult:
    """Measure the draft against prompt lookup and plain decoding on `target`.

    target: an HF-backed TargetModel (`load_target(path, "hf")`; anything with `.model`, an HF
    causal LM, and `.tokenizer`). draft: a serving export directory (EAGLE-3 or DFlash), or
    (draft, d2t, t2d); it is the one gated and served. compare: drafts of other families, simulated
    on the same prompts beside it (their rows carry their family as method).
    prompts: dicts with `id`, `domain` and `messages` (or `input_ids`); empty assistant turns (question
    files) are written by the target first, each later turn asked after its own reply (prompts.expand_turns).
    options: EvalConfig fields.
    """
    import torch

    from training.evaluation.prompt_lookup import PromptLookupProposer
    from training.evaluation.prompts import expand_turns, renderable_prompts
    from training.evaluation.speculative import DecodeConfig, TargetRunner, generate

    cfg = EvalConfig(**options)
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    say = log or (lambda s: None)
    model = getattr(target, "model", None)
    if model is None or not hasattr(model, "get_decoder"):
        raise TypeError(f"evaluate simulates decoding with an HF model: load the target with backend 'hf', "
                        f"not {getattr(target, 'backend', type(target).__name__)!r}")
    device = next(model.parameters()).device
    prompts, refused = renderable_prompts(target, list(prompts))
    if refused:
        say(f"{len(refused)} prompts the chat template refuses, e.g. {refused[0]['id']}: {refused[0]['detail'][:200]}")
    if not prompts:
        raise ValueError(f"the target's chat template refuses all {len(refused)} prompts: "
                         f"{dict(Counter(r['reason'] for r in refused))}, e.g. {refused[0]['detail'][:300]}")
    prompts = expand_turns(target, prompts, cfg.history_max_new_tokens)
    d, d2t, draft_name = _load_draft(draft, model, device)
    drafts = [(family_of(d), d, d2t)]
    for other in compare:
        od, od2t, _ = _load_draft(other, model, device)
        if family_of(od) in [f for f, _, _ in drafts]:
            raise ValueError(f"compare: a second {family_of(od)} draft; compare drafts of other families")
        drafts.append((family_of(od), od, od2t))
    for _, dd, _ in drafts:
        _check_pair(dd, model)
    # A runner per family: each captures the target layers its draft fuses.
    runners = {f: TargetRunner(model, dd.cfg.aux_layer_ids) for f, dd, _ in drafts}
    runner = runners[drafts[0][0]]
    stops = frozenset() if cfg.ignore_eos else frozenset(getattr(target, "stop_token_ids", lambda: set())())
    encoded = [(p.get("id", str(i)), str(p.get("domain") or "default"), prompt_ids(target, p, cfg.max_prompt_tokens))
               for i, p in enumerate(prompts)]
    proposers = [(f, _proposer(dd, dd2t, cfg.argmax_draft)) for f, dd, dd2t in drafts]
    lookup = PromptLookupProposer(cfg.prompt_lookup_max, cfg.prompt_lookup_min)

    def run(proposer, k: int, t: float, i: int, ids, new_tokens: int, salt: int):
        g = torch.Generator(device=device)
        g.manual_seed(cfg.seed * 1_000_003 + i * 7_919 + k * 101 + salt)  # reproducible per prompt/method/k
        dc = DecodeConfig(k=k, temperature=t, max_new_tokens=new_tokens, stop_token_ids=stops)
        return generate(runners.get(getattr(proposer, "name", None), runner), ids, dc, proposer, g)

    if cfg.warmup:
        _, _, ids = encoded[0]
        run(None, 0, 0.0, 0, ids, 4, 0)
        for _, proposer in proposers:
            run(proposer, max(cfg.ks), 0.0, 0, ids, 2 * max(cfg.ks), 0)

    domains = sorted({dom for _, dom, _ in encoded})
    rows: dict[tuple, MethodStats] = {}

    def add(method: str, k: int, t: float, dom: str, gen) -> None:
        for key in (dom, ALL):
            rows.setdefault((method, k, t, key), MethodStats(method, k, t, key)).add(gen)

    def record(method: str, k: int, t: float, gens: list, plain: list | None) -> None:
        for i, ((_, dom, _), gen) in enumerate(zip(encoded, gens)):
            add(method, k, t, dom, gen)
            if plain is not None and t == 0.0:
                # Greedy speculative decoding must reproduce plain greedy decoding token for token;
                # a miss on a GPU in bf16 means batched-verification numerics flipped a near-tie.
                same = int(gen.tokens == plain[i].tokens)
                for key in (dom, ALL):
                    r = rows[(method, k, t, key)]
                    r.exact_match = (r.exact_match or 0) + same

    # salts: the evaluated draft 2 (as before), prompt lookup 3, compared families 4..
    methods = [(proposers[0][0], proposers[0][1], 2), ("prompt_lookup", lookup, 3),
               *((f, pr, 4 + i) for i, (f, pr) in enumerate(proposers[1:]))]
    for t in cfg.temperatures:
        # Prompt by prompt, every method back to back: on a shared or throttling machine, load
        # drift then hits the plain reference and the drafted runs alike (wall speedups stay fair).
        plain, gens = [], {(m, k): [] for m, _, _ in methods for k in cfg.ks}
        for i, (_, _, ids) in enumerate(encoded):
            plain.append(run(None, 0, t, i, ids, cfg.max_new_tokens, 1))
            for k in cfg.ks:
                for method, proposer, salt in methods:
                    gens[(method, k)].append(run(proposer, k, t, i, ids, cfg.max_new_tokens, salt))
            if (i + 1) % max(1, len(encoded) // 10) == 0 or i + 1 == len(encoded):
                say(f"T={t:g}: {i + 1}/{len(encoded)} prompts decoded")
        record("plain", 0, t, plain, None)
        say(f"T={t:g} plain: {rows[('plain', 0, t, ALL)].time_per_token * 1e3:.2f} ms/token")
        for (method, k), g in gens.items():
            record(method, k, t, g, plain)
            r = rows[(method, k, t, ALL)]
            say(f"T={t:g} k={k} {method}: tau {r.tau:.3f}, c {r.c:.3f}, wall speedup "
                f"{rows[('plain', 0, t, ALL)].time_per_token / r.time_per_token:.2f}")

    order = {m: i for i, m in enumerate(("plain", drafts[0][0], "prompt_lookup", *(f for f, _, _ in drafts[1:])))}
    ordered = sorted(rows.values(), key=lambda r: (r.temperature, order[r.method], r.k, r.domain != ALL, r.domain))
    config = {
        **asdict(cfg),
        "target": getattr(target, "name", None) or str(getattr(target, "name_or_path", type(target).__name__)),
        "draft": draft_name,
        "draft_family": drafts[0][0],
        "compared_families": [f for f, _, _ in drafts[1:]],
        "draft_vocab_size": d.cfg.draft_vocab_size,
        "aux_layer_ids": list(d.cfg.aux_layer_ids),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "n_prompts": len(encoded),
        # prompts the chat template refused (template_error), left out with their reason
        "prompts_rejected": len(refused),
        "prompt_rejects": refused[:20],
        "domains": domains,
        "prompt_tokens": sum(len(ids) for _, _, ids in encoded),
        "stop_token_ids": sorted(stops),
    }
    result = EvalResult(config=config, rows=ordered)
    if cfg.served:
        from training.evaluation.served import vllm_missing_reason

        reason = None if isinstance(draft, (str, os.PathLike)) else "the draft is not an export directory"
        reason = reason or vllm_missing_reason()
        if reason:
            say(f"served measurement skipped: {reason}")
            config["served_by"] = f"skipped: {reason}"
        else:
            result.served = _served_rows(target, str(draft), [ids for _, _, ids in encoded], cfg, stops,
                                        config["dtype"], rows, say, drafts[0][0])
            config["served_by"] = "vLLM"
    return result.finalize()


def _served_rows(target, export: str, prompt_ids: list, cfg: EvalConfig, stops, dtype: str, rows: dict, say,
                 family: str) -> list[dict]:
    """The export decoded by vLLM on the simulator's prompt ids, one row per (temperature, k), beside the
    simulated tau; greedy rows must reproduce vLLM's plain decoding token for token."""
    import torch

    from training.evaluation.served import serve

    runs = serve(target.name_or_path, export, prompt_ids, cfg.ks, cfg.temperatures,
                 max_new_tokens=cfg.max_new_tokens, stop_token_ids=sorted(stops), ignore_eos=cfg.ignore_eos,
                 seed=cfg.seed, dtype=dtype, log=say)
    cuda = torch.cuda.is_available()
    plain = {r.temperature: r for r in runs if r.k == 0}
    out = []
    for r in runs:
        if r.k == 0:
            continue
        simulated = rows[(family, r.k, r.temperature, ALL)].tau
        base = plain[r.temperature]
        out.append({
            "temperature": r.temperature, "k": r.k, "served_tau": r.tau, "simulated_tau": simulated,
            "ratio": r.tau / simulated if r.tau and simulated else None,
            # vLLM drafts the argmax: a sampled row compares with the simulator under argmax_draft, and
            # only on a GPU: vLLM 0.32's CPU build accepts almost nothing in a batch holding a sampled
            # request (README "Serving the draft"); each temperature is decoded as a batch of its own.
            "like_for_like": r.temperature == 0.0 or (cfg.argmax_draft and cuda),
            "exact_match": (f"{sum(a == b for a, b in zip(r.tokens, base.tokens))}/{len(r.tokens)}"
                            if r.temperature == 0.0 else None),
            "drafts": r.drafts, "accepted": r.accepted,
            "accepted_per_pos": [a / r.drafts for a in r.accepted_per_pos] if r.drafts else [],
            "tokens_per_s": r.tokens_per_s, "speedup": r.tokens_per_s / base.tokens_per_s if base.tokens_per_s else None,
        })
        say(f"served T={r.temperature:g} k={r.k}: tau {r.tau or 0:.3f} (simulated {simulated:.3f})")
    return out


__all__ = [
    "ALL",
    "PLOTS",
    "EvalConfig",
    "EvalResult",
    "MethodStats",
    "evaluate",
    "gate",
    "load_result",
    "prompt_ids",
    "render_plots",
    "report_markdown",
    "write_report",
]
