"""The draft vocabulary: the target ids the draft's lm_head can emit (DESIGN.md, "Vocab map").

Counts come from loss-masked tokens only (what the target generates, which is what the draft must
guess), computed by DuckDB straight from tokenized Parquet on the object store, one shard at a time
so a caller can cache each shard's counts under the shard's fingerprint; the fan-in just sums them.

    d2t[draft_id] = target_id - draft_id      (int64 [draft_vocab], EAGLE-3's offset convention)
    t2d[target_id] = target_id is in the draft vocab   (bool [target_vocab])
"""

from __future__ import annotations

from typing import BinaryIO, Sequence

import numpy as np
import torch

from training.configs import VocabConfig

VOCAB_MAP_KEYS = ("d2t", "t2d", "counts")


VOCAB_COVERAGE = 0.999  # share of the masked tokens the draft vocabulary must cover
VOCAB_MULTIPLE = 64
MAX_DRAFT_VOCAB = 32000


def count_masked_tokens(con, parquet_path, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: how often each target id is a loss-masked token in the Parquet file(s).

    `con` is a DuckDB connection that can read `parquet_path` (ObjectStore.duckdb() registers the
    s3 filesystem; a path, URL or list of them works). Two unnests in one SELECT walk input_ids and
    loss_mask in step, so DuckDB does the counting without the rows ever reaching Python.
    """
    res = con.execute(
        "SELECT tok, count(*) AS n FROM ("
        "  SELECT unnest(input_ids) AS tok, unnest(loss_mask) AS m FROM read_parquet(?)"
        ") WHERE m = 1 GROUP BY tok",
        [parquet_path],
    ).fetchnumpy()
    toks = np.asarray(res["tok"], dtype=np.int64)
    counts = np.zeros(vocab_size, dtype=np.int64)
    if toks.size:
        if toks.min() < 0 or toks.max() >= vocab_size:
            bad = int(toks.max() if toks.max() >= vocab_size else toks.min())
            raise ValueError(f"{parquet_path}: token id {bad} outside the target vocab of {vocab_size}")
        counts[toks] = np.asarray(res["n"], dtype=np.int64)
    return counts


def draft_vocab_size_by_coverage(counts: Sequence[int] | np.ndarray, *, coverage: float = VOCAB_COVERAGE,
                     cap: int = MAX_DRAFT_VOCAB, multiple: int = VOCAB_MULTIPLE) -> int:
    """Draft vocabulary size for masked-token `counts` (int [target_vocab]): the fewest most
    frequent ids covering `coverage` of the masked tokens, rounded up to `multiple`, at most
    `cap` and the target vocabulary. A head over ids the corpus never produces costs compute
    (T x draft_vocab logits per TTT step) and teaches nothing; on a 44k-token chat corpus with a
    49k-token target the fixed 32,000 cost most of the step time."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no masked tokens were counted: nothing to size a draft vocabulary by")
    ordered = np.sort(counts)[::-1]
    need = int(np.searchsorted(np.cumsum(ordered), coverage * total - 1e-9 * total)) + 1
    need = -(-need // multiple) * multiple
    return int(min(need, cap, counts.size))


def build_vocab_map(counts, draft_vocab_size: int | None) -> dict[str, torch.Tensor]:
    """Top-N target ids by masked frequency (ties to the lower id), sorted ascending; N >= vocab:
    identity; N None: draft_vocab_size_by_coverage(counts)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {counts.shape}")
    VocabConfig(draft_vocab_size)  # the one range check
    if not counts.any():
        # A draft vocabulary chosen from nothing would be ids 0..N-1, and training would find no rows.
        raise ValueError(
            f"no loss-masked tokens in the counts (target vocab {counts.size}): every tokenized row was "
            "rejected or masks nothing; see tokenized_shards' reject_reasons"
        )
    vocab = counts.size
    if draft_vocab_size is None:
        draft_vocab_size = draft_vocab_size_by_coverage(counts)
    if draft_vocab_size >= vocab:
        draft = np.arange(vocab, dtype=np.int64)
    else:
        # stable sort on -count keeps ascending id order among equal counts: ties go to the lower id
        draft = np.sort(np.argsort(-counts, kind="stable")[:draft_vocab_size])
    t2d = np.zeros(vocab, dtype=bool)
    t2d[draft] = True
    return {
        "d2t": torch.from_numpy(draft - np.arange(draft.size, dtype=np.int64)),
        "t2d": torch.from_numpy(t2d),
        "counts": torch.from_numpy(counts.copy()),
    }


def coverage(counts, t2d) -> float:
    """Share of masked target tokens whose id is in the draft vocab; ValueError when there are none
    (covering nothing is no evidence of coverage, so it is not reported as 1.0)."""
    counts = np.asarray(counts, dtype=np.int64)
    t2d = np.asarray(t2d, dtype=bool)
    total = int(counts.sum())
    if not total:
        raise ValueError("coverage of 0 masked tokens is undefined: there is nothing to cover")
    return float(counts[t2d].sum()) / total


def check_vocab_map(vmap: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless d2t, t2d and counts describe one consistent draft vocabulary."""
    missing = [k for k in VOCAB_MAP_KEYS if k not in vmap]
    if missing:
        raise ValueError(f"vocab map lacks {missing}")
    d2t, t2d, counts = vmap["d2t"], vmap["t2d"], vmap["counts"]
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool or counts.dtype != torch.int64:
        raise ValueError(f"vocab map dtypes d2t={d2t.dtype} t2d={t2d.dtype} counts={counts.dtype}; "
                         "expected int64, bool, int64")
    if t2d.shape != counts.shape:
        raise ValueError(f"t2d {tuple(t2d.shape)} and counts {tuple(counts.shape)} disagree on the target vocab")
    if not torch.equal(draft_to_target(d2t), torch.nonzero(t2d).flatten()):
        raise ValueError("d2t does not map the draft ids onto exactly the ascending target ids where t2d is true")


def draft_to_target(d2t: torch.Tensor, device=None) -> torch.Tensor:
    """The target id of every draft id: target_id = draft_id + d2t[draft_id] (DESIGN.md, "Vocab map")."""
    d2t = d2t.to(device or d2t.device, torch.long)
    return torch.arange(d2t.numel(), device=d2t.device) + d2t


def save_vocab_map(vmap: dict[str, torch.Tensor], f: BinaryIO | None = None) -> bytes:
    """safetensors bytes of the map (also written to `f`, e.g. an ArtifactWriter file, if given)."""
    from safetensors.torch import save

    check_vocab_map(vmap)
    data = save({k: vmap[k].contiguous() for k in VOCAB_MAP_KEYS})
    if f is not None:
        f.write(data)
    return data


def load_vocab_map(data: bytes | BinaryIO) -> dict[str, torch.Tensor]:
    """The map from safetensors bytes (or a readable file), checked for consistency."""
    from safetensors.torch import load

    if hasattr(data, "read"):
        data = data.read()
    vmap = load(data)
    check_vocab_map(vmap)
    return vmap


def read_vocab_map(store, key: str) -> dict[str, torch.Tensor]:
    """The checked map from the object store: `key` is a .safetensors key, or the prefix of a vocab_map
    artifact whose manifest names exactly one .safetensors file. FileNotFoundError / ValueError name
    the key."""
    if not key.endswith(".safetensors"):
        manifest = store.manifest(key)
        if manifest is None:
            raise FileNotFoundError(f"no vocab map at {store.url(key)}: neither a .safetensors key nor a "
                                    "complete artifact prefix")
        tensors_files = [n for n in manifest.names() if n.endswith(".safetensors")]
        if len(tensors_files) != 1:
            raise ValueError(f"vocab-map artifact {key} holds {tensors_files}; expected one safetensors file")
        key = manifest.key(tensors_files[0])
    try:
        return load_vocab_map(store.read_bytes(key))
    except ValueError as err:
        raise ValueError(f"{store.url(key)}: {err}") from err
