"""TargetSpec: how to load the target, the one definition every path loads it from.

TargetModelResource builds one (resources/target_model.py), TrainJob carries it to train_main and
torchrun ranks as JSON, and Ray actors receive it as a dict (training/ray_pool.py), so a setting
reaches every process that loads the target, or none. Importing this module loads no torch.

    spec = TargetSpec("/models/Qwen3-8B", backend="hf", chat_template_kwargs={"enable_thinking": False}).resolved()
    target = spec.load()
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# Names a dtype may be given by -> the torch name; vLLM takes the torch names too.
DTYPES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def auto_dtype(on_cuda: bool) -> str:
    """What "auto" means for the hf backend: bf16 on GPU (what targets ship in), fp32 on CPU
    (CPU bf16 matmuls are slow and lossy)."""
    return "bfloat16" if on_cuda else "float32"


def dtype_name(dtype: str) -> str:
    """The torch name of `dtype` ("auto" stays "auto"); ValueError naming the known ones otherwise."""
    if dtype == "auto":
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[str(dtype)]


@dataclass(frozen=True)
class TargetSpec:
    """How to load the target.

    `path` is a local HF directory or hub id (a base URL for the openai backend); `model_dir` is
    where its config.json and head weights live (default: path). `dtype` "auto" is resolved by
    resolved(): the hf backend's choice for the device it will run on; vllm keeps "auto", which
    its engine resolves on its platform (vllm.engine_dtype: fp32 on vLLM's CPU build, as here, and
    vLLM's own rule, the config's dtype, on a GPU). `kwargs` are further backend
    arguments (vllm's tensor_parallel_size, say). Hashable: pools and caches key on it.
    """

    path: str
    backend: str = "hf"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    chat_template_kwargs: dict = field(default_factory=dict)
    model_dir: str | None = None
    kwargs: dict = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def resolved(self, on_cuda: bool | None = None) -> TargetSpec:
        """This spec with its dtype in torch's name, "auto" decided for the hf backend: on GPU when
        the device names cuda, or (device "auto") when `on_cuda` says so, by default when this
        process sees a GPU. The process that builds the spec decides, so every loader of it (a
        torchrun rank, a Ray actor) runs the same dtype."""
        dtype = dtype_name(self.dtype)
        if dtype == "auto" and self.backend == "hf":
            if self.device != "auto":
                on_cuda = str(self.device).startswith("cuda")
            elif on_cuda is None:
                import torch

                on_cuda = torch.cuda.is_available()
            dtype = auto_dtype(on_cuda)
        return replace(self, dtype=dtype)

    def weights_dir(self) -> str:
        return self.model_dir or self.path

    def load_kwargs(self, device: str | None = None) -> dict[str, Any]:
        """Keyword arguments of training.targets.load_target for this backend. `device` (a rank's
        own device under torchrun) replaces an "auto" device of the hf backend."""
        kw: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None:
            kw["revision"] = self.revision
        if self.chat_template_kwargs:
            kw["chat_template_kwargs"] = dict(self.chat_template_kwargs)
        if self.backend in ("hf", "vllm"):
            kw["dtype"] = self.dtype
            kw["device"] = device if (device is not None and self.device == "auto" and self.backend == "hf") else self.device
        return kw | self.kwargs

    def load(self, device: str | None = None):
        from training.targets import load_target

        return load_target(self.path, backend=self.backend, **self.load_kwargs(device))

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TargetSpec fields {unknown}; known: {sorted(names)}")
        return cls(**d)
