"""Generation through any OpenAI-compatible /v1/chat/completions server (`vllm serve`, SGLang, ...),
with the `openai` SDK's async client.

Generation only: hidden states never cross an HTTP API. A call's requests run concurrently, at most
`max_concurrency` at once. The SDK retries connection errors, 408, 409, 429 and 5xx answers
`max_retries` times with exponential backoff, waiting what the server's Retry-After asks for when
it sends one; other 4xx fail at once with the server's message. The API key comes from
OPENAI_API_KEY (or the variable named by `api_key_env`; "EMPTY" without one, as a vLLM server
without --api-key takes) and only ever goes into the Authorization header, never into logs or errors.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Sequence

from training.targets.base import Generation, SamplingParams, TargetError, TargetModel

# The statuses the openai SDK retries (besides a server's explicit x-should-retry).
RETRIED_STATUS = (408, 409, 429)


class OpenAIError(TargetError):
    """The server refused or answered something unusable; the message says which request and why."""


class OpenAITarget(TargetModel):
    """`load_target("http://host:8000/v1", "openai", model="served-name", tokenizer="hf/dir")`.

    `tokenizer` (an HF directory or hub id of the served model) is optional and only needed for
    `tokenizer` and `facts`; without it those raise, since the server does not expose them.
    """

    backend = "openai"
    supports_tools = True

    def __init__(
        self,
        name_or_path: str,
        *,
        model: str | None = None,
        tokenizer: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_concurrency: int = 8,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        api_key_env: str = "OPENAI_API_KEY",
        allow_empty: bool = False,
        extra_body: dict | None = None,
        chat_template_kwargs: dict | None = None,
        return_token_ids: bool = True,
    ):
        super().__init__(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        base = self.name_or_path.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self._model_name = model
        self.tokenizer_spec = tokenizer
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = timeout_s
        self.max_retries = int(max_retries)
        self.api_key_env = api_key_env
        self.allow_empty = allow_empty
        self.extra_body = dict(extra_body or {})
        # vLLM's server renders the template with these (request field `chat_template_kwargs`)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        # vLLM >= 0.10.2 returns the prompt's and the reply's ids on request; a server that does not
        # (or ignores the field) gives replies without ids, which tokenization re-encodes and counts.
        self.return_token_ids = return_token_ids

    @property
    def identity(self) -> str:
        return f"openai:{self.base_url}#{self.model_name}"

    @property
    def model_name(self) -> str:
        """The served model: as given, or the first (usually only) one the server lists."""
        if self._model_name is None:
            data = asyncio.run(self._run(lambda client: [self._call("GET", "/models", client.models.with_raw_response.list())]))[0]
            models = [m.get("id") for m in data.get("data") or [] if m.get("id")]
            if not models:
                raise OpenAIError(f"{self.base_url}/models lists no model; pass model=...")
            self._model_name = models[0]
        return self._model_name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._need_local("tokenizer")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.tokenizer_spec, revision=self.revision, trust_remote_code=self.trust_remote_code
            )
        return self._tokenizer

    @property
    def facts(self):
        if self._facts is None:
            self._need_local("facts")
            from transformers import AutoConfig

            from training.targets.base import TargetFacts

            config = AutoConfig.from_pretrained(
                self.tokenizer_spec, revision=self.revision, trust_remote_code=self.trust_remote_code
            )
            self._facts = TargetFacts.from_config(config.to_dict())
        return self._facts

    def _need_local(self, what: str) -> None:
        if not self.tokenizer_spec:
            raise TargetError(
                f"the openai backend has no {what} of its own: pass tokenizer=<HF dir or hub id of the served model>"
            )

    # -- generation -------------------------------------------------------------------------
    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[SamplingParams],
                 tools: Sequence | None = None) -> list[Generation]:
        if len(conversations) != len(sampling):
            raise TargetError(f"{len(conversations)} conversations but {len(sampling)} sampling params")
        model = self.model_name
        tools = tools or [None] * len(conversations)
        bodies = [self._body(model, c, s, t) for c, s, t in zip(conversations, sampling, tools)]
        limit = asyncio.Semaphore(self.max_concurrency)

        async def post(client, body):
            async with limit:
                request = client.chat.completions.with_raw_response.create(
                    model=body.pop("model"), messages=body.pop("messages"), extra_body=body)
                return await self._call("POST", "/chat/completions", request)

        answers = asyncio.run(self._run(lambda client: [post(client, b) for b in bodies]))
        return [self._generation(i, data) for i, data in enumerate(answers)]

    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> list[Generation]:
        """POST /completions with each prompt as token ids (vLLM and SGLang take them), no template."""
        if len(prompts) != len(sampling):
            raise TargetError(f"{len(prompts)} prompts but {len(sampling)} sampling params")
        model, limit = self.model_name, asyncio.Semaphore(self.max_concurrency)

        async def post(client, prompt, params):
            async with limit:
                request = client.completions.with_raw_response.create(
                    model=model, prompt=[int(t) for t in prompt], extra_body=self._sampling(params))
                return await self._call("POST", "/completions", request)

        answers = asyncio.run(self._run(lambda client: [post(client, p, s) for p, s in zip(prompts, sampling)]))
        out = []
        for prompt, data in zip(prompts, answers):
            choices = data.get("choices") or []
            if not choices or choices[0].get("text") is None:
                raise OpenAIError(f"{self.base_url}/completions returned no text (choices={len(choices)})")
            finish = str(choices[0].get("finish_reason") or "stop")
            out.append(Generation(
                text=choices[0]["text"], finish_reason=finish,
                n_tokens=int((data.get("usage") or {}).get("completion_tokens") or 0),
                token_ids=_reply_ids(choices[0], finish), prompt_token_ids=tuple(int(t) for t in prompt)))
        return out

    async def _run(self, requests):
        """Await the coroutines `requests(client)` makes with one SDK client; their results in order."""
        import openai

        key = os.environ.get(self.api_key_env) or "EMPTY"
        async with openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=self.max_retries,
                                      timeout=self.timeout_s) as client:
            return await asyncio.gather(*requests(client))

    async def _call(self, method: str, path: str, request) -> dict:
        """The JSON answer of one SDK request (retried by the SDK); OpenAIError naming the request otherwise."""
        import openai

        url = self.base_url + path
        attempts = self.max_retries + 1
        try:
            raw = await request
        except openai.APIStatusError as exc:
            body = exc.response.content
            key = os.environ.get(self.api_key_env)
            if key:  # a server may echo the key it refused ("invalid api key: sk-..."): never pass it on
                body = body.replace(key.encode(), b"<redacted>")
            detail, code = _excerpt(body), exc.status_code
            if code in RETRIED_STATUS or code >= 500:
                raise OpenAIError(f"{method} {url}: failed after {attempts} attempts, last: HTTP {code}: {detail}") from None
            hint = ""
            if "return_token_ids" in detail:
                hint = (" (this server does not take return_token_ids: set return_token_ids false on the "
                        "generation resource; replies are then re-encoded from text)")
            raise OpenAIError(f"{method} {url}: HTTP {code}: {detail}{hint}") from None
        except openai.APIConnectionError as exc:  # refused, reset, timed out: the innermost cause says which
            raise OpenAIError(f"{method} {url}: failed after {attempts} attempts, last: {_root_cause(exc)}") from None
        content = raw.content
        if not content.strip():
            raise OpenAIError(f"{method} {url}: empty response body")
        try:
            return json.loads(content)
        except ValueError:
            raise OpenAIError(f"{method} {url}: response is not JSON: {_excerpt(content)}") from None

    def _sampling(self, params: SamplingParams) -> dict:
        """The request fields a chat and a plain completion share."""
        body = {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_new_tokens,
                **self.extra_body}
        if params.seed is not None:
            body["seed"] = params.seed
        if self.return_token_ids:
            body["return_token_ids"] = True
        return body

    def _body(self, model: str, conversation: list[dict], params: SamplingParams, tools=None) -> dict:
        body = {"model": model, "messages": [_request_message(m) for m in conversation], **self._sampling(params)}
        if tools:
            body["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        from training.tokenization.templates import TEMPLATE_DATE_KEY

        # template_date pins the clock of the templates we render; a server renders on its own clock
        # (tokenization names that as the cause when a prompt then differs: prompt_mismatch)
        server_kwargs = {k: v for k, v in self.chat_template_kwargs.items() if k != TEMPLATE_DATE_KEY}
        if server_kwargs:
            body["chat_template_kwargs"] = server_kwargs
        return body

    def _generation(self, index: int, data: dict) -> Generation:
        choices = data.get("choices") or []
        message = (choices[0].get("message") or {}) if choices else {}
        text = message.get("content")
        # a reasoning parser's field (vLLM: reasoning_content, newer: reasoning); a reply cut by
        # max_tokens while thinking has reasoning and a null content: a reply, not an error
        reasoning = message.get("reasoning_content") or message.get("reasoning") or None
        calls = None
        if message.get("tool_calls"):  # a tool parser's calls: the reply is the call (content often null)
            from training.corpus.formats import normalize_tool_calls

            try:
                calls = normalize_tool_calls(message["tool_calls"], f"reply {index}: tool_calls")
            except ValueError as exc:
                raise OpenAIError(f"{self.base_url}/chat/completions: {exc}") from None
        if (reasoning is not None or calls is not None) and text is None:
            text = ""
        if not choices or text is None or (text == "" and reasoning is None and calls is None and not self.allow_empty):
            raise OpenAIError(
                f"{self.base_url}/chat/completions returned an empty reply for conversation {index} "
                f"(choices={len(choices)}, finish_reason={choices[0].get('finish_reason') if choices else None})"
            )
        usage = data.get("usage") or {}
        finish = str(choices[0].get("finish_reason") or "stop")
        token_ids, prompt_ids = _reply_ids(choices[0], finish), data.get("prompt_token_ids")
        if token_ids is None or prompt_ids is None:
            token_ids = prompt_token_ids = None
        else:
            prompt_token_ids = tuple(int(t) for t in prompt_ids)
        return Generation(
            text=text, finish_reason=finish, n_tokens=int(usage.get("completion_tokens") or 0),
            token_ids=token_ids, prompt_token_ids=prompt_token_ids, reasoning=reasoning, tool_calls=calls,
        )


def _reply_ids(choice: dict, finish: str) -> tuple[int, ...] | None:
    """A choice's sampled ids as the reply's (None: the server sent none, or they do not stand for it).

    vLLM's ids end with the stop token when an EOS (stop_reason null) or a stop token id (an int)
    ended the reply; the text never holds it, so it goes. A stop string (from the request or the
    server's generation config) cuts the text inside the ids, which vLLM returns whole: then none."""
    ids = choice.get("token_ids")
    if ids is None or (finish == "stop" and isinstance(choice.get("stop_reason"), str)):
        return None
    ids = [int(t) for t in ids]
    return tuple(ids[:-1] if finish == "stop" and ids else ids)


def _request_message(message: dict) -> dict:
    """A stored message as the chat completions API takes it: its set fields (reasoning_content in
    history, as vLLM's server hands it to the template), tool calls with their arguments as JSON text."""
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("tool_calls"), str):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                             for c in json.loads(out["tool_calls"])]
    return out


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of a failed connection in words: the SDK's error wraps httpx's, which
    wraps the socket's ("All connection attempts failed" around "Connection refused")."""
    chain = [exc]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    root = chain[-1]
    if isinstance(root, OSError) and root.errno:
        return f"{type(root).__name__}: {os.strerror(root.errno)} ({root.strerror})"
    return f"{type(root).__name__}: {root}"


def _excerpt(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."
