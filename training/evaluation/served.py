"""The draft as served: real vLLM decodes the prompts with and without the EAGLE-3 export.

    runs = serve(target_dir, export_dir, prompt_ids, ks=[1, 2, 3, 4], temperatures=[0.0, 1.0])

One engine per k (vLLM fixes `num_speculative_tokens` when it builds the engine) plus one without a
draft (k=0), each in its own subprocess (`python -m training.evaluation.served REQUEST RESULT`):
every engine starts clean and gives its memory back before the next, and the caller's process never
imports vLLM. An engine decodes all prompts at each temperature, the same token ids for every run;
tau = 1 + accepted / drafts from vLLM's own spec-decode counters (`LLM.get_metrics()`, differenced
around each call), which is DESIGN.md's tokens per target verification. vLLM drafts the draft's
argmax at every temperature, so the simulator's like-for-like sampled figure is its
`argmax_draft` mode; at T=0 the served tokens must equal plain decoding's token for token.

Works on vLLM's CPU build (with training.targets.vllm.engine_defaults) and on a GPU alike. eval_report, the served test and bench/bench_vllm_speedup.py all measure through here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class ServedRun:
    """One engine (k draft tokens per step, 0 = no draft) decoding every prompt at one temperature."""

    k: int
    temperature: float
    tokens: list[list[int]]  # per prompt, as vLLM emitted them (a final stop token included)
    wall_s: float  # the timed generate call
    drafts: float = 0.0  # verification steps that carried a draft
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: list[float] = field(default_factory=list)  # accepted at position i, per draft

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tau(self) -> float | None:
        return 1.0 + self.accepted / self.drafts if self.k and self.drafts else None


def vllm_missing_reason() -> str | None:
    """Why the served measurement cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (make install adds its CPU or CUDA build)"
    return None


def serve(
    target: str,
    export: str | None,
    prompt_ids: Sequence[Sequence[int]],
    ks: Sequence[int],
    temperatures: Sequence[float] = (0.0,),
    *,
    max_new_tokens: int = 64,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    seed: int = 0,
    max_num_seqs: int = 256,
    warmup: bool = False,
    dtype: str = "auto",
    log=None,
) -> list[ServedRun]:
    """ServedRuns for k=0 (no draft) and each k in `ks` (skipped when `export` is None), per temperature."""
    runs = []
    method = None if export is None else speculative_method(export)
    for k in [0, *([] if export is None else ks)]:
        request = {
            "target": str(target), "export": None if k == 0 else str(Path(export).resolve()), "k": int(k),
            "method": method,
            "prompt_ids": [[int(t) for t in p] for p in prompt_ids], "temperatures": [float(t) for t in temperatures],
            "max_new_tokens": int(max_new_tokens), "stop_token_ids": [int(t) for t in stop_token_ids],
            "ignore_eos": bool(ignore_eos), "seed": int(seed), "max_num_seqs": int(max_num_seqs),
            "warmup": bool(warmup), "dtype": dtype,
        }
        t0 = time.perf_counter()
        runs += [ServedRun(**r) for r in _run_child(request)]
        if log:
            taus = ", ".join(f"T={r.temperature:g} tau {r.tau:.3f}" for r in runs[-len(temperatures):] if r.tau)
            log(f"vLLM {'k=' + str(k) if k else 'without a draft'}: {time.perf_counter() - t0:.0f}s {taus}")
    return runs


def speculative_method(export) -> str:
    """vLLM's speculative method for an export directory: "dflash" for a DFlash draft, else "eagle3"."""
    from training.dflash.export import is_dflash_export

    return "dflash" if is_dflash_export(export) else "eagle3"


def _run_child(request: dict) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="specdraft-served-") as tmp:
        req, out = Path(tmp, "request.json"), Path(tmp, "result.json")
        req.write_text(json.dumps(request))
        # Its own process group: vLLM's engine processes go with it, even when this caller is interrupted.
        proc = subprocess.Popen([sys.executable, "-m", "training.evaluation.served", str(req), str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log_text = proc.communicate()[0]
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # the child and every engine process already ended
                pass
        if proc.returncode != 0 or not out.is_file():
            what = f"k={request['k']}" if request["k"] else "without a draft"
            raise RuntimeError(f"vLLM run {what} failed (exit {proc.returncode}); its log ends:\n"
                               + "\n".join((log_text or "").splitlines()[-40:]))
        return json.loads(out.read_text())


def spec_counters(llm) -> dict:
    """vLLM's cumulative spec-decode counters (the names LLM.get_metrics() reports)."""
    from vllm.v1.metrics.reader import Counter, Vector

    out = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0, "accepted_per_pos": []}
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    for m in llm.get_metrics():
        name = m.name.removesuffix("_total")
        if name in names and isinstance(m, Counter):
            out[names[name]] += m.value  # summed over engines when several report (data parallel)
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos" and isinstance(m, Vector):
            acc = out["accepted_per_pos"]
            acc.extend([0.0] * (len(m.values) - len(acc)))
            for i, v in enumerate(m.values):
                acc[i] += v
    return out


def _engine_runs(request: dict) -> list[dict]:
    """In the child: one engine, every temperature."""
    from vllm import LLM, SamplingParams

    from training.targets.vllm import engine_defaults, engine_dtype

    k = request["k"]
    llm = LLM(
        model=request["target"], dtype=engine_dtype(request["dtype"]), seed=request["seed"],
        speculative_config={"method": request["method"], "model": request["export"], "num_speculative_tokens": k}
        if k else None,
        disable_log_stats=False,  # the spec-decode counters are kept only with stats on
        max_num_seqs=request["max_num_seqs"], **engine_defaults(),
    )
    prompts = [{"prompt_token_ids": p} for p in request["prompt_ids"]]
    if request["warmup"]:
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    runs = []
    for t in request["temperatures"]:
        params = [SamplingParams(
            temperature=t, max_tokens=request["max_new_tokens"], ignore_eos=request["ignore_eos"],
            stop_token_ids=request["stop_token_ids"], seed=request["seed"] * 1_000_003 + i if t > 0 else None,
        ) for i in range(len(prompts))]
        before = spec_counters(llm) if k else None
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        run = ServedRun(k=k, temperature=t, tokens=[list(o.outputs[0].token_ids) for o in outputs],
                        wall_s=time.perf_counter() - t0)
        if k:
            after = spec_counters(llm)
            run.drafts, run.draft_tokens, run.accepted = (after[n] - before[n] for n in ("drafts", "draft_tokens", "accepted"))
            prior = before["accepted_per_pos"] + [0.0] * len(after["accepted_per_pos"])
            run.accepted_per_pos = [a - prior[i] for i, a in enumerate(after["accepted_per_pos"])]
        runs.append(asdict(run))
    return runs


if __name__ == "__main__":  # vLLM spawns its engine process: the child's work runs under this guard
    request_path, result_path = sys.argv[1:3]
    Path(result_path).write_text(json.dumps(_engine_runs(json.loads(Path(request_path).read_text()))))
