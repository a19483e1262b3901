import json
from functools import lru_cache

import dagster as dg


@lru_cache(maxsize=2)
def _load(spec):
    return spec.load()


def parse_chat_template_kwargs(text: str, where: str) -> dict:
    """A JSON object (e.g. '{"enable_thinking": false}'); an empty string is {}. dg.Failure naming `where` otherwise."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise dg.Failure(f"{where}: chat_template_kwargs is not JSON ({exc}): {text!r:.200}") from None
    if not isinstance(value, dict):
        raise dg.Failure(f"{where}: chat_template_kwargs must be a JSON object, got {type(value).__name__}: {text!r:.200}")
    return value


class TargetModelResource(dg.ConfigurableResource):
    """The target LLM: a local HF directory or hub id; empty means the demo target. definitions.py
    wires SPECDRAFT_TARGET, SPECDRAFT_BACKEND and SPECDRAFT_CHAT_TEMPLATE_KWARGS into its fields.

    `chat_template_kwargs` (a JSON object, e.g. {"enable_thinking": false} for Qwen3; empty: none)
    is the one chat-template setting: resampling generation (every
    backend), tokenization and evaluation prompts all render with it, and it is part of identity().
    """

    target: str = ""
    # hf (transformers) or vllm (features through vLLM's hidden-state capture; SPECDRAFT_BACKEND);
    # evaluation's simulator always runs the HF model (eval_report measures vLLM separately).
    backend: str = "hf"
    device: str = "auto"
    # auto: bf16 on GPU, fp32 on CPU for hf (decided where the spec is built); for vllm, fp32 on its CPU
    # build and vLLM's own rule on a GPU (decided where the engine starts: targets.vllm.engine_dtype)
    dtype: str = "auto"
    trust_remote_code: bool = False
    chat_template_kwargs: str = ""

    def model_path(self) -> str:
        if self.target:
            return self.target
        from training.demo.target import ensure_demo_target

        return str(ensure_demo_target())

    def facts(self):
        """The target's TargetFacts (layers, hidden size, vocab_size = embedding rows; a multimodal
        target's LM under text_config) from its config alone, without loading weights."""
        from training.targets.config import read_facts

        return read_facts(self.model_path(), trust_remote_code=self.trust_remote_code)

    def template_kwargs(self) -> dict:
        """The chat template settings as a dict ({} when unset)."""
        return parse_chat_template_kwargs(self.chat_template_kwargs,
                                          "the target resource (SPECDRAFT_CHAT_TEMPLATE_KWARGS or run config)")

    def identity(self) -> str:
        """The weights' identity, plus the chat settings and a dtype when set: they change every
        prompt, row and hidden state."""
        from training.fingerprint import model_identity
        from training.targets.spec import dtype_name

        kwargs = self.template_kwargs()
        base = model_identity(self.model_path())
        if self.dtype != "auto":
            base += f"+dtype={dtype_name(self.dtype)}"
        return f"{base}+chat_template_kwargs={json.dumps(kwargs, sort_keys=True)}" if kwargs else base

    def spec(self, backend: str | None = None, on_cuda: bool | None = None):
        """The TargetSpec (training/targets/spec.py) every loader of this target uses, on `backend`
        (default the resource's), dtype resolved for a GPU when `on_cuda` (default: this process has one)."""
        from training.targets.spec import TargetSpec

        return TargetSpec(self.model_path(), backend=backend or self.backend, device=self.device, dtype=self.dtype,
                          trust_remote_code=self.trust_remote_code,
                          chat_template_kwargs=self.template_kwargs()).resolved(on_cuda)

    def load(self, backend: str | None = None):
        """The loaded TargetModel (on `backend`, default the resource's), shared by the steps of one process."""
        return _load(self.spec(backend))
