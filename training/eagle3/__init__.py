"""EAGLE-3 draft model, training-time-test loss and attention (see DESIGN.md)."""

from training.eagle3.loss import TTTOutput, target_distribution, ttt_forward
from training.eagle3.model import DraftConfig, Eagle3Draft, KVCache, default_aux_layer_ids

__all__ = [
    "DraftConfig",
    "Eagle3Draft",
    "KVCache",
    "TTTOutput",
    "default_aux_layer_ids",
    "target_distribution",
    "ttt_forward",
]
