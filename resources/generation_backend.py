import json

import dagster as dg

from resources.target_model import TargetModelResource


class GenerationBackendResource(dg.ConfigurableResource):
    """Who regenerates assistant turns: `hf` or `vllm` on the target model, or `openai` for any
    OpenAI-compatible server (e.g. `vllm serve`). The API key comes from OPENAI_API_KEY and is
    never part of config, logs or metadata. Every backend renders prompts with the target resource's
    chat_template_kwargs (openai: sent as the request's `chat_template_kwargs`, which vLLM's server
    applies); `return_token_ids` asks the openai server for the reply's ids (vLLM >= 0.10.2), without
    which tokenization re-encodes the text and says so in its metadata."""

    backend: str = ""  # empty: the target resource's backend (hf, or vllm with SPECDRAFT_BACKEND)
    base_url: str = ""          # openai: e.g. http://127.0.0.1:8000/v1 (definitions.py wires OPENAI_BASE_URL)
    model: str = ""             # openai: served model name (default: the target's name or path)
    max_concurrency: int = 8
    return_token_ids: bool = True
    target: dg.ResourceDependency[TargetModelResource]

    def effective_backend(self) -> str:
        return self.backend or self.target.backend

    def identity(self) -> str:
        if self.effective_backend() == "openai":
            kwargs = self.target.template_kwargs()
            suffix = f"+chat_template_kwargs={json.dumps(kwargs, sort_keys=True)}" if kwargs else ""
            return f"openai:{self.base_url}#{self.model or 'served model'}{suffix}"
        return f"{self.effective_backend()}:{self.target.identity()}"

    def load(self):
        backend = self.effective_backend()
        if backend == self.target.backend:
            return self.target.load()  # share the loaded model (or engine) with the other stages
        if backend != "openai":
            return self.target.spec(backend).load()
        if not self.base_url:
            raise dg.Failure("generation backend 'openai' needs base_url (or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1")
        from training.targets import load_target

        return load_target(
            self.base_url, backend="openai", model=self.model or None,
            tokenizer=self.target.model_path(), max_concurrency=self.max_concurrency,
            chat_template_kwargs=self.target.template_kwargs() or None, return_token_ids=self.return_token_ids,
        )
