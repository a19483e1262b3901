"""The openai backend against a real OpenAI-compatible HTTP server on loopback serving a tiny HF target."""

import threading
import time
from http.server import ThreadingHTTPServer

import pytest

from tests.conftest import JsonHandler
from training.targets import OpenAIError, SamplingParams, TargetError, load_target
from training.targets.tiny import build_tiny_target

KEY = "sk-test-not-a-real-key"


class Server:
    """/v1/models and /v1/chat/completions backed by an HF target; faults are injected by setting fields."""

    def __init__(self, target):
        self.target = target
        self.lock = threading.Lock()
        self.fail_next = 0  # answer this many chat requests with 503 first
        self.fail_status, self.retry_after = 503, None  # ... or this status, with this Retry-After header
        self.mode = "ok"  # or "empty", "bad_request"
        self.requests = 0
        self.times: list[float] = []  # when each chat request was answered
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_seen: set[str] = set()
        self.bodies: list[dict] = []
        server = self

        class Handler(JsonHandler):
            def do_GET(self):
                self.send_json(200, {"object": "list", "data": [{"id": "tiny-llama", "object": "model"}]})

            def do_POST(self):
                body = self.read_json()
                server.auth_seen.add(self.headers.get("Authorization", ""))
                server.bodies.append(body)
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fail = server.fail_next > 0
                    server.fail_next -= fail
                try:
                    code, obj = server.answer(body, fail)
                finally:  # before replying: the client may send its next request as soon as it reads this one
                    with server.lock:
                        server.in_flight -= 1
                        server.times.append(time.monotonic())
                wait = {"Retry-After": server.retry_after} if fail and server.retry_after else {}
                self.send_json(code, obj, headers=wait)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, body, fail):
        time.sleep(0.05)  # let concurrent requests overlap
        if fail:
            return self.fail_status, {"error": {"message": "overloaded"}}
        if self.mode == "bad_request":
            return 400, {"error": {"message": "max_tokens is too large"}}
        if self.mode == "strict" and "return_token_ids" in body:  # as api.openai.com answers unknown fields
            return 400, {"error": {"message": "Unrecognized request argument supplied: return_token_ids"}}
        if self.mode == "empty":
            return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]}
        params = SamplingParams(body["temperature"], body["top_p"], body["max_tokens"], body.get("seed"))
        if "prompt" in body:  # /v1/completions with token ids, as vLLM answers it
            with self.lock:
                [gen] = self.target.complete([body["prompt"]], [params])
            stop = [self.target.tokenizer.eos_token_id] if gen.finish_reason == "stop" else []
            choice = {"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "stop_reason": None}
            if body.get("return_token_ids"):
                choice["token_ids"] = [*gen.token_ids, *stop]
            return 200, {"object": "text_completion", "choices": [choice], "usage": {"completion_tokens": gen.n_tokens}}
        with self.lock:  # one forward at a time on the shared model
            [gen] = self.target.generate([body["messages"]], [params])
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": gen.finish_reason}
        if self.mode == "thinking":  # a reasoning parser, the reply cut by max_tokens while still thinking
            choice.update(message={"role": "assistant", "content": None, "reasoning_content": gen.text},
                          finish_reason="length")
        out = {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"], "choices": [choice],
               "usage": {"completion_tokens": gen.n_tokens}}
        if body.get("return_token_ids") and self.mode != "no_ids":
            # as vLLM answers return_token_ids: the reply's ids end with the EOS that stopped it
            stop = [self.target.tokenizer.eos_token_id] if gen.finish_reason == "stop" else []
            choice.update(token_ids=[*gen.token_ids, *stop], stop_reason=None)
            out["prompt_token_ids"] = list(gen.prompt_token_ids)
        return 200, out

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hf_target(tmp_path_factory):
    return load_target(str(build_tiny_target(tmp_path_factory.mktemp("oai") / "llama", "llama", num_layers=2)))


@pytest.fixture
def server(hf_target, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Server(hf_target) as s:
        yield s


CONVS = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
PARAMS = [SamplingParams(temperature=0.7 * (i % 2), top_p=0.9, max_new_tokens=6, seed=i) for i in range(6)]


def test_generation_matches_the_served_target(server, hf_target):
    client = load_target(server.url, backend="openai", max_concurrency=2)
    gens = client.generate(CONVS, PARAMS)
    assert client.model_name == "tiny-llama"  # discovered from /v1/models
    assert gens == hf_target.generate(CONVS, PARAMS)
    assert 1 < server.max_in_flight <= 2  # concurrent, and bounded
    assert server.auth_seen == {f"Bearer {KEY}"}
    assert client.identity == f"openai:{server.url}#tiny-llama"


def test_token_ids_and_chat_template_kwargs(server, hf_target):
    """Replies carry the served ids (vLLM's return_token_ids, stop token dropped); the chat settings go
    in the request body; a server without ids gives replies without them (tokenization re-encodes)."""
    client = load_target(server.url, backend="openai", model="m", chat_template_kwargs={"enable_thinking": False})
    [gen] = client.generate(CONVS[:1], PARAMS[:1])
    [ref] = hf_target.generate(CONVS[:1], PARAMS[:1])
    assert gen.token_ids == ref.token_ids and gen.prompt_token_ids == ref.prompt_token_ids and gen.token_ids
    assert server.bodies[-1]["chat_template_kwargs"] == {"enable_thinking": False}
    assert server.bodies[-1]["return_token_ids"] is True
    server.mode = "no_ids"
    [gen] = client.generate(CONVS[:1], PARAMS[:1])
    assert gen.text == ref.text and gen.token_ids is None and gen.prompt_token_ids is None


def test_complete_continues_token_ids_as_the_served_target_does(server, hf_target):
    """/v1/completions with token-id prompts (resampling's written prompts): no template, the served ids."""
    client = load_target(server.url, backend="openai", max_concurrency=2)
    prompts = [hf_target.tokenizer(f"<|im_start|>user\nquestion {i}", add_special_tokens=False)["input_ids"]
               for i in range(len(PARAMS))]
    gens = client.complete(prompts, PARAMS)
    assert gens == hf_target.complete(prompts, PARAMS)
    assert all(g.prompt_token_ids == tuple(p) and g.token_ids for g, p in zip(gens, prompts))
    body = server.bodies[-1]
    assert body["prompt"] in prompts and "messages" not in body and body["return_token_ids"] is True


def test_server_refusing_return_token_ids_says_what_to_set(server):
    server.mode = "strict"
    with pytest.raises(OpenAIError, match="HTTP 400.*set return_token_ids false"):
        load_target(server.url, backend="openai", model="m").generate(CONVS[:1], PARAMS[:1])
    [gen] = load_target(server.url, backend="openai", model="m", return_token_ids=False).generate(CONVS[:1], PARAMS[:1])
    assert gen.text and gen.token_ids is None


def test_retries_5xx_then_succeeds(server):
    server.fail_next = 3
    client = load_target(server.url.removesuffix("/v1"), backend="openai", model="tiny-llama", max_concurrency=1)
    [gen] = client.generate(CONVS[:1], PARAMS[:1])
    assert gen.n_tokens > 0 and server.requests == 4


def test_429_waits_what_retry_after_asks(server):
    """The SDK's own first backoff is under a second; the server asks for 2 s and gets them."""
    server.fail_next, server.fail_status, server.retry_after = 1, 429, "2"
    [gen] = load_target(server.url, backend="openai", model="m").generate(CONVS[:1], PARAMS[:1])
    assert gen.n_tokens > 0 and server.requests == 2
    assert server.times[1] - server.times[0] >= 1.9


def test_gives_up_after_max_retries(server):
    server.fail_next = 100
    client = load_target(server.url, backend="openai", model="m", max_retries=2)
    with pytest.raises(OpenAIError, match="after 3 attempts.*HTTP 503") as err:
        client.generate(CONVS[:1], PARAMS[:1])
    assert KEY not in str(err.value)


def test_4xx_fails_at_once_with_the_servers_message(server):
    server.mode = "bad_request"
    client = load_target(server.url, backend="openai", model="m")
    with pytest.raises(OpenAIError, match="HTTP 400.*max_tokens is too large") as err:
        client.generate(CONVS[:1], PARAMS[:1])
    assert server.requests == 1 and KEY not in str(err.value)


def test_empty_reply_is_an_error(server):
    server.mode = "empty"
    client = load_target(server.url, backend="openai", model="m")
    with pytest.raises(OpenAIError, match="empty reply"):
        client.generate(CONVS[:1], PARAMS[:1])
    [gen] = load_target(server.url, backend="openai", model="m", allow_empty=True).generate(CONVS[:1], PARAMS[:1])
    assert gen.text == ""


def test_connection_refused_is_retried_then_reported():
    client = load_target("http://127.0.0.1:9/v1", backend="openai", model="m", max_retries=1)
    with pytest.raises(OpenAIError, match="after 2 attempts, last: ConnectionRefusedError: Connection refused"):
        client.generate(CONVS[:1], PARAMS[:1])


def test_no_features_and_facts_only_with_a_tokenizer(hf_target):
    client = load_target("http://127.0.0.1:9", backend="openai", model="m")
    with pytest.raises(TargetError, match="cannot compute features"):
        client.features([[1, 2]], (0,))
    with pytest.raises(TargetError, match="tokenizer="):
        client.facts
    with_tok = load_target("http://127.0.0.1:9", backend="openai", model="m", tokenizer=hf_target.name_or_path)
    assert with_tok.facts == hf_target.facts
    assert with_tok.tokenizer("ab")["input_ids"] == hf_target.tokenizer("ab")["input_ids"]


def test_a_reply_cut_while_reasoning_is_a_row_with_its_reason(server, hf_target):
    """A reasoning parser's reply cut by max_tokens (content null, reasoning only) is a generation, kept
    apart from the reply: resampling keeps the row (finish_reason length) or drops it with its reason,
    never fails the batch; the next turn's request carries the reasoning in its history."""
    from training.resample import ResampleConfig, resample_conversations

    server.mode = "thinking"
    client = load_target(server.url, backend="openai", model="m", tokenizer=hf_target.name_or_path)
    [gen] = client.generate(CONVS[:1], PARAMS[:1])
    assert gen.text == "" and gen.reasoning and gen.finish_reason == "length" and gen.token_ids
    rows = [{"id": f"r{i}", "source": "t", "messages": [*c, {"role": "assistant", "content": "x"},
                                                      {"role": "user", "content": "and?"},
                                                      {"role": "assistant", "content": "y"}]}
            for i, c in enumerate(CONVS[:3])]
    cfg = dict(temperatures={0.0: 1.0}, max_new_tokens=4)
    res = resample_conversations(client, rows, ResampleConfig(**cfg), log=lambda _: None)
    assert (res.n_in, res.n_ok, res.n_rejected) == (3, 3, 0) and res.finish_reasons == {"length": 3}
    for row in res.table.to_pylist():
        replies = [m for m in row["messages"] if m["role"] == "assistant"]
        assert all(m["content"] == "" and m["reasoning_content"] for m in replies)
        assert row["completion_ids"] is not None  # the ids cover the reasoning as generated
    assert server.bodies[-1]["messages"][1]["reasoning_content"]  # history keeps the reasoning
    dropped = resample_conversations(client, rows, ResampleConfig(**cfg, on_length="drop"), log=lambda _: None)
    assert dropped.n_rejected == 3 and set(dropped.rejects["reason"].to_pylist()) == {"length_limit"}


def test_written_prompts_through_the_server_equal_the_served_targets(monkeypatch, tmp_path):
    """resampled_corpus.written_prompts on the openai backend: the opening rendered with its tokenizer,
    the prompt written through /v1/completions, the reply through /v1/chat/completions; the same rows
    as the hf target the server runs gives, rejects included."""
    from tests.training.test_resample import CHAIN, build_bigram_target
    from training.configs import ResampleConfig
    from training.resample import resample_conversations

    target_dir = build_bigram_target(tmp_path / "bigram", CHAIN)
    hf = load_target(str(target_dir), "hf")
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": "what is it"}, {"role": "assistant", "content": "sure"}],
             "source": "t", "tools": None} for i in range(4)]
    cfg = ResampleConfig(max_new_tokens=8, written_prompts=2)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Server(hf) as server:
        # allow_empty: the bigram table ends some replies at once; hf makes them empty_reply rejects too
        client = load_target(server.url, backend="openai", tokenizer=str(target_dir), allow_empty=True)
        served = resample_conversations(client, rows, cfg, log=lambda s: None)
        assert any("prompt" in body for body in server.bodies)  # the prompts went through /v1/completions
    local = resample_conversations(hf, rows, cfg, log=lambda s: None)
    key = lambda res: ([(r["id"], r["messages"], r["temperature"], r["completion_ids"]) for r in res.table.to_pylist()],  # noqa: E731
                       res.rejects.to_pylist())
    assert key(served) == key(local)
    assert sum("~prompt" in r["id"] for r in served.table.to_pylist()) >= 4
