"""The library dataclasses own the defaults; the Dagster Config classes mirror them field by field
(they cannot import them: the library modules load pyarrow, torch or matplotlib, which the code
location must not)."""

import dataclasses

import pytest

from spec_assets.corpus import SourceCorpusConfig
from spec_assets.evaluation import EvalReportConfig
from spec_assets.hidden_states import HiddenStatesConfig
from spec_assets.resample import ResampledCorpusConfig
from spec_assets.tokenize import TokenizedShardsConfig, VocabMapConfig
from training.corpus import SplitConfig
from training.evaluation import EvalConfig
from training.hidden_states import FeatureConfig
from training.resample import ResampleConfig
from training.tokenization import TokenizeConfig
from training.vocab import VocabConfig

# Dagster-only switches, and library fields that come from elsewhere than the step's config.
PAIRS = [
    (SourceCorpusConfig, SplitConfig, set(), set()),
    (ResampledCorpusConfig, ResampleConfig, {"resample"}, set()),
    (TokenizedShardsConfig, TokenizeConfig, set(), {"chat_template_kwargs", "vocab_size"}),  # from the target resource
    (VocabMapConfig, VocabConfig, set(), set()),
    (HiddenStatesConfig, FeatureConfig, set(), set()),
    (EvalReportConfig, EvalConfig, {"prompts_url"}, set()),  # a location, like the corpus resource's eval_prompts
]


def _library_defaults(cls) -> dict:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def _comparable(name: str, value):
    if name == "temperatures" and isinstance(value, dict):  # Dagster config keys are strings
        return {float(t): w for t, w in value.items()}
    return list(value) if isinstance(value, tuple) else value  # Dagster config has lists, not tuples


@pytest.mark.parametrize("dagster_cls, library_cls, dagster_only, library_only", PAIRS,
                         ids=[p[0].__name__ for p in PAIRS])
def test_dagster_config_defaults_equal_the_library(dagster_cls, library_cls, dagster_only, library_only):
    lib = _library_defaults(library_cls)
    dag = {k: v.default for k, v in dagster_cls.model_fields.items()}
    assert set(dag) - dagster_only == set(lib) - library_only, "fields drifted between the Dagster config and the library"
    for name in set(lib) - library_only:
        value = _comparable(name, dag[name])
        # through the library's own normalization (ResampleConfig keys temperatures by float)
        value = getattr(library_cls(**{name: value}), name)
        assert _comparable(name, value) == _comparable(name, lib[name]), (
            f"{dagster_cls.__name__}.{name} = {dag[name]!r}, library default {lib[name]!r}")


@pytest.mark.parametrize("dagster_cls, library_cls, dagster_only, library_only", PAIRS,
                         ids=[p[0].__name__ for p in PAIRS])
def test_the_dagster_config_builds_the_library_config(dagster_cls, library_cls, dagster_only, library_only):
    """What the asset hands the library (its config less the Dagster-only switches) is accepted as is."""
    dumped = dagster_cls().model_dump(exclude=dagster_only)
    if "temperatures" in dumped and isinstance(dumped["temperatures"], dict):
        dumped["temperatures"] = _comparable("temperatures", dumped["temperatures"])
    assert dataclasses.asdict(library_cls(**dumped)) == dataclasses.asdict(library_cls())
