"""gpt-oss (harmony) replies: a reply is a run of channel messages, not one text.

A harmony model answers after `<|start|>assistant` with messages like
`<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>`.
Decoding that with special tokens skipped flattens it into `analysis...assistantfinal...`, which the
chat template would then render as the final message of a history the served model never sees. The
template expects the analysis channel as the message's `thinking` (our reasoning_content) and the
final channel as its content, so the reply is split on the token ids: analysis messages become the
reasoning, every other channel's message (final, commentary preambles) the content.
"""

from __future__ import annotations

CHANNEL, MESSAGE = "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")
REASONING_CHANNEL = "analysis"


def harmony_ids(tokenizer) -> dict | None:
    """The harmony control token ids of a tokenizer whose chat template speaks harmony, else None."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if CHANNEL not in template or MESSAGE not in template:
        return None
    vocab = tokenizer.get_vocab()
    if CHANNEL not in vocab or MESSAGE not in vocab:
        return None
    return {"channel": vocab[CHANNEL], "message": vocab[MESSAGE], "ends": {vocab[t] for t in ENDS if t in vocab}}


def split_channels(tokenizer, ids, control: dict) -> tuple[str, str | None]:
    """(content, reasoning or None) of a harmony reply's token ids; a reply cut inside a message keeps
    what it has (a reply cut while analysing: content "", the reasoning so far)."""
    content, reasoning = [], []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] != control["channel"]:
            i += 1
            continue
        j = i + 1
        while j < n and ids[j] != control["message"]:
            j += 1
        channel = tokenizer.decode(list(ids[i + 1:j]), skip_special_tokens=True).strip()
        k = j + 1
        while k < n and ids[k] not in control["ends"]:
            k += 1
        text = tokenizer.decode(list(ids[j + 1:k]), skip_special_tokens=True)
        (reasoning if channel.split(" ")[0] == REASONING_CHANNEL else content).append(text)
        i = k
    return "\n".join(content), ("\n".join(reasoning) if reasoning else None)
