"""The one place where an asset becomes incremental: fingerprint, cache hit, atomic write, DataVersion.

Every asset body calls `materialize_artifact` with what its output depends on and a `build`
function that writes the files; nothing else in the code location decides whether to recompute.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import dagster as dg

from spec_assets.metadata import summary_metadata
from training.fingerprint import fingerprint
from training.storage import ArtifactRef, ArtifactWriter, ObjectStore, artifact_prefix


def input_name(asset: str, shard: str | None = None) -> str:
    """How `upstream` names an input: a same-shard or unpartitioned input by its asset,
    each shard a fan-in reads as `asset/shard`. The currentness judge (spec_assets/plan.py)
    looks the recorded fingerprints up by these names."""
    return f"{asset}/{shard}" if shard else asset


def materialize_artifact(
    context: dg.AssetExecutionContext,
    store: ObjectStore,
    *,
    build: Callable[[ArtifactWriter], None],
    upstream: Mapping[str, str],
    config: Mapping[str, Any] | None = None,
    target: str | None = None,
) -> dg.Output[ArtifactRef]:
    """Write the asset's artifact under its fingerprint unless a complete one is already there.

    `upstream` maps input names (`input_name`) to their fingerprints (or, for a source file, its
    content digest); it is recorded as the `inputs` metadata, the fingerprints this materialization
    read. The asset's code_version comes from its definition so it cannot drift from what Dagster shows.
    """
    asset = context.asset_key.to_user_string()
    partition = context.partition_key if context.has_partition_key else None
    code_version = context.assets_def.code_versions_by_key[context.asset_key] or "0"
    fp = fingerprint(asset=asset, code_version=code_version, config=config, upstream=upstream, target=target)
    prefix = artifact_prefix(asset, partition, fp)

    manifest = store.manifest(prefix)
    cache_hit = manifest is not None
    if cache_hit:
        context.log.info(f"cache hit: {store.url(prefix)} is complete for fingerprint {fp}")
    else:
        with store.artifact(prefix, fp) as writer:
            build(writer)
        manifest = store.manifest(prefix)
        assert manifest is not None, f"artifact {prefix} finished without a manifest"

    metadata = {
        **summary_metadata(manifest.summary),
        "fingerprint": fp,
        "inputs": dg.MetadataValue.json(dict(upstream)),
        "cache_hit": cache_hit,
        "path": dg.MetadataValue.path(store.url(prefix)),
        "bytes": manifest.total_bytes,
    }
    ref = ArtifactRef(asset=asset, partition=partition, fingerprint=fp, prefix=prefix)
    # data_version is flagged beta, but it is how Dagster learns that an unchanged input needs
    # no recompute downstream; the warning would print on every step of every run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(ref, data_version=dg.DataVersion(fp), metadata=metadata)
