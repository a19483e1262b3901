"""The heavy per-shard stages on an existing Ray cluster: one actor per device, each holding the
target, the shard's batches split across them.

    pool = TargetPool.connect("10.0.0.1:6379", TargetSpec("/models/Llama-3.1-70B", backend="vllm").resolved(),
                              gpus_per_actor=8)
    result = resample_rows(PoolBatches(pool), rows, cfg, progress=progress, log=print)
    target = FeatureTarget(pool); rows = target.prefetch(rows, max_tokens_per_batch)
    write_hidden_states(target, rows, writer, ...)     # the local writer, fed by the actors

Identical output: the unit of work sent to an actor is exactly the unit the local path computes
(a resampling batch of `batch_size` rows; a packed feature batch from `pack_stream`), so every
actor runs the same forward the local process would; on CPU the rows and hidden states are
bitwise those of the local path (tests/e2e/test_ray_cluster.py,
test_ray_path_equals_local_path_bitwise).

Failures: an actor whose process or node dies is dropped, named with its node, and the calls it
held are sent again to a surviving actor; when none survives the step fails with RayPoolError
naming the nodes and causes. The caller writes the artifact only after every call returned, so a
failure never leaves a partial artifact (ArtifactWriter writes the manifest last), and
resampling progress saved per batch lets a rerun pick up where it stopped.

Why Ray directly and not dagster-ray: dagster-ray's resources start or connect a cluster and its
Pipes clients submit whole Ray jobs; what this needs is a pool of long-lived actors holding a
model inside one Dagster step, with the step itself writing the artifact and its manifest. That
is Ray's core actor API (a few calls), and no Dagster import belongs in training/.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

from training.targets.spec import TargetSpec

ADDRESS_ENV = "SPECDRAFT_RAY_ADDRESS"
# Calls kept queued per actor: one running, one ready, so an actor never idles between batches.
DEPTH = 2
# Each call may be sent again this many times after the actor holding it died.
MAX_RESENDS = 3


class RayPoolError(RuntimeError):
    """The Ray cluster is unreachable, or every actor died; the message names address or nodes."""


def check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """Fail at once, naming the address and the cause, when nothing listens there.

    `address` is what ray.init takes: `host:port` (the GCS of a cluster this machine is part of),
    `ray://host:port` (Ray Client) or `auto`. Credentials never appear in an address.
    """
    if address == "auto":
        return  # ray.init finds the local cluster, or says there is none
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise RayPoolError(f"Ray address {address!r} ({ADDRESS_ENV}) is not host:port: {exc}") from None
    if not host or not port:
        raise RayPoolError(f"Ray address {address!r} ({ADDRESS_ENV}) needs host:port, e.g. 10.0.0.1:6379 or ray://head:10001")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayPoolError(f"Ray cluster at {address} ({ADDRESS_ENV}) is unreachable: {exc}") from None


class TargetActor:
    """Holds one loaded target on one device; made a Ray actor class by TargetPool."""

    def __init__(self, spec: dict, threads: int):
        import ray
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.node = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        self.target = TargetSpec.from_dict(spec).load()

    def info(self) -> dict:
        from training.resample import generator_name

        return {**self.node, "identity": self.target.identity, "generator": generator_name(self.target),
                "facts": asdict(self.target.facts), "generation_batch_size": self.target.generation_batch_size}

    def resample_batch(self, batch: list[dict], cfg, generator: str, batch_no: int) -> list[dict]:
        from training.resample import resample_batch

        return resample_batch(self.target, batch, cfg, generator, batch_no)

    def features(self, sequences: list[list[int]], aux_layer_ids: tuple[int, ...]) -> dict:
        return self.target.features(sequences, aux_layer_ids)


@dataclass
class _Call:
    method: str
    args: tuple
    key: Any = None
    ref: Any = None
    actor: int = -1
    resends: int = 0


@dataclass
class TargetPool:
    """Actors on a Ray cluster, each holding the target; calls go to the least-busy live actor."""

    address: str
    actors: list
    nodes: list[dict]  # per actor: node_id, ip, pid, identity, generator, facts
    log: Callable[[str], Any] = print
    dead: dict[int, str] = field(default_factory=dict)  # actor index -> why it is gone
    load: list[int] = field(default_factory=list)

    @classmethod
    def connect(cls, address: str, spec: TargetSpec, *, actors: int = 0, cpus_per_actor: float = 1.0,
                gpus_per_actor: float = 0.0, start_timeout_s: float = 600.0,
                log: Callable[[str], Any] = print) -> "TargetPool":
        """Join the cluster at `address` and start `actors` actors (0: one per GPU when
        gpus_per_actor > 0, else one per alive node), spread over the nodes."""
        import ray

        check_ray_address(address)
        try:
            ray.init(address=address, ignore_reinit_error=True, logging_level="WARNING", log_to_driver=False,
                     configure_logging=False)
        except Exception as exc:
            raise RayPoolError(f"Ray cluster at {address} ({ADDRESS_ENV}): cannot join: {type(exc).__name__}: {exc}") from None
        if actors <= 0:
            if gpus_per_actor > 0:
                actors = int(ray.cluster_resources().get("GPU", 0) // gpus_per_actor)
            else:
                actors = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= cpus_per_actor)
        if actors < 1:
            raise RayPoolError(f"Ray cluster at {address} has no node with {cpus_per_actor} CPU and "
                               f"{gpus_per_actor} GPU free for a target actor")
        remote = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=0,
                            max_task_retries=0, scheduling_strategy="SPREAD")(TargetActor)
        handles = [remote.remote(spec.to_dict(), int(cpus_per_actor)) for _ in range(actors)]
        refs = [h.info.remote() for h in handles]
        # Placement waits for free resources; an actor that never gets them must not hang the step.
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=start_timeout_s)
        if waiting:
            for h in handles:
                ray.kill(h)
            raise RayPoolError(
                f"Ray cluster at {address}: {len(waiting)} of {actors} target actors not started within "
                f"{start_timeout_s:.0f}s (each needs {cpus_per_actor} CPU, {gpus_per_actor} GPU; free now: "
                f"{ray.available_resources()})")
        nodes = []
        for i, ref in enumerate(refs):
            try:
                nodes.append(ray.get(ref))
            except Exception as exc:
                raise RayPoolError(f"Ray actor {i} could not load the target {spec.path}: {_cause(exc)}") from None
        # The address each node registered with (what `ray status` shows), not the host's default IP.
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        for n in nodes:
            n["ip"] = ips.get(n["node_id"], "?")
        pool = cls(address, handles, nodes, log, load=[0] * actors)
        log(f"ray: {actors} target actors on " + ", ".join(f"{n['ip']} (node {n['node_id'][:8]})" for n in nodes))
        return pool

    # -- info ------------------------------------------------------------------------------
    def info(self) -> dict:
        """identity, generator name and facts of the target the actors hold (all the same)."""
        return self.nodes[0]

    def where(self, i: int) -> str:
        n = self.nodes[i]
        return f"actor {i} on node {n['ip']} (node id {n['node_id'][:12]}, pid {n['pid']})"

    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.dead]

    # -- calls -----------------------------------------------------------------------------
    def submit(self, method: str, *args, key: Any = None) -> _Call:
        call = _Call(method, args, key)
        self._send(call)
        return call

    def _send(self, call: _Call) -> None:
        live = self.live()
        if not live:
            raise RayPoolError("every Ray target actor died: " + "; ".join(self.dead.values()))
        i = min(live, key=lambda j: self.load[j])
        call.actor, call.ref = i, getattr(self.actors[i], call.method).remote(*call.args)
        self.load[i] += 1

    def _settle(self, call: _Call) -> tuple[bool, Any]:
        """(True, result), or (False, None) after an actor death (the call was sent again)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

        try:
            result = ray.get(call.ref)
        except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
            self.load[call.actor] -= 1
            if call.actor not in self.dead:
                self.dead[call.actor] = f"{self.where(call.actor)} died: {_cause(exc)}"
                self.log(f"ray: {self.dead[call.actor]}; {len(self.live())} actors left")
            if call.resends >= MAX_RESENDS:
                raise RayPoolError(f"{call.method} call sent {call.resends + 1} times, every actor died: "
                                   + "; ".join(self.dead.values())) from None
            call.resends += 1
            self._send(call)
            return False, None
        except RayTaskError as exc:
            # The target itself failed (bad input, a backend error): no point in another actor.
            raise RayPoolError(f"{call.method} failed on {self.where(call.actor)}: {_cause(exc)}") from None
        self.load[call.actor] -= 1
        return True, result

    def get(self, call: _Call) -> Any:
        while True:
            ok, result = self._settle(call)
            if ok:
                return result

    def as_completed(self, calls: Iterable[_Call], refill: Callable[[], _Call | None] = lambda: None) -> Iterator[tuple[_Call, Any]]:
        """(call, result) as they finish; after each, `refill()` may submit one more call."""
        import ray

        pending = list(calls)
        while pending:
            ready, _ = ray.wait([c.ref for c in pending], num_returns=1)
            call = next(c for c in pending if c.ref == ready[0])
            ok, result = self._settle(call)
            if ok:
                pending.remove(call)
                yield call, result
                more = refill()
                if more is not None:
                    pending.append(more)

    def close(self) -> None:
        import ray

        for h in self.actors:
            try:
                ray.kill(h)
            except Exception:
                pass  # already gone with its node


def _cause(exc: BaseException) -> str:
    """The first informative line of a Ray error (they carry whole remote tracebacks)."""
    text = str(getattr(exc, "cause", None) or exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Traceback", "File ", "^"))]
    return (useful[-1] if useful else type(exc).__name__)[:400]


# -- resampling -----------------------------------------------------------------------------------
class PoolBatches:
    """Resampling batches spread over the pool's actors, for training.resample.resample_rows: each
    actor runs resample_batch on the batch the local path would, DEPTH calls queued per actor."""

    def __init__(self, pool: TargetPool):
        self.pool = pool
        self.generator = pool.info()["generator"]
        self.generation_batch_size = pool.info().get("generation_batch_size")

    def describe(self) -> str:
        return f"on {len(self.pool.live())} Ray actors"

    def run(self, batches: list[tuple[int, list[dict]]], cfg) -> Iterator[tuple[int, list[dict], str]]:
        queue = deque(batches)

        def refill():
            if not queue:
                return None
            no, batch = queue.popleft()
            return self.pool.submit("resample_batch", batch, cfg, self.generator, no, key=no)

        first = [c for c in (refill() for _ in range(DEPTH * len(self.pool.live()))) if c is not None]
        for call, out in self.pool.as_completed(first, refill):
            yield call.key, out, f" from {self.pool.where(call.actor)}"


# -- hidden states --------------------------------------------------------------------------------
class FeatureTarget:
    """A stand-in for the target inside training.hidden_states.write_hidden_states: `features`
    answers from the pool's actors, which work ahead on the same packed batches the writer forms.

    `prefetch(rows, max_tokens_per_batch)` returns the rows for the writer and plans the batches
    from a copy of the same stream, keeping DEPTH per actor in flight. Each `features` call takes
    the next planned result after checking it is the batch asked for; a batch that was not
    planned (a different packing) is computed on an actor there and then, so correctness never
    rests on the plan.
    """

    def __init__(self, pool: TargetPool, log: Callable[[str], Any] = print):
        from training.targets.base import TargetFacts

        self.pool, self.log = pool, log
        info = pool.info()
        self.identity = info["identity"]
        self.facts = TargetFacts(**info["facts"])
        self._plan: Iterator | None = None
        self._ahead: deque = deque()
        self._aux_ids: tuple[int, ...] | None = None
        self.batches = 0

    def default_aux_layer_ids(self) -> tuple[int, ...]:
        from training.targets import default_aux_layer_ids

        return default_aux_layer_ids(self.facts.num_layers)

    def prefetch(self, rows: Iterable, max_tokens_per_batch: int, aux_layer_ids) -> Iterator:
        import itertools

        from training.hidden_states import feature_batches

        mine, theirs = itertools.tee(rows)
        self._plan = feature_batches(mine, max_tokens_per_batch, {"skipped_empty": 0})
        self._aux_ids = tuple(int(i) for i in aux_layer_ids)
        self._fill()
        return theirs

    def _fill(self) -> None:
        while self._plan is not None and len(self._ahead) < DEPTH * max(len(self.pool.live()), 1):
            batch = next(self._plan, None)
            if batch is None:
                self._plan = None
                return
            seqs = [r[0].tolist() for r in batch]
            self._ahead.append((seqs, self.pool.submit("features", seqs, self._aux_ids)))

    def features(self, sequences, aux_layer_ids) -> dict:
        sequences = [list(map(int, s)) for s in sequences]
        ids = tuple(int(i) for i in aux_layer_ids)
        if self._ahead and ids == self._aux_ids and self._ahead[0][0] == sequences:
            _, call = self._ahead.popleft()
        else:
            if self._ahead:
                self.log("hidden states: a batch differs from the planned one; computing it directly")
            call = self.pool.submit("features", sequences, ids)
        out = self.pool.get(call)
        self._fill()
        self.batches += 1
        if self.batches % 8 == 0:
            self.log(f"hidden states: {self.batches} batches back from {len(self.pool.live())} Ray actors")
        return out
