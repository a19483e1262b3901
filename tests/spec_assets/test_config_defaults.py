"""The library dataclasses own the defaults; the Dagster Config classes mirror them field by field
(they cannot import them: training.resample loads pyarrow, which the code location must not)."""

import dataclasses

import pytest

from spec_assets.resample import ResampledCorpusConfig
from spec_assets.tokenize import TokenizedShardsConfig
from training.resample import ResampleConfig
from training.tokenization import TokenizeConfig

# Dagster-only switches, and library fields that come from elsewhere than the step's config.
PAIRS = [
    (ResampledCorpusConfig, ResampleConfig, {"resample"}, set()),
    (TokenizedShardsConfig, TokenizeConfig, set(), {"chat_template_kwargs", "vocab_size"}),  # from the target resource
]


def _library_defaults(cls) -> dict:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("dagster_cls, library_cls, dagster_only, library_only", PAIRS,
                         ids=[p[0].__name__ for p in PAIRS])
def test_dagster_config_defaults_equal_the_library(dagster_cls, library_cls, dagster_only, library_only):
    lib = _library_defaults(library_cls)
    dag = {k: v.default for k, v in dagster_cls.model_fields.items()}
    assert set(dag) - dagster_only == set(lib) - library_only, "fields drifted between the Dagster config and the library"
    for name in set(lib) - library_only:
        value = dag[name]
        if name == "temperatures":  # Dagster config keys are strings
            value = {float(t): w for t, w in value.items()}
            assert library_cls(**{name: value}).temperatures == lib[name]
        else:
            assert value == lib[name], f"{dagster_cls.__name__}.{name} = {value!r}, library default {lib[name]!r}"
