"""The one way files are reached: fsspec, with its local filesystem for paths and file:// URLs and
s3fs for s3:// URLs, configured here. The object store (training/storage.py, and DuckDB through
it), the corpus readers and listings, online training's tokenized inputs, evaluation's prompt file,
source fingerprints and the CLI's plan all open files through `filesystem`.

S3 settings come from the standard AWS variables (credentials through botocore's own chain, never
config): only the endpoint and region are passed on, so a loopback or on-prem S3 API works.
"""

from __future__ import annotations

import os
from typing import Any

S3_MAX_ATTEMPTS = 3  # botocore attempts per S3 request (standard retry mode)
S3_CONNECT_TIMEOUT_S = 5  # a refused or unroutable endpoint fails in seconds, then is retried
# Reuse one S3 client per endpoint and settings (fsspec drops its instance cache after a fork):
# building a botocore client costs ~0.4 s, more than listing or reading a corpus shard.
REUSE_CLIENT = {"skip_instance_cache": False}


def s3_storage_options() -> dict[str, Any]:
    """s3fs options from the environment: endpoint and region, listings never cached (a manifest
    another process wrote is seen at once), bounded request retries with a short connect timeout
    (botocore's legacy default retries a dead endpoint for ~10 s per call)."""
    # A fresh client per call: fsspec's instance cache keys on these options only, so a cached
    # client would keep credentials the environment has since changed. (Readers that open many
    # files opt into reuse: REUSE_CLIENT.)
    opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    # botocore reads AWS_MAX_ATTEMPTS / AWS_RETRY_MODE itself; an explicit retries setting would
    # override them, so it is set only when they are not.
    config: dict[str, Any] = {"connect_timeout": S3_CONNECT_TIMEOUT_S}
    if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        config["retries"] = {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}
    opts["config_kwargs"] = config
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, path within it) for a local path, file:// or s3:// URL; `storage_options`
    replace the defaults of the same name (an explicit endpoint, say)."""
    import fsspec

    defaults = s3_storage_options() if str(url).startswith("s3://") else {}
    return fsspec.core.url_to_fs(str(url), **{**defaults, **(storage_options or {})})
