"""Eval prompts from question files (MT-Bench / Spec-Bench shape): later turns after the target's own
replies, the category as the domain, a clear error for a file with no usable prompt; and prompts
rendered with the target's chat template settings."""

import json

import pytest

from tests.conftest import set_fields

from training.evaluation import prompt_ids
from training.evaluation.prompts import PromptFileError, expand_turns, read_prompt_file, stratified_prompts
from training.targets import SamplingParams

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short poem about rain.", "Now make it rhyme."]},
    {"question_id": 101, "category": "reasoning", "turns": ["What is 2 + 3?"]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_question_file_gives_one_prompt_per_turn_after_the_targets_own_replies(target, tmp_path):
    rows = read_prompt_file(write_jsonl(tmp_path / "mt_bench.jsonl", QUESTIONS))
    prompts = stratified_prompts(rows, 10)
    assert {p["domain"] for p in prompts} == {"writing", "reasoning"}  # category is the eval domain
    expanded = expand_turns(target, prompts, max_new_tokens=5)
    by_id = {p["id"]: p for p in expanded}
    assert sorted(by_id) == ["101", "81", "81#2"]
    assert set_fields(by_id["81"]["messages"]) == [{"role": "user", "content": QUESTIONS[0]["turns"][0]}]
    second = by_id["81#2"]["messages"]
    [own] = target.generate([second[:1]], [SamplingParams(temperature=0.0, max_new_tokens=5, seed=0)])
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == own.text and own.text  # the target's own greedy reply
    assert second[2]["content"] == QUESTIONS[0]["turns"][1] and by_id["81#2"]["domain"] == "writing"
    assert prompt_ids(target, by_id["81#2"], 4096)  # renders as a prompt ending before the next reply
    # conversations with replies are evaluated as they are
    plain = [{"id": "c", "domain": "d", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    assert expand_turns(target, plain, 5) == plain


def test_all_rejected_prompt_file_says_so(tmp_path):
    url = write_jsonl(tmp_path / "bad.jsonl", [{"qid": 1, "text": "no known fields"}, {"question_id": 2, "turns": [""]}])
    with pytest.raises(PromptFileError) as err:
        read_prompt_file(url)
    text = str(err.value)
    assert url in text and "none of its 2 rows" in text
    assert "unrecognised_format x1" in text and "keys: qid, text" in text and "empty_content x1" in text


def test_partly_rejected_prompt_file_logs_and_keeps_the_rest(tmp_path):
    url = write_jsonl(tmp_path / "mixed.jsonl", [*QUESTIONS, {"nope": 1}])
    said = []
    rows = read_prompt_file(url, log=said.append)
    assert [r["id"] for r in rows] == ["81", "101"] and "1 of 3 prompt rows rejected" in said[0]


def test_eval_prompts_use_the_targets_chat_template_kwargs(target):
    """evaluation renders with the same setting as generation (render_prompt) and tokenization."""
    from tests.training.test_chat_templates import QWEN3, make_tokenizer
    from training.targets.base import render_prompt

    class Target:
        tokenizer = make_tokenizer(QWEN3, bos=None, eos="<|im_end|>")
        chat_template_kwargs = {"enable_thinking": False}

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = prompt_ids(Target, {"id": "q", "messages": messages}, 4096)
    assert ids == render_prompt(Target.tokenizer, messages, {"enable_thinking": False})
    assert Target.tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
