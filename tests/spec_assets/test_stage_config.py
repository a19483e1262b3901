"""Each stage's Dagster config is generated from its library dataclass (spec_assets/stage_config.py):
what a run config sets reaches the library as the library's own types, and the launchpad shows
every field's description."""

import dagster as dg
import pytest

from spec_assets.corpus import SourceCorpusConfig
from spec_assets.draft import DraftModelConfig
from spec_assets.evaluation import EvalReportConfig
from spec_assets.hidden_states import HiddenStatesConfig
from spec_assets.resample import ResampledCorpusConfig
from spec_assets.stage_config import stage_config
from spec_assets.tokenize import TokenizedShardsConfig, VocabMapConfig
from training.configs import (EvalConfig, FeatureConfig, ResampleConfig, ResampleError, SplitConfig,
                              TokenizeConfig, VocabConfig)
from training.recipe import TrainConfig

# (asset, its Config, the library dataclass, fields the library gets from elsewhere than the step's config)
STAGES = [
    ("source_corpus", SourceCorpusConfig, SplitConfig, {}),
    ("resampled_corpus", ResampledCorpusConfig, ResampleConfig, {}),
    ("tokenized_shards", TokenizedShardsConfig, TokenizeConfig, {"chat_template_kwargs": {"a": 1}, "vocab_size": 9}),
    ("vocab_map", VocabMapConfig, VocabConfig, {}),
    ("hidden_states", HiddenStatesConfig, FeatureConfig, {}),
    ("draft_model", DraftModelConfig, TrainConfig, {}),
    ("eval_report", EvalReportConfig, EvalConfig, {}),
]
IDS = [s[0] for s in STAGES]


@pytest.mark.parametrize("asset, config_cls, library_cls, overrides", STAGES, ids=IDS)
def test_the_default_config_builds_the_library_default(asset, config_cls, library_cls, overrides):
    assert config_cls().library(library_cls, **overrides) == library_cls(**overrides)


def test_run_config_values_reach_the_library_in_its_types():
    # Dagster config has string keys and lists; the library gets float keys and tuples back.
    cfg = ResampledCorpusConfig(temperatures={"0.5": 3, "1.0": 1}, batch_size=4).library(ResampleConfig)
    assert cfg.temperatures == {0.5: 0.75, 1.0: 0.25} and cfg.batch_size == 4
    tc = DraftModelConfig(lr=1e-3, epochs=3, betas=[0.8, 0.9], export_checkpoint="last").library(TrainConfig)
    assert (tc.lr, tc.epochs, tc.betas, tc.export_checkpoint) == (1e-3, 3, (0.8, 0.9), "last")
    assert HiddenStatesConfig(aux_layer_ids=[1, 2, 3]).library(FeatureConfig).aux_layer_ids == (1, 2, 3)
    # and a bad value meets the library's own check, naming the field
    with pytest.raises(ResampleError, match="on_length"):
        ResampledCorpusConfig(on_length="truncate").library(ResampleConfig)
    with pytest.raises(ValueError, match="dtype"):
        HiddenStatesConfig(dtype="fp16").library(FeatureConfig)


def test_the_draft_config_carries_the_train_jobs_shape_fields():
    from training.job import DRAFT_FIELDS, TrainJob

    job_defaults = {name: f.default for name, f in TrainJob.__dataclass_fields__.items() if name in DRAFT_FIELDS}
    assert {name: DraftModelConfig().model_dump()[name] for name in DRAFT_FIELDS} == job_defaults
    assert DraftModelConfig(draft_hidden_size=512).draft_hidden_size == 512


@pytest.mark.parametrize("asset, config_cls, library_cls, overrides", STAGES, ids=IDS)
def test_the_launchpad_schema_describes_every_field(asset, config_cls, library_cls, overrides):
    from spec_assets.definitions import defs

    fields = defs.resolve_assets_def(asset).op.config_schema.as_field().config_type.fields
    assert set(fields) == set(config_cls.model_fields)
    undescribed = [name for name, f in fields.items() if not f.description]
    assert undescribed == [], f"{asset}: fields without a description {undescribed}"
    # the library's defaults, as Dagster shows them (a tuple as a list, float keys as strings)
    library = library_cls(**overrides)
    for name in set(fields) & set(library_cls.__dataclass_fields__):
        value = getattr(library, name)
        shown = fields[name].default_value
        if isinstance(value, dict):
            value = {str(k): v for k, v in value.items()}
        assert shown == (list(value) if isinstance(value, tuple) else value), f"{asset}.{name}"


def test_run_config_is_validated_against_the_generated_schema():
    from spec_assets.definitions import defs

    job = defs.resolve_job_def("train_job")
    good = {"ops": {"draft_model": {"config": {"epochs": 2, "betas": [0.8, 0.9]}},
                    "eval_report": {"config": {"ks": [1, 2], "temperatures": [0.0]}}}}
    assert dg.validate_run_config(job, good)
    with pytest.raises(dg.DagsterInvalidConfigError, match="epochz"):
        dg.validate_run_config(job, {"ops": {"draft_model": {"config": {"epochz": 2}}}})
    with pytest.raises(dg.DagsterInvalidConfigError, match="betas"):
        dg.validate_run_config(job, {"ops": {"draft_model": {"config": {"betas": "0.9"}}}})


def test_dataclass_types_become_dagster_config_types():
    from dataclasses import dataclass, field

    @dataclass
    class Lib:
        pair: tuple[float, float] = (1.0, 2.0)
        mix: dict[float, float] = field(default_factory=lambda: {0.5: 1.0})
        maybe: int | None = None

    fields = stage_config(Lib).model_fields
    assert fields["pair"].annotation == list[float] and fields["pair"].default == [1.0, 2.0]
    assert fields["mix"].annotation == dict[str, float] and fields["mix"].default == {"0.5": 1.0}
    assert fields["maybe"].default is None and fields["maybe"].description is None
