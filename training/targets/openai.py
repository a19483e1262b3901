"""Generation through any OpenAI-compatible /v1/chat/completions server (`vllm serve`, SGLang, ...).

Generation only: hidden states never cross an HTTP API. Requests run on a bounded thread pool;
connection errors, 429 and 5xx are retried with exponential backoff, other 4xx fail at once with
the server's message. The API key comes from OPENAI_API_KEY (or the variable named by
`api_key_env`) and only ever goes into the Authorization header, never into logs or errors.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from training.targets.base import Generation, SamplingParams, TargetError, TargetModel

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


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
        backoff_s: float = 1.0,
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
        self.backoff_s = backoff_s
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
            data = self._request("GET", "/models", None)
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
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="openai-gen") as pool:
            futures = [pool.submit(self._complete, model, i, c, s, t)
                       for i, (c, s, t) in enumerate(zip(conversations, sampling, tools))]
            return [f.result() for f in futures]

    def _complete(self, model: str, index: int, conversation: list[dict], params: SamplingParams,
                  tools=None) -> Generation:
        body = {
            "model": model,
            "messages": [_request_message(m) for m in conversation],
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            **self.extra_body,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if tools:
            body["tools"] = json.loads(tools) if isinstance(tools, str) else tools
        from training.tokenization.templates import TEMPLATE_DATE_KEY

        # template_date pins the clock of the templates we render; a server renders on its own clock
        # (tokenization names that as the cause when a prompt then differs: prompt_mismatch)
        server_kwargs = {k: v for k, v in self.chat_template_kwargs.items() if k != TEMPLATE_DATE_KEY}
        if server_kwargs:
            body["chat_template_kwargs"] = server_kwargs
        if self.return_token_ids:
            body["return_token_ids"] = True
        data = self._request("POST", "/chat/completions", body)
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
        ids, prompt_ids = choices[0].get("token_ids"), data.get("prompt_token_ids")
        stop_reason = choices[0].get("stop_reason")
        # A stop string (from the request or the server's generation config) cuts the text inside
        # the sampled ids, which vLLM returns whole: they no longer stand for the text, so none.
        if ids is not None and prompt_ids is not None and not (finish == "stop" and isinstance(stop_reason, str)):
            ids = [int(t) for t in ids]
            # vLLM's ids end with the stop token when an EOS (stop_reason null) or a stop token id
            # (an int) ended the reply; the text never holds it.
            if finish == "stop" and ids:
                ids = ids[:-1]
            token_ids, prompt_token_ids = tuple(ids), tuple(int(t) for t in prompt_ids)
        else:
            token_ids = prompt_token_ids = None
        return Generation(
            text=text, finish_reason=finish, n_tokens=int(usage.get("completion_tokens") or 0),
            token_ids=token_ids, prompt_token_ids=prompt_token_ids, reasoning=reasoning, tool_calls=calls,
        )

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.base_url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        payload = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=payload, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                body = exc.read()
                if key:  # a server may echo the key it refused ("invalid api key: sk-..."): never pass it on
                    body = body.replace(key.encode(), b"<redacted>")
                detail = _excerpt(body)
                if exc.code not in RETRY_STATUS:
                    hint = ""
                    if "return_token_ids" in detail:
                        hint = (" (this server does not take return_token_ids: set return_token_ids false on the "
                                "generation resource; replies are then re-encoded from text)")
                    raise OpenAIError(f"{method} {url}: HTTP {exc.code}: {detail}{hint}") from None
                failure = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                failure = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            else:
                if not raw.strip():
                    raise OpenAIError(f"{method} {url}: empty response body")
                try:
                    return json.loads(raw)
                except ValueError:
                    raise OpenAIError(f"{method} {url}: response is not JSON: {_excerpt(raw)}") from None
            if attempt == self.max_retries:
                raise OpenAIError(f"{method} {url}: failed after {attempt + 1} attempts, last: {failure}")
            # Jitter keeps many workers from retrying in lockstep against a recovering server.
            time.sleep(self.backoff_s * (2 ** attempt) * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")


def _request_message(message: dict) -> dict:
    """A stored message as the chat completions API takes it: its set fields (reasoning_content in
    history, as vLLM's server hands it to the template), tool calls with their arguments as JSON text."""
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("tool_calls"), str):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                             for c in json.loads(out["tool_calls"])]
    return out


def _excerpt(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."
