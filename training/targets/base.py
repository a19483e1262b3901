"""The one interface every target backend implements (DESIGN.md, "Target backends").

A target is the LLM the draft learns to imitate. The pipeline needs four things from it: its
architecture facts (to size and export the draft), its tokenizer, its features over packed
sequences (aux hidden states + final post-norm state, the training signal) and generations
(to resample assistant turns). A backend that cannot do one of them raises TargetError saying so.

No torch import at module level: the Dagster code location imports this package while loading.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Sequence

from training.aux_layers import default_aux_layer_ids  # noqa: F401  (re-exported: one definition)
from training.targets.config import TargetFacts, read_facts  # noqa: F401  (TargetFacts re-exported)


class TargetError(RuntimeError):
    """A target backend cannot do what was asked (missing dependency, unsupported method, bad input)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-conversation sampling. temperature 0 means greedy. seed None means not reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    """One assistant reply. finish_reason is "stop" (end-of-turn token) or "length" (max_new_tokens).

    `token_ids`: the reply's ids as sampled, without the stop token (None: the backend cannot say,
    e.g. an OpenAI server that does not return ids); `prompt_token_ids`: the ids it was generated
    after. Tokenization trains on exactly these (DESIGN.md, "Tokenized Parquet"), since re-encoding
    `text` can give other ids (a sampled non-canonical split, a sentencepiece word-start).
    """

    text: str
    finish_reason: str
    n_tokens: int
    token_ids: tuple[int, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    reasoning: str | None = None  # reasoning the server kept apart from `text` (reasoning parser); token_ids cover both
    tool_calls: str | None = None  # calls a server's tool parser took out of the reply (MESSAGE_TYPE's JSON text)


def check_aux_layer_ids(ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    ids = tuple(int(i) for i in ids)
    if not ids or any(i < 0 or i > num_layers for i in ids):
        raise TargetError(f"aux_layer_ids {ids} must be indices into hidden_states, 0..{num_layers}")
    return ids


def check_sequences(sequences: Sequence[Sequence[int]]) -> list[int]:
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) == 0:
        raise TargetError("features() needs at least one sequence and no empty sequence")
    return lengths


class TargetModel(ABC):
    """A target LLM. Construct through `load_target(name_or_path, backend)`; heavy state loads lazily."""

    backend: ClassVar[str]
    # Rows per resampling batch when ResampleConfig leaves batch_size unset. A batch is the unit that
    # resampling saves its progress in; a backend that schedules requests itself wants more of them.
    generation_batch_size: ClassVar[int] = 32
    # generate(..., tools=) shows each conversation's tool schemas to the target (its template's tools block)
    supports_tools: ClassVar[bool] = False

    def __init__(self, name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
        self.name_or_path = str(name_or_path)
        self.revision = revision
        self.trust_remote_code = trust_remote_code  # never implied: remote code runs on our machines
        self._tokenizer = None
        self._facts: TargetFacts | None = None
        self._identity: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name_or_path!r})"

    @property
    def name(self) -> str:
        return self.name_or_path

    @property
    def identity(self) -> str:
        """Stable id of the weights (path + content hash, or hub id + revision) for fingerprints and headers."""
        if self._identity is None:
            from training.fingerprint import model_identity

            self._identity = model_identity(self.name_or_path, self.revision)
        return self._identity

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.name_or_path, revision=self.revision, trust_remote_code=self.trust_remote_code
            )
        return self._tokenizer

    @property
    def facts(self) -> TargetFacts:
        if self._facts is None:
            self._facts = read_facts(self.name_or_path, revision=self.revision, trust_remote_code=self.trust_remote_code)
        return self._facts

    def default_aux_layer_ids(self) -> tuple[int, int, int]:
        return default_aux_layer_ids(self.facts.num_layers)

    def features(self, sequences: Sequence[Sequence[int]], aux_layer_ids: Sequence[int] | None = None) -> dict:
        """Packed features: {aux [T, k*H], last [T, H], cu_seqlens [S+1] int64}, T = sum of lengths, no padding."""
        raise TargetError(f"the {self.backend!r} backend cannot compute features; use 'hf' or 'vllm'")

    def logits(self, last):
        """Target logits [T, V] from `last` [T, H] (lm_head plus any final soft-capping the model applies)."""
        raise TargetError(f"the {self.backend!r} backend cannot compute logits; use 'hf' or 'vllm'")

    @abstractmethod
    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[SamplingParams]) -> list[Generation]:
        """One assistant reply per conversation; the backend applies the chat template. A backend with
        `supports_tools` also takes `tools=`: per conversation, its tool schemas (a list, JSON text or None)."""

    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> list[Generation]:
        """What the target writes after each token-id prompt, no template applied: e.g. the user turn
        after its template's own user-turn opening (resampling's written prompts). Stops where
        `generate` stops (the end-of-turn / EOS tokens); Generation as generate's."""
        raise TargetError(f"the {self.backend!r} backend cannot continue a token-id prompt; use 'hf', 'vllm' or 'openai'")

    def close(self) -> None:
        """Release models, engines and pools (a later call loads them again)."""


def apply_final_logit_transforms(logits, config: dict):
    """What some CausalLM heads do after lm_head: Granite divides, Cohere multiplies, Gemma soft-caps."""
    text = config.get("text_config") or config
    if text.get("logits_scaling"):
        logits = logits / text["logits_scaling"]
    if text.get("logit_scale"):
        logits = logits * text["logit_scale"]
    cap = text.get("final_logit_softcapping")
    if cap:
        logits = (logits / cap).tanh() * cap
    return logits


def render_prompt(tokenizer, conversation: list[dict], chat_template_kwargs: dict | None = None,
                  tools: str | list | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt.

    The tokenizer's own chat template renders it (with `chat_template_kwargs`, the clock fixed at their
    `template_date`: tokenization/templates.py template_vars); one without a template
    gets the `plain` rendering of training/tokenization/templates.py, the same text tokenization
    puts before the reply, so a generated reply and its training row share one prompt.
    """
    from training.tokenization.templates import prompt_renderer

    # The renderer tokenization uses (apply_chat_template's template and sandbox): same text, and the
    # clock of a template that reads it fixed at the settings' template_date, which apply_chat_template
    # cannot do (it passes no callable to a template).
    renderer = prompt_renderer(tokenizer, chat_template_kwargs).bind(tools)  # tools: the template's tools block
    text = renderer.render(conversation, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
