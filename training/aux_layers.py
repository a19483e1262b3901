"""Aux layer ids: which target layers the draft fuses, in HF's convention and in each engine's.

specdraft's ids are HF's: id i is `hidden_states[i]` of a transformers forward, the residual
stream entering decoder layer i (0 = the embeddings, L = the final post-norm state). The hidden
states we store, the draft we train and `DraftConfig.aux_layer_ids` all use it.

The serving engines capture the residual stream (hidden + residual) in front of a decoder layer,
walking the layers in order and testing membership, and each reads its ids from its own key:
- vLLM (vllm/model_executor/models/llama.py, LlamaModel.forward: `if idx in
  self.aux_hidden_state_layers: aux_hidden_states.append(hidden_states + residual)` before layer
  idx; ids from the draft config's top-level `eagle_aux_hidden_state_layer_ids`,
  vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py): vLLM id i == HF id i.
- SGLang (python/sglang/srt/models/llama.py, set_eagle3_layers_to_capture: `layers_to_capture =
  [val + 1 for val in layer_ids]`, captured the same way in front of layer val+1; ids from the
  draft config's `eagle_config.eagle_aux_hidden_state_layer_ids`, model_runner.py): SGLang id i
  == HF id i+1 ("output of layer i").
So an engine can feed back HF ids 1..L-1 only (layer 0 has no residual yet and the loops never
reach the post-norm state L), each layer at most once, in ascending layer order. Any other set
would be fed as different layers, or crash the engine, so it is refused before hidden states
are computed (`check_servable`), as is a list that is not three ids.
"""

from __future__ import annotations

from typing import Sequence


N_AUX = 3  # layers an EAGLE-3 draft fuses


class AuxLayerError(ValueError):
    """Aux layer ids the serving engines cannot feed to the draft as trained."""


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """HF ids of the three fused layers when none are configured.

    vLLM's and SGLang's own default (2, L//2, L-3) for L >= 7, where its ids are distinct. Below
    that it repeats a layer (L=6 gives (2, 3, 3)), which no engine can feed (each captures a
    layer once), so 4..6-layer targets get (1, L//2, L-1). Fewer than 4 layers cannot give three
    distinct servable layers (AuxLayerError).
    """
    L = int(num_layers)
    if L >= 7:
        return (2, L // 2, L - 3)
    if L >= 4:
        return (1, L // 2, L - 1)
    raise AuxLayerError(f"a {L}-layer target has no three distinct layers in 1..{L - 1} for EAGLE-3 to fuse")


def check_servable(ids: Sequence[int], num_layers: int, *, where: str = "") -> tuple[int, ...]:
    """`ids` as a tuple if vLLM and SGLang can both feed exactly these layers, else AuxLayerError
    saying why: three ids (EAGLE-3's fc fuses exactly three layers, and the engines build it
    3 * hidden wide), each in 1..L-1, strictly ascending (no repeats)."""
    ids = tuple(int(i) for i in ids)
    L = int(num_layers)
    at = f"{where}: " if where else ""
    if len(ids) != N_AUX:
        raise AuxLayerError(
            f"{at}aux_layer_ids {list(ids)} hold {len(ids)} ids: EAGLE-3 fuses exactly {N_AUX} target layers "
            f"(the draft's fc is {N_AUX} x hidden wide in vLLM and SGLang)")
    bad = [i for i in ids if not 1 <= i <= L - 1]
    if bad:
        raise AuxLayerError(
            f"{at}aux_layer_ids {list(ids)} include {bad}: vLLM and SGLang can feed only HF hidden_states "
            f"1..{L - 1} of this {L}-layer target (0 is the embeddings, {L} the final post-norm state)")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise AuxLayerError(
            f"{at}aux_layer_ids {list(ids)} must be strictly ascending: vLLM and SGLang capture each layer "
            f"once, in layer order, so they would feed {sorted(set(ids))}")
    return ids


def vllm_ids(ids: Sequence[int]) -> list[int]:
    """HF ids -> the draft config's top-level `eagle_aux_hidden_state_layer_ids` (vLLM)."""
    return [int(i) for i in ids]


def sglang_ids(ids: Sequence[int]) -> list[int]:
    """HF ids -> `eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang: id i means HF i+1)."""
    return [int(i) - 1 for i in ids]


def hf_ids_from_export(config: dict) -> tuple[int, ...]:
    """The HF ids a serving config.json was trained on: vLLM's top-level key, else SGLang's
    nested one plus one (a draft that carries only SGLang's key, as SpecForge writes them)."""
    if config.get("eagle_aux_hidden_state_layer_ids"):
        return tuple(int(i) for i in config["eagle_aux_hidden_state_layer_ids"])
    return tuple(int(i) + 1 for i in config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])


# -- per draft family ------------------------------------------------------------------------------
# DFlash (vLLM's DFlashQwen3ForCausalLM) fuses any number of target layers, named in the draft's
# `dflash_config.target_layer_ids` as "output of decoder layer i" (vLLM adds one and captures in front
# of layer i+1, eagle3_utils.get_eagle3_aux_layers_from_config): HF id i+1, the SGLang convention.
FAMILIES = ("eagle3", "dflash")
N_DFLASH = 5  # layers a DFlash draft fuses by default (the published DFlash drafts fuse five)


def default_dflash_layer_ids(num_layers: int, n: int = N_DFLASH) -> tuple[int, ...]:
    """HF ids spread evenly over 1..L-1 (the shallowest feeds the draft the token, the deepest the
    target's prediction); fewer than n when the target has fewer servable layers."""
    L = int(num_layers)
    if L < 2:
        raise AuxLayerError(f"a {L}-layer target has no layer in 1..{L - 1} for DFlash to fuse")
    n = min(int(n), L - 1)
    if n == 1:
        return (L - 1,)
    return tuple(1 + (i * (L - 2)) // (n - 1) for i in range(n))


def check_dflash_servable(ids: Sequence[int], num_layers: int, *, where: str = "") -> tuple[int, ...]:
    """`ids` as a tuple if vLLM can feed exactly these layers to a DFlash draft, else AuxLayerError:
    at least one id, each in 1..L-1, strictly ascending."""
    ids = tuple(int(i) for i in ids)
    L = int(num_layers)
    at = f"{where}: " if where else ""
    if not ids or any(not 1 <= i <= L - 1 for i in ids) or any(b <= a for a, b in zip(ids, ids[1:])):
        raise AuxLayerError(
            f"{at}DFlash layer ids {list(ids)} must be one or more strictly ascending HF hidden_states ids in "
            f"1..{L - 1} of this {L}-layer target (vLLM captures each once, in layer order)")
    return ids


def family_layer_ids(family: str, ids: Sequence[int], num_layers: int, *, where: str = "") -> tuple[int, ...]:
    """The HF ids a draft family fuses: `ids` checked for that family, or its default when empty.
    hidden_states stores exactly these (so the family is part of its fingerprint)."""
    if family == "eagle3":
        return check_servable(tuple(ids) or default_aux_layer_ids(num_layers), num_layers, where=where)
    if family == "dflash":
        return check_dflash_servable(tuple(ids) or default_dflash_layer_ids(num_layers), num_layers, where=where)
    raise ValueError(f"{where + ': ' if where else ''}draft_family must be one of {FAMILIES}, not {family!r}")
