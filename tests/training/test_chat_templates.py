"""Golden loss masks for chat-template families, on a small BPE tokenizer trained here (no downloads).

Each family's jinja template is written out as the model ships it (tools and multimodal parts left
out). For every case the masked tokens, decoded run by run, must be exactly the assistant turns as
the template renders them plus their end-of-turn token, and nothing else.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from training.tokenization import TokenizeConfig, tokenize_conversations

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",  # ChatML / Qwen
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # Llama-3
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]",  # Mistral
    "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",  # Gemma
]
NON_SPECIAL_TOKENS = ["<think>", "</think>"]  # Qwen3 adds these as normal (non-special) tokens

WORDS = (
    "the a an of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said each she "
    "which do their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find answer question think reason step sum carry digit hello "
    "joke chicken road assistant user system helpful four five twenty kilometers miles list sorted"
).split()


def _sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        s = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        out.append(s + rng.choice(["", "\n", "\n\n", " 12 + 30 = 42.", " [x] (y) {z}"]))
    return out


@functools.lru_cache(maxsize=None)
def backend_json(kind: str = "bytelevel") -> str:
    """A BPE trained on synthetic sentences with every family's special tokens (cached per session)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # sentencepiece-like: spaces become "▁" glued to the next word, so offsets have gaps
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = sorted(set("".join(_sentences()).replace(" ", "▁")) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_sentences(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_TOKENS])
    return tok.to_str()


def make_tokenizer(chat_template: str | None, bos: str | None = None, eos: str | None = None,
                   pad: str | None = "<pad>", add_bos: bool = False, kind: str = "bytelevel"):
    """A PreTrainedTokenizerFast over a fresh copy of the trained backend."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(backend_json(kind))
    if add_bos:  # the tokenizer itself puts BOS in front of text, as Llama's does
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=chat_template, clean_up_tokenization_spaces=False)


# --- templates, as the models ship them ---------------------------------------------------------

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content']|trim + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


@dataclass
class Family:
    template: str | None
    bos: str | None
    eos: str
    expect: Callable[[str], str]  # assistant content -> what its masked tokens decode to
    add_bos: bool = False


FAMILIES = {
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", lambda c: c.strip() + "<|eot_id|>"),
    "chatml": Family(QWEN25, None, "<|im_end|>", lambda c: c + "<|im_end|>"),
    # the template's space before the answer is part of the first token the target generates
    "mistral": Family(MISTRAL, "<s>", "</s>", lambda c: " " + c.strip() + "</s>"),
    "gemma": Family(GEMMA, "<bos>", "<eos>", lambda c: c.strip() + "<end_of_turn>"),
    "plain": Family(None, "<s>", "</s>", lambda c: c + "</s>", add_bos=True),
}


def family_tokenizer(name: str):
    f = FAMILIES[name]
    return make_tokenizer(f.template, bos=f.bos, eos=f.eos, add_bos=f.add_bos)


def masked_runs(tokenizer, row: dict) -> list[str]:
    """Each contiguous run of loss_mask == 1, decoded."""
    ids = np.asarray(row["input_ids"])
    mask = np.asarray(row["loss_mask"], dtype=np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [decode(tokenizer, ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def chat_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_one(tokenizer, messages, **cfg) -> list[dict]:
    res = tokenize_conversations(tokenizer, [{"id": "c", "messages": messages}], TokenizeConfig(**cfg))
    assert res.rejects.num_rows == 0, res.rejects.to_pylist()
    assert (res.n_in, res.n_ok, res.n_rejected) == (1, 1, 0)
    return res.table.to_pylist()


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CASES = {
    "single": [msg("user", "What is twenty plus four?"), msg("assistant", "The answer is twenty four.")],
    "multi_system": [
        msg("system", "You are a helpful assistant."),
        msg("user", "Hello there!"),
        msg("assistant", "Hello, how can I help you today?"),
        msg("user", "Write one word."),
        msg("assistant", "Water."),
        msg("user", "Now a list, sorted."),
        msg("assistant", "1. apple\n2. banana\n3. cherry"),
    ],
    "whitespace": [msg("user", "Say it with spaces"), msg("assistant", "  padded answer here \n")],
    "trailing_user": [msg("user", "First question?"), msg("assistant", "First answer."), msg("user", "Unanswered?")],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_masks_exactly_assistant_turns(family, case):
    tok = family_tokenizer(family)
    messages = CASES[case]
    (row,) = tokenize_one(tok, messages)
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    assert masked_runs(tok, row) == [FAMILIES[family].expect(c) for c in assistants]
    assert row["n_tokens"] == len(row["input_ids"]) and not row["truncated"]
    if FAMILIES[family].template is not None:
        # the ids are exactly what apply_chat_template gives for the conversation (trailing user dropped)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        assert row["input_ids"] == chat_ids(tok, messages[: last + 1])


def test_plain_template_layout():
    tok = family_tokenizer("plain")
    (row,) = tokenize_one(tok, CASES["multi_system"])
    text = decode(tok, row["input_ids"])
    assert text == (
        "<s>You are a helpful assistant.\nHello there!Hello, how can I help you today?</s>"
        "Write one word.Water.</s>Now a list, sorted.1. apple\n2. banana\n3. cherry</s>"
    )
    no_bos = make_tokenizer(None, bos="<s>", eos="</s>", add_bos=False)  # GPT-2 style: no BOS on encode
    (row,) = tokenize_one(no_bos, CASES["single"])
    assert decode(no_bos, row["input_ids"]).startswith("What is")


def test_plain_on_metaspace_tokenizer():
    """Sentencepiece-style offsets leave the spaces uncovered; spans must still land on whole tokens."""
    tok = make_tokenizer(None, bos="<s>", eos="</s>", add_bos=True, kind="metaspace")
    messages = [msg("user", "Hello there"), msg("assistant", " the answer is four"),
                msg("user", " And now"), msg("assistant", " one more word")]
    (row,) = tokenize_one(tok, messages)
    ids = np.asarray(row["input_ids"])
    mask = np.asarray(row["loss_mask"], dtype=bool)
    want = tok(" the answer is four</s>", add_special_tokens=False)["input_ids"]
    assert ids[mask][: len(want)].tolist() == want
    assert [tok.convert_ids_to_tokens(int(i)) for i in ids[mask]].count("</s>") == 2
    assert ids[0] == tok.bos_token_id and not mask[0]


# --- Qwen3: reasoning, and a template that rewrites earlier turns -----------------------------------


def qwen3():
    return make_tokenizer(QWEN3, bos=None, eos="<|im_end|>")


def test_qwen3_thinking_single_turn():
    tok = qwen3()
    messages = [msg("user", "What is 12 + 30?"),
                msg("assistant", "<think>\nAdd the ones, then the tens.\n</think>\n\nThe sum is 42.")]
    (row,) = tokenize_one(tok, messages)
    assert masked_runs(tok, row) == ["<think>\nAdd the ones, then the tens.\n</think>\n\nThe sum is 42.<|im_end|>"]
    assert row["input_ids"] == chat_ids(tok, messages)


def test_qwen3_thinking_multi_turn_keeps_each_turns_reasoning():
    """Qwen3 drops the reasoning of turns before the last user message, so each turn gets its own row:
    the text the target saw while generating it, with its reasoning masked."""
    tok = qwen3()
    messages = [
        msg("system", "You are a helpful assistant."),
        msg("user", "What is 12 + 30?"),
        msg("assistant", "<think>\nOnes first: 2 + 0 = 2.\n</think>\n\nThe sum is 42."),
        msg("user", "And doubled?"),
        msg("assistant", "<think>\n42 + 42 = 84.\n</think>\n\nDoubled, it is 84."),
    ]
    first, final = tokenize_one(tok, messages)
    assert first["id"] == "c#2" and final["id"] == "c"
    assert masked_runs(tok, first) == ["<think>\nOnes first: 2 + 0 = 2.\n</think>\n\nThe sum is 42.<|im_end|>"]
    assert first["input_ids"] == chat_ids(tok, messages[:3])
    assert masked_runs(tok, final) == ["<think>\n42 + 42 = 84.\n</think>\n\nDoubled, it is 84.<|im_end|>"]
    assert final["input_ids"] == chat_ids(tok, messages)
    # in the final row the first turn is history, as the template renders it: reasoning gone, unmasked
    assert "Ones first" not in decode(tok, final["input_ids"])


def test_qwen3_reasoning_content_kept_apart_is_rendered_and_masked_as_the_target_emits_it():
    """Reasoning stored apart from the reply (reasoning_content: vLLM/SGLang reasoning parsers, regenerated
    data sets) renders exactly as the same reasoning inside the content does: masked with its think
    tags, each turn in the row its template renders it in, and counted."""
    tok = qwen3()
    apart = [
        msg("user", "What is 12 + 30?"),
        {"role": "assistant", "content": "The sum is 42.", "reasoning_content": "Ones first: 2 + 0 = 2."},
        msg("user", "And doubled?"),
        {"role": "assistant", "content": "", "reasoning_content": "42 + 42 = 84, cut by max_tokens"},
    ]
    inline = [m if "reasoning_content" not in m else
              msg("assistant", f"<think>\n{m['reasoning_content']}\n</think>\n\n{m['content']}") for m in apart]
    res = tokenize_conversations(tok, [{"id": "c", "messages": apart}], TokenizeConfig())
    assert res.reasoning_turns == 2 and res.n_ok == 1
    first, final = res.table.to_pylist()
    assert masked_runs(tok, first) == ["<think>\nOnes first: 2 + 0 = 2.\n</think>\n\nThe sum is 42.<|im_end|>"]
    assert masked_runs(tok, final) == ["<think>\n42 + 42 = 84, cut by max_tokens\n</think>\n\n<|im_end|>"]
    assert [first, final] == tokenize_one(tok, inline)
    assert final["input_ids"] == chat_ids(tok, apart)  # as transformers renders reasoning_content


def test_qwen3_without_thinking():
    tok = qwen3()
    messages = [msg("user", "Hi!"), msg("assistant", "Hello."), msg("user", "Bye!"), msg("assistant", "Goodbye.")]
    # enable_thinking=False: the generation prompt carries the empty think block, the target writes the rest
    rows = tokenize_one(tok, messages, chat_template_kwargs={"enable_thinking": False})
    assert [masked_runs(tok, r) for r in rows] == [["Hello.<|im_end|>"], ["Goodbye.<|im_end|>"]]
    assert rows[-1]["input_ids"] == chat_ids(tok, messages, enable_thinking=False)
    # default (thinking on) with answers that have no reasoning: the target writes an empty think block
    rows = tokenize_one(tok, messages)
    assert [masked_runs(tok, r) for r in rows] == [
        ["<think>\n\n</think>\n\nHello.<|im_end|>"], ["<think>\n\n</think>\n\nGoodbye.<|im_end|>"]]


@pytest.mark.parametrize("family", ["llama3", "chatml", "mistral", "gemma"])
def test_our_render_is_apply_chat_template(family):
    """The renderer uses transformers' compiled template directly; it must render what the API does."""
    from training.tokenization.templates import ChatRenderer

    tok = family_tokenizer(family)
    renderer = ChatRenderer(tok)
    for messages in CASES.values():
        for gen in (False, True):
            assert renderer.render(messages, gen) == tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)


# Gemma-1/2's template with ChatML's turn tokens (the tiny targets have no <start_of_turn>): it raises
# on a system message and on roles that do not alternate (Mistral v0.x and Llama-2 raise the same way).
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
)


# Qwen2.5's template with its tools block, tool calls and tool results, as it ships (system prompt
# shortened): the shape OpenAI tool-calling conversations render through.
QWEN25_TOOLS = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                               "parameters": {"type": "object", "properties": {
                                                   "a": {"type": "number"}, "b": {"type": "number"}}}}}
# An OpenAI tool-calling record: the call (content null), the tool's result, the answer.
TOOL_RECORD = {"id": "t1", "tools": [ADD_TOOL], "messages": [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    {"role": "assistant", "content": "2 + 2 is 4."}]}


def test_tool_calls_render_through_the_tools_block_and_train_on_the_calls():
    from training.corpus import normalize_record

    tok = make_tokenizer(QWEN25_TOOLS, bos=None, eos="<|im_end|>")
    row, _ = normalize_record(TOOL_RECORD, source="f", row_index=0, shard="s")
    res = tokenize_conversations(tok, [row], TokenizeConfig())
    assert (res.n_in, res.n_ok, res.tool_call_turns) == (1, 1, 1)
    (out,) = res.table.to_pylist()
    assert masked_runs(tok, out) == ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>',
                                     "2 + 2 is 4.<|im_end|>"]
    # exactly what apply_chat_template renders with the record's tools and calls, arguments as an object
    # (transformers' convention; OpenAI sends JSON text), the tool result unmasked
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    hf_messages = [TOOL_RECORD["messages"][0], {"role": "assistant", "content": "", "tool_calls": [call]},
                   *TOOL_RECORD["messages"][2:]]
    expected = tok.apply_chat_template(hf_messages, tools=TOOL_RECORD["tools"], tokenize=False)
    assert decode(tok, out["input_ids"]) == expected and "# Tools" in expected and "<tool_response>\n4\n" in expected
