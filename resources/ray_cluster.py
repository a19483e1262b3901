from typing import Any, Callable

import dagster as dg
from pydantic import PrivateAttr

from resources.target_model import TargetModelResource


class RayClusterResource(dg.ConfigurableResource):
    """Where the heavy per-shard stages (resampling, hidden-state extraction) run: in the step's
    own process, or on an existing Ray cluster as one actor per device holding the target.

    `address` (definitions.py wires SPECDRAFT_RAY_ADDRESS) empty means local. `actors` 0 means one per
    GPU (gpus_per_actor > 0) or one per alive node. The `openai` generation backend always runs
    locally: its server already does the work. See training/ray_pool.py.
    """

    address: str = ""
    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    start_timeout_s: float = 600.0  # actors not placed and loaded by then: fail, naming what they need

    # One pool per target for the resource's life (a run in one process: resampling and hidden
    # states share the actors and their loaded target); closed when the run ends.
    _pools: dict = PrivateAttr(default_factory=dict)

    def ray_address(self) -> str:
        return self.address.strip()

    def enabled(self) -> bool:
        return bool(self.ray_address())

    def _pool(self, target: TargetModelResource, log: Callable[[str], Any], backend: str | None = None):
        """Actors holding `target` on `backend` (default the target resource's): its TargetSpec, the
        dtype resolved for the actors' device (GPU when gpus_per_actor > 0)."""
        from training.ray_pool import RayPoolError, TargetPool

        spec = target.spec(backend, on_cuda=self.gpus_per_actor > 0)
        pool = self._pools.get(spec)
        if pool is not None and pool.live():
            pool.log = log  # this step's log
            return pool
        try:
            pool = TargetPool.connect(self.ray_address(), spec, actors=self.actors, cpus_per_actor=self.cpus_per_actor,
                                      gpus_per_actor=self.gpus_per_actor, start_timeout_s=self.start_timeout_s, log=log)
        except RayPoolError as exc:
            raise dg.Failure(str(exc)) from None
        self._pools[spec] = pool
        return pool

    def resample(self, generator, rows, cfg, progress=None, log: Callable[[str], Any] = print):
        """training.resample.resample_rows, its batches generated here or on the Ray actors when enabled."""
        from training.ray_pool import PoolBatches, RayPoolError
        from training.resample import LocalBatches, resample_rows

        if not self.enabled() or generator.effective_backend() == "openai":
            return resample_rows(LocalBatches(generator.load()), rows, cfg, progress=progress, log=log)
        try:
            # The generation backend's, which the fingerprint names, not necessarily the target resource's.
            pool = self._pool(generator.target, log, backend=generator.effective_backend())
            return resample_rows(PoolBatches(pool), rows, cfg, progress=progress, log=log)
        except RayPoolError as exc:
            raise dg.Failure(str(exc)) from None

    def feature_target(self, target: TargetModelResource, log: Callable[[str], Any] = print):
        """The target for write_hidden_states: loaded here, or a FeatureTarget over Ray actors."""
        if not self.enabled():
            return target.load()
        from training.ray_pool import FeatureTarget

        return FeatureTarget(self._pool(target, log), log=log)

    def prefetch(self, model, rows, max_tokens_per_batch: int, aux_layer_ids):
        """The rows for write_hidden_states; with Ray, the actors start on their batches now."""
        if not self.enabled():
            return rows
        return model.prefetch(rows, max_tokens_per_batch, aux_layer_ids)

    def teardown_after_execution(self, context) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
