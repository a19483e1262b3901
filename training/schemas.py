"""Arrow types that more than one stage's tables use, defined once.

MESSAGE_TYPE is a chat turn in every conversation table (source_corpus, resampled_corpus);
REJECTS_SCHEMA is the row a stage writes for a conversation it cannot use (resampling,
tokenization). Ingestion's own rejects carry more (the source file, line and raw record):
training/corpus/schema.py's SOURCE_REJECTS_SCHEMA. pyarrow only: any stage imports this cheaply.
"""

from __future__ import annotations

import pyarrow as pa

# role system|user|assistant|tool; content always a string ("" for an assistant turn that only
# reasons or calls tools). The optional fields are null when absent:
#   reasoning_content  the assistant's reasoning, kept apart from its reply (vLLM/SGLang reasoning
#                      parsers, regenerated reasoning data sets, gpt-oss's analysis channel)
#   tool_calls         JSON text of the assistant's calls: [{"id", "type": "function", "function":
#                      {"name", "arguments": {...}}}] (arguments an object, as chat templates expect)
#   tool_call_id, name a tool result's call id and tool name
MESSAGE_FIELDS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")
MESSAGE_TYPE = pa.struct([(name, pa.string()) for name in MESSAGE_FIELDS])

REJECTS_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
