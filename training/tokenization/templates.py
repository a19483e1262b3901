"""Where each assistant turn sits in the text the target sees, taken from the target's own template.

A renderer turns one conversation into one or more `View`s: a text to tokenize plus the character
spans of its assistant turns. Nothing here knows any role header; every span comes from rendering:

- Chat template with `{% generation %}` markers: the template declares the assistant spans itself;
  one render per conversation (the tracker transformers uses for return_assistant_tokens_mask).
  Markers that leave out the end-of-turn token get the special token right after them added.
- Any other chat template: for assistant message i, P = render(messages[:i], generation prompt) and
  V = render(messages[:i+1]). The target generates exactly V[len(P):] after seeing P, so that is
  the turn: its content plus whatever the template closes the turn with. The span keeps the turn up
  to and including its last special token (the end-of-turn token: <|im_end|>, <|eot_id|>, </s>,
  <end_of_turn>) and drops the template's trailing text after it (the "\n" before the next turn);
  that cut is made on token ids in masking.py. P must be a prefix of V or the template's generation
  prompt does not start its own assistant turn, and no mask can be derived (template_mismatch).
- Templates that rewrite earlier turns once later messages follow (Qwen3 strips <think> reasoning
  from turns before the last user message) make V for an early turn differ from the same turn inside
  the full conversation. Such a turn is not masked inside the full text, where the target would
  never generate it that way; the conversation is split instead: the turn keeps its own view V
  (everything before it exactly as the target saw it while generating it, reasoning included), and
  earlier turns whose V is a prefix of that view share it. Templates that never rewrite history
  (ChatML, Llama-3, Mistral, Gemma) always give one view per conversation.
  Cost: two renders per assistant turn, each over its prefix; through a context built once per
  tokenizer that stays well under the cost of encoding the text (bench/bench_tokenize.py).
- `plain` (tokenizers without a chat template): BOS if the tokenizer adds one; consecutive
  non-assistant contents joined by "\n" form the prompt; each assistant content follows its prompt
  directly (the data owns its separators, as in prompt/completion pairs) and is followed by EOS.
  Generation renders its prompts with the same class (targets/base.py render_prompt).

Rows whose replies carry the target's own token ids (resampled) are not re-encoded from text:
`ReplyFrame` gives, per assistant turn, the prompt text the target generated after and the text the
template closes the turn with; tokenization joins encode(prompt) + generated ids + encode(closing)
(tokenization/__init__.py), so a sampled non-canonical split or a sentencepiece word-start reply
("▁She" after "room.") is trained as generated.

Messages after the last assistant turn are dropped: they carry no loss and would only cost features.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime

from jinja2.runtime import new_context

ASSISTANT = "assistant"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

# A conversation every chat template must handle: checked once per tokenize call so a template that
# cannot give a mask fails with one clear error instead of rejecting every row.
PROBE = [
    {"role": "user", "content": "Hello there, who are you?"},
    {"role": "assistant", "content": "I am a helpful assistant."},
    {"role": "user", "content": "Tell me a short joke."},
    {"role": "assistant", "content": "Why did the chicken cross the road? To get to the other side."},
]


# Templates that read the clock (Llama-3.x, Mistral-Small, Granite: `strftime_now("%d %b %Y")` in the
# system block) would render another prompt on another day (or in another time zone), so a row
# resampled before midnight and tokenized after it would no longer match. Every renderer we drive
# binds strftime_now to one fixed date instead: `template_date` (YYYY-MM-DD) of the chat template
# settings, else DEFAULT_TEMPLATE_DATE. It sits in chat_template_kwargs, the target identity every
# fingerprint includes, so changing it re-runs every stage that renders a prompt.
TEMPLATE_DATE_KEY = "template_date"
DEFAULT_TEMPLATE_DATE = "2026-01-01"


def template_message(message: dict) -> dict:
    """A stored message (training.schemas.MESSAGE_TYPE) as chat templates read it, as transformers'
    apply_chat_template hands it over: null fields left out (a template tests `"thinking" in
    message`), `tool_calls` parsed from its JSON text, reasoning under both names templates read
    (`reasoning_content`: Qwen3, DeepSeek; `thinking`: gpt-oss)."""
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("tool_calls"), str):
        out["tool_calls"] = json.loads(out["tool_calls"])
    reasoning = out.get("reasoning_content")
    if reasoning is not None:
        out = {"thinking": reasoning, **out}
    return out


def template_vars(template_kwargs: dict | None) -> dict:
    """The chat template settings as template variables: `template_date` replaced by the clock it
    fixes (`strftime_now` formats that date at midnight); ValueError for a date that is not ISO."""
    kwargs = dict(template_kwargs or {})
    day = kwargs.pop(TEMPLATE_DATE_KEY, DEFAULT_TEMPLATE_DATE)
    try:
        fixed = datetime.combine(date.fromisoformat(str(day)), datetime.min.time())
    except ValueError:
        raise ValueError(f"chat template setting {TEMPLATE_DATE_KEY}={day!r} is not a date (YYYY-MM-DD)") from None
    return {**kwargs, "strftime_now": fixed.strftime}


def template_date(source: str | None, template_kwargs: dict | None) -> str | None:
    """The date a template that reads the clock renders (None for one that does not)."""
    if not source or "strftime_now" not in source:
        return None
    return str((template_kwargs or {}).get(TEMPLATE_DATE_KEY, DEFAULT_TEMPLATE_DATE))


class ChatTemplateError(ValueError):
    """The tokenizer's template cannot give a loss mask; the message names the template problem."""


class RowReject(Exception):
    """One conversation cannot be used; `reason` goes to the rejects table."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class View:
    """One row to tokenize: `text` and its assistant spans (start, end, trimmed end) in characters.

    `turn` is the message index of the view's last assistant turn, or None for the conversation's
    final view (which keeps the conversation id).
    """

    text: str
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    turn: int | None = None
    turns: list[int] = field(default_factory=list)  # message index of each span, in span order


# A reply no template rewrites (no whitespace to trim, no think tags): where it lands in a render
# shows what the template puts around a reply.
REPLY_SENTINEL = "\ue000specdraft-reply\ue000"


@dataclass
class ReplyFrame:
    """How the template frames assistant message i: `prompt` = render(messages[:i]) with the
    generation prompt (what the target generated after), `after` = the template's text closing the
    turn, `rendered` = what the template puts between the two for this reply; `verbatim` when that
    is the reply itself up to whitespace trimmed at its ends (not so: Qwen3 inserting an empty think
    block before a reply generated without one)."""

    prompt: str
    after: str
    rendered: str | None
    verbatim: bool


def _trimmed_end(text: str, start: int, end: int) -> int:
    """End of text[start:end] without its trailing whitespace, used when a turn has no special token."""
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _last_assistant(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == ASSISTANT:
            return i
    raise RowReject("no_assistant", "conversation has no assistant message")


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on prefix equality: C-speed compares, no per-char loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChatRenderer:
    """Views from the tokenizer's jinja chat template, rendered exactly as apply_chat_template does."""

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        # transformers' own compiled template (same sandbox, filters and {% generation %} tracker as
        # apply_chat_template; a test holds the renders equal). We render through a shared context
        # built once: Template.render rebuilds the context from the globals ChainMap on every call,
        # which cost more than the template itself over the many prefixes rendered per conversation.
        from transformers.utils.chat_template_utils import _compile_jinja_template

        self.source = tokenizer.get_chat_template()
        self.template = _compile_jinja_template(self.source)
        self.base_vars = {**self.template.globals, **tokenizer.special_tokens_map, **template_vars(template_kwargs)}
        self.template_date = template_date(self.source, template_kwargs)
        self.markers = bool(GENERATION_MARKER.search(self.source))
        # markers may wrap only the content; then the end-of-turn token right after it joins the span
        self.extend_eot = self.markers

    def bind(self, tools: str | list | None):
        """This renderer for a conversation with tool schemas (a list, or its JSON text): the template
        renders them as its tools block, as apply_chat_template(tools=...) does. No tools: itself."""
        if not tools:
            return self
        bound = copy.copy(self)
        bound.base_vars = {**self.base_vars, "tools": json.loads(tools) if isinstance(tools, str) else tools}
        return bound

    def render(self, messages: list[dict], add_generation_prompt: bool = False, spans: list | None = None) -> str:
        """The template's text for `messages`; with `spans`, also collect its {% generation %} spans."""
        t = self.template
        try:
            ctx = new_context(t.environment, t.name, t.blocks, shared=True,
                              vars={**self.base_vars, "messages": [template_message(m) for m in messages],
                                    "add_generation_prompt": add_generation_prompt})
            if spans is None:
                return "".join(t.root_render_func(ctx))
            blocks: list[str] = []
            with t.environment.activate_tracker(blocks, spans):
                for block in t.root_render_func(ctx):
                    blocks.append(block)  # the tracker measures span offsets on `blocks` as it grows
            return "".join(blocks)
        except Exception as exc:  # jinja errors, raise_exception(...) of the template, bad data types
            raise RowReject("template_error", f"{type(exc).__name__}: {exc}") from None

    def views(self, messages: list[dict]) -> list[View]:
        messages = messages[: _last_assistant(messages) + 1]
        return self._marked_views(messages) if self.markers else self._prefix_views(messages)

    def _marked_views(self, messages: list[dict]) -> list[View]:
        spans: list[tuple[int, int]] = []
        text = self.render(messages, spans=spans)
        spans = [(s, e, e) for s, e in spans if e > s]
        if not spans:
            raise RowReject("template_mismatch", "the template's {% generation %} markers enclose no text")
        turns = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        return [View(text, spans, turns=turns if len(turns) == len(spans) else [])]

    def _prefix_views(self, messages: list[dict]) -> list[View]:
        turns = []  # (message index, span start, text of the view that ends with this turn)
        for i, m in enumerate(messages):
            if m["role"] != ASSISTANT:
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not full.startswith(prompt):
                k = _first_difference(prompt, full)
                raise RowReject(
                    "template_mismatch",
                    f"the generation prompt does not start assistant message {i}: render(messages[:{i}], "
                    f"add_generation_prompt=True) is not a prefix of render(messages[:{i + 1}]); they differ "
                    f"at char {k}: {prompt[k:k + 40]!r} vs {full[k:k + 40]!r}",
                )
            turns.append((i, len(prompt), full))
        # Walk back from the last turn; a turn whose own view is not a prefix of the current view was
        # rewritten by the template once later messages followed, so it starts a view of its own.
        views = [View(turns[-1][2])]
        for i, start, full in reversed(turns):
            if not views[-1].text.startswith(full):
                views.append(View(full, turn=i))
            views[-1].spans.append((start, len(full), _trimmed_end(full, start, len(full))))
            views[-1].turns.append(i)
        for v in views:
            v.spans.reverse()
            v.turns.reverse()
        views.reverse()
        return views

    def frame(self, messages: list[dict], i: int) -> ReplyFrame:
        """The template's framing of assistant message i (RowReject template_mismatch if the
        generation prompt does not start the turn)."""
        prompt = self.render(messages[:i], add_generation_prompt=True)
        # the bare reply: what the template writes after it closes the turn, whatever the reply held
        # (reasoning and tool calls are in the generated ids, not after them)
        probe = self.render([*messages[:i], {"role": messages[i]["role"], "content": REPLY_SENTINEL}])
        at = probe.rfind(REPLY_SENTINEL)
        if not probe.startswith(prompt) or at < len(prompt):
            k = _first_difference(prompt, probe)
            raise RowReject(
                "template_mismatch",
                f"the generation prompt does not start assistant message {i}: they differ at char {k}: "
                f"{prompt[k:k + 40]!r} vs {probe[k:k + 40]!r}",
            )
        after = probe[at + len(REPLY_SENTINEL):]
        full = self.render(messages[: i + 1])
        rendered = full[len(prompt):len(full) - len(after)] if full.startswith(prompt) and full.endswith(after) else None
        reply, reasoning = messages[i]["content"].strip(), (messages[i].get("reasoning_content") or "").strip()
        # with reasoning kept apart, the template renders it (think tags and all) before the reply
        verbatim = rendered is not None and (rendered.strip() == reply if not reasoning else
                                             reasoning in rendered and rendered.strip().endswith(reply))
        return ReplyFrame(prompt, after, rendered, verbatim)


class PlainRenderer:
    """The explicit `plain` template: prompt text, then completion + EOS; BOS as the tokenizer adds it."""

    markers = False
    extend_eot = False
    template_date = None

    def __init__(self, tokenizer):
        # BOS only if the tokenizer itself puts one in front of text (Llama does, GPT-2 does not)
        with_special = tokenizer.encode("a", add_special_tokens=True)
        without = tokenizer.encode("a", add_special_tokens=False)
        bos_id = tokenizer.bos_token_id
        adds_bos = bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id
        self.bos = tokenizer.bos_token if adds_bos else ""
        self.eos = tokenizer.eos_token or ""

    def bind(self, tools: str | list | None):
        """No tools block in plain text: a conversation with tools cannot be shown as the data says."""
        if tools:
            raise RowReject("tools_unsupported", "the conversation has tool schemas and the plain template "
                                                 "(a tokenizer without a chat template) has no tools block")
        return self

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The plain text of `messages`; the generation prompt adds nothing (the reply follows the prompt)."""
        return self._layout(messages)[0]

    def _layout(self, messages: list[dict]) -> tuple[str, list[tuple[int, int, int]], list[int]]:
        parts, spans, turns, pos = [self.bos], [], [], len(self.bos)
        prev_prompt = False
        for i, m in enumerate(messages):
            for key in ("reasoning_content", "tool_calls"):
                if m.get(key) is not None:  # plain text has no place for them: never drop them silently
                    raise RowReject(f"{key}_unsupported", f"message {i} has {key} and the plain template (a "
                                                          "tokenizer without a chat template) renders content only")
            if m["role"] == ASSISTANT:
                piece = m["content"] + self.eos
                spans.append((pos, pos + len(piece), pos + len(piece)))
                turns.append(i)
                prev_prompt = False
            else:
                piece = ("\n" if prev_prompt else "") + m["content"]
                prev_prompt = True
            parts.append(piece)
            pos += len(piece)
        return "".join(parts), spans, turns

    def views(self, messages: list[dict]) -> list[View]:
        text, spans, turns = self._layout(messages[: _last_assistant(messages) + 1])
        return [View(text, spans, turns=turns)]

    def frame(self, messages: list[dict], i: int) -> ReplyFrame:
        content = messages[i]["content"]
        return ReplyFrame(self.render(messages[:i], add_generation_prompt=True), self.eos, content, True)


def user_turn_opening(renderer, messages: list[dict]) -> str:
    """The text the template puts before a user turn's content after `messages` (its system turns):
    what the target continues to write a prompt of its own (resampling's written prompts, the
    Magpie recipe). RowReject when the template does not show a user turn's content."""
    probe = renderer.render([*messages, {"role": "user", "content": REPLY_SENTINEL}])
    at = probe.rfind(REPLY_SENTINEL)
    if at < 0:
        raise RowReject("template_error", "the template does not render a user turn's content")
    return probe[:at]


def prompt_renderer(tokenizer, template_kwargs: dict | None = None):
    """What renders generation prompts for this tokenizer (its chat template, else plain), without
    make_renderer's masking probe: resampling and evaluation render every prompt through it first,
    so a row the template refuses (raise_exception on a system role, on roles that do not
    alternate) is that row's RowReject(template_error), not a failed batch."""
    if getattr(tokenizer, "chat_template", None):
        return ChatRenderer(tokenizer, template_kwargs)
    return PlainRenderer(tokenizer)


def check_chat_template(renderer: ChatRenderer) -> None:
    """Fail early, with the template problem named, if the template cannot mask a plain conversation."""
    try:
        views = renderer.views([dict(m) for m in PROBE])
    except RowReject as exc:
        raise ChatTemplateError(f"chat template cannot give a loss mask ({exc.reason}): {exc.detail}") from None
    spans = [(v.text, s, e) for v in views for s, e, _ in v.spans]
    contents = [m["content"] for m in PROBE if m["role"] == ASSISTANT]
    if len(spans) != len(contents):
        raise ChatTemplateError(
            f"chat template marks {len(spans)} assistant spans in a conversation with {len(contents)} "
            "assistant messages: its {% generation %} markers do not enclose each assistant turn"
        )
    for (text, s, e), content in zip(spans, contents):
        if content not in text[s:e]:
            raise ChatTemplateError(
                "chat template renders an assistant message outside its own turn (non-contiguously): "
                f"{content!r} is not inside the assistant span {text[s:e]!r}"
            )


def make_renderer(tokenizer, template: str = "auto", template_kwargs: dict | None = None):
    """`chat`: the tokenizer's chat template (error if it has none); `plain`; `auto`: chat if present."""
    if template not in ("auto", "chat", "plain"):
        raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ChatTemplateError(
            f"template='chat' but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use template='plain' (or 'auto') for a base model"
        )
    if template == "plain" or not has_chat:
        return PlainRenderer(tokenizer)
    renderer = ChatRenderer(tokenizer, template_kwargs)
    check_chat_template(renderer)
    return renderer
