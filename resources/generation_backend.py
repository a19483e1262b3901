import os

import dagster as dg

from resources.target_model import TargetModelResource


class GenerationBackendResource(dg.ConfigurableResource):
    """Who regenerates assistant turns: `hf` or `vllm` on the target model, or `openai` for any
    OpenAI-compatible server (e.g. `vllm serve`). The API key comes from OPENAI_API_KEY and is
    never part of config, logs or metadata."""

    backend: str = "hf"
    base_url: str = ""          # openai: e.g. http://127.0.0.1:8000/v1 (or OPENAI_BASE_URL)
    model: str = ""             # openai: served model name (default: the target spec)
    max_concurrency: int = 8
    target: dg.ResourceDependency[TargetModelResource]

    def identity(self) -> str:
        if self.backend == "openai":
            return f"openai:{self._base_url()}#{self.model or 'served model'}"
        return f"{self.backend}:{self.target.identity()}"

    def _base_url(self) -> str:
        return self.base_url or os.environ.get("OPENAI_BASE_URL", "")

    def load(self):
        if self.backend == "hf" and self.target.backend == "hf":
            return self.target.load()  # share the loaded model with the other stages
        from training.targets import load_target

        if self.backend == "openai":
            if not self._base_url():
                raise dg.Failure("generation backend 'openai' needs base_url (or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1")
            return load_target(
                self._base_url(), backend="openai", model=self.model or None,
                tokenizer=self.target.model_path(), max_concurrency=self.max_concurrency,
            )
        return load_target(self.target.model_path(), backend=self.backend)
