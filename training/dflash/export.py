"""DFlash serving export: a directory vLLM's DFlashQwen3ForCausalLM loads as-is (DESIGN.md,
"DFlash serving export"); written through training.export.write_export (atomic replace)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.dflash.model import DFlashConfig, DFlashDraft
from training.export import CONFIG, WEIGHTS, check_target, check_vocab_maps, layer_config, write_export

ARCHITECTURE = "DFlashDraftModel"  # vLLM's registry: qwen3_dflash.DFlashQwen3ForCausalLM


def export_config(cfg: DFlashConfig, target_config: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json: a Qwen3 config (vLLM builds the draft's layers from it) plus `dflash_config`:
    `target_layer_ids` in DFlash's "output of layer i" convention (HF id - 1; vLLM adds one back),
    `mask_token_id` (the embedding vLLM feeds the masked slots), `causal: false` (non-causal blocks)."""
    check_target(cfg, cfg.hidden_size, target_config)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        "num_hidden_layers": cfg.num_layers,
        **layer_config(cfg, dtype),
        "target_hidden_size": cfg.hidden_size,
        "use_sliding_window": False,
        "block_size": cfg.block_size,
        "dflash_config": {
            "target_layer_ids": [i - 1 for i in cfg.aux_layer_ids],
            "mask_token_id": cfg.mask_token_id,
            "causal": False,
        },
    }


def export_tensors(draft: DFlashDraft, d2t, t2d, dtype=torch.bfloat16) -> dict:
    """The trained tensors; the frozen embedding stays out (vLLM shares the target's). d2t only for
    a pruned draft vocab (vLLM has no draft_id_to_target_id to load into otherwise)."""
    cfg = draft.cfg
    check_vocab_maps(d2t, t2d, cfg.draft_vocab_size, cfg.target_vocab_size)
    tensors = {n: t.detach().to("cpu", dtype).contiguous() for n, t in draft.state_dict().items()
               if n != "embed_tokens.weight"}
    if cfg.draft_vocab_size < cfg.target_vocab_size:
        tensors["d2t"] = d2t.detach().to("cpu", torch.int64).contiguous()
    tensors["t2d"] = t2d.detach().to("cpu", torch.bool).contiguous()
    return tensors


def export_dflash(draft: DFlashDraft, d2t, t2d, target_config: dict, out_dir, dtype=torch.bfloat16) -> Path:
    draft = getattr(draft, "module", draft)
    return write_export(export_tensors(draft, d2t, t2d, dtype), export_config(draft.cfg, target_config, dtype), out_dir)


def load_dflash(export_dir, embed_weight: torch.Tensor, device="cpu"):
    """Reload an export as a float32 DFlashDraft -> (draft, d2t, t2d, config dict)."""
    from safetensors.torch import load_file

    d = Path(export_dir)
    config = json.loads((d / CONFIG).read_text())
    tensors = {n: t.float() if t.is_floating_point() else t for n, t in load_file(str(d / WEIGHTS), device=str(device)).items()}
    t2d = tensors.pop("t2d")
    d2t = tensors.pop("d2t", torch.zeros(int(t2d.sum()), dtype=torch.int64, device=t2d.device))
    cfg = DFlashConfig.from_export_config(config)
    check_vocab_maps(d2t, t2d, cfg.draft_vocab_size, cfg.target_vocab_size)
    draft = DFlashDraft(cfg, embed_weight.to(device)).to(device)
    tensors["embed_tokens.weight"] = draft.embed_tokens.weight
    draft.load_state_dict(tensors, strict=True)
    return draft, d2t, t2d, config


def is_dflash_export(export_dir) -> bool:
    return ARCHITECTURE in json.loads((Path(export_dir) / CONFIG).read_text()).get("architectures", [])
