"""How an asset's figures read in the Dagster UI: the one place that turns a summary into metadata.

Headline numbers stay plain floats, so the asset's Plots tab charts them across materializations,
rounded to SIGNIFICANT digits (`tau 1.412`, not `1.4117179153029566`). Rows (per k, per draft
position, a preview) become table metadata with a typed schema; keys ending in `_md` are markdown;
any other structure is JSON with its floats rounded the same way. Assets put full-precision values in
their summaries: the rounding happens here, once. A count by reason keeps its MAX_REASONS largest
(`top_counts`) and an image is inline markdown (`png_md`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import dagster as dg

SIGNIFICANT = 4  # digits: a tau of 1.412, a loss of 2.346, a coverage of 0.9871
# Reasons carry the offending value (`unknown_role:<name>`): a file with many bogus roles would
# otherwise grow the metadata without bound. The rejects Parquet keeps every row and reason.
MAX_REASONS = 20


def rounded(x: float, digits: int = SIGNIFICANT) -> float:
    """x to `digits` significant digits, still a float (NaN and infinities as they are)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _round_json(value: Any) -> Any:
    if isinstance(value, float):
        return rounded(value)
    if isinstance(value, dict):
        return {k: _round_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round_json(v) for v in value]
    return value


def _column_type(values: list) -> str:
    """Dagster's column type for a column's non-null values: int, float, bool or string."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "string"


def table(rows: list[Mapping[str, Any]]) -> dg.TableMetadataValue:
    """Rows of {column: value} as table metadata: columns in first-seen order, typed from their
    values, floats rounded, anything that is not a number or a bool shown as text."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    types = {c: _column_type([r.get(c) for r in rows]) for c in columns}

    def cell(value: Any, kind: str) -> Any:
        if value is None:
            return None
        if kind == "float":
            return rounded(float(value))
        if kind in ("int", "bool"):
            return value
        return str(value)

    schema = dg.TableSchema(columns=[dg.TableColumn(c, types[c]) for c in columns])
    records = [dg.TableRecord({c: cell(r.get(c), types[c]) for c in columns}) for r in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def summary_metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest summary as Dagster metadata: numbers (floats rounded) and strings as they are,
    `*_md` keys as markdown, lists of rows as tables, other structures as JSON; None is left out."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key.endswith("_md"):
            out[key[:-3]] = dg.MetadataValue.md(str(value))
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            out[key] = table(value)
        elif isinstance(value, (dict, list)):
            out[key] = dg.MetadataValue.json(_round_json(value))
        elif isinstance(value, float):
            out[key] = rounded(value)
        elif value is not None:
            out[key] = value
    return out


def top_counts(counts: Mapping[str, int], limit: int = MAX_REASONS) -> dict[str, int]:
    """{reason: count} for the `limit` most frequent (ties by reason), the rest summed under one key,
    so the counts still add up to the total."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    top, rest = dict(ranked[:limit]), ranked[limit:]
    if rest:
        top[f"({len(rest)} more reasons)"] = sum(n for _, n in rest)
    return top


def png_md(png: bytes, alt: str) -> str:
    """A PNG inline in markdown (a `*_md` summary key shows it in the UI)."""
    import base64

    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def recorded(record, key: str) -> Any:
    """The plain value of metadata `key` on a materialization record (an EventLogRecord), or None."""
    value = record.asset_materialization.metadata.get(key)
    return value.value if value is not None else None
