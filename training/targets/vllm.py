"""vLLM backend (GPU or vLLM's CPU build): generation with LLM.chat, features with `extract_hidden_states`.

Features use the speculative method "extract_hidden_states" with vLLM's hidden-state connector, in
the device-agnostic subclass of training/targets/vllm_connector.py (vLLM's own copies through CUDA
streams and pinned memory, which its CPU build lacks): a prefill-only request (max_tokens=1) stores,
per prompt token, the residual stream at `eagle_aux_hidden_state_layer_ids` into a safetensors
file named in `output.kv_transfer_params["hidden_states_path"]`, shaped [n, k, H]. vLLM's layer
id i is the input of decoder layer i, HF's hidden_states[i]; id L is the last layer's output
*before* the final norm, so `last` applies the target's final RMSNorm here, in float32 like HF.

An engine serves one mode (generation, or features for one set of layer ids): feature extraction
needs prefix caching and chunked prefill off, which generation wants on (on a GPU; the CPU build
turns chunked prefill off everywhere, engine_defaults). On a GPU two engines would
not share its memory, so switching mode releases the previous engine; on the CPU build each mode
keeps its engine (1 GiB of KV cache each), so a run that alternates resampling and features shard
after shard starts each engine once.
`make install` installs vLLM (its CPU build where no GPU is visible); tests/training/targets/test_vllm.py
runs both modes on the CPU build against the hf backend.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from typing import Sequence

from training.targets.base import (
    Generation,
    SamplingParams,
    TargetError,
    TargetModel,
    apply_final_logit_transforms,
    check_aux_layer_ids,
    check_sequences,
)
from training.targets.spec import auto_dtype, dtype_name


def _check_device(device: str) -> str:
    import torch

    kind = str(device).split(":")[0]
    have = "cuda" if torch.cuda.is_available() else "cpu"
    if kind not in ("auto", have):
        raise TargetError(f"the vllm backend runs on this machine's {have}, not on device {device!r}")
    return str(device)


def engine_dtype(dtype: str) -> str:
    """The dtype an engine starts with. "auto" on vLLM's CPU build is the hf backend's CPU choice,
    fp32 (spec.auto_dtype): vLLM's own rule would take the config's bf16, which a CPU without bf16
    instructions (AVX2 only) generates in 4x slower than fp32 (bench_resample_backends), and the
    hidden states the hf backend computes on a CPU are fp32 too. On a GPU "auto" stays vLLM's rule
    (the config's dtype)."""
    import torch

    name = dtype_name(dtype)
    return auto_dtype(False) if name == "auto" and not torch.cuda.is_available() else name


def engine_defaults() -> dict:
    """LLM(...) settings every specdraft engine starts with where vLLM runs on the CPU build.

    There `gpu_memory_utilization` is the share of *host* memory the KV cache may take (85% of the
    machine by default, refused when that much is not free), so the cache gets a fixed size instead:
    VLLM_CPU_KVCACHE_SPACE GiB when set, else 1 GiB (tens of thousands of tokens of a 135M model). Eager mode:
    torch.compile's CPU kernels cost minutes per engine start for models this small. No chunked
    prefill: a step that prefills part of a prompt discards that request's sample and rewinds its
    seeded generator with `set_offset`, which CPU generators refuse ("CPU Generator does not use
    offset", the engine dies): every seeded resampling batch longer than one step's token budget
    crashed. On a GPU: none.
    """
    import torch

    if torch.cuda.is_available():
        return {}
    out = {"enforce_eager": True, "enable_chunked_prefill": False}
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        out["kv_cache_memory_bytes"] = 1 << 30
    return out


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise TargetError(
            "the 'vllm' target backend needs vLLM: `make install` adds it (pip install 'specdraft[cpu]' "
            f"for its CPU build, 'specdraft[gpu]' on CUDA machines; import failed: {exc}), or use backend='hf'"
        ) from None
    return vllm


class VLLMTarget(TargetModel):
    """`load_target(path_or_hub_id, "vllm", tensor_parallel_size=..., gpu_memory_utilization=...)`."""

    backend = "vllm"
    # vLLM schedules the requests of one call itself: a call of 32 rows leaves its running batch half
    # empty while the longest replies finish (bench_resample_backends: 0.62x of bare LLM.chat).
    generation_batch_size = 256

    def __init__(
        self,
        name_or_path: str,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        device: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        chat_template_kwargs: dict | None = None,
        engine_kwargs: dict | None = None,
        scratch_dir: str | None = None,
    ):
        super().__init__(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        self.dtype = engine_dtype(dtype)
        # vLLM runs on the platform its build is for (CUDA, or the CPU build) and places the model
        # itself; a device that build cannot serve is an error here, not a surprise at engine start.
        self.device = _check_device(device)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.chat_template_kwargs = chat_template_kwargs
        self.engine_kwargs = dict(engine_kwargs or {})
        # vLLM's docs recommend a RAM-backed folder: each file is read once and deleted at once.
        self.scratch_root = scratch_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._engines: dict[tuple, tuple] = {}  # mode -> (vllm.LLM, its hidden-state folder or None)
        self._norm = None
        self._head = None

    # -- engines ----------------------------------------------------------------------------
    def _engine(self, mode: tuple):
        if mode in self._engines:
            return self._engines[mode][0]
        vllm = import_vllm()
        import torch

        if torch.cuda.is_available():
            self.close()  # one engine per GPU at a time
        kwargs = dict(
            model=self.name_or_path,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
        )
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        kwargs.update(engine_defaults())
        scratch = None
        if mode[0] == "features":
            scratch = tempfile.mkdtemp(prefix="specdraft-hs-", dir=self.scratch_root)
            kwargs.update(
                enable_chunked_prefill=False,  # required by the connector
                enable_prefix_caching=False,  # every prompt token must be computed, and stored, by its own request
                speculative_config={
                    "method": "extract_hidden_states",
                    "num_speculative_tokens": 1,
                    "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(mode[1])}},
                },
                kv_transfer_config=_kv_transfer_config(scratch),
            )
        kwargs.update(self.engine_kwargs)
        self._engines[mode] = (vllm.LLM(**kwargs), scratch)
        return self._engines[mode][0]

    def close(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for llm, scratch in engines:
            # Dropping the LLM does not stop its engine process (vLLM's client threads keep it
            # referenced), so a GPU would still hold its memory when the next engine starts: stop it.
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None:
                core.shutdown()
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        if engines:
            del engines, llm
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # -- generation -------------------------------------------------------------------------
    def generation_engine(self):
        """The vllm.LLM that `generate` uses (started on first call), e.g. to measure it bare."""
        return self._engine(("generate",))

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[SamplingParams]) -> list[Generation]:
        if len(conversations) != len(sampling):
            raise TargetError(f"{len(conversations)} conversations but {len(sampling)} sampling params")
        outputs = self.generation_engine().chat(
            [list(c) for c in conversations], self._params(sampling), use_tqdm=False,
            chat_template_kwargs=self.chat_template_kwargs,
        )
        return self._generations(outputs)

    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> list[Generation]:
        if len(prompts) != len(sampling):
            raise TargetError(f"{len(prompts)} prompts but {len(sampling)} sampling params")
        outputs = self.generation_engine().generate(
            [{"prompt_token_ids": [int(t) for t in p]} for p in prompts], self._params(sampling), use_tqdm=False)
        return self._generations(outputs)

    @staticmethod
    def _params(sampling: Sequence[SamplingParams]) -> list:
        vllm = import_vllm()
        return [vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=s.seed)
                for s in sampling]

    def _generations(self, outputs) -> list[Generation]:
        """Generation per vLLM RequestOutput: the engine's own ids, without the stop token."""
        from training.targets.harmony import harmony_ids, split_channels

        harmony = harmony_ids(self.tokenizer)  # gpt-oss: channels kept apart, not flattened into the text
        results = []
        for out in outputs:
            completion = out.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            finish = str(completion.finish_reason or "length")
            # token_ids end with the stop token when an EOS (stop_reason None) or a stop token id
            # (an int) ended the reply; text never holds it, and neither do the reply's ids here.
            if finish == "stop" and ids and (completion.stop_reason is None or isinstance(completion.stop_reason, int)):
                ids = ids[:-1]
            text, reasoning = split_channels(self.tokenizer, ids, harmony) if harmony else (completion.text, None)
            results.append(Generation(
                text=text, reasoning=reasoning, finish_reason=finish, n_tokens=len(completion.token_ids),
                token_ids=tuple(ids), prompt_token_ids=tuple(int(t) for t in out.prompt_token_ids or ()) or None,
            ))
        return results

    # -- features ---------------------------------------------------------------------------
    def features(self, sequences: Sequence[Sequence[int]], aux_layer_ids: Sequence[int] | None = None) -> dict:
        import torch

        vllm = import_vllm()
        L = self.facts.num_layers
        ids = check_aux_layer_ids(aux_layer_ids or self.default_aux_layer_ids(), L)
        lengths = check_sequences(sequences)
        captured = tuple(sorted(set(ids) | {L}))  # L: pre-norm final state, normed below into `last`
        slot = {layer: k for k, layer in enumerate(captured)}
        llm = self._engine(("features", captured))
        prompts = [{"prompt_token_ids": [int(t) for t in s]} for s in sequences]
        outputs = llm.generate(prompts, vllm.SamplingParams(max_tokens=1), use_tqdm=False)

        aux_parts, last_parts = [], []
        for seq, out in zip(sequences, outputs):
            path = (out.kv_transfer_params or {}).get("hidden_states_path")
            if not path:
                raise TargetError("vLLM returned no hidden_states_path: is the extract_hidden_states method enabled?")
            hidden = _load_hidden_states(path)  # [n, len(captured), H]
            if hidden.shape[0] != len(seq):
                raise TargetError(f"vLLM stored {hidden.shape[0]} positions for a {len(seq)}-token sequence")
            last = self._final_norm(hidden[:, slot[L]])
            aux_parts.append(torch.cat([last if i == L else hidden[:, slot[i]] for i in ids], dim=-1))
            last_parts.append(last)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.long)
        cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
        return {"aux": torch.cat(aux_parts), "last": torch.cat(last_parts), "cu_seqlens": cu_seqlens}

    def _final_norm(self, x):
        """The target's final RMSNorm, computed as HF does (float32 statistics, weight applied after)."""
        import torch

        from training.targets.weights import load_final_norm

        if self._norm is None:
            self._norm = load_final_norm(self.name_or_path, self.revision).float()
        eps = self.facts.rms_norm_eps
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        model_type = str((self.facts.config.get("text_config") or self.facts.config).get("model_type", ""))
        if model_type.startswith("gemma"):  # Gemma's norm scales by (1 + w), in float32
            return (normed * (1.0 + self._norm)).to(x.dtype)
        return self._norm.to(x.dtype) * normed.to(x.dtype)

    def logits(self, last):
        from training.targets.weights import load_head_weights

        if self._head is None:
            self._head = load_head_weights(self.name_or_path, self.revision)[1]
        head = self._head.to(device=last.device, dtype=last.dtype)
        return apply_final_logit_transforms(last @ head.T, self.facts.config)


def _kv_transfer_config(path: str):
    """vLLM's hidden-state writer as our device-agnostic subclass, loaded by module path."""
    from vllm.config.kv_transfer import KVTransferConfig

    from training.targets.vllm_connector import CONNECTOR

    return KVTransferConfig(
        kv_connector=CONNECTOR, kv_connector_module_path="training.targets.vllm_connector", kv_role="kv_producer",
        kv_connector_extra_config={"shared_storage_path": path, "use_synchronization_lock": True},
    )


def _load_hidden_states(path: str):
    """Read one request's file (waiting on the connector's lock where it has one), then delete it."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import load_hidden_states
    except ImportError:  # releases before the lock file: the write is done when the request returns
        from safetensors.torch import load_file as load_hidden_states
    try:
        return load_hidden_states(path)["hidden_states"]
    finally:
        for p in (path, path + ".lock"):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
