"""training/filesystem.py is the one way files are reached: S3 settings from the environment,
overrides by name, and no other module of the package builds an fsspec filesystem itself."""

import re
from pathlib import Path

from training.filesystem import REUSE_CLIENT, filesystem

ROOT = Path(__file__).resolve().parents[2]


def test_s3_settings_come_from_the_environment_and_overrides_replace_them(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    fs, path = filesystem("s3://bucket/a/b.parquet")
    assert path == "bucket/a/b.parquet"
    assert fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-3"}
    assert fs.config_kwargs["retries"] == {"max_attempts": 3, "mode": "standard"}
    assert fs.dircache.use_listings_cache is False  # another process's new manifest is seen at once
    # An explicit option replaces the default of its name; a reader's reuse returns one client.
    other, _ = filesystem("s3://bucket/x", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:2"}})
    assert other.client_kwargs == {"endpoint_url": "http://127.0.0.1:2"}
    assert filesystem("s3://bucket/x", REUSE_CLIENT)[0] is filesystem("s3://bucket/y", REUSE_CLIENT)[0]
    assert filesystem("s3://bucket/x")[0] is not filesystem("s3://bucket/x")[0]
    # The deployment's botocore retry settings win: none is set over them.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert "retries" not in filesystem("s3://bucket/x")[0].config_kwargs


def test_local_paths_and_file_urls(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    for url in (str(tmp_path / "f.txt"), (tmp_path / "f.txt").as_uri()):
        fs, path = filesystem(url)
        assert fs.cat_file(path) == b"x"


def test_no_other_module_builds_a_filesystem():
    pattern = re.compile(r"^\s*(import fsspec|from fsspec)|fsspec\.(core|filesystem|open)", re.M)
    offenders = [str(p.relative_to(ROOT)) for package in ("training", "spec_assets", "resources")
                 for p in sorted((ROOT / package).rglob("*.py"))
                 if p.name != "filesystem.py" and pattern.search(p.read_text())]
    assert offenders == []
