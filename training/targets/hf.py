"""transformers backend: any AutoModelForCausalLM on CPU or GPU, features and generation.

Features run over sequences packed into one row without padding: position_ids restart at 0 for
each document and no attention mask is passed, which transformers (5.x) turns into a
block-diagonal causal mask for eager/sdpa/flex and into varlen cu_seqlens for flash attention.
So each token sees exactly its own document's prefix, as in a per-sequence forward.

Only the requested layers are kept: a forward pre-hook on decoder layer i copies its input
(= HF hidden_states[i]) straight into the output buffer, and we call the decoder body, not the
LM head, so no [T, V] logits and no list of all layers is ever built.
"""

from __future__ import annotations

from typing import Sequence

from training.targets.base import (
    Generation,
    SamplingParams,
    TargetError,
    TargetModel,
    apply_final_logit_transforms,
    check_aux_layer_ids,
    check_sequences,
    render_prompt,
)
from training.targets.spec import auto_dtype, dtype_name


def resolve_dtype(dtype, device: str):
    """The torch dtype for `dtype` on `device` ("auto": spec.auto_dtype's rule)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = "auto"
    try:
        name = dtype_name(dtype)
    except ValueError as exc:
        raise TargetError(str(exc)) from None
    return getattr(torch, auto_dtype(str(device).startswith("cuda")) if name == "auto" else name)


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def decoder_layers(decoder, num_layers: int):
    """The decoder's ModuleList of `num_layers` blocks (`.layers` almost everywhere, searched otherwise)."""
    import torch

    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == num_layers:
        return layers
    for _, module in decoder.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise TargetError(f"cannot find the {num_layers} decoder layers of {type(decoder).__name__}")


def sample_token(logits, params: SamplingParams, generator) -> int:
    """One token from a [V] float32 CPU logits row: greedy at temperature 0, else top-p sampling."""
    import torch

    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < params.top_p  # the top token is always kept
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def reply_text(tokenizer, prompt: list[int], reply: list[int]) -> str:
    """The reply's text decoded after its prompt, as vLLM's incremental detokenizer does: a
    sentencepiece word-start token keeps its space ("▁She" after "room." is " She"), which decoding
    the reply alone would drop (decoders strip the first token's space)."""
    alone = tokenizer.decode(reply, skip_special_tokens=True)
    # The prompt's tail is enough context; decoding all of it per turn would cost O(prompt).
    tail = list(prompt[-8:])
    head = tokenizer.decode(tail, skip_special_tokens=True)
    both = tokenizer.decode(tail + list(reply), skip_special_tokens=True)
    return both[len(head):] if both.startswith(head) else alone


class HFTarget(TargetModel):
    """`load_target(path_or_hub_id, "hf", dtype=..., device=...)`."""

    backend = "hf"
    supports_tools = True

    def __init__(
        self,
        name_or_path: str,
        *,
        dtype="auto",
        device: str | None = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
        micro_batch_rows: int = 16,
        chat_template_kwargs: dict | None = None,
    ):
        super().__init__(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.attn_implementation = attn_implementation
        # Rows generate() pads and runs at once (memory and padding bound it); not the resampling
        # batch, which is TargetModel.generation_batch_size (the unit progress is saved in).
        self.micro_batch_rows = int(micro_batch_rows)
        self.chat_template_kwargs = chat_template_kwargs
        self._model = None

    # -- loading ----------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            kwargs = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
            model = AutoModelForCausalLM.from_pretrained(
                self.name_or_path,
                revision=self.revision,
                trust_remote_code=self.trust_remote_code,
                dtype=self.dtype,
                **kwargs,
            )
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    def close(self) -> None:
        self._model = None

    # -- features ---------------------------------------------------------------------------
    def features(self, sequences: Sequence[Sequence[int]], aux_layer_ids: Sequence[int] | None = None) -> dict:
        import torch

        L, H = self.facts.num_layers, self.facts.hidden_size
        ids = check_aux_layer_ids(aux_layer_ids or self.default_aux_layer_ids(), L)
        lengths = check_sequences(sequences)
        T, dev = sum(lengths), self.device
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.long)
        cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)

        decoder = self.model.get_decoder()
        layers = decoder_layers(decoder, L)
        aux = torch.empty(T, len(ids) * H, dtype=self.dtype, device=dev)
        last = torch.empty(T, H, dtype=self.dtype, device=dev)
        groups = _forward_layout(lengths, H, self.facts.intermediate_size, varlen=str(
            getattr(self.model.config, "_attn_implementation", "")).startswith("flash_attention"))
        # no_grad, not inference_mode: an online trainer may use these tensors inside its autograd graph.
        with torch.no_grad():
            for batch in _forward_batches(sequences, lengths, cu_seqlens, groups, device=dev):
                hooks = [
                    layers[i].register_forward_pre_hook(
                        _copy_input_hook(aux[:, slot * H:(slot + 1) * H], batch["rows"], batch["valid"]),
                        with_kwargs=True)
                    for slot, i in enumerate(ids) if i < L
                ]
                try:
                    out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
                finally:
                    for h in hooks:
                        h.remove()
                _scatter(last, out.last_hidden_state, batch["rows"], batch["valid"])
        for slot, i in enumerate(ids):
            if i == L:  # HF's hidden_states[L] is the final post-norm state
                aux[:, slot * H:(slot + 1) * H].copy_(last)
        return {"aux": aux, "last": last, "cu_seqlens": cu_seqlens.to(dev)}

    def logits(self, last):
        import torch

        with torch.no_grad():
            head = self.model.get_output_embeddings()
            return apply_final_logit_transforms(head(last.to(head.weight.dtype)), self.facts.config)

    # -- generation -------------------------------------------------------------------------
    def stop_token_ids(self) -> set[int]:
        ids = set()
        for value in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if value is None:
                continue
            ids.update(value if isinstance(value, (list, tuple)) else [value])
        return ids

    def generate(self, conversations: Sequence[list[dict]], sampling: Sequence[SamplingParams],
                 tools: Sequence | None = None) -> list[Generation]:
        """Batched sampling with one RNG per row, seeded by that row's `seed`.

        Guarantee: a row's tokens depend only on its own prompt, params and seed, never on which
        other rows share its batch or on their order; same inputs give the same output on the same
        hardware and dtype. Rows are batched by prompt length to limit padding; left padding with
        positions counted from each row's first real token keeps each row's forward the same
        computation (up to float summation order in kernels that see a different padded length).
        """
        if len(conversations) != len(sampling):
            raise TargetError(f"{len(conversations)} conversations but {len(sampling)} sampling params")
        tools = tools or [None] * len(conversations)
        prompts = [render_prompt(self.tokenizer, c, self.chat_template_kwargs, t) for c, t in zip(conversations, tools)]
        return self.complete(prompts, sampling)

    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> list[Generation]:
        """generate's batched sampling (same guarantee) after token-id prompts, no template applied."""
        if len(prompts) != len(sampling):
            raise TargetError(f"{len(prompts)} prompts but {len(sampling)} sampling params")
        prompts = [[int(t) for t in p] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        step = max(1, self.micro_batch_rows)
        for start in range(0, len(order), step):
            rows = order[start:start + step]
            for i, gen in zip(rows, self._generate_batch([prompts[i] for i in rows], [sampling[i] for i in rows])):
                results[i] = gen
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Generation]:
        import torch

        B, P, dev = len(prompts), max(len(p) for p in prompts), self.device
        stops = self.stop_token_ids()
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else next(iter(stops), 0)
        input_ids = torch.full((B, P), pad, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids[b, P - len(p):] = torch.tensor(p)
            mask[b, P - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, mask, positions = input_ids.to(dev), mask.to(dev), positions.to(dev)
        generators = []
        for p in params:
            g = torch.Generator()
            g.manual_seed(p.seed) if p.seed is not None else g.seed()
            generators.append(g)

        tokens: list[list[int]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        past = None
        with torch.inference_mode():
            for _ in range(max(p.max_new_tokens for p in params)):
                out = self.model(
                    input_ids=input_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=past, use_cache=True, logits_to_keep=1,
                )
                past = out.past_key_values
                logits = out.logits[:, -1].float().cpu()
                nxt = []
                for b in range(B):
                    if finish[b] is not None:
                        nxt.append(pad)  # finished rows ride along; their outputs are ignored
                        continue
                    t = sample_token(logits[b], params[b], generators[b])
                    tokens[b].append(t)
                    if t in stops:
                        finish[b] = "stop"
                    elif len(tokens[b]) >= params[b].max_new_tokens:
                        finish[b] = "length"
                    nxt.append(t)
                if all(f is not None for f in finish):
                    break
                input_ids = torch.tensor(nxt, device=dev)[:, None]
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
                positions = positions[:, -1:] + 1
        from training.targets.harmony import harmony_ids, split_channels

        harmony = harmony_ids(self.tokenizer)  # gpt-oss: channels kept apart, not flattened into the text
        results = []
        for b in range(B):
            toks = tokens[b][:-1] if finish[b] == "stop" else tokens[b]
            text, reasoning = (split_channels(self.tokenizer, toks, harmony) if harmony else
                               (reply_text(self.tokenizer, prompts[b], toks), None))
            results.append(Generation(
                text=text, finish_reason=finish[b] or "length", reasoning=reasoning,
                n_tokens=len(tokens[b]), token_ids=tuple(toks), prompt_token_ids=tuple(prompts[b]),
            ))
        return results


# Most padding a batch of sorted sequences may add before the next sequence starts a new batch.
PAD_WASTE = 0.25
# Padded batches are used when the cost model below predicts them this much cheaper than one
# packed row: the model is rough (on CPU a 110M Llama over 2-4 chat-length sequences per pack
# measured 0.90x where it predicted 1.05x), and short documents in a big pack win 5-10x anyway.
MIN_PADDED_GAIN = 1.25


def _pad_groups(lengths: list[int]) -> list[list[int]]:
    """Sequence indices in batches of similar length, ascending, each padded by <= PAD_WASTE."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, group, real = [], [], 0
    for i in order:  # ascending: the newest sequence is the batch's widest
        if group and (len(group) + 1) * lengths[i] > (1 + PAD_WASTE) * (real + lengths[i]):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    groups.append(group)
    return groups


def _forward_layout(lengths: list[int], hidden: int, intermediate: int, *, varlen: bool = False):
    """The padded batches (_pad_groups) to run `lengths` in, or None for one packed row: always
    for varlen (flash-attention) kernels, else when padding does not pay."""
    if varlen:
        return None
    groups = _pad_groups(lengths)
    return groups if _padding_pays(lengths, groups, hidden, intermediate) else None


def _padding_pays(lengths: list[int], groups: list[list[int]], hidden: int, intermediate: int) -> bool:
    """Whether right-padded batches `groups` beat one packed row with a dense block-diagonal mask.

    Per layer, a token costs about 4H^2 + 3HI multiply-adds in its projections and MLP, and a
    (query, key) pair 2H in attention. The packed row pays its projections once per token but
    attention over all T^2 pairs (sdpa and eager skip nothing under a mask); padded batches pay
    projections on their padding too, and causal attention over B*W^2/2 pairs each.
    """
    token, pair = 4 * hidden * hidden + 3 * hidden * intermediate, 2 * hidden
    T = sum(lengths)
    packed = T * token + T * T * pair
    padded = sum(len(g) * lengths[g[-1]] * (token + lengths[g[-1]] * pair / 2) for g in groups)
    return packed >= MIN_PADDED_GAIN * padded


def _forward_batches(sequences, lengths: list[int], cu_seqlens, groups, *, device):
    """Forward batches covering every token of `sequences` once: {input_ids, position_ids [B, W]
    (None: 0..W-1), valid [B, W] bool, rows [n] (each valid token's row in the packed output, in
    valid's row-major order)}; valid and rows are None for the packed row (it is the output).

    groups None: one [1, T] row with per-document positions, for the flash-attention kernels,
    which read document boundaries from position_ids (varlen), and where few long documents
    share a pack (see _forward_layout). Otherwise the right-padded batches `groups` of
    similar-length sequences, causal only: a real token never attends to the padding on its right, and attention costs
    sum(B * W^2) rather than T^2 over the dense block-diagonal mask that sdpa and eager build
    from packed position_ids.
    """
    import torch

    if groups is None:
        ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)
        pos = torch.cat([torch.arange(n, device=device) for n in lengths])
        yield {"input_ids": ids[None], "position_ids": pos[None], "valid": None, "rows": None}
        return
    for group in groups:
        W = lengths[group[-1]]
        ids = torch.zeros(len(group), W, dtype=torch.long)
        valid = torch.zeros(len(group), W, dtype=torch.bool)
        rows = []
        for b, i in enumerate(group):
            ids[b, :lengths[i]] = torch.as_tensor(sequences[i], dtype=torch.long)
            valid[b, :lengths[i]] = True
            rows.append(torch.arange(int(cu_seqlens[i]), int(cu_seqlens[i + 1])))
        yield {"input_ids": ids.to(device), "position_ids": None, "valid": valid.to(device),
               "rows": torch.cat(rows).to(device)}


def _scatter(dest, hidden, rows, valid) -> None:
    """hidden [B, W, H] at `valid` into the packed dest [T, H] at `rows` (None: hidden is [1, T, H])."""
    if rows is None:
        dest.copy_(hidden[0])
    else:
        dest.index_copy_(0, rows, hidden[valid].to(dest.dtype))


def _copy_input_hook(dest, rows, valid):
    """Pre-hook scattering a decoder layer's input hidden states into the packed `dest` [T, H]."""

    def hook(module, args, kwargs):
        _scatter(dest, args[0] if args else kwargs["hidden_states"], rows, valid)

    return hook
