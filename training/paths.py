"""Where the project keeps its local state when no environment variable says otherwise."""

import os
from pathlib import Path


def project_dir() -> Path:
    """The checkout this package was installed from (an editable install, as the Makefile does)."""
    return Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Local data folder: default object-store root, demo corpus and target, Dagster instance."""
    return Path(os.environ.get("SPECDRAFT_DATA_DIR") or project_dir() / "data").resolve()


def default_store_root() -> str:
    return (data_dir() / "store").as_uri()


def default_dagster_home() -> Path:
    return data_dir() / "dagster_home"
