"""torchrun entry point: train an EAGLE-3 draft from a TrainJob (training/job.py) in JSON.

    python -m training.train_main job.json                                  # one process
    torchrun --nproc_per_node 8 -m training.train_main job.json             # data parallel

Rank 0 writes checkpoints, metrics, `{run_prefix}/result.json` (TrainResult.summary) and the
export; every rank builds the same draft from the seed (DDP broadcasts rank 0's anyway).
`launch(job, nproc)` runs a job in-process (nproc 1) or under torchrun and returns result.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from training.job import TrainJob
from training.storage import ObjectStore
from training.online import OnlineBatchSource
from training.recipe import draft_width
from training.targets.config import TargetFacts
from training.trainer import train
from training.vocab import read_vocab_map


def build_offline_source(hidden_states: Sequence[str], store: ObjectStore):
    """HiddenStateDataset over hidden_states artifact prefixes."""
    from training.hidden_states import HiddenStateDataset

    manifests = []
    for prefix in hidden_states:
        m = store.manifest(prefix)
        if m is None:
            raise FileNotFoundError(f"hidden-state artifact {store.url(prefix)} has no manifest")
        manifests.append(m)
    return HiddenStateDataset(store, manifests)


def build_online_source(job: TrainJob, store: ObjectStore, aux_layer_ids, device: torch.device):
    """OnlineBatchSource: the job's tokenized data with its target loaded on this rank's device."""
    target = job.target.load(device=str(device))
    return OnlineBatchSource(target, job.tokenized, aux_layer_ids=aux_layer_ids, store=store)


def run(job: TrainJob, log=print):
    """Build draft, source and heads from the job and train; returns the TrainResult."""
    from training.targets.weights import load_head_weights, model_dir

    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if job.threads:
        torch.set_num_threads(int(job.threads))
    store = ObjectStore(job.store_root)
    target_dir = model_dir(job.target.weights_dir())  # a local directory, or the hub snapshot of an id
    target_config = json.loads((target_dir / "config.json").read_text())
    embed, lm_head = load_head_weights(str(target_dir))
    vmap = read_vocab_map(store, job.vocab_map)
    d2t, t2d = vmap["d2t"], vmap["t2d"]
    aux_ids = job.aux_layer_ids
    offline = build_offline_source(job.hidden_states, store) if job.hidden_states else None
    if offline is not None:
        # The draft must be exported with the layers its features came from.
        stored = tuple(offline.aux_layer_ids)
        if aux_ids is not None and tuple(aux_ids) != stored:
            raise ValueError(f"aux_layer_ids {aux_ids} differ from the hidden states' {stored}")
        aux_ids = stored
    draft, draft_cfg = build_draft(job, target_config, embed, lm_head, t2d, vmap, aux_ids, device)
    if offline is not None and offline.hidden_size != draft_cfg.target_hidden_size:
        raise ValueError(f"hidden states have H={offline.hidden_size}, the target config {draft_cfg.target_hidden_size}")
    if job.init_from:
        warm_start(draft, store, job.init_from, log=log if rank == 0 else (lambda _: None))
    source = offline or build_online_source(job, store, draft_cfg.aux_layer_ids, device)
    result = train(job.train, source, draft, lm_head, t2d, store, job.run_prefix,
                   log=log if rank == 0 else (lambda _: None), resume=job.resume, loss_fn=family_loss(job.draft_family))
    if rank == 0:
        if job.export_dir and job.draft_family == "dflash":
            from training.dflash.export import export_dflash

            export_dflash(draft, d2t, t2d, target_config, job.export_dir)
        elif job.export_dir:
            from training.export import export_draft

            export_draft(draft, d2t, t2d, target_config, job.export_dir, include_embed=job.export_embed_tokens)
        store.write_json(f"{job.run_prefix.strip('/')}/result.json", result.summary())
    return result


def build_draft(job: TrainJob, target_config: dict, embed, lm_head, t2d, vmap, aux_ids, device):
    """The job's draft, of its family, seeded alike on every rank -> (draft, its config)."""
    torch.manual_seed(job.train.seed)  # same init on every rank and on every resume (then overwritten)
    if job.draft_family == "dflash":
        from training.dflash.model import DFlashConfig, DFlashDraft, mask_token_for

        cfg = DFlashConfig.from_target_config(
            target_config, int(t2d.sum()), mask_token_for(vmap["counts"]), layer_ids=aux_ids,
            num_layers=job.dflash_layers, intermediate_size=job.draft_intermediate_size,
            block_size=job.train.ttt_length + 1)
        draft = DFlashDraft(cfg, embed).to(device)
    else:
        from training.eagle3.model import DraftConfig, Eagle3Draft

        facts = TargetFacts.from_config(target_config)
        hidden, inter = draft_width(facts.hidden_size, facts.intermediate_size, job.draft_hidden_size,
                                    job.draft_intermediate_size)
        cfg = DraftConfig.from_target_config(target_config, int(t2d.sum()), aux_ids, inter, hidden)
        draft = Eagle3Draft(cfg, embed).to(device)
    if job.head_init == "target":  # a warm start or a resumed checkpoint overwrites it
        draft.init_head_from_target(lm_head, t2d)
    return draft, cfg


def family_loss(family: str):
    """The training objective of a draft family (the trainer's loss_fn)."""
    if family == "dflash":
        from training.dflash.loss import dflash_forward

        return dflash_forward
    from training.eagle3.loss import ttt_forward

    return ttt_forward


def warm_start(draft, store: ObjectStore, key: str, log=print) -> None:
    """Start from an earlier export's weights (store key of its model.safetensors), e.g. when only
    new data arrived. Every trainable tensor must be there with its shape: a changed draft vocab
    or hidden size is a new model, not a warm start."""
    from safetensors.torch import load

    exported = load(store.read_bytes(key))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if not p.requires_grad:
                continue
            if name not in exported or exported[name].shape != p.shape:
                got = tuple(exported[name].shape) if name in exported else "missing"
                raise ValueError(f"warm start from {store.url(key)}: {name} is {got}, the draft needs {tuple(p.shape)}")
            p.copy_(exported[name].to(p.dtype))
    log(f"warm start from {store.url(key)}")


def launch(job: TrainJob, nproc: int = 1, *, log=print) -> dict:
    """Run a job and return its result.json: in this process for nproc 1, else under
    `torchrun --standalone --nproc_per_node nproc -m training.train_main` (rank 0's output is
    streamed to `log`). What the draft_model asset calls."""
    if nproc <= 1:
        return run(job, log=log).summary()
    with tempfile.TemporaryDirectory(prefix="specdraft-train-") as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(job.to_json())
        # torchrun pins OMP_NUM_THREADS=1 unless told otherwise: give each rank its share instead.
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "training.train_main", str(path)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        tail: list[str] = []
        try:
            for line in proc.stdout:
                log(line.rstrip())
                tail = (tail + [line])[-50:]
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: torchrun and its ranks only
            proc.wait()
            raise
        if rc != 0:
            raise RuntimeError(f"torchrun ({nproc} processes) exited with {rc}:\n{''.join(tail)}")
    return ObjectStore(job.store_root).read_json(f"{job.run_prefix.strip('/')}/result.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    job = TrainJob.from_json(Path(argv[0]).read_text())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        run(job, log=lambda line: print(line, flush=True))
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
