"""Which held-out conversations the evaluation runs on, and how question files become prompts."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import zip_longest
from typing import Callable, Iterable


class PromptFileError(ValueError):
    """A prompt file gave no usable prompt; the message names the file and the reject reasons."""


def stratified_prompts(rows: Iterable[dict], n: int) -> list[dict]:
    """Up to `n` prompts {id, domain, messages}, round-robin over domains (each sorted by id), so a
    small budget still covers every domain and the choice does not depend on shard order."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_domain[row.get("source") or "all"].append(
            {"id": row["id"], "domain": row.get("source") or "all", "messages": row["messages"],
             "tools": row.get("tools")}
        )
    columns = [sorted(v, key=lambda r: r["id"]) for _, v in sorted(by_domain.items())]
    interleaved = [p for group in zip_longest(*columns) for p in group if p is not None]
    return interleaved[:n]


def read_prompt_file(url: str, log: Callable[[str], None] | None = None) -> list[dict]:
    """Conversation rows of a held-out prompt file (any corpus format, MT-Bench/Spec-Bench question
    files included: training/corpus). Rejected rows are logged; PromptFileError when none is usable,
    naming the file and the reasons (an unrecognised format says which fields the rows have)."""
    from training.corpus import read_source

    result = read_source(url)
    if result.n_accepted == 0:
        reasons = Counter(result.rejects["reason"].to_pylist())
        first = {}
        for r in result.rejects.to_pylist():
            first.setdefault(r["reason"], r["detail"])
        listed = "; ".join(f"{k} x{v} (e.g. {first[k][:200]})" for k, v in reasons.most_common(10)) or "the file is empty"
        raise PromptFileError(f"{url}: none of its {result.n_read} rows is a usable eval prompt: {listed}")
    if result.n_rejected and log is not None:
        log(f"{url}: {result.n_rejected} of {result.n_read} prompt rows rejected: {dict(Counter(result.rejects['reason'].to_pylist()))}")
    return result.rows.to_pylist()


def renderable_prompts(target, prompts: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompts the target's chat template renders, rejects {id, reason, detail} for the others).

    Every generation prompt a prompt leads to is rendered first (before each assistant turn, and the
    whole conversation when it ends on another role), so a prompt the template refuses (a system
    role it does not support, roles that do not alternate: raise_exception) is rejected with the
    template's reason and the evaluation goes on with the rest. Prompts given as input_ids render nothing.
    """
    from training.tokenization.templates import RowReject, prompt_renderer

    renderer = prompt_renderer(target.tokenizer, getattr(target, "chat_template_kwargs", None))
    kept, rejects = [], []
    for p in prompts:
        messages = list(p.get("messages") or []) if p.get("input_ids") is None else []
        ends = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if messages and messages[-1].get("role") != "assistant":
            ends.append(len(messages))
        try:
            for i in ends:
                if i:
                    renderer.bind(p.get("tools")).render(messages[:i], add_generation_prompt=True)
        except RowReject as exc:
            rejects.append({"id": p.get("id"), "reason": exc.reason, "detail": f"{exc.detail} (before message {i})"})
            continue
        kept.append(p)
    return kept, rejects


def expand_turns(target, prompts: list[dict], max_new_tokens: int) -> list[dict]:
    """Multi-turn questions as one prompt per turn, later turns asked after the target's OWN replies.

    A prompt whose messages hold empty assistant turns (a question file: training/corpus `question`
    format) becomes one prompt per empty turn, `{id}#{k}` for turn k >= 2 (the first keeps the id):
    the conversation up to that turn, where each earlier empty reply is what `target` writes there
    greedily (up to `max_new_tokens`), as in MT-Bench's second turn. Other prompts are unchanged.
    """
    from training.targets.base import SamplingParams

    out = []
    for p in prompts:
        messages = [dict(m) for m in p.get("messages") or []]
        empty = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and not (m.get("content") or "").strip()]
        if not empty:
            out.append(p)
            continue
        for k, i in enumerate(empty):
            out.append({**p, "id": p["id"] if k == 0 else f"{p['id']}#{k + 1}", "messages": messages[:i]})
            if k + 1 < len(empty):  # a later turn follows: the target answers this one first
                params = [SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)]
                tools = {"tools": [p["tools"]]} if p.get("tools") else {}  # the tools block, as in training
                [gen] = target.generate([messages[:i]], params, **tools)
                messages[i]["content"] = gen.text
    return out
