"""Chain speculative decoding simulated on an HF target (CPU or GPU), one sequence at a time.

Per step: the proposer drafts up to k tokens, the target verifies them in ONE forward over the
k+1 new positions (the pending token + the drafts), the longest acceptable prefix is kept plus one
target token (correction or bonus), and both KV caches are cropped back to what was verified.

    runner = TargetRunner(hf_model, draft.cfg.aux_layer_ids)
    stats = generate(runner, prompt_ids, DecodeConfig(k=3), Eagle3Proposer(draft, d2t))

Acceptance: greedy (temperature 0) accepts while the draft token equals the target argmax, so the
output is token-for-token the target's own greedy decoding. Sampled (temperature > 0) uses the
standard rejection rule (Leviathan et al. 2023, Chen et al. 2023): accept x with probability
min(1, p(x)/q(x)); on rejection sample from norm(max(0, p - q)); if all k are accepted, a bonus
token from p. The output distribution is then exactly the target's.

EAGLE-3 draft state (DESIGN.md, "EAGLE-3 training semantics"): position t of the draft reads
fc(aux_t) of the target and the embedding of x_{t+1} and predicts x_{t+2} ("step 0"); chain step
j >= 1 reads the draft's own previous output hidden and the j-th draft token at position t + j.
The draft KV cache therefore holds step-0 entries for every verified position, then this round's
chain entries; after verification the chain entries are dropped and step 0 runs over the newly
verified positions with the aux states the verification forward produced, exactly as vLLM's
EAGLE proposer does.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from training.eagle3.model import Eagle3Draft, KVCache
from training.targets.base import apply_final_logit_transforms
from training.targets.hf import decoder_layers
from training.vocab import draft_to_target


@dataclass
class DecodeConfig:
    k: int = 3  # draft tokens per step (ignored by plain decoding)
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: int = 128
    stop_token_ids: frozenset[int] = frozenset()  # generation ends after emitting one of these


@dataclass
class GenStats:
    """One generation. Times in seconds; `steps` counts target verification forwards (prefill excluded)."""

    prompt_len: int
    tokens: list[int] = field(default_factory=list)  # generated tokens, a final stop token included
    steps: int = 0
    accepted: list[int] = field(default_factory=list)  # per step: drafts accepted
    proposed: list[int] = field(default_factory=list)  # per step: drafts proposed (< k for prompt lookup)
    draft_time: float = 0.0  # proposing + keeping the draft's state in step with the target
    target_time: float = 0.0  # verification forwards
    prefill_time: float = 0.0  # target prefill + the draft's step 0 over the prompt
    wall_time: float = 0.0


class Proposer(Protocol):
    name: str
    needs_aux: bool  # whether target forwards must capture the aux hidden states

    def start(self, prompt_ids: list[int], first_token: int, aux) -> None: ...

    def propose(self, context: list[int], k: int, temperature: float, generator) -> tuple[list[int], list | None]:
        """Draft tokens (target ids) and, for sampled drafts, their proposal distributions q
        over the target vocab (None = deterministic proposals, q a point mass)."""

    def accept(self, aux, tokens: list[int], start: int) -> None:
        """The target verified `tokens` (accepted drafts + its own token) following position `start`."""


# -- the target ------------------------------------------------------------------------------------
class TargetRunner:
    """An HF causal LM with one DynamicCache and, on demand, capture of the aux hidden states
    (HF hidden_states[i] = input of decoder layer i, taken with forward pre-hooks, as the
    features backend does) at every position of a forward."""

    def __init__(self, model, aux_layer_ids: Sequence[int] = ()):
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.config = model.config.to_dict()
        self.num_layers = model.config.get_text_config().num_hidden_layers
        self.layers = decoder_layers(self.decoder, self.num_layers)
        self.aux_layer_ids = tuple(int(i) for i in aux_layer_ids)
        if any(i < 0 or i > self.num_layers for i in self.aux_layer_ids):
            raise ValueError(f"aux_layer_ids {self.aux_layer_ids} outside 0..{self.num_layers}")
        self.device = next(model.parameters()).device
        self.cache = None
        self._captured: dict[int, torch.Tensor] = {}
        self._capturing = False

    def reset(self) -> None:
        from transformers import DynamicCache

        try:
            self.cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x: no config argument
            self.cache = DynamicCache()
        if not getattr(self.cache, "is_croppable", True):
            raise ValueError("the target's KV cache cannot be cropped (sliding-window or recurrent layers)")

    def __len__(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    @contextmanager
    def capturing(self):
        """Capture the aux states during forwards inside this block (hooks removed on exit)."""
        hooks = []

        def make_hook(i):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                self._captured[i] = hidden[0]  # a fresh tensor per layer; not written in place later

            return hook

        for i in sorted(set(self.aux_layer_ids)):
            if i < self.num_layers:  # hidden_states[L] is the final post-norm state, taken from the output
                hooks.append(self.layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
        self._capturing = True
        try:
            yield self
        finally:
            self._capturing = False
            self._captured = {}
            for h in hooks:
                h.remove()

    def forward(self, ids: Sequence[int], start: int, last_only: bool = False):
        """Run `ids` at positions start.. on top of the cache (which must hold exactly `start`
        entries). Returns (float32 logits [n, V] ([1, V] if last_only), aux [n, 3H] or None)."""
        if len(self) != start:
            raise RuntimeError(f"target cache holds {len(self)} positions, forward starts at {start}")
        n = len(ids)
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        out = self.decoder(input_ids=input_ids, position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values if out.past_key_values is not None else self.cache
        last = out.last_hidden_state[0]
        rows = last[-1:] if last_only else last  # prefill needs one row of logits, not [n, V]
        logits = apply_final_logit_transforms(self.head(rows.to(self.head.weight.dtype)), self.config).float()
        aux = None
        if self._capturing:
            aux = torch.cat([last if i == self.num_layers else self._captured[i] for i in self.aux_layer_ids], dim=-1)
        return logits, aux

    def crop(self, n: int) -> None:
        """Keep the first n positions (drop rejected drafts)."""
        remove = len(self) - n
        if remove > 0:
            self.cache.crop(-remove)  # negative = drop that many: the same call in transformers 4.x and 5.x


# -- the EAGLE-3 draft --------------------------------------------------------------------------------
class Eagle3Proposer:
    """Chain drafting with a trained Eagle3Draft and its KVCache (see the module docstring)."""

    name = "eagle3"
    needs_aux = True

    def __init__(self, draft: Eagle3Draft, d2t: torch.Tensor, argmax_draft: bool = False):
        self.draft = draft.eval()
        self.device = draft.fc.weight.device
        self.draft_to_target = draft_to_target(d2t, self.device)
        self.target_vocab = draft.cfg.target_vocab_size
        # argmax_draft: propose the draft argmax even when sampling, as vLLM's EAGLE proposer does
        # (q is then a point mass; still unbiased). The default samples x ~ q, the textbook scheme,
        # which accepts more when q is close to p.
        self.argmax_draft = argmax_draft
        self.cache = KVCache()
        self.pos = -1  # position t of the last step-0 row
        self.n0 = 0  # step-0 entries in the cache

    def _step0(self, aux, tokens: list[int], start: int) -> None:
        n = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)
        logits, hidden = self.draft.step(aux.to(self.device), ids, positions, self.cache)
        self.logits, self.hidden = logits[-1], hidden[-1:]
        self.pos, self.n0 = start + n - 1, len(self.cache)

    def start(self, prompt_ids, first_token, aux) -> None:
        # Position t reads aux_t and x_{t+1}: the prompt shifted by one, then the first target token.
        self.cache = KVCache()
        self._step0(aux, list(prompt_ids[1:]) + [first_token], 0)

    def pick(self, logits, temperature: float, generator, context, j: int) -> tuple[int, torch.Tensor | None]:
        """The j-th draft token (a target id) from draft-vocab logits, and q over the target vocab
        when it was sampled. A test subclass overrides this to force proposals."""
        if temperature <= 0 or self.argmax_draft:
            return int(self.draft_to_target[logits.argmax()]), None
        q_draft = torch.softmax(logits.float() / temperature, dim=-1)
        d = torch.multinomial(q_draft, 1, generator=generator)
        q = torch.zeros(self.target_vocab, device=q_draft.device).index_copy_(0, self.draft_to_target, q_draft)
        return int(self.draft_to_target[d]), q

    def propose(self, context, k, temperature, generator):
        tokens, qs = [], []
        logits, hidden = self.logits, self.hidden
        for j in range(k):
            token, q = self.pick(logits, temperature, generator, context, j)
            tokens.append(token)
            qs.append(q)
            if j + 1 < k:  # the k-th token needs no further draft forward
                ids = torch.tensor([token], dtype=torch.long, device=self.device)
                pos = torch.tensor([self.pos + j + 1], device=self.device)
                out, hidden = self.draft.step(hidden, ids, pos, self.cache)
                logits = out[0]
        return tokens, (None if all(q is None for q in qs) else qs)

    def accept(self, aux, tokens, start) -> None:
        if start != self.pos + 1:
            raise RuntimeError(f"draft state at position {self.pos}, verified tokens start at {start}")
        self.cache.crop(self.n0)  # this round's chain entries go; step-0 entries stay
        self._step0(aux, tokens, start)


# -- verification -------------------------------------------------------------------------------------
def verify_greedy(logits: torch.Tensor, proposal: Sequence[int]) -> tuple[int, int]:
    """logits [m+1, V] at the pending token and the m drafts -> (accepted a, target token after them)."""
    target = logits.argmax(-1).tolist()
    a = 0
    while a < len(proposal) and proposal[a] == target[a]:
        a += 1
    return a, target[a]


def verify_sampled(p: torch.Tensor, proposal: Sequence[int], q: Sequence[torch.Tensor] | None,
                   generator) -> tuple[int, int]:
    """Rejection-sampling acceptance. p [m+1, V] target probabilities; q[i] [V] the distribution
    draft i was drawn from (None: deterministic proposals, q = point mass on the proposal)."""
    m = len(proposal)
    if m:
        idx = torch.tensor(list(proposal), device=p.device)
        px = p[torch.arange(m, device=p.device), idx]
        qx = torch.ones_like(px) if q is None else torch.stack([q[i][idx[i]] for i in range(m)])
        u = torch.rand(m, generator=generator, device=p.device)
        ok = (u * qx < px).tolist()  # u < p/q, i.e. accept with probability min(1, p/q)
        for i in range(m):
            if ok[i]:
                continue
            if q is None:
                residual = p[i].clone()
                residual[proposal[i]] = 0.0  # max(0, p - onehot)
            else:
                residual = (p[i] - q[i]).clamp_(min=0.0)
            total = residual.sum()
            # p == q up to rounding leaves nothing: then any rejection is a rounding artifact, sample p
            residual = residual / total if total > 0 else p[i]
            return i, int(torch.multinomial(residual, 1, generator=generator))
    return m, int(torch.multinomial(p[m], 1, generator=generator))


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample_next(logits_row: torch.Tensor, temperature: float, generator) -> int:
    if temperature <= 0:
        return int(logits_row.argmax())
    return int(torch.multinomial(probs(logits_row, temperature), 1, generator=generator))


# -- decoding -----------------------------------------------------------------------------------------
def _sync(device) -> None:
    # Timings must include the GPU work, not just its launch.
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _emit(stats: GenStats, tokens: Sequence[int], cfg: DecodeConfig) -> bool:
    """Append tokens up to a stop token or the length limit; True when generation is over."""
    for t in tokens:
        stats.tokens.append(t)
        if t in cfg.stop_token_ids or len(stats.tokens) >= cfg.max_new_tokens:
            return True
    return False


def prefill(runner: TargetRunner, prompt_ids: Sequence[int], cfg: DecodeConfig, generator):
    """Target forward over the prompt -> (first generated token, aux of the prompt or None)."""
    runner.reset()
    logits, aux = runner.forward(prompt_ids, 0, last_only=True)
    return sample_next(logits[-1], cfg.temperature, generator), aux


def decode_one(runner: TargetRunner, token: int, cfg: DecodeConfig, generator) -> int:
    """Plain decoding: feed the pending token, sample the next."""
    logits, _ = runner.forward([token], len(runner))
    return sample_next(logits[-1], cfg.temperature, generator)


def speculative_step(runner: TargetRunner, proposer: Proposer, context: list[int], cfg: DecodeConfig,
                     generator, stats: GenStats) -> list[int]:
    """Draft, verify in one target forward over the k+1 new positions, crop both caches.
    `context` = prompt + generated; its last token is pending (not yet in the target cache)."""
    dev = runner.device
    n = len(context) - 1  # target cache length = position of the pending token
    t0 = time.perf_counter()
    proposal, q = proposer.propose(context, cfg.k, cfg.temperature, generator)
    _sync(dev)
    t1 = time.perf_counter()
    logits, aux = runner.forward([context[-1], *proposal], n)
    if cfg.temperature <= 0:
        a, nxt = verify_greedy(logits, proposal)
    else:
        a, nxt = verify_sampled(probs(logits, cfg.temperature), proposal, q, generator)
    runner.crop(n + a + 1)  # keep the pending token and the accepted drafts
    _sync(dev)
    t2 = time.perf_counter()
    emitted = [*proposal[:a], nxt]
    proposer.accept(None if aux is None else aux[: a + 1], emitted, n)
    _sync(dev)
    t3 = time.perf_counter()
    stats.draft_time += (t1 - t0) + (t3 - t2)
    stats.target_time += t2 - t1
    stats.steps += 1
    stats.accepted.append(a)
    stats.proposed.append(len(proposal))
    return emitted


@torch.inference_mode()
def generate(runner: TargetRunner, prompt_ids: Sequence[int], cfg: DecodeConfig,
             proposer: Proposer | None = None, generator: torch.Generator | None = None) -> GenStats:
    """Decode one prompt: plain decoding when proposer is None, else chain speculative decoding."""
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("empty prompt")
    stats = GenStats(prompt_len=len(prompt_ids))
    dev = runner.device
    with runner.capturing() if proposer is not None and proposer.needs_aux else nullcontext():
        _sync(dev)
        t_start = time.perf_counter()
        token, aux = prefill(runner, prompt_ids, cfg, generator)
        if proposer is not None:
            proposer.start(prompt_ids, token, aux)
        _sync(dev)
        stats.prefill_time = time.perf_counter() - t_start
        context = [*prompt_ids, token]
        done = _emit(stats, [token], cfg)
        while not done:
            if proposer is None:
                t0 = time.perf_counter()
                token = decode_one(runner, token, cfg, generator)
                _sync(dev)
                stats.target_time += time.perf_counter() - t0
                stats.steps += 1
                stats.accepted.append(0)
                stats.proposed.append(0)
                emitted = [token]
            else:
                emitted = speculative_step(runner, proposer, context, cfg, generator, stats)
                token = emitted[-1]
            context.extend(emitted)
            done = _emit(stats, emitted, cfg)
        _sync(dev)
        stats.wall_time = time.perf_counter() - t_start
    return stats
