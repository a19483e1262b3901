"""Read single tensors from a model's safetensors without loading the model.

The draft copies the target's embedding (frozen) and scores against its lm_head; both are a few
hundred MB of a model that may be hundreds of GB, so we open only the shard holding each tensor
(safetensors mmaps; get_tensor reads just that tensor's bytes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from training.targets.base import TargetError

# Names in the order we prefer them; multimodal checkpoints nest the LM under language_model.
EMBED_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "transformer.wte.weight",
    "embed_tokens.weight",
)
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "output.weight")
FINAL_NORM_NAMES = (
    "model.norm.weight",
    "model.language_model.norm.weight",
    "language_model.model.norm.weight",
    "transformer.ln_f.weight",
    "norm.weight",
)


def model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local directory for `name_or_path`: itself, or the hub snapshot of its json and safetensors files."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=["*.json", "*.safetensors"]))


def weight_map(directory: Path) -> dict[str, Path]:
    """tensor name -> file, from the sharded index or by reading the headers of every safetensors file."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in names.items()}
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise TargetError(f"no safetensors weights in {directory}")
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            found.update({name: f for name in st.keys()})
    return found


def read_tensors(files: dict, names: Sequence[str]) -> dict:
    from safetensors import safe_open

    missing = [n for n in names if n not in files]
    if missing:
        raise TargetError(f"no tensors {missing} in the model's safetensors")
    out = {}
    for name in names:
        with safe_open(str(files[name]), framework="pt") as st:
            out[name] = st.get_tensor(name)
    return out


def find_name(files: dict, candidates: Sequence[str]) -> str | None:
    return next((n for n in candidates if n in files), None)


def load_head_weights(name_or_path: str, revision: str | None = None):
    """(embed [V, H], lm_head [V, H]) in their stored dtype; tied embeddings give lm_head = embed.

    save_pretrained leaves lm_head out of a tied checkpoint, so an absent lm_head stands for the
    embedding only when the config says the embeddings are tied (`tie_word_embeddings`, read by
    the one config parser, transformers' class default where config.json omits it). An untied
    target without an lm_head tensor raises TargetError naming the model: its head is not the
    embedding, and scoring with it would train the draft on a wrong distribution."""
    directory = model_dir(name_or_path, revision)
    files = weight_map(directory)
    embed = find_name(files, EMBED_NAMES)
    if embed is None:
        raise TargetError(f"{name_or_path}: cannot find the input embedding among {EMBED_NAMES}")
    head = find_name(files, LM_HEAD_NAMES)
    if head is None:
        _require_tied(name_or_path, directory)
    tensors = read_tensors(files, [embed] + ([head] if head else []))
    return tensors[embed], tensors[head] if head else tensors[embed]


def _require_tied(name_or_path: str, directory: Path) -> None:
    from training.targets.config import TargetFacts

    config = directory / "config.json"
    if not config.exists():
        raise TargetError(f"{name_or_path}: no lm_head tensor among {LM_HEAD_NAMES} and no config.json in {directory} "
                          "to say whether the embeddings are tied")
    if not TargetFacts.from_config(json.loads(config.read_text())).tie_word_embeddings:
        raise TargetError(f"{name_or_path}: config.json has tie_word_embeddings false, but the safetensors in {directory} "
                          f"hold no lm_head tensor (looked for {list(LM_HEAD_NAMES)}); the checkpoint is incomplete "
                          "(the embedding is not the head of an untied model)")


def load_final_norm(name_or_path: str, revision: str | None = None):
    """The final RMSNorm weight [H] (for backends that capture the pre-norm last layer)."""
    files = weight_map(model_dir(name_or_path, revision))
    name = find_name(files, FINAL_NORM_NAMES)
    if name is None:
        raise TargetError(f"{name_or_path}: cannot find the final norm among {FINAL_NORM_NAMES}")
    return read_tensors(files, [name])[name]
