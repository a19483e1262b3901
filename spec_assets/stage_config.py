"""The Dagster Config of each stage, generated from the library's dataclass (training/configs.py,
training/recipe.py): a field's name, type, default and description are written once, there.

Dagster config has lists, not tuples, and string mapping keys, so a tuple field becomes a list and
a dict keyed by floats (resampling's temperature mixture) one keyed by strings; the dataclass's own
__post_init__ turns them back. An asset's own switches (draft_model's `mode`, say) are fields of a
subclass, declared there and nowhere else.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import dagster as dg
import pydantic


class StageConfig(dg.Config):
    """A stage's Dagster config; `library` builds the library's dataclass from it."""

    def library(self, cls, **overrides):
        """`cls` built from this config's fields of the same names, plus `overrides` (fields that come
        from elsewhere than the step's config, such as the target's chat settings)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name in type(self).model_fields}
        return cls(**values, **overrides)


def _dagster_type(tp: Any) -> Any:
    """A dataclass field's type as a Dagster config type: tuples as lists, mapping keys as str."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_dagster_type(a) for a in args)]
    if origin in (tuple, list):  # tuple[int, ...] and tuple[float, float] alike
        return list[_dagster_type(args[0])]
    if origin is dict:
        return dict[str, _dagster_type(args[1])]
    return tp


def _dagster_value(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_dagster_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _dagster_value(v) for k, v in value.items()}
    return value


def _fields(cls, names) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = (_dagster_type(hints[f.name]),
                       pydantic.Field(default=_dagster_value(default), description=f.metadata.get("doc")))
    return out


def stage_config(*sources) -> type[StageConfig]:
    """A StageConfig base with the fields of each source: a dataclass (every field), or (dataclass,
    field names). An asset's config subclasses it: `class VocabMapConfig(stage_config(VocabConfig))`."""
    fields: dict[str, tuple[Any, Any]] = {}
    for source in sources:
        cls, names = source if isinstance(source, tuple) else (source, None)
        fields |= _fields(cls, names)
    name = "".join((s[0] if isinstance(s, tuple) else s).__name__ for s in sources) + "Fields"
    return pydantic.create_model(name, __base__=StageConfig, __module__=__name__, **fields)
