"""Draft serving export: a directory vLLM's LlamaForCausalLMEagle3 and SGLang load as-is.

config.json + model.safetensors with exactly the tensor names of DESIGN.md ("Draft serving
export"); they are the Eagle3Draft parameter names, so export and reload are plain state dicts.
The directory is written under a temporary name and renamed into place, so it is never half
written: a reader sees the previous export, the complete new one, or (killed between the two
renames of a replacement) none. The pipeline does not rely on more: draft_model copies the export
into its artifact, which its manifest commits.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from training.aux_layers import check_servable, sglang_ids, vllm_ids
from training.eagle3.model import DraftConfig, Eagle3Draft
from training.targets.config import TargetFacts

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor, draft_vocab: int, target_vocab: int) -> None:
    """d2t/t2d must describe the same draft vocab: target_id = draft_id + d2t[draft_id] lists the
    True positions of t2d in ascending order (the draft's logit order)."""
    if d2t.shape != (draft_vocab,) or t2d.shape != (target_vocab,):
        raise ValueError(f"d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} vs vocab {draft_vocab}/{target_vocab}")
    target_ids = torch.arange(draft_vocab, device=d2t.device) + d2t.to(torch.int64)
    if not torch.equal(target_ids.cpu(), t2d.to(torch.bool).nonzero().squeeze(1).cpu()):
        raise ValueError("d2t and t2d disagree (draft ids must map to the t2d tokens in ascending order)")


def check_target(cfg, target_hidden_size: int, target_config: dict) -> TargetFacts:
    """The target's facts, or ValueError when the draft (an EAGLE-3 or DFlash config) was not built for
    it: its RoPE, width or vocabulary differ."""
    facts = TargetFacts.from_config(target_config)
    if (facts.rope_theta, facts.rope_scaling) != (cfg.rope_theta, cfg.rope_scaling):
        raise ValueError(f"draft RoPE {(cfg.rope_theta, cfg.rope_scaling)} is not the target's "
                         f"{(facts.rope_theta, facts.rope_scaling)}")
    if (facts.hidden_size, facts.vocab_size) != (target_hidden_size, cfg.target_vocab_size):
        raise ValueError(f"the draft (H={target_hidden_size}, vocab={cfg.target_vocab_size}) was not built for this "
                         f"target (H={facts.hidden_size}, vocab={facts.vocab_size})")
    return facts


def layer_config(cfg, dtype: torch.dtype) -> dict:
    """The config.json keys every draft family's export shares: the decoder layers' shape, RoPE (also
    as `rope_parameters`, the draft's own flat form, which transformers-5 readers and vLLM on them
    take: the target's full-attention RoPE even where the target has one per layer type, Gemma 3),
    and the vocabularies."""
    return {
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": copy.deepcopy(cfg.rope_scaling),
        "rope_parameters": cfg.rope_parameters(),
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.target_vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }


def export_config(cfg: DraftConfig, target_config: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json of the serving export (DESIGN.md). The aux layer ids go under two keys, each in
    its reader's convention (training/aux_layers.py), so both engines feed the layers trained on:
    top-level `eagle_aux_hidden_state_layer_ids` = HF ids (vLLM), `eagle_config.
    eagle_aux_hidden_state_layer_ids` = HF ids - 1 (SGLang). Raises ValueError when the draft was
    not built for this target, AuxLayerError for ids no engine can feed."""
    facts = check_target(cfg, cfg.target_hidden_size, target_config)
    aux = check_servable(cfg.aux_layer_ids, facts.num_layers, where="export")
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        **layer_config(cfg, dtype),
        "target_hidden_size": cfg.target_hidden_size,
        "mlp_bias": False,
        "eagle_aux_hidden_state_layer_ids": vllm_ids(aux),  # vLLM: HF hidden_states ids
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": sglang_ids(aux),  # SGLang: "output of layer i" = HF i+1
            "use_aux_hidden_state": True,
        },
    }


def export_tensors(draft: Eagle3Draft, d2t, t2d, dtype=torch.bfloat16, include_embed: bool = False) -> dict:
    cfg = draft.cfg
    check_vocab_maps(d2t, t2d, cfg.draft_vocab_size, cfg.target_vocab_size)
    tensors = {
        name: t.detach().to("cpu", dtype).contiguous()
        for name, t in draft.state_dict().items()
        # a draft wider than the target carries its own (padded) embedding: no engine can share the target's
        if include_embed or name != "embed_tokens.weight" or cfg.hidden_size != cfg.target_hidden_size
    }
    tensors["d2t"] = d2t.detach().to("cpu", torch.int64).contiguous()
    tensors["t2d"] = t2d.detach().to("cpu", torch.bool).contiguous()
    return tensors


def export_draft(
    draft: Eagle3Draft,
    d2t: torch.Tensor,
    t2d: torch.Tensor,
    target_config: dict,
    out_dir,
    dtype: torch.dtype = torch.bfloat16,
    include_embed: bool = False,
) -> Path:
    """Write the serving directory at out_dir (replacing an existing one, never leaving a half one).

    include_embed (default False) adds `embed_tokens.weight` [V, H], the frozen copy of the
    target's embedding. Left out, the file is V*H elements smaller (half of it or more for a large
    vocab and a small draft), and both engines use the target's own embedding, which is what the
    draft was trained with: vLLM shares the target's when the checkpoint has none (llama_eagle3.py
    skips `embed_tokens` in load_weights; the EAGLE proposer logs "Detected EAGLE model without
    its own embed_tokens ... Sharing target model embedding weights"), and SGLang replaces the
    draft's with the target's in any case (eagle_worker: `draft_model.set_embed(embed)`).
    load_draft then needs the target's embed_weight. A draft wider than its target
    (hidden_size > target_hidden_size) always writes its own zero-padded embedding [V, H]: vLLM
    shares the target's only when the shapes match, and SGLang's set_embed skips a draft whose
    target_hidden_size differs."""
    draft = getattr(draft, "module", draft)
    config = export_config(draft.cfg, target_config, dtype)
    tensors = export_tensors(draft, d2t, t2d, dtype, include_embed)
    return write_export(tensors, config, out_dir)


def write_export(tensors: dict, config: dict, out_dir) -> Path:
    """Write model.safetensors + config.json as the directory out_dir, replacing an existing one
    atomically (every draft family's export goes through here)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; servers may run as another user
        if out.exists():  # the old one out of the way (hidden), the new one in, the old one removed
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_draft(export_dir, embed_weight: torch.Tensor | None = None, device="cpu"):
    """Reload an export as a float32 Eagle3Draft -> (draft, d2t, t2d, config dict).
    embed_weight (the target's input embedding) is needed only when the export has none."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    config = json.loads((d / CONFIG).read_text())
    tensors = load_file(str(d / WEIGHTS), device=str(device))
    d2t, t2d = tensors.pop("d2t"), tensors.pop("t2d")
    if "embed_tokens.weight" not in tensors:
        if embed_weight is None:
            raise ValueError(f"{d} has no embed_tokens.weight: pass the target's embed_weight")
        tensors["embed_tokens.weight"] = embed_weight
    cfg = DraftConfig.from_export_config(config)
    check_vocab_maps(d2t, t2d, cfg.draft_vocab_size, cfg.target_vocab_size)
    draft = Eagle3Draft(cfg, tensors["embed_tokens.weight"]).to(device)
    draft.load_state_dict(tensors, strict=True)  # every tensor consumed, none missing
    return draft, d2t, t2d, config
