"""Offline target features on object storage: the writer and the training-time reader.

Format (DESIGN.md, "Hidden-state part"): safetensors parts `part-00000.safetensors`, ... inside
one artifact, each holding whole sequences packed without padding:
  aux [T, k*H]   residual stream after `aux_layer_ids` (HF hidden_states[i]), concatenated
  last [T, H]    final post-norm state: target logits = lm_head(last)
  input_ids [T] int32, loss_mask [T] uint8, cu_seqlens [S+1] int64 (offsets of each sequence)
  header metadata: one key, "specdraft", holding a JSON object (keys sorted) of format, target
  identity, aux_layer_ids (JSON), dtype, hidden_size and counts. One key, because safetensors'
  writer puts several in a random order (safetensors issue #584) and a part's bytes must be a
  function of its content: artifacts are content-addressed and compared bitwise.
dtype "bf16" stores aux/last in bfloat16: 8H+5 bytes per token for k=3, plus 8 per sequence.
dtype "fp8" stores them in float8_e4m3fn with one float32 scale per token and per aux layer:
  aux_scale [T, k], last_scale [T]; value = fp8 * scale, scale = row amax / 448 (1 for a zero row).
  4H+21 bytes per token for k=3. Per-layer scales matter: layers differ by orders of magnitude.

Every value stored is finite: a batch whose features hold inf or NaN is refused (NonFiniteFeatures
names the shard, the row and the layer) before anything of it is written, so an fp8 scale never
becomes inf and a bad target never reaches training disguised as a learning-rate problem. The aux
layer ids must be ones vLLM and SGLang can feed back (training/aux_layers.py); others are refused
before the first forward.

The writer streams: peak memory is the model, one batch and the part being built (twice while
safetensors' own writer serializes it to bytes). A part never exceeds `part_bytes` unless one
sequence alone does. Parts only split between
sequences. The manifest (ArtifactWriter) is written last, so a killed writer leaves nothing a
reader trusts.

The reader streams one part at a time (a local file or one S3 object's bytes); only the part
headers and cu_seqlens are read up front, with range reads, to plan batches.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from training.aux_layers import family_layer_ids
from training.configs import FeatureConfig
from training.packing import pack_by_tokens, pack_stream

FORMAT_VERSION = "2"  # 2: written by safetensors' own writer, the metadata under METADATA_KEY
METADATA_KEY = "specdraft"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
TENSOR_NAMES = ("cu_seqlens", "aux_scale", "last_scale", "input_ids", "aux", "last", "loss_mask")


def bytes_per_token(hidden_size: int, n_aux: int = 3, dtype: str = "bf16") -> int:
    """Bytes a token costs in a part, excluding the 8 bytes per sequence of cu_seqlens and the header."""
    width = (n_aux + 1) * hidden_size
    return 2 * width + 5 if dtype == "bf16" else width + 4 * (n_aux + 1) + 5


class NonFiniteFeatures(ValueError):
    """The target produced inf/NaN features; the message names shard, row and layer."""


# -- writer ----------------------------------------------------------------------------------
def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, G, H] -> (float8_e4m3fn [T, G, H], float32 scales [T, G]), one scale per row and group.
    Scales are finite and positive: non-finite input is refused (ValueError; the writer names where
    it came from first), and a row too small for amax / 448 to be a float32 gets scale 1."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_fp8: non-finite input (inf/NaN) would make its row scale inf/NaN")
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero row, or amax/448 underflowing
    # Clamp: x/scale can round a hair past 448, and e4m3fn turns out-of-range values into NaN.
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.squeeze(-1)


def encode_features(aux: torch.Tensor, last: torch.Tensor, n_aux: int, dtype: str) -> dict[str, torch.Tensor]:
    """Storage tensors on CPU; conversion happens on the features' device, so less crosses to the host."""
    if dtype == "bf16":
        return {"aux": aux.to(torch.bfloat16).cpu(), "last": last.to(torch.bfloat16).cpu()}
    T, H = last.shape
    qa, sa = quantize_fp8(aux.reshape(T, n_aux, H))
    ql, sl = quantize_fp8(last.reshape(T, 1, H))
    return {"aux": qa.reshape(T, n_aux * H).cpu(), "aux_scale": sa.cpu(),
            "last": ql.reshape(T, H).cpu(), "last_scale": sl.reshape(T).cpu()}


def part_metadata(metadata: dict[str, str], tokens: int, sequences: int) -> dict[str, str]:
    """A part's safetensors metadata: the writer's facts and its counts, as one JSON value."""
    facts = {**metadata, "num_tokens": str(tokens), "num_sequences": str(sequences)}
    return {METADATA_KEY: json.dumps(facts, sort_keys=True, separators=(",", ":"))}


def header_bound(metadata: dict[str, str]) -> int:
    """Bytes a part's safetensors header can take at most: its 8-byte length, the compact JSON of
    every tensor entry and the metadata with each number at 12 digits, and the padding to 8."""
    big = 10 ** 12
    entry = {"dtype": "F8_E4M3", "shape": [big, big], "data_offsets": [big, big]}
    header = {"__metadata__": part_metadata(metadata, big, big), **{name: entry for name in TENSOR_NAMES}}
    return 8 + len(json.dumps(header, separators=(",", ":"))) + 8


@dataclass
class _Part:
    """Batch slices buffered for one part; serialized in one pass when the part is full."""

    chunks: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    seqlens: list[int] = field(default_factory=list)
    tokens: int = 0
    nbytes: int = 8  # data bytes so far: cu_seqlens' leading 0, then 8 per sequence + the tensors

    def add(self, tensors: dict[str, torch.Tensor], seqlens: list[int]) -> None:
        for name, t in tensors.items():
            self.chunks.setdefault(name, []).append(t)
            self.nbytes += t.nbytes
        self.seqlens += seqlens
        self.tokens += sum(seqlens)
        self.nbytes += 8 * len(seqlens)

    def write(self, f, metadata: dict[str, str]) -> int:
        """Serialize the part with safetensors' own writer into `f`; returns the bytes written."""
        from safetensors.torch import save

        cu = torch.zeros(len(self.seqlens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(self.seqlens, dtype=torch.int64).cumsum(0)
        tensors = {"cu_seqlens": cu, **{name: torch.cat(cs) for name, cs in self.chunks.items()}}
        self.chunks = {}  # the batch slices are copied: let them go before the bytes are built
        data = save(tensors, metadata=part_metadata(metadata, self.tokens, len(self.seqlens)))
        del tensors
        f.write(data)
        return len(data)


def feature_batches(rows: Iterable, max_tokens_per_batch: int, stats: dict) -> Iterator[list[tuple]]:
    """The packed batches of one target forward each, as the writer forms them: the one plan that
    the local writer and the Ray actors (ray_pool.FeatureTarget) both follow. Empty rows are
    counted in stats["skipped_empty"]."""
    return pack_stream(_clean_rows(rows, stats), max_tokens_per_batch, length=lambda r: len(r[0]))


def _clean_rows(rows: Iterable, stats: dict) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """(input_ids, loss_mask, label) per non-empty row; label = "row {index}" plus its id when given."""
    for index, row in enumerate(rows):
        input_ids, loss_mask = row[0], row[1]
        label = f"row {index}" + (f" (id {row[2]!r})" if len(row) > 2 and row[2] is not None else "")
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        mask = np.asarray(loss_mask, dtype=np.uint8).reshape(-1)
        if len(ids) != len(mask):
            raise ValueError(f"{label} has {len(ids)} input_ids but {len(mask)} loss_mask entries")
        if len(ids) == 0:
            stats["skipped_empty"] += 1
            continue
        yield ids, mask, label


def check_finite(aux: torch.Tensor, last: torch.Tensor, lengths: list[int], labels: list[str],
                 aux_layer_ids: Sequence[int], shard: str) -> None:
    """Raise NonFiniteFeatures naming shard, the first bad row (index, id), token and layer (aux id or
    'last') if aux [T, k*H] or last [T, H] holds inf/NaN; one reduction when all is finite."""
    if bool(torch.isfinite(aux).all()) and bool(torch.isfinite(last).all()):
        return
    T, H = last.shape
    bad = torch.cat([~torch.isfinite(aux.reshape(T, -1, H)).all(-1), ~torch.isfinite(last).all(-1, keepdim=True)], 1)
    t, slot = (int(v) for v in bad.nonzero()[0])
    starts = np.cumsum([0] + list(lengths))
    seq = int(np.searchsorted(starts, t, side="right")) - 1
    layer = f"aux layer {aux_layer_ids[slot]}" if slot < len(aux_layer_ids) else "layer 'last'"
    rows_hit = len({int(np.searchsorted(starts, int(x), side="right")) - 1 for x in bad.any(1).nonzero()[:, 0]})
    raise NonFiniteFeatures(
        f"hidden_states {shard}: the target's features hold inf/NaN at {labels[seq]}, token {t - int(starts[seq])} "
        f"of {lengths[seq]}, {layer} (first of {int(bad.sum())} bad token-layers in {rows_hit} row(s) of this "
        f"batch); nothing of it is stored. The target overflows on this input: check its dtype (fp16?) and weights.")


def write_hidden_states(
    target,
    rows: Iterable[tuple[Sequence[int], Sequence[int]]],
    writer,
    *,
    log: Callable[[str], None] | None = None,
    shard: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run `target` over (input_ids, loss_mask[, row id]) rows and write parts through `writer` (an ArtifactWriter).

    options: FeatureConfig fields (aux_layer_ids, max_tokens_per_batch, part_bytes, dtype).
    Returns the summary (also merged into writer.summary): tokens, sequences, bytes,
    bytes_per_token, tokens_per_s, parts, and the format facts. Raises, before the first forward,
    AuxLayerError for aux ids vLLM and SGLang cannot feed back; NonFiniteFeatures when the target
    yields inf/NaN (naming `shard`, default the writer's prefix, the row and the layer).
    """
    cfg = FeatureConfig(**options)
    dtype, part_bytes = cfg.dtype, cfg.part_bytes
    shard = shard or str(getattr(writer, "prefix", "?"))
    ids = family_layer_ids(cfg.draft_family, cfg.aux_layer_ids, target.facts.num_layers, where=f"hidden_states {shard}")
    H = target.facts.hidden_size
    metadata = {
        "format": FORMAT_VERSION,
        "target": target.identity,
        "aux_layer_ids": json.dumps(list(ids)),
        "dtype": dtype,
        "hidden_size": str(H),
    }
    if dtype == "fp8":
        metadata["fp8_scales"] = "per token and aux layer: aux_scale [T,k], last_scale [T]; x = fp8 * scale"
    reserve = header_bound(metadata)
    per_token = bytes_per_token(H, len(ids), dtype)
    if part_bytes < reserve + per_token + 16:
        raise ValueError(f"part_bytes={part_bytes} cannot hold even one token (needs > {reserve + per_token + 16})")

    stats = {"tokens": 0, "sequences": 0, "skipped_empty": 0, "parts": 0, "bytes": 0}
    part = _Part()
    start = time.perf_counter()

    def flush() -> None:
        nonlocal part
        name = f"part-{stats['parts']:05d}.safetensors"
        with writer.open(name) as f:
            stats["bytes"] += part.write(f, metadata)
        stats["parts"] += 1
        if log:
            rate = stats["tokens"] / max(time.perf_counter() - start, 1e-9)
            log(f"hidden states: wrote {name} ({part.tokens} tokens, {len(part.seqlens)} sequences); "
                f"{stats['tokens']} tokens so far, {rate:.0f} tokens/s")
        part = _Part()

    for batch in feature_batches(rows, cfg.max_tokens_per_batch, stats):
        lengths = [len(r[0]) for r in batch]
        feats = target.features([r[0].tolist() for r in batch], ids)
        check_finite(feats["aux"], feats["last"], lengths, [r[2] for r in batch], ids, shard)
        enc = encode_features(feats["aux"], feats["last"], len(ids), dtype)
        enc["input_ids"] = torch.from_numpy(np.concatenate([r[0] for r in batch]).astype(np.int32))
        enc["loss_mask"] = torch.from_numpy(np.concatenate([r[1] for r in batch]))
        del feats
        # Hand whole sequences to parts; a part closes when the next sequence would overflow it.
        s, tok = 0, 0
        while s < len(lengths):
            room = part_bytes - reserve - part.nbytes
            fit, used = 0, 0
            while s + fit < len(lengths) and used + lengths[s + fit] * per_token + 8 <= room:
                used += lengths[s + fit] * per_token + 8
                fit += 1
            if fit == 0:
                if part.tokens:
                    flush()
                    continue
                fit = 1  # one sequence bigger than a whole part gets a part of its own
            n = sum(lengths[s:s + fit])
            part.add({k: v[tok:tok + n] for k, v in enc.items()}, lengths[s:s + fit])
            s, tok = s + fit, tok + n
        stats["tokens"] += sum(lengths)
        stats["sequences"] += len(lengths)
    if part.tokens:
        flush()

    seconds = time.perf_counter() - start
    summary = {
        **stats,
        "bytes_per_token": stats["bytes"] / max(stats["tokens"], 1),
        "tokens_per_s": stats["tokens"] / max(seconds, 1e-9),
        "seconds": seconds,
        "dtype": dtype,
        "aux_layer_ids": list(ids),
        "draft_family": cfg.draft_family,  # whose layers these are: draft_model checks it names the same
        "hidden_size": H,
        "target": target.identity,
        "format": FORMAT_VERSION,
    }
    writer.summary.update(summary)
    return summary


# -- reader ----------------------------------------------------------------------------------
@dataclass
class _PartInfo:
    key: str
    offsets: np.ndarray  # cu_seqlens of the part
    metadata: dict[str, str]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def read_part_index(store, key: str) -> tuple[dict[str, str], np.ndarray]:
    """(header metadata, cu_seqlens) of one part with three small range reads, not the whole object."""
    path = store.path(key)
    (n,) = struct.unpack("<Q", store.fs.cat_file(path, start=0, end=8))
    header = json.loads(store.fs.cat_file(path, start=8, end=8 + n))
    begin, end = header["cu_seqlens"]["data_offsets"]
    raw = store.fs.cat_file(path, start=8 + n + begin, end=8 + n + end)
    return read_metadata(header.get("__metadata__"), key), np.frombuffer(raw, dtype="<i8").copy()


def read_metadata(raw: dict[str, str] | None, key: str) -> dict[str, str]:
    """The facts part_metadata stored in a part's header; ValueError naming the part otherwise."""
    try:
        return json.loads((raw or {})[METADATA_KEY])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{key}: not a hidden-state part of format {FORMAT_VERSION} (its safetensors metadata "
                         f"has no valid {METADATA_KEY!r} entry: {exc})") from None


def load_part(store, key: str) -> dict[str, torch.Tensor]:
    """A whole part: from the local file directly, or one object's bytes from S3."""
    from safetensors.torch import load as tensors_from_bytes, load_file

    local = store.local_path(key)
    if local is not None:
        return load_file(local)
    return tensors_from_bytes(store.read_bytes(key))


class HiddenStateDataset:
    """Training batches from hidden_states artifacts (one manifest per shard).

    Order for (epoch, seed): parts shuffled, sequences shuffled within each part, then packed
    greedily into batches of <= max_tokens. Ranks take disjoint contiguous runs of that batch
    list, all of the same length (the remainder is dropped), so each rank reads only about
    1/world_size of the parts; `skip` drops a rank's first batches without loading their parts.
    """

    def __init__(self, store, manifests: Sequence):
        if not manifests:
            raise ValueError("HiddenStateDataset needs at least one manifest")
        self.store = store
        self.manifests = list(manifests)
        self._parts: list[_PartInfo] | None = None

    @property
    def parts(self) -> list[_PartInfo]:
        if self._parts is None:
            parts = []
            for m in self.manifests:
                for name in m.names("part-"):
                    key = m.key(name)
                    meta, offsets = read_part_index(self.store, key)
                    parts.append(_PartInfo(key, offsets, meta))
            if not parts:
                raise ValueError("the hidden_states manifests list no parts")
            ref = parts[0].metadata
            for p in parts[1:]:
                for k in ("hidden_size", "aux_layer_ids", "dtype", "format"):
                    if p.metadata.get(k) != ref.get(k):
                        raise ValueError(f"{p.key}: {k}={p.metadata.get(k)!r} differs from {parts[0].key}'s {ref.get(k)!r}")
            self._parts = parts
        return self._parts

    @property
    def num_tokens(self) -> int:
        return int(sum(p.offsets[-1] for p in self.parts))

    @property
    def num_sequences(self) -> int:
        return sum(len(p.offsets) - 1 for p in self.parts)

    @property
    def hidden_size(self) -> int:
        return int(self.parts[0].metadata["hidden_size"])

    @property
    def aux_layer_ids(self) -> tuple[int, ...]:
        return tuple(json.loads(self.parts[0].metadata["aux_layer_ids"]))

    @property
    def dtype(self) -> str:
        return self.parts[0].metadata["dtype"]

    @property
    def target(self) -> str:
        return self.parts[0].metadata.get("target", "")

    def plan(self, max_tokens: int, epoch: int, seed: int) -> list[tuple[int, np.ndarray]]:
        """All batches of the epoch in order, as (part index, sequence indices within the part)."""
        rng = np.random.default_rng([int(seed), int(epoch)])
        batches = []
        for p in rng.permutation(len(self.parts)):
            order = rng.permutation(len(self.parts[p].offsets) - 1)
            lengths = self.parts[p].lengths[order]
            for group in pack_by_tokens(lengths, max_tokens):
                batches.append((int(p), order[group]))
        return batches

    def num_batches(self, max_tokens: int, world_size: int = 1, *, epoch: int = 0, seed: int = 0) -> int:
        """Batches per rank for (epoch, seed); packing shuffled sequences makes it vary slightly by epoch."""
        return len(self.plan(max_tokens, epoch, seed)) // world_size

    def batches(
        self,
        max_tokens: int,
        *,
        epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        skip: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield {aux [T,kH], last [T,H] (dtype, fp8 dequantized), input_ids int64, loss_mask uint8, cu_seqlens int64}."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        plan = self.plan(max_tokens, epoch, seed)
        per_rank = len(plan) // world_size
        mine = plan[rank * per_rank:(rank + 1) * per_rank][skip:]
        loaded, tensors = None, None
        for p, seqs in mine:
            if p != loaded:
                tensors = None  # drop the previous part before reading the next one
                tensors, loaded = load_part(self.store, self.parts[p].key), p
            yield self._gather(tensors, self.parts[p].offsets, seqs, dtype)

    def _gather(self, tensors: dict, offsets: np.ndarray, seqs: np.ndarray, dtype: torch.dtype) -> dict:
        starts, ends = offsets[seqs], offsets[seqs + 1]
        lengths = ends - starts
        index = torch.from_numpy(np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]))
        H = self.hidden_size
        out = {}
        for name in ("aux", "last"):
            x = tensors[name].index_select(0, index)
            if f"{name}_scale" in tensors:
                scale = tensors[f"{name}_scale"].index_select(0, index).reshape(len(index), -1, 1)
                x = (x.float().reshape(len(index), -1, H) * scale).reshape(len(index), -1)
            out[name] = x.to(dtype)
        out["input_ids"] = tensors["input_ids"].index_select(0, index).long()
        out["loss_mask"] = tensors["loss_mask"].index_select(0, index)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        cu[1:] = torch.from_numpy(lengths).cumsum(0)
        out["cu_seqlens"] = cu
        return out
