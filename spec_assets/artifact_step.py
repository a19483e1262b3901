"""The one place where an asset becomes incremental: fingerprint, cache hit, atomic write, DataVersion.

Every asset body calls `materialize_artifact` with what its output depends on and a `build`
function that writes the files; nothing else in the code location decides whether to recompute.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import dagster as dg

from training.fingerprint import fingerprint
from training.storage import ArtifactRef, ArtifactWriter, ObjectStore, artifact_prefix


def summary_metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Manifest summary -> Dagster metadata: numbers and strings as they are, `*_md` keys as
    markdown, lists of rows as a markdown table, other structures as JSON."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key.endswith("_md"):
            out[key[:-3]] = dg.MetadataValue.md(str(value))
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            out[key] = dg.MetadataValue.md(markdown_table(value))
        elif isinstance(value, (dict, list)):
            out[key] = dg.MetadataValue.json(value)
        elif value is not None:
            out[key] = value
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


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

    `upstream` maps input names to their fingerprints (or, for a source file, its content digest);
    the asset's code_version comes from its definition so it cannot drift from what Dagster shows.
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
