"""TrainJob: everything one draft training run needs, typed, and serializable to JSON for torchrun.

draft_model (spec_assets/draft.py) builds one from its config and the target resource; train_main
runs it in process or writes it to job.json for `torchrun -m training.train_main job.json`. The
target travels as the TargetSpec the target resource builds (training/targets/spec.py: backend,
device, resolved dtype, trust_remote_code, chat settings), so online training loads the very
target the pipeline uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from training.configs import setting
from training.recipe import TrainConfig
from training.targets.spec import TargetSpec

# TrainJob's fields that draft_model's Dagster config sets (spec_assets/draft.py).
DRAFT_FIELDS = ("export_embed_tokens", "head_init", "draft_intermediate_size", "draft_hidden_size", "draft_family",
                "dflash_layers")


def _known(cls, d: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; known: {sorted(names)}")
    return d


@dataclass
class TrainJob:
    """One training run. Exactly one data source: `hidden_states` (artifact prefixes: offline) or
    `tokenized` (tokenized_shards prefixes, or keys/URLs of tokenized Parquet: online, the target
    runs in the loop). Rank 0 writes checkpoints, metrics and `{run_prefix}/result.json` under
    `store_root`, and the serving export to `export_dir` if set."""

    store_root: str
    run_prefix: str
    target: TargetSpec
    vocab_map: str                       # store key of the vocab-map safetensors, or its artifact prefix
    train: TrainConfig = field(default_factory=TrainConfig)
    hidden_states: list[str] = field(default_factory=list)
    tokenized: list[str] = field(default_factory=list)
    aux_layer_ids: list[int] | None = None  # default (2, L//2, L-3); offline: must match the features'
    export_dir: str | None = None
    init_from: str | None = None         # store key of an earlier export's model.safetensors (warm start)
    # The draft's shape and export (draft_model's config takes these fields: DRAFT_FIELDS).
    export_embed_tokens: bool = setting(False, "Write embed_tokens.weight into the export too: current vLLM and "
                                               "SGLang use the target's own embedding (README 'Serving the draft').")
    head_init: str = setting("target", "lm_head starts at the target's rows of the draft vocab ('target'), or "
                                       "'random' (normal, std 0.02). bench_recipe: tau 3.30 vs 3.23 at "
                                       "k=4, T=0, on stories260K.")
    draft_intermediate_size: int | None = setting(None, "The draft's MLP width; None: recipe.draft_width's rule.")
    draft_hidden_size: int | None = setting(None, "The draft's residual width; None: recipe.draft_width's rule (the "
                                                  "target's own from 256 wide up). A wider draft keeps the target's "
                                                  "head_dim and KV heads, adds query heads, exports its own embedding.")
    draft_family: str = setting("eagle3", "eagle3 (chain drafts) | dflash (block drafts: ttt_length + 1 slots, one "
                                          "draft forward per step); set hidden_states' draft_family alike, so the "
                                          "features hold the layers it fuses.")
    dflash_layers: int = setting(1, "A DFlash draft's decoder layers.")
    resume: bool = True
    threads: int | None = None           # torch intra-op threads per process

    def __post_init__(self):
        if isinstance(self.target, dict):
            self.target = TargetSpec.from_dict(self.target)
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if bool(self.hidden_states) == bool(self.tokenized):
            raise ValueError("a TrainJob needs exactly one of hidden_states (offline) or tokenized (online), "
                             f"got {len(self.hidden_states)} hidden_states and {len(self.tokenized)} tokenized sources")
        self.hidden_states, self.tokenized = list(self.hidden_states), list(self.tokenized)
        for name in ("draft_intermediate_size", "draft_hidden_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_init not in ("target", "random"):
            raise ValueError(f"head_init must be 'target' or 'random', not {self.head_init!r}")
        if self.aux_layer_ids is not None:
            self.aux_layer_ids = [int(i) for i in self.aux_layer_ids]
        from training.aux_layers import FAMILIES

        if self.draft_family not in FAMILIES:
            raise ValueError(f"draft_family must be one of {FAMILIES}, not {self.draft_family!r}")
        if int(self.dflash_layers) < 1:
            raise ValueError(f"dflash_layers must be positive, got {self.dflash_layers}")
        if self.draft_family == "dflash" and (self.draft_hidden_size is not None or self.export_embed_tokens):
            # vLLM shares the target's embedding with a DFlash draft only at the target's width
            raise ValueError("a DFlash draft is the target's width and shares its embedding: leave "
                             "draft_hidden_size unset and export_embed_tokens off")

    @property
    def mode(self) -> str:
        return "offline" if self.hidden_states else "online"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        return cls(**_known(cls, dict(d), "TrainJob"))

    @classmethod
    def from_json(cls, text: str) -> TrainJob:
        return cls.from_dict(json.loads(text))
