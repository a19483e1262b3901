import dagster as dg

from training.paths import default_store_root
from training.storage import ArtifactRef, ObjectStore


class ObjectStoreResource(dg.ConfigurableResource):
    """The object store under `root` (file:// or s3://; definitions.py wires SPECDRAFT_ROOT); empty
    means the local data folder.

    S3 credentials are never config: s3fs reads AWS_* variables through botocore's own chain, so
    they never reach the run config the UI shows.
    """

    root: str = ""

    def resolved_root(self) -> str:
        return self.root or default_store_root()

    def store(self) -> ObjectStore:
        return ObjectStore(self.resolved_root())


def _ref_key(asset: str, partition: str | None) -> str:
    return f"_refs/{asset}/{partition or '_'}.json"


def write_ref(store: ObjectStore, ref: ArtifactRef) -> None:
    store.write_json(_ref_key(ref.asset, ref.partition), ref.to_json())


def read_ref(store: ObjectStore, asset: str, partition: str | None = None) -> ArtifactRef:
    """The latest materialization's ArtifactRef of `asset` (and partition), or a Failure saying to materialize it."""
    key = _ref_key(asset, partition)
    try:
        return ArtifactRef.from_json(store.read_json(key))
    except FileNotFoundError:
        where = f" partition {partition!r}" if partition else ""
        raise dg.Failure(
            f"{asset}{where} has not been materialized yet (no pointer at {store.url(key)}); materialize it first"
        ) from None


class ArtifactRefIOManager(dg.ConfigurableIOManager):
    """Stores each output's ArtifactRef as a small JSON pointer in the object store.

    Big artifacts are written by the assets themselves; this only passes "where is the finished
    artifact" downstream, keyed by asset and partition, so fan-ins read every shard's pointer.
    """

    object_store: dg.ResourceDependency[ObjectStoreResource]

    def handle_output(self, context: dg.OutputContext, obj: ArtifactRef) -> None:
        if not isinstance(obj, ArtifactRef):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not an ArtifactRef")
        write_ref(self.object_store.store(), obj)

    def load_input(self, context: dg.InputContext):
        store = self.object_store.store()
        asset = context.asset_key.to_user_string()
        if not context.has_asset_partitions:
            return read_ref(store, asset)
        refs = {p: read_ref(store, asset, p) for p in sorted(context.asset_partition_keys)}
        # A per-shard asset reads its own shard's ref; a fan-in (unpartitioned) reads them all.
        if context.has_partition_key:
            (ref,) = refs.values()
            return ref
        return refs
