"""Each stage's settings, written once: names, types, defaults, checks and descriptions.

The library takes these dataclasses, and the Dagster layer generates its Config classes from them
(spec_assets/stage_config.py), so the launchpad, the run config, `specdraft run -c` and the
fingerprints all see the fields defined here. Standard library only: the code location imports this
module and must load in seconds. The trainer's TrainConfig lives with its recipe (training/recipe.py)
and is built the same way.

A field's description is `setting(default, doc)`: Dagster shows it beside the field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a description (read by spec_assets/stage_config.py)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class SplitConfig:
    """source_corpus: the held-out split."""

    heldout_fraction: float = setting(0.05, "Share of conversations (chosen by a hash of their id) kept out of "
                                            "training for eval_report.")
    heldout_seed: int = setting(0, "Seed of the held-out hash.")

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout fraction must be in [0, 1), got {self.heldout_fraction}")


class ResampleError(RuntimeError):
    """Resampling cannot go on (the backend failed, bad config); finished batches stay saved."""


DEFAULT_TEMPERATURES = {0.0: 0.4, 0.7: 0.3, 1.0: 0.3}


def check_mixture(mixture: dict) -> dict[float, float]:
    """{temperature: share} with float keys, non-negative shares summing to 1."""
    if not mixture:
        raise ResampleError("the temperature mixture is empty")
    out: dict[float, float] = {}
    for t, w in mixture.items():
        t, w = float(t), float(w)
        if t < 0 or w < 0:
            raise ResampleError(f"temperature {t} with share {w}: both must be >= 0")
        out[t] = out.get(t, 0.0) + w
    total = sum(out.values())
    if total <= 0:
        raise ResampleError("the temperature mixture's shares sum to 0")
    return {t: w / total for t, w in sorted(out.items())}


@dataclass
class ResampleConfig:
    """resampled_corpus: how assistant turns are regenerated."""

    temperatures: dict[float, float] = setting(DEFAULT_TEMPERATURES, "Share of rows per sampling temperature "
                                               "(temperature -> share; Dagster config keys are strings).")
    max_new_tokens: int = setting(160, "Tokens generated per assistant turn at most.")
    top_p: float = setting(1.0, "Nucleus sampling threshold, in (0, 1].")
    on_length: str = setting("flag", "A row with a turn cut at max_new_tokens: 'flag' keeps it (finish_reason "
                                     "'length'), 'drop' rejects it.")
    keep_reasoning: bool = setting(True, "False strips <think>...</think> from replies (and drops their token ids).")
    batch_size: int | None = setting(None, "Rows per batch, the unit progress is saved in; None: the generation "
                                           "backend's own (hf, openai 32; vllm 256).")
    seed: int = setting(0, "Seed of the per-row temperature and per-turn sampling draws.")
    replies_per_prompt: int = setting(1, "Target-written rows per conversation: the row itself and n - 1 copies "
                                         "(ids '{id}~reply{j}') answered again at the mixture's temperatures above "
                                         "0. More target-written data for a small corpus (bench_real_chat).")
    written_prompts: int = setting(0, "Prompts the target writes per conversation (ids '{id}~prompt{j}'): after the "
                                      "row's system turns the target continues its template's user-turn opening "
                                      "at T=1 (the Magpie recipe), then answers that prompt at the mixture's "
                                      "temperatures. Target-written data on topics beyond a small corpus's.")

    def __post_init__(self):
        # Keys arrive as strings from Dagster/JSON config; normalise once here.
        self.temperatures = check_mixture(self.temperatures)
        if self.replies_per_prompt < 1:
            raise ResampleError(f"replies_per_prompt must be at least 1, got {self.replies_per_prompt}")
        if self.written_prompts < 0:
            raise ResampleError(f"written_prompts must be at least 0, got {self.written_prompts}")
        if self.replies_per_prompt > 1 and not any(t > 0 and w > 0 for t, w in self.temperatures.items()):
            raise ResampleError(f"replies_per_prompt={self.replies_per_prompt} needs a temperature above 0 in "
                                f"the mixture {self.temperatures}: greedy copies would repeat the first reply")
        if self.on_length not in ("drop", "flag"):
            raise ResampleError(f"on_length must be 'drop' or 'flag', got {self.on_length!r}")
        if self.max_new_tokens < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise ResampleError("max_new_tokens and batch_size must be at least 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ResampleError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class TokenizeConfig:
    """tokenized_shards: input_ids and loss masks. chat_template_kwargs and vocab_size come from the
    target resource (shared with resampling and evaluation), not from the step's config."""

    max_length: int = setting(2048, "Tokens per row at most (longer rows are truncated and counted).")
    template: str = setting("auto", "auto: the tokenizer's chat template if it has one, else plain; chat; plain.")
    chat_template_kwargs: dict = setting({}, "Passed to the chat template, e.g. {'enable_thinking': False}.")
    use_generated_ids: bool = setting(True, "Resampled rows: train on the target's own reply ids "
                                            "(False: re-encode the text).")
    vocab_size: int | None = setting(None, "The target's vocab: an id >= it is an error naming the row.")


@dataclass(frozen=True)
class VocabConfig:
    """vocab_map: the draft vocabulary."""

    draft_vocab_size: int | None = setting(None, "Draft lm_head rows. None: the fewest most frequent ids covering "
                                                 "99.9% of the masked tokens, rounded up to 64, at most 32,000.")

    def __post_init__(self):
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be positive, got {self.draft_vocab_size}")


FEATURE_DTYPES = ("bf16", "fp8")


@dataclass(frozen=True)
class FeatureConfig:
    """hidden_states: how target features are written."""

    max_tokens_per_batch: int = setting(8192, "Token budget of one packed target forward.")
    part_bytes: int = setting(1 << 30, "A part's size bound (one sequence larger than it gets a part alone).")
    dtype: str = setting("bf16", "bf16 | fp8 (e4m3 with per-row scales).")
    aux_layer_ids: tuple[int, ...] = setting((), "HF hidden_states ids; empty (or None): the draft family's default "
                                                 "(training/aux_layers.py; EAGLE-3: (2, L//2, L-3)).")
    draft_family: str = setting("eagle3", "eagle3 | dflash: whose target layers to store (part of the fingerprint).")

    def __post_init__(self):
        object.__setattr__(self, "aux_layer_ids", tuple(int(i) for i in self.aux_layer_ids or ()))  # None: the default
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {FEATURE_DTYPES}, got {self.dtype!r}")


@dataclass
class EvalConfig:
    """eval_report: decoding, prompts and the quality gate. `evaluate` reads the decoding fields;
    max_prompts, gate_k, min_tau and compare_families are for its caller (prompts.stratified_prompts,
    report.write_report and report.gate, spec_assets.evaluation.compared_drafts) and recorded with
    the result."""

    ks: list[int] = setting([1, 2, 3, 4, 5, 6, 7], "Draft lengths measured.")
    temperatures: list[float] = setting([0.0, 1.0], "Sampling temperatures measured.")
    max_new_tokens: int = setting(64, "Tokens decoded per prompt.")
    seed: int = setting(0, "Sampling seed.")
    max_prompts: int = setting(24, "Held-out prompts drawn, stratified by domain.")
    gate_k: int = setting(4, "The quality gate: tau at this k (lowest temperature) must beat prompt lookup's ...")
    min_tau: float = setting(1.5, "... and reach this.")
    max_prompt_tokens: int = setting(1024, "Longer prompts keep their last tokens (bounds CPU prefill).")
    prompt_lookup_max: int = setting(3, "Largest n-gram of the prompt-lookup baseline.")
    prompt_lookup_min: int = setting(1, "Smallest n-gram of the prompt-lookup baseline.")
    history_max_new_tokens: int = setting(256, "Question files: length of the target's own replies before "
                                               "later turns.")
    argmax_draft: bool = setting(False, "Sampled runs: propose the draft's argmax (vLLM's way) instead of "
                                        "sampling it.")
    ignore_eos: bool = setting(False, "Generate max_new_tokens whatever the target says (fixed-length timing).")
    warmup: bool = setting(True, "One short untimed run first, so lazy init does not land in the first prompt.")
    compare_families: bool = setting(True, "eval_report: also simulate the newest draft of each other family "
                                           "(eagle3 | dflash) trained on the same data (the same vocab_map), "
                                           "beside the evaluated one; only the evaluated one is gated and released.")
    served: bool = setting(True, "Also decode the prompts in real vLLM with the export (method eagle3 or dflash, the export's) at every k "
                                 "and temperature when vLLM is installed: served tau beside the simulated one.")

    def __post_init__(self):
        self.ks = sorted({int(k) for k in self.ks})
        self.temperatures = sorted({float(t) for t in self.temperatures})
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be positive, got {self.ks}")
        if not self.temperatures or self.temperatures[0] < 0:
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
