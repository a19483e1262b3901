import dagster as dg
import pytest

from resources.corpus_source import CorpusSourceResource
from resources.object_store import ArtifactRefIOManager, ObjectStoreResource


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
        **extra,
    }
