from pathlib import Path

import dagster as dg
import pytest

from resources.corpus_source import CorpusSourceResource
from resources.object_store import ArtifactRefIOManager, ObjectStoreResource
from resources.ray_cluster import RayClusterResource


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def make_resources(store_root: str, corpus_location: str, **extra) -> dict:
    """The definitions' resources pointed at a test store and corpus."""
    object_store = ObjectStoreResource(root=store_root)
    return {
        "object_store": object_store,
        "artifact_refs": ArtifactRefIOManager(object_store=object_store),
        "corpus": CorpusSourceResource(location=corpus_location),
        "ray_cluster": RayClusterResource(),  # local unless SPECDRAFT_RAY_ADDRESS is set
        **extra,
    }


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    """A random-weight 8-layer Llama (H=64, distinct aux layers) that every graph test runs."""
    from training.targets.tiny import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("target") / "tiny", hidden_size=64, num_layers=8)


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
