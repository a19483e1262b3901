"""Rendered views -> token ids and loss mask, with one batch encode and numpy over the whole batch.

Python work is per assistant span (a few char_to_token lookups at its ends), never per token:
offsets of every token would cost about as much as the encode itself, and only span ends matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from training.tokenization.templates import View


@dataclass
class Encoded:
    """A batch of views as flat arrays: `ids`/`mask` of all views end to end, `lens` per view."""

    ids: np.ndarray  # int32 [N]
    mask: np.ndarray  # bool [N]
    lens: np.ndarray  # int64 [V]


def encoder(tokenizer):
    """The tokenizer's Rust backend, without truncation or padding baked into tokenizer.json."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: loss masks need its char offsets")
    if backend.truncation is not None or backend.padding is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer stays as it was
        backend.no_truncation()
        backend.no_padding()
    return backend


def special_lookup(tokenizer) -> np.ndarray:
    """bool[id] = the id is a special token (end-of-turn candidates: <|im_end|>, <|eot_id|>, </s>, ...)."""
    ids = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    ids.update(tokenizer.all_special_ids)
    lut = np.zeros(max(len(tokenizer), max(ids, default=0) + 1), dtype=bool)
    lut[list(ids)] = True
    return lut


def _token_at(enc, start: int, end: int, forward: bool) -> int | None:
    """First (or last) token overlapping chars [start, end); steps over chars no token covers
    (whitespace a Metaspace tokenizer folds into the next token, trimmed offsets).

    char_to_token names the FIRST token of a char, but a byte-level tokenizer may spell one char
    (an emoji, a CJK character) as several byte tokens that all cover it: going backward, the last
    token is the last of those, or a reply ending in an emoji would keep only its first byte."""
    positions = range(start, end) if forward else range(end - 1, start - 1, -1)
    for pos in positions:
        tok = enc.char_to_token(pos)
        if tok is not None:
            if not forward:
                while tok + 1 < len(enc) and _covers(enc.token_to_chars(tok + 1), pos):
                    tok += 1
            return tok
    return None


def _covers(chars, pos: int) -> bool:
    return chars is not None and chars[0] <= pos < chars[1]


def encode_views(backend, views: list[View], special: np.ndarray, extend_eot: bool) -> Encoded:
    encs = backend.encode_batch([v.text for v in views], add_special_tokens=False)
    lens = np.fromiter((len(e) for e in encs), dtype=np.int64, count=len(encs))
    n = int(lens.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=n)
    base = [0, *np.cumsum(lens[:-1]).tolist()]  # first token of each view (plain ints: fast per-span math)

    # Token bounds of every span: [first, last + 1) over the span, the same over its trimmed end,
    # and the token holding the char right after it (for markers that leave out the end-of-turn).
    rows = []
    for v, (view, enc) in enumerate(zip(views, encs)):
        for start, end, trim in view.spans:
            first = _token_at(enc, start, end, True)
            if first is None:
                continue
            last = _token_at(enc, start, end, False)
            trim_last = _token_at(enc, start, trim, False) if trim > start else None
            after = enc.char_to_token(end) if end < len(view.text) else None
            rows.append((base[v] + first, base[v] + last + 1,
                         base[v] + (first if trim_last is None else trim_last + 1),
                         -1 if after is None else base[v] + after))
    if not rows:
        return Encoded(ids, np.zeros(n, dtype=bool), lens)
    first, stop, trim_stop, after = np.array(rows, dtype=np.int64).T

    # A turn ends with its last special token (the end-of-turn); text after it is template formatting.
    is_special = special[ids]
    last_special = np.maximum.accumulate(np.where(is_special, np.arange(n), -1))
    ls = last_special[stop - 1]
    has_special = ls >= first
    end = np.where(has_special, ls + 1, trim_stop)
    if extend_eot:
        # generation markers around the content only: take the special token that directly follows
        adjacent = ~has_special & (after == stop) & is_special[np.minimum(stop, n - 1)]
        end = end + adjacent
    delta = np.bincount(first, minlength=n + 1) - np.bincount(end, minlength=n + 1)
    mask = np.cumsum(delta[:n]) > 0
    return Encoded(ids, mask, lens)
