"""Arrow types that more than one stage's tables use, defined once.

MESSAGE_TYPE is a chat turn in every conversation table (source_corpus, resampled_corpus);
REJECTS_SCHEMA is the row a stage writes for a conversation it cannot use (resampling,
tokenization). Ingestion's own rejects carry more (the source file, line and raw record):
training/corpus/schema.py's SOURCE_REJECTS_SCHEMA. pyarrow only: any stage imports this cheaply.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
