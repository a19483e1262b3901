import os
from functools import lru_cache

import dagster as dg


@lru_cache(maxsize=2)
def _load(path: str, backend: str, device: str, trust_remote_code: bool):
    from training.targets import load_target

    return load_target(path, backend=backend, device=device, trust_remote_code=trust_remote_code)


class TargetModelResource(dg.ConfigurableResource):
    """The target LLM: a local HF directory or hub id; empty means SPECDRAFT_TARGET or the demo target."""

    target: str = ""
    backend: str = "hf"
    device: str = "auto"
    trust_remote_code: bool = False

    def model_path(self) -> str:
        spec = self.target or os.environ.get("SPECDRAFT_TARGET")
        if spec:
            return spec
        from training.demo.target import ensure_demo_target

        return str(ensure_demo_target())

    def identity(self) -> str:
        from training.fingerprint import model_identity

        return model_identity(self.model_path())

    def load(self):
        """The loaded TargetModel, shared by the steps of one process."""
        return _load(self.model_path(), self.backend, self.device, self.trust_remote_code)
