"""The corpus tables' Arrow schemas and the error raised for a source that cannot be read."""

from __future__ import annotations

import pyarrow as pa

from training.schemas import MESSAGE_TYPE

# Fields stay nullable (pyarrow's default) so tables other stages build with the same field
# names and types compare equal without having to repeat nullability flags.
CONVERSATION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
        ("source", pa.string()),
        ("tools", pa.string()),  # JSON text of the record's tool schemas (OpenAI `tools`), null without
    ]
)

# A source record that could not be normalized (the stages' rejects: training/schemas.py).
SOURCE_REJECTS_SCHEMA = pa.schema(
    [
        ("source_url", pa.string()),
        ("row_index", pa.int64()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)

RAW_CHARS = 500  # how much of a rejected record the rejects table keeps


class CorpusError(RuntimeError):
    """A source location or file cannot be read at all; the message names the URL and the cause."""
