"""Training checkpoints in the object store: safetensors + JSON, no pickles, atomic, prunable.

Layout under a run prefix:
```
{run}/checkpoints/step-00000500/manifest.json        written last by store.artifact (complete or absent)
{run}/checkpoints/step-00000500/attempt-.../model.safetensors      draft trainable weights
                                         .../optimizer.safetensors  optimizer state tensors, flattened
                                         .../optimizer.json         param groups + non-tensor state + names
                                         .../rng.safetensors        generator states (uint8 tensors)
                                         .../state.json             step, epoch, batch position, config, metrics
{run}/checkpoints/latest.json                        pointer, replaced only after a manifest is complete
```
A writer killed at any moment leaves either the previous pointer (to a complete checkpoint) or
the new one; a reader follows the pointer and checks every file's sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from training.storage import ObjectStore, StoreError

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_prefix(run_prefix: str) -> str:
    return f"{run_prefix.strip('/')}/{CKPT_DIR}"


def checkpoint_prefix(run_prefix: str, step: int) -> str:
    return f"{checkpoints_prefix(run_prefix)}/step-{step:08d}"


# -- optimizer state <-> (tensors, json) ---------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"optimizer state value of type {type(v).__name__} is not JSON-serializable")


def flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> ({"state.<pid>.<key>": tensor}, JSON index of the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                # clone: safetensors refuses tensors that share storage, and a copy decouples
                # the bytes we write from an optimizer that keeps stepping.
                tensors[f"state.{pid}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = _jsonable(value)
    index = {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars,
             "state_ids": sorted(int(p) for p in sd["state"])}
    return tensors, index


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], index: dict) -> dict:
    state: dict[int, dict[str, Any]] = {pid: {} for pid in index["state_ids"]}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state[int(pid)][key] = t
    for pid, entries in index["scalars"].items():
        state[int(pid)].update(entries)
    groups = []
    for g in index["param_groups"]:
        # JSON turned tuples (betas) into lists; torch's own state_dict has tuples.
        groups.append({k: (tuple(v) if isinstance(v, list) and k not in ("params", "param_names") else v)
                       for k, v in g.items()})
    return {"state": state, "param_groups": groups}


# -- save / load ---------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    step: int
    prefix: str
    model: dict[str, torch.Tensor]
    optimizer: dict          # ready for optimizer.load_state_dict
    param_names: list[str]   # names in optimizer order, checked against the live model on resume
    rng: dict[str, torch.Tensor]
    state: dict              # state.json


def save_checkpoint(
    store: ObjectStore,
    run_prefix: str,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    param_names: list[str],
    rng: dict[str, torch.Tensor],
    state: dict,
    keep: int = 2,
) -> str:
    """Write one checkpoint, then move the latest pointer to it, then prune old ones."""
    prefix = checkpoint_prefix(run_prefix, step)
    opt_tensors, opt_index = flatten_optimizer_state(optimizer_state)
    opt_index["param_names"] = list(param_names)
    model_cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    fp = hashlib.sha256(f"{run_prefix}:{step}".encode()).hexdigest()[:24]
    with store.artifact(prefix, fp) as w:
        w.write_bytes("model.safetensors", st_save(model_cpu, metadata={"step": str(step)}))
        w.write_bytes("optimizer.safetensors", st_save(opt_tensors))
        w.write_json("optimizer.json", opt_index)
        w.write_bytes("rng.safetensors", st_save({k: v.contiguous() for k, v in rng.items()}))
        w.write_json("state.json", state)
        w.summary = {"step": step}
    # The pointer moves only after the manifest exists: a reader never follows it to a partial one.
    store.write_json(f"{checkpoints_prefix(run_prefix)}/{LATEST}", {"step": step, "prefix": prefix})
    prune_checkpoints(store, run_prefix, keep=keep, protect=prefix)
    return prefix


def list_checkpoints(store: ObjectStore, run_prefix: str) -> list[tuple[int, str]]:
    """(step, prefix) of the step folders under the run, complete or not, ascending."""
    found = []
    for key in store.list(checkpoints_prefix(run_prefix)):
        m = _STEP_DIR.match(key.rsplit("/", 1)[-1])
        if m:
            found.append((int(m.group(1)), key))
    return sorted(found)


def prune_checkpoints(store: ObjectStore, run_prefix: str, *, keep: int, protect: str) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and dead (manifest-less)
    folders below the one just written. A dead folder above it is left alone: the run will
    reach that step again and the artifact writer replaces it then."""
    protect = protect.strip("/")
    ckpts = list_checkpoints(store, run_prefix)
    top = max((s for s, k in ckpts if k.strip("/") == protect), default=None)
    complete = [(s, k) for s, k in ckpts if store.manifest(k) is not None]
    survivors = {k for _, k in complete[-max(1, keep):]} | {protect}
    for s, key in ckpts:
        if key.strip("/") not in survivors and (top is None or s < top):
            store.delete(key)


def latest_checkpoint_prefix(store: ObjectStore, run_prefix: str) -> str | None:
    """Where the pointer says; without a pointer (killed between manifest and pointer, or an older
    layout), the newest step folder whose manifest is complete."""
    pointer = f"{checkpoints_prefix(run_prefix)}/{LATEST}"
    if store.exists(pointer):
        return store.read_json(pointer)["prefix"]
    for _, key in reversed(list_checkpoints(store, run_prefix)):
        if store.manifest(key) is not None:
            return key
    return None


def _read_checked(store: ObjectStore, manifest, name: str) -> bytes:
    data = store.read_bytes(manifest.key(name))
    if hashlib.sha256(data).hexdigest() != manifest.files[name]["sha256"]:
        raise StoreError(f"{store.url(manifest.key(name))}: sha256 differs from its manifest")
    return data


def _load_tensors(store: ObjectStore, manifest, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; anything else (a torch.save pickle) is refused, never unpickled."""
    try:
        return st_load(_read_checked(store, manifest, name))
    except StoreError:
        raise
    except Exception as exc:  # safetensors' SafetensorError: not a safetensors file
        raise StoreError(f"{store.url(manifest.key(name))} is not a safetensors file ({type(exc).__name__}: {exc}); "
                         "checkpoints are loaded as safetensors only, never unpickled") from exc


def load_checkpoint(store: ObjectStore, run_prefix: str, prefix: str | None = None) -> Checkpoint | None:
    """The latest complete checkpoint of the run (or the one at `prefix`), or None if there is none."""
    prefix = prefix or latest_checkpoint_prefix(store, run_prefix)
    if prefix is None:
        return None
    manifest = store.manifest(prefix)
    if manifest is None:
        raise StoreError(f"checkpoint {store.url(prefix)} has no manifest (the pointer must follow a complete one)")
    model = _load_tensors(store, manifest, "model.safetensors")
    opt_tensors = _load_tensors(store, manifest, "optimizer.safetensors")
    opt_index = json.loads(_read_checked(store, manifest, "optimizer.json"))
    rng = _load_tensors(store, manifest, "rng.safetensors")
    state = json.loads(_read_checked(store, manifest, "state.json"))
    return Checkpoint(
        step=int(state["step"]), prefix=prefix, model=model,
        optimizer=unflatten_optimizer_state(opt_tensors, opt_index),
        param_names=list(opt_index["param_names"]), rng=rng, state=state,
    )


def clear_run(store: ObjectStore, run_prefix: str) -> None:
    """Forget a run's checkpoints and best weights (a fresh start must not later resume from an older run)."""
    store.delete(checkpoints_prefix(run_prefix))
    store.delete(best_prefix(run_prefix))


def best_prefix(run_prefix: str) -> str:
    return f"{run_prefix.strip('/')}/best"


def save_best(store: ObjectStore, run_prefix: str, *, step: int, model_state: dict[str, torch.Tensor],
              record: dict) -> str:
    """The trainable weights of the best held-out epoch so far (one artifact, replaced each time):
    what export_checkpoint=best exports. `record` is the validation record that made it best."""
    prefix = best_prefix(run_prefix)
    model_cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    fp = hashlib.sha256(f"{run_prefix}:best:{step}".encode()).hexdigest()[:24]
    with store.artifact(prefix, fp) as w:
        w.write_bytes("model.safetensors", st_save(model_cpu, metadata={"step": str(step)}))
        w.write_json("record.json", record)
        w.summary = {"step": step}
    return prefix


def load_best(store: ObjectStore, run_prefix: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(weights, validation record) saved by save_best, or None."""
    manifest = store.manifest(best_prefix(run_prefix))
    if manifest is None:
        return None
    return _load_tensors(store, manifest, "model.safetensors"), json.loads(_read_checked(store, manifest, "record.json"))
