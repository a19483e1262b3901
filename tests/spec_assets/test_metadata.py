"""Asset metadata a person reads: rounded headline floats (still numbers, so the Plots tab charts
them), rows as typed tables, markdown for `*_md`, rounded JSON for other structures."""

import dagster as dg

from spec_assets.metadata import MAX_REASONS, png_md, rounded, summary_metadata, table, top_counts


def test_rounded_keeps_four_significant_digits_and_the_float_type():
    assert rounded(1.4117179153029566) == 1.412 and isinstance(rounded(1.4117179153029566), float)
    assert rounded(0.000123456) == 0.0001235
    assert rounded(1590.94) == 1591.0
    assert rounded(float("inf")) == float("inf")


def test_summary_metadata_rounds_floats_and_makes_tables():
    md = summary_metadata({
        "tau": 1.4117179153029566,
        "rows": 12,
        "name": "x",
        "skipped": None,
        "report_md": "# title",
        "by_reason": {"a": 3, "b": 0.123456789},
        "tau_by_k": [{"k": 1, "tau": 1.23456, "prompt_lookup_tau": None},
                     {"k": 2, "tau": 2.0, "prompt_lookup_tau": 1.5}],
    })
    assert md["tau"] == 1.412 and isinstance(md["tau"], float)  # a plain float: charted across runs
    assert md["rows"] == 12 and md["name"] == "x" and "skipped" not in md
    assert isinstance(md["report"], dg.MarkdownMetadataValue) and md["report"].value == "# title"
    assert md["by_reason"].value == {"a": 3, "b": 0.1235}
    t = md["tau_by_k"]
    assert isinstance(t, dg.TableMetadataValue)
    assert [(c.name, c.type) for c in t.schema.columns] == [("k", "int"), ("tau", "float"),
                                                           ("prompt_lookup_tau", "float")]
    assert [r.data for r in t.records] == [{"k": 1, "tau": 1.235, "prompt_lookup_tau": None},
                                           {"k": 2, "tau": 2.0, "prompt_lookup_tau": 1.5}]


def test_table_types_mixed_and_text_columns():
    t = table([{"id": "a", "turns": 2, "ok": True, "share": 1}, {"id": 7, "turns": 3, "ok": False, "share": 0.5}])
    assert [(c.name, c.type) for c in t.schema.columns] == [("id", "string"), ("turns", "int"), ("ok", "bool"),
                                                           ("share", "float")]
    assert t.records[1].data == {"id": "7", "turns": 3, "ok": False, "share": 0.5}


def test_top_counts_keeps_the_largest_and_sums_the_rest():
    counts = {f"r{i:02d}": i + 1 for i in range(MAX_REASONS + 5)}
    top = top_counts(counts)
    assert len(top) == MAX_REASONS + 1 and top["(5 more reasons)"] == sum(range(1, 6))
    assert list(top)[0] == f"r{MAX_REASONS + 4:02d}" and sum(top.values()) == sum(counts.values())
    assert top_counts({"b": 2, "a": 2, "c": 1}, limit=2) == {"a": 2, "b": 2, "(1 more reasons)": 1}  # ties by name
    assert top_counts({}) == {}


def test_png_md_is_inline_markdown():
    assert png_md(b"\x89PNG", "a plot") == "![a plot](data:image/png;base64,iVBORw==)"
