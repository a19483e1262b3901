"""Helpers of the Dagster-layer tests (also used by tests/e2e): resources on a test store, a
DAGSTER_HOME, a graph environment. The `instance` and `tiny_target` fixtures are in tests/conftest.py."""

from pathlib import Path

from resources.corpus_source import CorpusSourceResource
from resources.object_store import ArtifactRefIOManager, ObjectStoreResource
from resources.ray_cluster import RayClusterResource


def make_resources(store_root: str, corpus_location: str, **extra) -> dict:
    """The definitions' resources pointed at a test store and corpus."""
    object_store = ObjectStoreResource(root=store_root)
    return {
        "object_store": object_store,
        "artifact_refs": ArtifactRefIOManager(object_store=object_store),
        "corpus": CorpusSourceResource(location=corpus_location),
        "ray_cluster": RayClusterResource(),  # local
        **extra,
    }


def new_dagster_home(folder: Path, *, ui: bool = False) -> Path:
    """A DAGSTER_HOME without telemetry (ui: and without the first-visit dialog over the pages)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n" + ("nux:\n  enabled: false\n" if ui else ""))
    return folder


def graph_env(root: Path, target: Path, *, n_shards: int, ui: bool = False) -> dict[str, str]:
    """A demo corpus of `n_shards` small shards, a store and a DAGSTER_HOME under `root`: the
    variables a shell would export to run the graph on them with `target`."""
    from training.demo.corpus import write_demo_corpus

    write_demo_corpus(root / "corpus", n_shards=n_shards, rows_per_shard=16, seed=1)
    return {"DAGSTER_HOME": str(new_dagster_home(root / "dagster_home", ui=ui)),
            "SPECDRAFT_ROOT": (root / "store").as_uri(),
            "SPECDRAFT_TARGET": str(target),
            "SPECDRAFT_CORPUS": str(root / "corpus")}


def pool_occupancy(home: Path, pool: str) -> tuple[int, int]:
    """(slots occupied, limit) of a concurrency pool of the instance in `home`, as `dagster instance
    concurrency get` prints them (Dagster has no public Python API for it)."""
    import re

    from spec_assets.instance import dagster_cli

    out = dagster_cli(["-m", "dagster", "instance", "concurrency", "get", pool], home, f"reading pool {pool}")
    match = re.search(rf'"{re.escape(pool)}": (\d+) / (\d+) slots occupied', out)
    assert match, f"unexpected `dagster instance concurrency get` output: {out!r}"
    return int(match.group(1)), int(match.group(2))
