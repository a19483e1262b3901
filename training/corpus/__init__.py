"""Corpus ingestion: source files in five chat formats to normalized conversation rows + rejects.

Sources (`list_sources`): .jsonl, .json (a JSON list, or JSONL under a .json name) and .parquet
files, local or s3://, read through fsspec with the ObjectStore's S3 settings (AWS_ENDPOINT_URL,
...), bounded retries and a connect timeout so an unreachable endpoint fails in seconds. A file's
shard key is its sanitized name stem; two files with one key are an error.

Formats, detected per record by which fields are present and non-null, first match wins (so an
UltraChat row with both `prompt` and `messages` is read as `messages`):
  openai             `messages`: [{role, content}], roles system|user|assistant; an assistant turn's
                     `reasoning_content` (or `reasoning`, `thinking`) is kept apart as its
                     reasoning_content, and with it the content may be null or empty (a reply cut
                     while reasoning)
  sharegpt           `conversations`: [{from, value}], from system | human, user | gpt, assistant,
                     chatgpt, bing, bard (the names the common dumps use), mapped to
                     system | user | assistant
  prompt_completion  `prompt` + `completion` (+ optional `system`)
  alpaca             `instruction` + `output` (+ optional `input`, `system`); the user turn is
                     the instruction, then a blank line and the input when there is one
  question           `turns`: [str] (MT-Bench / Spec-Bench question files, with `question_id`
                     and `category`): user turns, each followed by an empty assistant turn that
                     the target writes (resampling; evaluation asks later turns after the
                     target's own replies). Without resampling they are rejected [needs_generation]
In the flat formats a null or "" `system`/`input` means absent.

Row rules (a violation rejects the row with the reason code in brackets):
  - the record is a JSON object [not_an_object] of a known format [unrecognised_format];
  - turn lists are lists [invalid_turns] of objects with a role and a content key [invalid_turn];
    roles as above [unknown_role:<name>]; content is a string [non_string_content]; user and
    assistant content is not empty or whitespace-only [empty_content] (an empty system prompt is
    kept: it differs from none for templates with a default system prompt); text is valid
    Unicode [invalid_utf8]; there is at least one turn [empty_conversation]; reasoning is a
    string [non_string_content] on an assistant turn [misplaced_reasoning];
  - a system turn may only come first [misplaced_system];
  - at least one assistant turn [no_assistant_turn];
  - turn order is otherwise kept as given: consecutive turns of one role and a conversation that
    opens with an assistant turn are accepted unchanged (the tokenizer stage renders them with
    the target's own chat template); content is never stripped or rewritten.
  - id: the record's `id`, else `question_id` (string or integer; other types [invalid_id]),
    else `{shard}:{row_index}`. Ids are unique within a shard: the first accepted row with an id
    wins, later rows with it are rejected [duplicate_id].
The row's `source` is the record's own `source`, `domain` or `category` string when it has one
(the evaluation domain), else `{file name}:{format}` (not the full URL, so the same file read from
a folder or from S3 gives identical rows).

File rules: JSONL is streamed line by line; blank lines are not records; a line that is not
UTF-8 [invalid_utf8] or not JSON [malformed_json] is rejected on its own. `row_index` is the
1-based line number for JSONL and the 0-based position for JSON lists and Parquet. Problems that
leave no record to reject raise `CorpusError` naming the URL: a missing file, an unreachable
endpoint, an unreadable Parquet file, a .json file that is neither a list nor JSONL or is not
valid UTF-8 as a whole. Every read record is accepted or rejected: n_read = n_accepted + n_rejected.
"""

from training.corpus.formats import FORMATS, detect_format, normalize_record
from training.corpus.schema import CONVERSATION_SCHEMA, SOURCE_REJECTS_SCHEMA, CorpusError
from training.corpus.sources import IngestResult, SourceFile, list_sources, read_source, shard_key
from training.corpus.split import SplitConfig, is_heldout, split_heldout
from training.corpus.stats import corpus_stats

__all__ = [
    "is_heldout",
    "split_heldout",
    "SplitConfig",
    "CONVERSATION_SCHEMA",
    "FORMATS",
    "SOURCE_REJECTS_SCHEMA",
    "CorpusError",
    "IngestResult",
    "SourceFile",
    "corpus_stats",
    "detect_format",
    "list_sources",
    "normalize_record",
    "read_source",
    "shard_key",
]
