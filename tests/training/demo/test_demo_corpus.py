import json
import re

from training.demo.corpus import (
    CREATURES,
    FAMILIES,
    LANDS,
    generate_conversations,
    heldout_conversations,
    write_demo_corpus,
)


def test_deterministic_and_prefix_stable():
    a = generate_conversations(60, seed=0)
    assert a == generate_conversations(60, seed=0)
    assert generate_conversations(20, seed=0) == a[:20]  # shards don't depend on the total
    assert generate_conversations(60, seed=1) != a


def test_row_shape_roles_and_families():
    rows = generate_conversations(400, seed=0)
    assert {r["source"] for r in rows} == {f"demo/{f}" for f in FAMILIES}
    assert {r["source"] for r in rows[:4]} == {f"demo/{f}" for f in FAMILIES}
    for r in rows:
        assert set(r) == {"id", "messages", "source"}
        roles = [m["role"] for m in r["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    assert {1, 2, 3} <= set(turns)
    n_system = sum(r["messages"][0]["role"] == "system" for r in rows)
    assert 0.15 * len(rows) < n_system < 0.45 * len(rows)


def test_ids_unique_and_heldout_disjoint():
    train = generate_conversations(1600, seed=0)
    ids = [r["id"] for r in train]
    assert len(set(ids)) == len(ids)
    held = heldout_conversations(64)
    assert held == heldout_conversations(64)
    held_ids = {r["id"] for r in held}
    assert len(held_ids) == 64 and all(i.startswith("heldout-") for i in held_ids)
    assert not held_ids & set(ids)
    assert {r["source"] for r in held} == {f"demo/{f}" for f in FAMILIES}


def _assistant(rows, family):
    return [m["content"] for r in rows if r["source"] == f"demo/{family}"
            for m in r["messages"] if m["role"] == "assistant"]


def test_replies_are_correct():
    """The worked answers state true facts: a target trained on them learns the right thing."""
    rows = generate_conversations(800, seed=3)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
    n = 0
    for text in _assistant(rows, "arithmetic"):
        m = re.search(r"So (\d+) ([+\-×]) (\d+) = (\d+)\.$", text)
        if m:
            a, op, b, c = m.groups()
            assert ops[op](int(a), int(b)) == int(c), text
            n += 1
    assert n > 100
    for text in _assistant(rows, "units"):
        m = re.search(r": (\d+) ([×/]) (\d+) = (\d+)\.", text)
        a, op, b, c = m.groups()
        assert (int(a) * int(b) if op == "×" else int(a) / int(b)) == int(c), text
    n_sorted = 0
    for text in _assistant(rows, "lists"):
        m = re.search(r"From (smallest|largest) to \w+, the (\d) numbers are \[([\d, ]+)\]", text)
        if m:
            xs = [int(x) for x in m.group(3).split(", ")]
            assert xs == sorted(xs, reverse=m.group(1) == "largest") and len(xs) == int(m.group(2))
            n_sorted += 1
        m = re.search(r"The sum is (\d+)\.$", text)
        if m:
            steps = re.findall(r"(\d+) \+ (\d+) = (\d+)", text)
            assert all(int(a) + int(b) == int(c) for a, b, c in steps)
            assert int(steps[-1][2]) == int(m.group(1))
    assert n_sorted > 20
    for text in _assistant(rows, "facts"):
        assert any(c in text for c in CREATURES) or any(l in text for l in LANDS)


def test_follow_up_turns_use_history():
    rows = generate_conversations(400, seed=0)
    doubles = [r for r in rows if any(m["content"] == "Now double it." for m in r["messages"])]
    assert doubles
    for r in doubles:
        msgs = r["messages"]
        i = next(i for i, m in enumerate(msgs) if m["content"] == "Now double it.")
        # The previous reply ends with the result ("... = 85.") or its parity ("so 85 is odd.").
        m = re.search(r"= (\d+)\.$|so (\d+) is \w+\.$", msgs[i - 1]["content"])
        previous = int(m.group(1) or m.group(2))
        assert msgs[i + 1]["content"].endswith(f"= {2 * previous}.")


def test_write_demo_corpus_is_idempotent(tmp_path):
    paths = write_demo_corpus(tmp_path, n_shards=3, rows_per_shard=25, seed=0)
    assert [p.name for p in paths] == ["demo-00000.jsonl", "demo-00001.jsonl", "demo-00002.jsonl"]
    first = [p.read_bytes() for p in paths]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = write_demo_corpus(tmp_path, n_shards=3, rows_per_shard=25, seed=0)
    assert [p.read_bytes() for p in again] == first
    assert [p.stat().st_mtime_ns for p in again] == mtimes  # unchanged files are not rewritten
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    assert rows == generate_conversations(75, seed=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_assistant_replies_are_15_to_60_target_tokens():
    from training.demo.target import DemoTargetConfig, train_tokenizer

    cfg = DemoTargetConfig()
    rows = generate_conversations(cfg.train_rows, seed=cfg.seed)  # what the demo target sees
    tok = train_tokenizer(rows, cfg.vocab_size)
    lengths = [len(tok(m["content"])["input_ids"]) for r in rows for m in r["messages"]
               if m["role"] == "assistant"]
    assert 15 <= min(lengths) and max(lengths) <= 60, (min(lengths), max(lengths))
