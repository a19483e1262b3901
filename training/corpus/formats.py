"""One input record to one conversation row: format detection, role mapping, validation.

Every check raises `_Rejected(reason, detail)`; `normalize_record` turns that into its
`(None, (reason, detail))` answer, so a record is either a row or a reject, never both, never lost.
The rules are listed in the package docstring (training/corpus/__init__.py).
"""

from __future__ import annotations

import json
from typing import Any, Callable

FORMATS = ("openai", "sharegpt", "prompt_completion", "alpaca", "question")

ID_FIELDS = ("id", "question_id")

OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "function": "tool"}

# ShareGPT dumps name the speakers inconsistently; these are the names seen in the common
# dumps. Anything else (tool, function, observation, ...) is rejected rather than guessed.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    # function-calling dumps (glaive, LLaMA-Factory): the assistant's call, and the tool's result
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}

_LABEL_CHARS = 40  # longest role name quoted inside a reason code


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def normalize_record(
    record: Any, *, source: str, row_index: int, shard: str
) -> tuple[dict | None, tuple[str, str] | None]:
    """`(row, None)` for a usable record, `(None, (reason, detail))` otherwise.

    `source` names the file (its base name); the row's `source` column is the record's own
    `source`, `domain` or `category` string when it has one (the dataset or task family the
    evaluation groups by), else `"{source}:{format}"`.
    `row_index` and `shard` build the fallback id `"{shard}:{row_index}"`.
    """
    try:
        if not isinstance(record, dict):
            raise _Rejected("not_an_object", f"expected a JSON object, got {_json_type(record)}")
        fmt = detect_format(record)
        if fmt is None:
            keys = ", ".join(sorted(map(str, record))[:12]) or "none"
            raise _Rejected(
                "unrecognised_format",
                "no messages, conversations, prompt+completion, instruction+output or turns field "
                f"(keys: {keys})",
            )
        row_id = _explicit_id(record) or f"{shard}:{row_index}"
        messages = _TURN_BUILDERS[fmt](record)
        _check_conversation(messages)
        tools = _tools(record)
    except _Rejected as rejected:
        return None, (rejected.reason, rejected.detail)
    return {"id": row_id, "messages": messages, "source": _record_domain(record) or f"{source}:{fmt}",
            "tools": tools}, None


def _record_domain(record: dict) -> str | None:
    for key in ("source", "domain", "category"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def detect_format(record: dict) -> str | None:
    """The record's format by which fields are present and non-null, in FORMATS' priority order.

    Null counts as absent because a Parquet file holds every column in every row: a row of a
    mixed file with `messages = null` must fall through to its prompt/completion columns.
    """
    if record.get("messages") is not None:
        return "openai"
    if record.get("conversations") is not None:
        return "sharegpt"
    if record.get("prompt") is not None and record.get("completion") is not None:
        return "prompt_completion"
    if record.get("instruction") is not None and record.get("output") is not None:
        return "alpaca"
    if record.get("turns") is not None:
        return "question"
    return None


def record_id(record: Any) -> str | None:
    """The record's own id if it has a usable one (for reject rows); never raises."""
    if not isinstance(record, dict):
        return None
    try:
        return _explicit_id(record)
    except _Rejected:
        return None


def _explicit_id(record: dict) -> str | None:
    for field in ID_FIELDS:
        value = record.get(field)
        if value is None or value == "":
            continue
        # bool is an int subclass, and a float id (3.0) usually means a lossy export: refuse both.
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Rejected("invalid_id", f"{field} is {_json_type(value)}, expected a string or integer")
        text = str(value)
        _check_encodable(text, field)
        return text
    return None


def _openai_turns(record: dict) -> list[dict]:
    return _turns(
        record["messages"], field="messages", role_key="role", content_key="content", roles=OPENAI_ROLES
    )


# Where an assistant turn's reasoning arrives: vLLM / SGLang reasoning parsers and regenerated data
# sets (reasoning_content), newer vLLM and OpenRouter (reasoning), gpt-oss templates (thinking).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _reasoning(turn: dict, role: str, where: str) -> str | None:
    """The assistant turn's reasoning kept apart from its reply, or None."""
    for key in REASONING_KEYS:
        value = turn.get(key)
        if value is None or value == "":
            continue
        if role != "assistant":
            raise _Rejected("misplaced_reasoning", f"{where}.{key} is on a {role} turn; only assistant turns reason")
        if not isinstance(value, str):
            raise _Rejected("non_string_content", f"{where}.{key} is {_json_type(value)}, expected a string")
        _check_encodable(value, f"{where}.{key}")
        return value
    return None


def _sharegpt_turns(record: dict) -> list[dict]:
    return _turns(
        record["conversations"],
        field="conversations",
        role_key="from",
        content_key="value",
        roles=SHAREGPT_ROLES,
    )


def _tools(record: dict) -> str | None:
    """The record's tool schemas (`tools`: a list, or its JSON text as ShareGPT function-calling dumps
    store it) as canonical JSON text, or None; the chat template renders them as its tools block."""
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise _Rejected("invalid_tools", "tools is a string but not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _Rejected("invalid_tools", f"tools is {_json_type(tools)}, expected a list of objects")
    # bare function definitions ({name, description, parameters}: glaive, LLaMA-Factory) in OpenAI's shape
    tools = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return json.dumps(tools, ensure_ascii=False) if tools else None  # key order kept: the template renders it


def normalize_tool_calls(calls: Any, where: str) -> str:
    """`calls` (OpenAI tool_calls, a server reply's included) as MESSAGE_TYPE's tool_calls JSON text;
    ValueError naming `where` for a malformed call."""
    try:
        return _tool_calls(calls, where)
    except _Rejected as rejected:
        raise ValueError(f"{rejected.reason}: {rejected.detail}") from None


def _tool_calls(calls: Any, where: str) -> str:
    """OpenAI `tool_calls` as canonical JSON text: [{id?, type: function, function: {name, arguments}}],
    arguments an object (OpenAI sends JSON text; chat templates read an object)."""
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise _Rejected("invalid_tool_call", f"{where} is {_json_type(calls)}, expected a non-empty list")
    out = []
    for k, call in enumerate(calls):
        at = f"{where}[{k}]"
        fn = call.get("function", call) if isinstance(call, dict) else None  # ShareGPT: {name, arguments}
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _Rejected("invalid_tool_call", f"{at} has no function name")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise _Rejected("invalid_tool_call", f"{at}.arguments is not JSON: {args[:80]!r}") from None
        if not isinstance(args, dict):
            raise _Rejected("invalid_tool_call", f"{at}.arguments is {_json_type(args)}, expected an object")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return json.dumps(out, ensure_ascii=False)


def _turns(value: Any, *, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(value, list):
        raise _Rejected("invalid_turns", f"{field} is {_json_type(value)}, expected a list")
    messages = []
    for i, turn in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise _Rejected("invalid_turn", f"{where} is {_json_type(turn)}, expected an object")
        if turn.get(role_key) is None:
            raise _Rejected("invalid_turn", f"{where} has no {role_key!r}")
        role = _map_role(turn[role_key], roles, where)
        if content_key not in turn:
            raise _Rejected("invalid_turn", f"{where} has no {content_key!r}")
        message = {"role": role}
        reasoning = _reasoning(turn, role, where)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        content = turn[content_key]
        if turn[role_key] == "function_call":  # ShareGPT: the call itself is the value (JSON text)
            message["tool_calls"] = _tool_calls(_json_value(content, f"{where}.{content_key}"), f"{where}.{content_key}")
            content = ""
        elif turn.get("tool_calls") is not None or turn.get("function_call") is not None:
            if role != "assistant":
                raise _Rejected("invalid_tool_call", f"{where} carries tool calls on a {role} turn")
            calls = turn.get("tool_calls") if turn.get("tool_calls") is not None else turn["function_call"]
            message["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(turn.get(key), str) and turn[key]:
                    message[key] = turn[key]
        # an assistant turn that only reasons (a reply cut while thinking) or only calls tools has a
        # null or empty content; a tool's result may be empty
        if (len(message) > 1 or role == "tool") and (content is None or (isinstance(content, str) and not content.strip())):
            message["content"] = "" if content is None else content
        else:
            message["content"] = _turn_text(content, role, f"{where}.{content_key}")
        messages.append(message)
    return messages


def _json_value(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise _Rejected("invalid_tool_call", f"{where} is not JSON: {value[:80]!r}") from None


def _map_role(value: Any, roles: dict[str, str], where: str) -> str:
    if isinstance(value, str) and value in roles:
        return roles[value]
    label = value[:_LABEL_CHARS] if isinstance(value, str) else f"<{_json_type(value)}>"
    raise _Rejected(f"unknown_role:{label}", f"{where} has role {value!r}; accepted: {', '.join(roles)}")


def _turn_text(value: Any, role: str, where: str) -> str:
    if not isinstance(value, str):
        raise _Rejected("non_string_content", f"{where} is {_json_type(value)}, expected a string")
    _check_encodable(value, where)
    # An empty system prompt is meaningful (it replaces a template's default one); an empty
    # user or assistant turn is not, and would train the draft on nothing.
    if role != "system" and not value.strip():
        raise _Rejected("empty_content", f"{where} ({role}) is empty")
    return value


def _prompt_completion_turns(record: dict) -> list[dict]:
    return _exchange(
        system=_optional_text(record, "system"),
        user=_required_text(record, "prompt", "user"),
        assistant=_required_text(record, "completion", "assistant"),
    )


def _alpaca_turns(record: dict) -> list[dict]:
    parts = [_optional_text(record, "instruction"), _optional_text(record, "input")]
    user = "\n\n".join(p for p in parts if p)
    if not user.strip():
        raise _Rejected("empty_content", "instruction and input are both empty")
    return _exchange(
        system=_optional_text(record, "system"),
        user=user,
        assistant=_required_text(record, "output", "assistant"),
    )


def _question_turns(record: dict) -> list[dict]:
    """MT-Bench / Spec-Bench question files: `turns` are the user's questions, asked one after the
    other; each is followed by an EMPTY assistant turn for the target to write (resampling writes it
    in the corpus, evaluation asks the next question after the target's own reply). Without
    resampling such a row has nothing to train on (resample.passthrough rejects it: needs_generation)."""
    turns = record["turns"]
    if not isinstance(turns, list):
        raise _Rejected("invalid_turns", f"turns is {_json_type(turns)}, expected a list of strings")
    if not turns:
        raise _Rejected("empty_conversation", "turns is empty")
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": _turn_text(turn, "user", f"turns[{i}]")})
        messages.append({"role": "assistant", "content": ""})
    return messages


def _required_text(record: dict, field: str, role: str) -> str:
    return _turn_text(record.get(field), role, field)


def _optional_text(record: dict, field: str) -> str | None:
    """A flat-format text field that may be absent; null and "" both mean absent (columnar exports
    fill missing values with either), so an empty Alpaca `system` adds no system turn."""
    value = record.get(field)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Rejected("non_string_content", f"{field} is {_json_type(value)}, expected a string")
    _check_encodable(value, field)
    return value


def _exchange(*, system: str | None, user: str, assistant: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": assistant})
    return messages


def _check_conversation(messages: list[dict]) -> None:
    if not messages:
        raise _Rejected("empty_conversation", "the conversation has no turns")
    for i, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise _Rejected("misplaced_system", f"turn {i} is a system turn; only the first turn may be")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Rejected("no_assistant_turn", "the conversation has no assistant turn to learn from")


def _check_encodable(text: str, where: str) -> None:
    # json.loads accepts "\ud800" escapes, which decode to lone surrogates that Arrow (UTF-8)
    # cannot store; catching them here makes them a row reject instead of a failed table build.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Rejected("invalid_utf8", f"{where} holds a lone surrogate at character {exc.start}") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__  # Parquet values: bytes, datetime, Decimal, ...


_TURN_BUILDERS: dict[str, Callable[[dict], list[dict]]] = {
    "openai": _openai_turns,
    "sharegpt": _sharegpt_turns,
    "prompt_completion": _prompt_completion_turns,
    "alpaca": _alpaca_turns,
    "question": _question_turns,
}
