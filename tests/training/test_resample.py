"""Resampling against a real HF model through the real `hf` backend, no fakes.

The target is a tiny LlamaForCausalLM built here whose next-token logits are a chosen bigram
table: embeddings are one-hot, so the final RMSNorm gives sqrt(H) * e_t and lm_head[:, t] holds
the logits after token t / sqrt(H). Attention and MLP run as usual but write back almost nothing
(o_proj/down_proj scaled to ~1e-3), so context nudges logits by far less than any margin in the
table. That makes stop/length/empty/reasoning behaviour designable while everything goes through
load_target(dir, "hf").generate. Tests observe calls with a Spy that wraps the real target (it
records and can raise, as a killed or failing backend would) and never invents replies.
"""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import set_fields
from tests.training.test_chat_templates import GEMMA_STYLE
from training.corpus.schema import CONVERSATION_SCHEMA
from training.resample import (
    REJECTS_SCHEMA,
    RESAMPLED_SCHEMA,
    ResampleConfig,
    ResampleError,
    ResampleProgress,
    check_mixture,
    draw_temperature,
    passthrough,
    LocalBatches,
    resample_batch,
    resample_conversations,
    resample_rows,
    strip_reasoning,
    turn_seed,
)

SPECIALS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = ["system", "user", "assistant", "<think>", "</think>", "hmm", "answer", "sure", "more",
         "what", "is", "the", "a", "and", "now", "so", "it", "of", "in", "to"]
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Logits after each token; every other target gets -20. Greedy reply: "<think> hmm </think> answer"
# then <|im_end|> (5 tokens). At temperature 1: ~24% empty replies, "hmm"/"more" loops that can
# run into max_new_tokens.
CHAIN = {
    "assistant": {"<think>": 3.0, "<|im_end|>": 2.0, "sure": 1.0},
    "<think>": {"hmm": 10.0},
    "hmm": {"</think>": 2.0, "hmm": 1.0},
    "</think>": {"answer": 10.0},
    "sure": {"answer": 10.0},
    "answer": {"<|im_end|>": 2.0, "more": 1.0},
    "more": {"answer": 10.0},
}
DEFAULT_NEXT = {"answer": 10.0}  # after any other token (prompt words, specials)
MUTE_CHAIN = {"assistant": {"<|im_end|>": 10.0}}  # replies with nothing


def build_bigram_target(out_dir, chain: dict, hidden: int = 64, *, specials=SPECIALS, words=WORDS,
                        template: str = CHATML, eos: str = "<|im_end|>"):
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token=eos,
        unk_token="[UNK]", chat_template=template,
    )
    V = len(vocab)
    assert V <= hidden
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=V, max_position_embeddings=2048, tie_word_embeddings=False,
        rms_norm_eps=1e-6, bos_token_id=vocab["<|bos|>"], eos_token_id=vocab[eos],
        pad_token_id=vocab["<|pad|>"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        emb = torch.zeros(V, hidden)
        emb[torch.arange(V), torch.arange(V)] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        head = torch.full((V, hidden), 0.0)
        for t, i in vocab.items():
            head[:, i] = -20.0
            for nxt, logit in chain.get(t, DEFAULT_NEXT).items():
                head[vocab[nxt], i] = logit
        model.lm_head.weight.copy_(head / math.sqrt(hidden))
        for layer in model.model.layers:  # real attention/MLP, tiny write-back
            layer.self_attn.o_proj.weight.mul_(0.05)
            layer.mlp.down_proj.weight.mul_(0.05)
    model.generation_config = GenerationConfig(eos_token_id=vocab[eos], pad_token_id=vocab["<|pad|>"])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box the spinning threads
    make each forward ~20x slower; restored afterwards for the other test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from training.targets import load_target

    return load_target(str(build_bigram_target(tmp_path_factory.mktemp("bigram"), CHAIN)), backend="hf")


@pytest.fixture(scope="module")
def mute_target(tmp_path_factory):
    from training.targets import load_target

    return load_target(str(build_bigram_target(tmp_path_factory.mktemp("mute"), MUTE_CHAIN)), backend="hf")


@pytest.fixture(scope="module")
def rows():
    """Demo-corpus conversations: 1-3 exchanges, some with a system prompt."""
    from training.demo.corpus import generate_conversations

    rows = generate_conversations(24, seed=0)
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) >= 3 for r in rows)
    return rows


class Spy:
    """Wraps a real target: records every generate call and each row-turn it generated, and can
    raise before a chosen call (a dying backend or a killed process, seen from inside)."""

    def __init__(self, target, rows, seed=0, fail=None):
        self.target = target
        self.fail = fail  # fail(call_no, turns_of_this_call) -> bool, checked before generating
        self.calls: list[tuple[list, list, list]] = []  # (conversations, params, generations)
        self.generated: Counter = Counter()  # (row id, turn) -> times generated
        self.by_seed = {turn_seed(r["id"], j, seed): (r["id"], j) for r in rows for j in range(6)}

    def __getattr__(self, name):
        return getattr(self.target, name)

    def keys(self, params):
        return [self.by_seed[p.seed] for p in params]

    def generate(self, conversations, sampling, **kw):
        keys = self.keys(sampling)
        if self.fail and self.fail(len(self.calls), {j for _, j in keys}):
            raise RuntimeError("backend went away")
        gens = self.target.generate(conversations, sampling, **kw)
        self.calls.append((conversations, list(sampling), gens))
        self.generated.update(keys)
        return gens


def assistant_turns(messages):
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def check_counts(res):
    assert res.n_in == res.n_ok + res.n_rejected
    assert res.table.num_rows == res.n_ok and res.rejects.num_rows == res.n_rejected
    assert res.table.schema == RESAMPLED_SCHEMA and res.rejects.schema == REJECTS_SCHEMA


# ---------------------------------------------------------------------------------------------
# seeding and config


def test_temperature_mixture_proportions_and_reproducible():
    mixture = {0.0: 0.4, 0.7: 0.3, 1.0: 0.3}
    ids = [f"row-{i:05d}" for i in range(2000)]
    drawn = [draw_temperature(i, mixture, seed=0) for i in ids]
    share = Counter(drawn)
    for t, w in mixture.items():
        assert abs(share[t] / len(ids) - w) < 0.04, (t, share)
    # A function of (id, seed) only: order and repetition do not matter, the seed does.
    assert [draw_temperature(i, mixture, seed=0) for i in reversed(ids)] == drawn[::-1]
    assert [draw_temperature(i, mixture, seed=1) for i in ids] != drawn
    # Shares need not sum to 1, string keys (Dagster config) work, a zero share is never drawn.
    assert {draw_temperature(i, {"0.5": 2, "0.9": 0}, seed=0) for i in ids[:200]} == {0.5}
    assert check_mixture({"1.0": 3, 0: 1}) == {0.0: 0.25, 1.0: 0.75}
    seeds = {turn_seed(i, j, 0) for i in ids[:100] for j in range(3)}
    assert len(seeds) == 300 and all(0 <= s < 2**31 for s in seeds)


def test_schema_matches_corpus_contract():
    n = len(CONVERSATION_SCHEMA)
    assert RESAMPLED_SCHEMA.names[:n] == CONVERSATION_SCHEMA.names
    assert list(RESAMPLED_SCHEMA)[:n] == list(CONVERSATION_SCHEMA)
    assert RESAMPLED_SCHEMA.field("temperature").type == pa.float64() and RESAMPLED_SCHEMA.field("temperature").nullable


def test_config_validation():
    assert ResampleConfig().temperatures == {0.0: 0.4, 0.7: 0.3, 1.0: 0.3}
    for bad in ({"on_length": "truncate"}, {"temperatures": {}}, {"temperatures": {0.5: -1}}, {"batch_size": 0},
                {"replies_per_prompt": 0}):
        with pytest.raises(ResampleError):
            ResampleConfig(**bad)
    with pytest.raises(ResampleError, match="temperature above 0"):  # greedy copies would repeat reply 0
        ResampleConfig(replies_per_prompt=2, temperatures={0.0: 1.0})


def test_replies_per_prompt_adds_sampled_copies_and_keeps_the_first_reply(target, rows):
    one = resample_conversations(target, rows[:6], ResampleConfig(max_new_tokens=8), log=lambda s: None)
    three = resample_conversations(target, rows[:6], ResampleConfig(max_new_tokens=8, replies_per_prompt=3),
                                   log=lambda s: None)
    check_counts(three)
    assert three.n_in == 18 and three.tokens_generated > one.tokens_generated
    got = {r["id"]: r for r in three.table.to_pylist() + three.rejects.to_pylist()}
    assert set(got) == {f"{r['id']}{s}" for r in rows[:6] for s in ("", "~reply1", "~reply2")}
    # the first reply of each conversation is the one replies_per_prompt=1 writes; copies are sampled
    assert [got[r["id"]] for r in one.table.to_pylist()] == one.table.to_pylist()
    copies = [r for i, r in got.items() if "~reply" in i]
    assert all(r["temperature"] in (0.7, 1.0) for r in copies if r.get("temperature") is not None)
    firsts = {r["id"]: r["messages"] for r in one.table.to_pylist()}
    assert any(r["messages"] != firsts.get(r["id"].split("~")[0]) for r in copies if r.get("messages"))
    with pytest.raises(ResampleError, match="contains '~reply'"):
        resample_conversations(target, [{**rows[0], "id": "a~reply1"}], ResampleConfig(replies_per_prompt=2))


def test_strip_reasoning():
    assert strip_reasoning("<think>plan\nmore</think>\n\nThe answer.") == "The answer."
    assert strip_reasoning("a <think>x</think> b <think>y</think> c") == "a  b  c"
    assert strip_reasoning("opened by the template</think> Answer") == "Answer"  # <think> was in the prompt
    assert strip_reasoning("<think> cut at the length limit") == ""
    assert strip_reasoning("  no reasoning here ") == "  no reasoning here "  # untouched


# ---------------------------------------------------------------------------------------------
# generation semantics


def test_batch_size_left_unset_is_the_backends_own(target, rows):
    from training.targets import HFTarget, VLLMTarget, load_target

    assert VLLMTarget.generation_batch_size > HFTarget.generation_batch_size == 32  # vLLM schedules its own batch
    # what resampling reads is the instance's (LocalBatches, the Ray pool's info): DESIGN's 32 for hf
    assert load_target("some/model", backend="hf", device="cpu").generation_batch_size == 32
    spy = Spy(target, rows)
    spy.generation_batch_size = 5
    check_counts(resample_conversations(spy, rows, ResampleConfig(max_new_tokens=4), log=lambda _: None))
    assert max(len(convs) for convs, _, _ in spy.calls) == 5 == len(spy.calls[0][0])
    explicit = Spy(target, rows)
    explicit.generation_batch_size = 5
    resample_conversations(explicit, rows, ResampleConfig(max_new_tokens=4, batch_size=len(rows)), log=lambda _: None)
    assert max(len(convs) for convs, _, _ in explicit.calls) == len(rows)  # the config's wins


def test_multiturn_replay_uses_own_replies_and_keeps_system(target, rows):
    cfg = ResampleConfig(max_new_tokens=12, batch_size=8)
    spy = Spy(target, rows)
    res = resample_conversations(spy, rows, cfg, log=lambda _: None)
    check_counts(res)
    by_id = {r["id"]: r for r in res.table.to_pylist()}
    src = {r["id"]: r for r in rows}

    # One generate call per turn index per batch, not per row.
    batches = [rows[i:i + 8] for i in range(0, len(rows), 8)]
    assert len(spy.calls) == sum(max(len(assistant_turns(r["messages"])) for r in b) for b in batches)
    assert all(n == 1 for n in spy.generated.values())

    replies = {}  # (id, turn) -> text the target produced
    for convs, params, gens in spy.calls:
        for key, gen in zip(spy.keys(params), gens):
            replies[key] = gen.text
    checked_later_turns = 0
    for convs, params, _ in spy.calls:
        for conv, (rid, j) in zip(convs, spy.keys(params)):
            original = src[rid]["messages"]
            turn_at = assistant_turns(original)[j]
            # The prompt is the corpus up to this turn with earlier assistant turns replaced by
            # the target's own replies; system and user turns are the corpus's.
            assert [m["role"] for m in conv] == [m["role"] for m in original[:turn_at]]
            for k, i in enumerate(assistant_turns(original)[:j]):
                assert conv[i]["content"] == replies[(rid, k)]
                assert conv[i]["content"] != original[i]["content"]
                checked_later_turns += 1
            for m, o in zip(conv, original):
                if m["role"] != "assistant":
                    assert m == o
            if rid in by_id:  # and the stored row is exactly what the target saw
                assert conv == set_fields(by_id[rid]["messages"][:turn_at])
    assert checked_later_turns > 0

    with_system = [r for r in rows if r["messages"][0]["role"] == "system" and r["id"] in by_id]
    assert with_system
    for r in with_system:
        assert set_fields(by_id[r["id"]]["messages"][:1]) == r["messages"][:1]
    for rid, row in by_id.items():
        assert row["generator"] == target.identity
        assert row["temperature"] == draw_temperature(rid, cfg.temperatures, cfg.seed)
        assert len(row["messages"]) == len(src[rid]["messages"])


def test_on_length_flag_vs_drop(target, rows):
    common = dict(temperatures={0.0: 0.5, 1.0: 0.5}, max_new_tokens=5, batch_size=12)
    flag_spy, drop_spy = Spy(target, rows), Spy(target, rows)
    flag = resample_conversations(flag_spy, rows, ResampleConfig(on_length="flag", **common), log=lambda _: None)
    drop = resample_conversations(drop_spy, rows, ResampleConfig(on_length="drop", **common), log=lambda _: None)
    check_counts(flag)
    check_counts(drop)
    # Same seeds, same replies: drop rejects exactly the rows whose first problem is a cut turn
    # (a row that ends with an empty reply before any cut is an empty_reply either way).
    first_problem = {}
    for _, params, gens in flag_spy.calls:
        for (rid, j), g in sorted(zip(flag_spy.keys(params), gens), key=lambda kg: kg[0]):
            if rid not in first_problem and (g.finish_reason == "length" or not g.text.strip()):
                first_problem[rid] = "length" if g.finish_reason == "length" else "empty"
    flagged = {r["id"] for r in flag.table.to_pylist() if r["finish_reason"] == "length"}
    dropped = {r["id"] for r in drop.rejects.to_pylist() if r["reason"] == "length_limit"}
    assert flagged and flagged <= dropped
    assert dropped == {rid for rid, p in first_problem.items() if p == "length"}
    assert all(r["finish_reason"] == "stop" for r in drop.table.to_pylist())
    # finish_reasons counts every generated row, kept or rejected: any cut turn makes it "length".
    cut_rows = {rid for _, params, gens in flag_spy.calls
                for (rid, _), g in zip(flag_spy.keys(params), gens) if g.finish_reason == "length"}
    assert flag.finish_reasons["length"] == len(cut_rows) >= len(flagged)
    # A dropped row's later turns are not generated.
    for rid in dropped:
        cut = int(next(r["detail"] for r in drop.rejects.to_pylist() if r["id"] == rid).split()[2])
        assert max(j for (i, j) in drop_spy.generated if i == rid) == cut - 1

    greedy = dict(temperatures={0.0: 1.0}, batch_size=24)
    cut = resample_conversations(target, rows, ResampleConfig(max_new_tokens=4, on_length="drop", **greedy), log=lambda _: None)
    assert cut.n_ok == 0 and Counter(cut.rejects["reason"].to_pylist()) == {"length_limit": len(rows)}
    full = resample_conversations(target, rows, ResampleConfig(max_new_tokens=16, on_length="drop", **greedy), log=lambda _: None)
    assert full.n_ok == len(rows) and full.finish_reasons == {"stop": len(rows)}


def test_keep_or_strip_reasoning(target, rows):
    greedy = dict(temperatures={0.0: 1.0}, max_new_tokens=16, batch_size=24)
    kept = resample_conversations(target, rows, ResampleConfig(keep_reasoning=True, **greedy), log=lambda _: None)
    spy = Spy(target, rows)
    stripped = resample_conversations(spy, rows, ResampleConfig(keep_reasoning=False, **greedy), log=lambda _: None)
    assert kept.n_ok == stripped.n_ok == len(rows)
    for k, s in zip(kept.table.to_pylist(), stripped.table.to_pylist()):
        for i in assistant_turns(k["messages"]):
            # replies are decoded after their prompt (as vLLM does); this decoder-less word-level
            # tokenizer joins words with a space, so the reply starts with one
            assert k["messages"][i]["content"].lstrip().startswith("<think>") and "</think>" in k["messages"][i]["content"]
            assert s["messages"][i]["content"] == strip_reasoning(k["messages"][i]["content"]) == "answer"
    # Later turns were generated from the stripped replies, as stored.
    later = [conv for convs, params, _ in spy.calls for conv, (_, j) in zip(convs, spy.keys(params)) if j > 0]
    assert later and all(m["content"] == "answer" for conv in later for m in conv if m["role"] == "assistant")


def test_empty_reply_rejected(mute_target, rows):
    res = resample_conversations(mute_target, rows, ResampleConfig(max_new_tokens=8), log=lambda _: None)
    check_counts(res)
    assert res.n_ok == 0 and res.n_rejected == len(rows)
    assert set(res.rejects["reason"].to_pylist()) == {"empty_reply"}
    assert res.rejects["id"].to_pylist() == [r["id"] for r in rows]
    assert res.finish_reasons == {"stop": len(rows)}


def test_counts_reconcile_with_every_kind_of_reject(target, rows):
    extra = [
        {"id": "no-reply", "messages": [{"role": "user", "content": "what is it"}], "source": "t"},
        dict(rows[0]),  # a repeated id
    ]
    inp = rows + extra
    spy = Spy(target, inp)
    res = resample_conversations(spy, inp, ResampleConfig(temperatures={1.0: 1.0}, max_new_tokens=8, batch_size=10),
                                 log=lambda _: None)
    check_counts(res)
    assert res.n_in == len(inp)
    reasons = Counter(res.rejects["reason"].to_pylist())
    assert reasons["no_assistant_turn"] == 1 and reasons["duplicate_id"] == 1 and reasons["empty_reply"] >= 1
    assert set(reasons) <= {"no_assistant_turn", "duplicate_id", "empty_reply"}  # on_length="flag" keeps cut rows
    assert res.finish_reasons.get("length", 0) == sum(r == "length" for r in res.table["finish_reason"].to_pylist())
    assert res.tokens_generated == sum(g.n_tokens for _, _, gens in spy.calls for g in gens)
    empty = resample_conversations(spy, [], ResampleConfig(), log=lambda _: None)
    check_counts(empty)
    assert empty.n_in == 0 and passthrough([]).n_in == 0
    order = [r["id"] for r in rows]
    kept = res.table["id"].to_pylist()
    assert kept == [i for i in order if i in set(kept)]  # input order


def test_generation_error_fails_clearly(target, rows, local_store):
    progress = ResampleProgress(local_store, "resampled/_/fp/_progress")
    spy = Spy(target, rows, fail=lambda call, turns: call == 4)
    with pytest.raises(ResampleError, match=r"generation failed in batch \d+, assistant turn \d+ .*backend went away"):
        resample_conversations(spy, rows, ResampleConfig(batch_size=6, max_new_tokens=8), progress=progress, log=lambda _: None)
    saved = set(progress.load())
    assert progress.chunk_keys() and len(saved) % 6 == 0 and saved < {r["id"] for r in rows}


def test_passthrough(rows):
    table = pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)
    for inp in (table, rows):
        res = passthrough(inp)
        check_counts(res)
        assert res.n_in == res.n_ok == len(rows) and res.n_rejected == 0 and res.tokens_generated == 0
        assert [{**r, "messages": set_fields(r["messages"])}
                for r in res.table.select(["id", "messages", "source"]).to_pylist()] == rows
        assert set(res.table["finish_reason"].to_pylist()) == {"source"}
        assert res.table["temperature"].null_count == len(rows)
        assert set(res.table["generator"].to_pylist()) == {"corpus"}
        assert res.finish_reasons == {"source": len(rows)}


# ---------------------------------------------------------------------------------------------
# progress and resume


def test_progress_chunks_roundtrip_and_dedupe(store):
    progress = ResampleProgress(store, "resampled_corpus/shard/fp/_progress")
    assert set(progress.load()) == set() and progress.chunk_keys() == []

    def rec(i, reason=None):
        return {"id": f"r{i}", "messages": [{"role": "assistant", "content": f"reply {i}"}], "source": "s",
                "finish_reason": "stop", "temperature": 0.7, "generator": "g", "n_tokens": i,
                "reject_reason": reason, "reject_detail": reason and "why"}

    k1 = progress.append([rec(0), rec(1, "empty_reply")])
    k2 = progress.append([rec(2)])
    assert k1.endswith("/chunk-000001.parquet") and k2.endswith("/chunk-000002.parquet")
    store.write_bytes(k1.replace("000001", "000003"), store.read_bytes(k1))  # the same batch saved twice
    store.write_bytes(k1 + ".tmp-deadbeef", b"half a file")  # what a killed local write leaves
    assert len(progress.chunk_keys()) == 3
    loaded = ResampleProgress(store, "resampled_corpus/shard/fp/_progress").load()
    assert sorted(loaded) == ["r0", "r1", "r2"]
    assert loaded["r1"]["reject_reason"] == "empty_reply" and loaded["r2"]["n_tokens"] == 2
    assert progress.append([rec(3)]).endswith("/chunk-000004.parquet")


def _kill_at_batch(n_batches_done):
    """Raise at the first call of batch n+1, i.e. right after batch n was saved."""
    state = {"starts": 0}

    def fail(call, turns):
        if 0 in turns:
            state["starts"] += 1
        return state["starts"] > n_batches_done

    return fail


def _kill_in_batch(n):
    """Raise at the first later-turn call of batch n: its first turn was generated, nothing saved."""
    state = {"starts": 0}

    def fail(call, turns):
        if 0 in turns:
            state["starts"] += 1
        return state["starts"] == n and 0 not in turns

    return fail


def test_resume_after_kill_reproduces_uninterrupted_run(target, rows, local_store):
    cfg = ResampleConfig(max_new_tokens=10, batch_size=5)  # default mixture: greedy and sampled rows
    table = pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)
    reference = resample_conversations(target, table, cfg, log=lambda _: None)

    progress = ResampleProgress(local_store, "resampled_corpus/demo-00000/fp/_progress")
    first = Spy(target, rows, fail=_kill_at_batch(2))
    with pytest.raises(ResampleError):
        resample_conversations(first, table, cfg, progress=progress, log=lambda _: None)
    assert len(set(progress.load())) == 10 and len(progress.chunk_keys()) == 2

    second = Spy(target, rows)
    res = resample_conversations(second, table, cfg, progress=ResampleProgress(local_store, progress.prefix), log=lambda _: None)
    # No row-turn generated twice across the killed and the resumed run, none skipped.
    both = first.generated + second.generated
    assert max(both.values()) == 1
    assert {i for i, _ in both} == {r["id"] for r in rows}
    assert res.n_resumed == 10
    check_counts(res)
    assert res.table.equals(reference.table) and res.rejects.equals(reference.rejects)
    assert res.finish_reasons == reference.finish_reasons and res.tokens_generated == reference.tokens_generated
    assert set(res.table["temperature"].to_pylist()) > {0.0}  # sampled rows are compared too


class ReversedBatches(LocalBatches):
    """Batches finishing last-first, as Ray actors may return them (ray_pool.PoolBatches)."""

    def run(self, batches, cfg):
        for no, batch in reversed(batches):
            yield no, resample_batch(self.target, batch, cfg, self.generator, no), " (reversed)"


def test_the_driver_result_does_not_depend_on_the_order_batches_finish(target, rows, local_store):
    """resample_rows, the one driver of the local and the Ray path: progress saved in any order,
    output in input order, the same table as batches run one after another."""
    cfg = ResampleConfig(max_new_tokens=10, batch_size=3)
    reference = resample_conversations(target, rows, cfg, log=lambda _: None)
    lines = []
    progress = ResampleProgress(local_store, "r/_progress")
    res = resample_rows(ReversedBatches(target), rows, cfg, progress=progress, log=lines.append)
    assert res.table.equals(reference.table) and res.rejects.equals(reference.rejects)
    n = -(-len(rows) // 3)
    assert lines[1].startswith(f"resample: batch {n}/{n} (reversed):") and len(progress.chunk_keys()) == n
    again = resample_rows(ReversedBatches(target), rows, cfg, progress=progress, log=lambda _: None)
    assert again.n_resumed == len(progress.load()) > 0 and again.table.equals(reference.table)


def test_resume_after_mid_batch_kill_and_duplicate_chunk(target, rows, local_store):
    cfg = ResampleConfig(max_new_tokens=10, batch_size=8)
    reference = resample_conversations(target, rows, cfg, log=lambda _: None)
    progress = ResampleProgress(local_store, "p/_progress")
    # Killed inside batch 2, after its first turn was generated but before it was saved.
    first = Spy(target, rows, fail=_kill_in_batch(2))
    with pytest.raises(ResampleError):
        resample_conversations(first, rows, cfg, progress=progress, log=lambda _: None)
    saved = set(progress.load())
    assert saved == {r["id"] for r in rows[:8]}
    # The same chunk landing twice (a retry after a lost acknowledgement) changes nothing.
    key = progress.chunk_keys()[0]
    local_store.write_bytes(key.replace("chunk-000001", "chunk-000007"), local_store.read_bytes(key))

    second = Spy(target, rows)
    res = resample_conversations(second, rows, cfg, progress=progress, log=lambda _: None)
    assert not {i for i, _ in second.generated} & saved  # finished rows are never redone
    assert {i for i, _ in second.generated} == {r["id"] for r in rows[8:]}
    assert res.n_resumed == 8 and res.table["id"].to_pylist() == reference.table["id"].to_pylist()
    assert res.table.equals(reference.table) and res.rejects.equals(reference.rejects)

    # A third run generates nothing and returns the same result.
    third = Spy(target, rows)
    again = resample_conversations(third, rows, cfg, progress=progress, log=lambda _: None)
    assert third.calls == [] and again.n_resumed == len(rows) and again.table.equals(reference.table)
    assert pq.read_table(local_store.open(key)).num_rows == 8
    # Progress from another config is refused, not mixed in.
    with pytest.raises(ResampleError, match="fingerprint"):
        resample_conversations(target, rows, ResampleConfig(max_new_tokens=10, batch_size=8, seed=1),
                               progress=progress, log=lambda _: None)


def test_question_rows_need_generation(target):
    """A question file (MT-Bench `turns`, read as user turns each followed by an empty assistant turn)
    is a training corpus only with resampling: the target writes every reply; pass-through rejects it."""
    from training.corpus.formats import normalize_record

    row, problem = normalize_record({"question_id": 7, "category": "math", "turns": ["what is it", "and now"]},
                                    source="q.jsonl", row_index=1, shard="q")
    assert problem is None and row["source"] == "math"
    rows = [row, {"id": "full", "source": "s", "messages": [{"role": "user", "content": "what"},
                                                              {"role": "assistant", "content": "answer"}]}]
    res = passthrough(rows)
    check_counts(res)
    assert res.table["id"].to_pylist() == ["full"]
    assert res.rejects.to_pylist()[0]["id"] == "7" and res.rejects["reason"].to_pylist() == ["needs_generation"]
    gen = resample_conversations(target, [row], ResampleConfig(temperatures={0.0: 1.0}, max_new_tokens=8), log=lambda _: None)
    assert gen.n_ok == 1
    [out] = gen.table.to_pylist()
    assert all(m["content"].strip() for m in out["messages"]) and len(out["completion_ids"]) == 2


@pytest.mark.parametrize("batch_size", [1, 32])
def test_rows_the_template_refuses_are_rejected_and_the_shard_goes_on(target, rows, batch_size):
    from training.targets import load_target
    from training.tokenization import TokenizeConfig, tokenize_conversations

    strict = load_target(target.name_or_path, backend="hf")
    strict.tokenizer.chat_template = GEMMA_STYLE
    doubled = {"id": "two-users", "source": "t", "messages": [
        {"role": "user", "content": "what is it"}, {"role": "assistant", "content": "so"},
        {"role": "user", "content": "now"}, {"role": "user", "content": "and now"},
        {"role": "assistant", "content": "so"}]}
    inp = [*rows, doubled]
    res = resample_conversations(strict, inp, ResampleConfig(temperatures={0.0: 1.0}, max_new_tokens=6,
                                                             batch_size=batch_size), log=lambda _: None)
    check_counts(res)
    with_system = {r["id"] for r in rows if r["messages"][0]["role"] == "system"}
    rejects = {r["id"]: r for r in res.rejects.to_pylist()}
    assert set(rejects) == with_system | {"two-users"}
    assert all(r["reason"] == "template_error" for r in rejects.values())
    assert "System role not supported" in rejects[next(iter(with_system))]["detail"]
    assert rejects["two-users"]["detail"].startswith("assistant turn 2: ") and "must alternate" in rejects["two-users"]["detail"]
    assert res.n_ok == len(rows) - len(with_system) > 0
    # what was kept tokenizes under the same strict template, every row
    tok = tokenize_conversations(strict.tokenizer, res.table, TokenizeConfig())
    assert tok.n_in == tok.n_ok == res.n_ok and tok.rows_from_generated_ids == tok.table.num_rows


# ChatML with a tools block naming each tool (the bigram tokenizer knows "answer")
TOOLS_CHATML = ("{{ bos_token }}{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t.function.name }} {% endfor %}"
                "<|im_end|>\n{% endif %}" + CHATML.replace("{{ bos_token }}", ""))


def test_tool_conversations_show_the_target_their_tools_and_keep_the_calls(target):
    import json

    from training.targets import load_target

    tooled = load_target(target.name_or_path, backend="hf")
    tooled.tokenizer.chat_template = TOOLS_CHATML
    tools = json.dumps([{"type": "function", "function": {"name": "answer", "parameters": {}}}])
    call = json.dumps([{"type": "function", "function": {"name": "answer", "arguments": {}}}])
    messages = [{"role": "user", "content": "what is it"},
                {"role": "assistant", "content": "", "tool_calls": call},
                {"role": "tool", "content": "so"}, {"role": "assistant", "content": "it is so"}]
    rows = [{"id": "with-tools", "source": "t", "tools": tools, "messages": messages},
            {"id": "without", "source": "t", "tools": None, "messages": messages}]
    spy = Spy(tooled, rows)
    res = resample_conversations(spy, rows, ResampleConfig(temperatures={0.0: 1.0}, max_new_tokens=4), log=lambda _: None)
    check_counts(res)
    assert res.n_ok == 2 and res.table["tools"].to_pylist() == [tools, None]
    (convs, _, gens), *_ = spy.calls
    answer = tooled.tokenizer.convert_tokens_to_ids("answer")
    assert answer in gens[0].prompt_token_ids[:8] and answer not in gens[1].prompt_token_ids[:8]  # the tools block
    assert convs[0][:1] == messages[:1]
    # the corpus's call turn is history the target answers after; a backend that cannot show tools rejects the rows
    blind = Spy(tooled, rows)
    blind.supports_tools = False
    res = resample_conversations(blind, rows, ResampleConfig(temperatures={0.0: 1.0}, max_new_tokens=4), log=lambda _: None)
    check_counts(res)
    assert res.rejects["reason"].to_pylist() == ["tools_unsupported"] * 2  # the calls in history too
    # without resampling, a turn that only calls a tool is a reply, not an empty turn to generate
    kept = passthrough(rows)
    assert kept.n_ok == 2 and kept.table["tools"].to_pylist() == [tools, None]


# gpt-oss's harmony format, cut down to its shape: history keeps only the final channel, the last
# assistant message renders its analysis channel (`thinking`) and ends with <|return|>.
HARMONY = ("{%- for m in messages %}{%- if m.role == 'assistant' %}"
           "{%- if m.thinking and loop.last %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>"
           "{%- endif %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}"
           "{%- if loop.last and not add_generation_prompt %}<|return|>{%- else %}<|end|>{%- endif %}"
           "{%- else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{%- endif %}{%- endfor %}"
           "{%- if add_generation_prompt %}<|start|>assistant{%- endif %}")
HARMONY_SPECIALS = ["<|pad|>", "<|bos|>", "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "[UNK]"]
# A bigram harmony speaker: analysis or final channel, a message, then the next message or <|return|>
HARMONY_CHAIN = {
    "assistant": {"<|channel|>": 10.0},
    "<|channel|>": {"analysis": 2.0, "final": 2.0},
    "analysis": {"<|message|>": 10.0},
    "final": {"<|message|>": 10.0},
    "<|message|>": {"hmm": 3.0, "answer": 3.0},
    "hmm": {"<|end|>": 3.0, "hmm": 1.0},
    "answer": {"<|return|>": 3.0, "<|end|>": 1.0},
    "<|end|>": {"<|start|>": 10.0},
    "<|start|>": {"assistant": 10.0},
}


def harmony_target(tmp_path):
    from training.targets import load_target

    words = [w for w in WORDS if not w.startswith("<")] + ["analysis", "final"]
    path = build_bigram_target(tmp_path / "harmony", HARMONY_CHAIN, specials=HARMONY_SPECIALS, words=words,
                               template=HARMONY, eos="<|return|>")
    return load_target(str(path), backend="hf")


def test_harmony_replies_keep_analysis_and_final_channels_apart(rows, tmp_path):
    from training.tokenization import TokenizeConfig, tokenize_conversations

    target = harmony_target(tmp_path)
    res = resample_conversations(target, rows, ResampleConfig(temperatures={1.0: 1.0}, max_new_tokens=24),
                                 log=lambda _: None)
    check_counts(res)
    replies = [m for r in res.table.to_pylist() for m in r["messages"] if m["role"] == "assistant"]
    markers = ("<|", "analysis", "final", "assistant")
    assert replies and not any(k in m["content"] or k in (m["reasoning_content"] or "") for m in replies for k in markers)
    both = [m for m in replies if m["reasoning_content"] and m["content"]]
    assert both and all(set(m["reasoning_content"].split()) <= {"hmm", "answer"} for m in replies if m["reasoning_content"])
    # trained on exactly the ids the target generated; history is rendered as the template renders it
    tok = tokenize_conversations(target.tokenizer, res.table, TokenizeConfig(max_length=4096))
    assert tok.n_in == res.n_ok and tok.n_rejected == 0 and tok.id_mismatches == 0
    assert tok.rows_from_generated_ids == tok.table.num_rows and tok.reasoning_turns == len(
        [m for m in replies if m["reasoning_content"]])


# ---------------------------------------------------------------------------------------------
# prompts the target writes


def test_written_prompts_are_the_targets_own_and_answered(target, rows):
    cfg = ResampleConfig(max_new_tokens=8, written_prompts=2)
    res = resample_conversations(target, rows[:6], cfg, log=lambda s: None)
    check_counts(res)
    assert res.n_in == 18
    got = {r["id"]: r for r in res.table.to_pylist() + res.rejects.to_pylist()}
    assert set(got) == {f"{r['id']}{s}" for r in rows[:6] for s in ("", "~prompt1", "~prompt2")}
    # the corpus rows come out as they do without written prompts
    one = resample_conversations(target, rows[:6], ResampleConfig(max_new_tokens=8), log=lambda s: None)
    assert [got[r["id"]] for r in one.table.to_pylist()] == one.table.to_pylist()
    source = {r["id"]: r for r in rows[:6]}
    written = [r for i, r in got.items() if "~prompt" in i and r.get("messages")]
    assert len(written) >= 8
    for r in written:
        src = source[r["id"].split("~")[0]]["messages"]
        system = [m["content"] for m in src[:1] if m["role"] == "system"]
        msgs = r["messages"]
        assert [m["role"] for m in msgs] == ["system"] * len(system) + ["user", "assistant"]
        assert [m["content"] for m in msgs[:len(system)]] == system
        # the bigram table's continuation of "<|im_start|>user": "answer", then "more answer" or the end of turn
        words = msgs[-2]["content"].split()
        assert words[0] == "answer" and set(words) <= {"answer", "more"}, msgs[-2]
        assert msgs[-1]["content"] or msgs[-1].get("reasoning_content")
    assert any(s["role"] == "system" for r in written for s in r["messages"])
    assert len({r["temperature"] for r in written}) > 1  # answered at the mixture's temperatures, greedy included
    # a written prompt is a function of (row id, seed): the same run writes the same prompts
    again = resample_conversations(target, rows[:6], cfg, log=lambda s: None)
    assert again.table.to_pylist() == res.table.to_pylist()
    with pytest.raises(ResampleError, match="contains '~prompt'"):
        resample_conversations(target, [{**rows[0], "id": "a~prompt1"}], cfg)


def test_written_prompts_that_do_not_end_or_are_empty_are_rejects_with_their_reason(target, rows, tmp_path):
    from training.targets import load_target

    cut = resample_conversations(target, rows[:4], ResampleConfig(max_new_tokens=1, written_prompts=1),
                                 log=lambda s: None)
    check_counts(cut)
    reasons = {r["id"]: r["reason"] for r in cut.rejects.to_pylist()}
    assert all(reasons.get(f"{r['id']}~prompt1") == "written_prompt_length" for r in rows[:4]), reasons
    silent = load_target(str(build_bigram_target(tmp_path / "silent", {**CHAIN, "user": {"<|im_end|>": 10.0}})), "hf")
    empty = resample_conversations(silent, rows[:4], ResampleConfig(max_new_tokens=8, written_prompts=1),
                                   log=lambda s: None)
    check_counts(empty)
    reasons = {r["id"]: r["reason"] for r in empty.rejects.to_pylist()}
    assert all(reasons.get(f"{r['id']}~prompt1") == "empty_prompt" for r in rows[:4]), reasons


def test_written_prompts_resume_from_progress_and_need_a_tokenizer(target, rows, tmp_path):
    from training.storage import ObjectStore
    from training.targets import TargetError

    cfg = ResampleConfig(max_new_tokens=8, written_prompts=1, batch_size=4)
    progress = ResampleProgress(ObjectStore(str(tmp_path)), "progress")
    first = resample_conversations(target, rows[:6], cfg, progress=progress, log=lambda s: None)
    resumed = resample_conversations(target, rows[:6], cfg, progress=progress, log=lambda s: None)
    assert resumed.n_resumed == 12 and resumed.table.to_pylist() == first.table.to_pylist()

    class NoTokenizer(Spy):  # an openai server given no tokenizer: its template is out of reach
        @property
        def tokenizer(self):
            raise TargetError("the openai backend has no tokenizer of its own")

    with pytest.raises(ResampleError, match="written_prompts needs the target's tokenizer"):
        resample_conversations(NoTokenizer(target, rows), rows[:2], cfg, log=lambda s: None)
