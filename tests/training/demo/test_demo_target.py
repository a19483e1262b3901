"""The demo target: a loadable HF directory whose greedy replies are right on held-out prompts.

`demo_target_dir` (tests/conftest.py) trains it once into the project's data folder and every
later session reuses it; the small tests at the end train a throwaway model into tmp_path.
"""

import json
import os

import pytest

from training.demo.corpus import FAMILIES, generate_conversations, heldout_conversations
from training.demo.target import (
    COMPLETE_MARKER,
    QUALITY_FILE,
    RECIPE_VERSION,
    DemoTargetConfig,
    ensure_demo_target,
    evaluate_greedy,
    is_complete,
    train_demo_target,
)

# Held-out quality of demo targets measured on the 2-core dev machine (bench/bench_demo_target.py):
# 571 steps: exact match facts 0.42, units 0.04, lists 0.07, arithmetic 0.00, teacher-forced token
# accuracy 0.87 overall (facts 0.93, arithmetic 0.79); 618 steps: facts 0.67, units 0.13; the
# schedule's 700 steps: facts 0.67, units 0.30, lists 0.10. The replies have the right template and
# wording; the numbers copied from the prompt are what the short schedule does not get right yet,
# and one wrong digit fails an exact match. The floors sit below those figures. The schedule counts
# steps, not seconds, so a busy machine takes longer but trains the same target.
MIN_EXACT_MATCH = {"facts": 0.3}
MIN_TOKEN_ACCURACY = 0.8


def _quality(target_dir):
    q = json.loads((target_dir / QUALITY_FILE).read_text())
    assert q["steps"] == q["config"]["max_steps"], "the cached demo target did not get its whole schedule"
    return q


def test_loads_as_standard_hf_directory(demo_target_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "generation_config.json", QUALITY_FILE,
                 COMPLETE_MARKER):
        assert (demo_target_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(demo_target_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_target_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers >= 8 and cfg.hidden_size >= 128
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 64 == 0
    assert tok.eos_token == "<|im_end|>" and cfg.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert tok.pad_token_id is not None and tok.bos_token_id is not None


def test_chat_template_and_assistant_mask(demo_target_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_target_dir)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "Add the ones: 2 + 0 = 2."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|bos|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
                    "<|im_start|>assistant\nAdd the ones: 2 + 0 = 2.<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    learned = [i for i, m in zip(ids, mask) if m]
    # Assistant content plus its end-of-turn token, nothing from the prompt or the role header.
    assert tok.decode(learned) == "Add the ones: 2 + 0 = 2.<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips


def test_quality_file_is_complete_and_the_whole_schedule_ran(demo_target_dir):
    q = _quality(demo_target_dir)
    assert set(q["exact_match"]) == set(FAMILIES) and sum(q["n_turns"].values()) > 64
    assert q["steps"] > 0 and 0 < q["train_seconds"] <= q["total_seconds"]
    assert q["config"]["n_layers"] >= 8 and q["config"]["hidden"] >= 128


def test_held_out_exact_match_above_measured_floor(demo_target_dir):
    q = _quality(demo_target_dir)
    for family, floor in MIN_EXACT_MATCH.items():
        assert q["exact_match"][family] >= floor, (family, q["exact_match"], q["examples"])
    assert q["token_accuracy_overall"] >= MIN_TOKEN_ACCURACY, q["token_accuracy"]
    assert set(q["token_accuracy"]) == set(FAMILIES)


def test_saved_weights_reproduce_greedy_quality(demo_target_dir):
    """Greedy decoding from the files on disk, not just the numbers in the quality file."""
    _quality(demo_target_dir)
    facts = [c for c in heldout_conversations(32) if c["source"] == "demo/facts"]
    q = evaluate_greedy(demo_target_dir, facts)
    assert q["exact_match"]["facts"] >= MIN_EXACT_MATCH["facts"], q["examples"]
    assert q["token_accuracy"]["facts"] >= MIN_TOKEN_ACCURACY, q["token_accuracy"]


def test_ensure_reuses_a_complete_target(demo_target_dir):
    before = {p.name: p.stat().st_mtime_ns for p in demo_target_dir.iterdir()}
    assert ensure_demo_target(demo_target_dir, log=lambda s: pytest.fail(f"retrained: {s}")) \
        == demo_target_dir
    assert {p.name: p.stat().st_mtime_ns for p in demo_target_dir.iterdir()} == before


# A throwaway target: few rows, few steps, small evaluation; checks the write protocol only.
TINY = DemoTargetConfig(n_eval=4, eval_max_new_tokens=16)


def test_train_writes_complete_directory_atomically(tmp_path):
    out = tmp_path / "target"
    rows = generate_conversations(48, seed=0)
    assert train_demo_target(out, rows, max_steps=3, seed=0, log=lambda s: None, config=TINY) == out
    assert is_complete(out)
    q = json.loads((out / QUALITY_FILE).read_text())
    assert q["steps"] == 3 and q["train_rows"] == 48
    assert os.listdir(tmp_path) == ["target"]  # no temp folder left behind
    assert (out / COMPLETE_MARKER).read_text().strip() == RECIPE_VERSION
    # Reused as-is, even though it is far from the quality of the real one.
    assert ensure_demo_target(out, log=lambda s: pytest.fail("retrained")) == out
    # A target cut short (what the wall-clock budget of earlier recipes left on a busy machine)
    # is not complete: ensure_demo_target trains it again instead of keeping it for good.
    q["steps"] = 2
    (out / QUALITY_FILE).write_text(json.dumps(q))
    assert not is_complete(out)


def test_killed_training_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "target"

    def die(msg):
        if "step" in msg or "steps" in msg:
            raise KeyboardInterrupt  # what a Ctrl-C or a killed step looks like from inside

    rows = generate_conversations(48, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train_demo_target(out, rows, max_steps=3, seed=0, log=die, config=TINY)
    assert not out.exists() and not is_complete(out)
    assert os.listdir(tmp_path) == []


def test_a_target_from_an_older_recipe_is_not_reused(tmp_path):
    out = tmp_path / "target"
    out.mkdir()
    (out / COMPLETE_MARKER).write_text("demo-target-v0\n")
    assert not is_complete(out)
