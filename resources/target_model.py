import json
from functools import lru_cache

import dagster as dg


@lru_cache(maxsize=2)
def _load(path: str, backend: str, device: str, trust_remote_code: bool, chat_template_kwargs: str):
    from training.targets import load_target

    kwargs = {"chat_template_kwargs": json.loads(chat_template_kwargs)} if chat_template_kwargs != "{}" else {}
    return load_target(path, backend=backend, device=device, trust_remote_code=trust_remote_code, **kwargs)


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
        """The weights' identity, plus the chat settings when set: they change every prompt and row."""
        from training.fingerprint import model_identity

        kwargs = self.template_kwargs()
        base = model_identity(self.model_path())
        return f"{base}+chat_template_kwargs={json.dumps(kwargs, sort_keys=True)}" if kwargs else base

    def load(self, backend: str | None = None):
        """The loaded TargetModel (on `backend`, default the resource's), shared by the steps of one process."""
        return _load(self.model_path(), backend or self.backend, self.device, self.trust_remote_code,
                     json.dumps(self.template_kwargs(), sort_keys=True))
