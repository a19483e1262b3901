"""Summary numbers of a written corpus Parquet, computed by DuckDB (also over s3:// via the store)."""

from __future__ import annotations

_STATS_SQL = """
SELECT
    count(*) AS rows,
    coalesce(sum(len(messages)), 0) AS turns,
    coalesce(sum(len(list_filter(messages, lambda m: m.role = 'system'))), 0) AS system_turns,
    coalesce(sum(len(list_filter(messages, lambda m: m.role = 'user'))), 0) AS user_turns,
    coalesce(sum(len(list_filter(messages, lambda m: m.role = 'assistant'))), 0) AS assistant_turns,
    coalesce(sum(list_sum(list_transform(messages, lambda m: length(m.content)))), 0) AS characters,
    coalesce(sum(list_sum(list_transform(
        list_filter(messages, lambda m: m.role = 'assistant'), lambda m: length(m.content)))), 0)
        AS assistant_characters
FROM read_parquet(?)
"""


def corpus_stats(con, parquet_path: str | list[str]) -> dict:
    """rows, turns, system/user/assistant turns, characters (Unicode code points, as Python's
    len counts them), assistant characters and mean turns per row of CONVERSATION_SCHEMA Parquet.

    `con` is a DuckDB connection able to read the path (ObjectStore.duckdb() for s3://).
    """
    cursor = con.execute(_STATS_SQL, [parquet_path])
    names = [d[0] for d in cursor.description]
    stats = {name: int(value) for name, value in zip(names, cursor.fetchone())}
    stats["mean_turns_per_row"] = stats["turns"] / stats["rows"] if stats["rows"] else 0.0
    return stats
