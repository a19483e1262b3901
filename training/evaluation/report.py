"""Evaluation results, the quality gate, and the report (markdown + JSON + small PNG plots).

No torch here: a report can be re-rendered from report.json anywhere. Plots use matplotlib's
object API on the Agg canvas (no pyplot global state, safe inside a Dagster step), 560x360 px.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from training.aux_layers import FAMILIES

DRAFTS = FAMILIES  # the draft families, as method names
METHODS = (*DRAFTS, "prompt_lookup", "plain")
LABELS = {"eagle3": "EAGLE-3 draft", "dflash": "DFlash draft", "prompt_lookup": "prompt lookup", "plain": "no draft"}
COLORS = {"eagle3": "tab:blue", "dflash": "tab:green", "prompt_lookup": "tab:orange"}


def draft_forwards(method: str, k: int) -> int:
    """Draft forwards per step at draft length k: a DFlash block is one forward, a chain k."""
    return 1 if method == "dflash" else k
PLOTS = ("tau_vs_k.png", "acceptance_by_position.png", "tau_by_domain.png")
ALL = "all"  # the domain name of the aggregate over every prompt


@dataclass
class MethodStats:
    """Sums over the generations of one (method, k, temperature, domain); metrics are derived."""

    method: str
    k: int
    temperature: float
    domain: str
    n_prompts: int = 0
    steps: int = 0  # target verification forwards
    tokens: int = 0  # generated tokens
    accepted: int = 0  # accepted draft tokens
    proposed: int = 0  # proposed draft tokens
    reached: list[int] = field(default_factory=list)  # [k] steps in which position i was proposed with 0..i-1 accepted
    accepted_at: list[int] = field(default_factory=list)  # [k] steps in which position i was accepted
    draft_time: float = 0.0
    target_time: float = 0.0
    prefill_time: float = 0.0
    wall_time: float = 0.0
    exact_match: int | None = None  # greedy only: prompts whose output equals plain greedy decoding
    plain_time_per_token: float | None = None  # set by EvalResult.finalize, for the wall-clock speedup

    def __post_init__(self):
        self.reached = list(self.reached) or [0] * self.k
        self.accepted_at = list(self.accepted_at) or [0] * self.k

    def add(self, gen) -> None:
        """Fold in one generation (a speculative.GenStats or anything with its fields)."""
        self.n_prompts += 1
        self.steps += gen.steps
        self.tokens += len(gen.tokens)
        self.accepted += sum(gen.accepted)
        self.proposed += sum(gen.proposed)
        for a, m in zip(gen.accepted, gen.proposed):
            for i in range(min(m, self.k)):
                self.reached[i] += 1
                if i < a:
                    self.accepted_at[i] += 1
                else:
                    break  # position i rejected: later positions were not reached
        self.draft_time += gen.draft_time
        self.target_time += gen.target_time
        self.prefill_time += gen.prefill_time
        self.wall_time += gen.wall_time

    # -- derived ----------------------------------------------------------------------------
    @property
    def tau(self) -> float:
        """Tokens emitted per target verification forward: accepted drafts + the target's own token."""
        return (self.steps + self.accepted) / self.steps if self.steps else float("nan")

    @property
    def acceptance(self) -> list[float | None]:
        """P(position i accepted | position i reached), i = 0..k-1 (None: never reached)."""
        return [a / r if r else None for a, r in zip(self.accepted_at, self.reached)]

    @property
    def acceptance_rate(self) -> list[float]:
        """P(position i accepted) per step: non-increasing, and tau = 1 + its sum."""
        return [a / self.steps if self.steps else 0.0 for a in self.accepted_at]

    @property
    def forwards(self) -> int:
        """Draft forwards per step (draft_forwards)."""
        return draft_forwards(self.method, self.k)

    @property
    def c(self) -> float:
        """One draft forward's time over one target verification forward's time."""
        if self.k <= 0 or not self.target_time or not self.steps:
            return 0.0
        return (self.draft_time / (self.steps * self.forwards)) / (self.target_time / self.steps)

    @property
    def est_speedup(self) -> float:
        """tau / (1 + n c), n = draft forwards per step: the speedup if a verification forward costs
        one decoding step (a chain pays k draft forwards per step, a DFlash block one)."""
        return self.tau / (1.0 + self.forwards * self.c)

    @property
    def time_per_token(self) -> float:
        return self.wall_time / self.tokens if self.tokens else float("nan")

    @property
    def wall_speedup(self) -> float | None:
        """Measured in the simulator: plain decoding's time per token over this method's."""
        if self.plain_time_per_token is None or not self.tokens:
            return None
        return self.plain_time_per_token / self.time_per_token

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tau=self.tau, acceptance=self.acceptance, acceptance_rate=self.acceptance_rate,
                 c=self.c, forwards=self.forwards, est_speedup=self.est_speedup, time_per_token=self.time_per_token,
                 wall_speedup=self.wall_speedup)
        return _clean(d)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "MethodStats":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class EvalResult:
    """Everything `evaluate` measured: one MethodStats row per (method, k, temperature, domain),
    domain "all" included; `config` records how it was run (target, draft, prompts, settings)."""

    config: dict[str, Any]
    rows: list[MethodStats]
    # The export decoded by real vLLM (evaluate's _served_rows): one dict per (temperature, k) with
    # served_tau, simulated_tau, ratio, like_for_like, exact_match, tokens_per_s, speedup; empty without vLLM.
    served: list[dict[str, Any]] = field(default_factory=list)

    def row(self, method: str, k: int, temperature: float = 0.0, domain: str = ALL) -> MethodStats | None:
        k = 0 if method == "plain" else k
        for r in self.rows:
            if r.method == method and r.k == k and abs(r.temperature - temperature) < 1e-9 and r.domain == domain:
                return r
        return None

    @property
    def draft_method(self) -> str:
        """The evaluated (gated, served) draft's family."""
        return self.config.get("draft_family", "eagle3")

    @property
    def drafted(self) -> list[str]:
        """Every draft family with rows, the evaluated one first (others ran for comparison)."""
        present = {r.method for r in self.rows}
        return [self.draft_method] + [m for m in DRAFTS if m in present and m != self.draft_method]

    def tau(self, method: str | None = None, k: int = 3, temperature: float = 0.0, domain: str = ALL) -> float:
        r = self.row(method or self.draft_method, k, temperature, domain)
        return r.tau if r is not None else float("nan")

    @property
    def ks(self) -> list[int]:
        return sorted({r.k for r in self.rows if r.method != "plain"})

    @property
    def temperatures(self) -> list[float]:
        return sorted({r.temperature for r in self.rows})

    @property
    def domains(self) -> list[str]:
        return sorted({r.domain for r in self.rows if r.domain != ALL})

    def finalize(self) -> "EvalResult":
        """Attach plain decoding's time per token (same temperature and domain) to every row."""
        for r in self.rows:
            plain = self.row("plain", 0, r.temperature, r.domain)
            if plain is not None and plain.tokens:
                r.plain_time_per_token = plain.time_per_token
        return self

    def summary(self, k: int | None = None, temperature: float | None = None) -> dict[str, Any]:
        """The figures for asset metadata, over all prompts. Headline numbers (tau, prompt-lookup
        tau, c, speedups) at k (default: the largest) and temperature (default: the lowest);
        `tau_by_k` one row per (temperature, k) evaluated; `acceptance_by_position` one row per
        draft position at (k, temperature): P(accepted | reached) of the draft and prompt lookup.
        Other draft families evaluated beside it (`compared_families`) add `{family}_tau`, `{family}_c` and
        `{family}_est_speedup` at (k, temperature), and `{family}_tau` / `{family}_est_speedup` columns."""
        k = max(self.ks) if k is None else k
        t = min(self.temperatures) if temperature is None else temperature
        dm = self.draft_method
        e, p = self.row(dm, k, t), self.row("prompt_lookup", k, t)
        out: dict[str, Any] = {"k": k, "temperature": t, "ceiling": k + 1, "draft_family": dm}
        if e is not None:
            out.update(tau=e.tau, c=e.c, est_speedup=e.est_speedup, wall_speedup=e.wall_speedup)
            if e.exact_match is not None:
                out["greedy_exact_match"] = f"{e.exact_match}/{e.n_prompts}"
        if p is not None:
            out.update(prompt_lookup_tau=p.tau, prompt_lookup_wall_speedup=p.wall_speedup)
        out["compared_families"] = self.drafted[1:]
        for m in self.drafted[1:]:
            if (r := self.row(m, k, t)) is not None:
                out.update({f"{m}_tau": r.tau, f"{m}_c": r.c, f"{m}_est_speedup": r.est_speedup})
        if (s := self.served_row(k, t)) is not None:
            out.update(served_tau=s["served_tau"], served_over_simulated=s["ratio"])
            if s["exact_match"] is not None:
                out["served_greedy_exact_match"] = s["exact_match"]
        if self.served:
            out["served_by_k"] = [{c: r[c] for c in ("temperature", "k", "served_tau", "simulated_tau", "ratio",
                                                     "like_for_like", "tokens_per_s", "speedup")} for r in self.served]
        out["tau_by_k"] = [
            {"temperature": tt, "k": kk, "tau": self.tau(dm, kk, tt),
             "prompt_lookup_tau": self.tau("prompt_lookup", kk, tt), "ceiling": kk + 1,
             "est_speedup": r.est_speedup if (r := self.row(dm, kk, tt)) is not None else None,
             **{f"{m}_{c}": getattr(self.row(m, kk, tt), c, None) for m in self.drafted[1:] for c in ("tau", "est_speedup")}}
            for tt in self.temperatures for kk in self.ks
        ]
        if e is not None:
            lookup = p.acceptance if p is not None else [None] * k
            out["acceptance_by_position"] = [
                {"position": i + 1, dm: a, "prompt_lookup": b} for i, (a, b) in enumerate(zip(e.acceptance, lookup))
            ]
        return _clean(out)

    def to_json(self) -> dict[str, Any]:
        return {"config": _clean(self.config), "rows": [r.to_json() for r in self.rows], "served": _clean(self.served)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalResult":
        rows = [MethodStats.from_json(r) for r in d["rows"]]
        return cls(config=d["config"], rows=rows, served=list(d.get("served") or [])).finalize()

    def served_row(self, k: int, temperature: float) -> dict[str, Any] | None:
        return next((r for r in self.served if r["k"] == k and abs(r["temperature"] - temperature) < 1e-9), None)


# -- gate ------------------------------------------------------------------------------------------
def gate(result: EvalResult, k: int, min_tau: float, temperature: float | None = None) -> tuple[bool, str]:
    """Passes when the draft's tau at k (over all prompts, at `temperature`, default the lowest
    evaluated) beats prompt lookup's and is at least min_tau."""
    t = min(result.temperatures) if temperature is None else temperature
    e, p = result.row(result.draft_method, k, t), result.row("prompt_lookup", k, t)
    if e is None or not e.steps:
        return False, f"no {LABELS[result.draft_method].removesuffix(' draft')} measurement at k={k}, temperature={t} (evaluated k: {result.ks})"
    reasons = []
    if p is not None and p.steps and not e.tau > p.tau:
        reasons.append(f"tau {e.tau:.3f} does not beat prompt lookup's {p.tau:.3f}")
    if not e.tau >= min_tau:
        reasons.append(f"tau {e.tau:.3f} is below the minimum {min_tau:.3f}")
    pl = f"{p.tau:.3f}" if p is not None and p.steps else "n/a"
    head = f"k={k}, T={t:g}: tau {e.tau:.3f} (prompt lookup {pl}, minimum {min_tau:.3f}, ceiling {k + 1})"
    if reasons:
        return False, f"FAILED {head}: " + "; ".join(reasons)
    return True, f"passed {head}"


# -- plots -----------------------------------------------------------------------------------------
def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=80)  # 560 x 360 px
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


_STYLES = ["-", "--", ":", "-."]


def plot_tau_vs_k(result: EvalResult) -> bytes:
    fig, ax = _figure()
    ks = result.ks
    for j, t in enumerate(result.temperatures):
        ls = _STYLES[j % len(_STYLES)]
        for method in (*result.drafted, "prompt_lookup"):
            color = COLORS[method]
            ys = [result.tau(method, k, t) for k in ks]
            ax.plot(ks, ys, ls, marker="o", color=color, label=f"{LABELS[method]}, T={t:g}")
    ax.plot(ks, [k + 1 for k in ks], "-", color="gray", alpha=0.6, label="ceiling k+1")
    ax.axhline(1.0, color="black", lw=0.8, alpha=0.4)
    ax.set_xticks(ks)
    ax.set_xlabel("draft tokens per step k")
    ax.set_ylabel("tau (tokens per target forward)")
    ax.set_title("Acceptance length against k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_acceptance_by_position(result: EvalResult, k: int) -> bytes:
    fig, ax = _figure()
    pos = list(range(1, k + 1))
    for j, t in enumerate(result.temperatures):
        ls = _STYLES[j % len(_STYLES)]
        for method in (*result.drafted, "prompt_lookup"):
            color = COLORS[method]
            r = result.row(method, k, t)
            if r is None:
                continue
            ys = [float("nan") if a is None else a for a in r.acceptance]
            ax.plot(pos, ys, ls, marker="o", color=color, label=f"{LABELS[method]}, T={t:g}")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(pos)
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(accepted | reached)")
    ax.set_title(f"Acceptance by position (k={k})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_tau_by_domain(result: EvalResult, k: int, temperature: float) -> bytes:
    fig, ax = _figure()
    domains = result.domains or [ALL]
    methods = (*result.drafted, "prompt_lookup")
    width = 0.76 / len(methods)
    xs = range(len(domains))
    for i, method in enumerate(methods):
        off = (i - (len(methods) - 1) / 2) * width
        ys = [result.tau(method, k, temperature, d) for d in domains]
        ax.bar([x + off for x in xs], ys, width, color=COLORS[method], label=LABELS[method])
    ax.axhline(k + 1, color="gray", ls="--", lw=1, label="ceiling k+1")
    ax.axhline(1.0, color="black", lw=0.8, alpha=0.4)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(domains, rotation=20 if len(domains) > 4 else 0, fontsize=8)
    ax.set_ylabel("tau")
    ax.set_title(f"tau by domain (k={k}, T={temperature:g})")
    ax.legend(fontsize=8)
    return _png(fig)


def render_plots(result: EvalResult, k: int | None = None) -> dict[str, bytes]:
    """{file name: PNG bytes} for PLOTS; k = the k shown per position/domain (default: the largest)."""
    k = max(result.ks) if k is None else k
    t = min(result.temperatures)
    return {
        "tau_vs_k.png": plot_tau_vs_k(result),
        "acceptance_by_position.png": plot_acceptance_by_position(result, k),
        "tau_by_domain.png": plot_tau_by_domain(result, k, t),
    }


# -- markdown --------------------------------------------------------------------------------------
def _f(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:.{digits}f}"


def report_markdown(result: EvalResult, embed_png: dict[str, bytes] | None = None, k: int | None = None,
                    links: bool = False) -> str:
    """The report as markdown. embed_png {name: PNG bytes} are embedded as base64 data URIs (for
    Dagster metadata); links=True refers to the PNG files by name instead (for report.md)."""
    k = max(result.ks) if k is None else k
    cfg = result.config
    dm = result.draft_method
    name = LABELS[dm].removesuffix(" draft")
    lines = [f"# {LABELS[dm]} evaluation", ""]
    lines.append(
        f"Target `{cfg.get('target', '?')}`, draft `{cfg.get('draft', '?')}`; {cfg.get('n_prompts', '?')} prompts "
        f"({', '.join(result.domains) or 'one domain'}), up to {cfg.get('max_new_tokens', '?')} new tokens, "
        f"seed {cfg.get('seed', '?')}, simulated with the HF target on `{cfg.get('device', '?')}`."
    )
    lines.append("")
    lines.append(
        "tau = tokens emitted per target verification forward (ceiling k+1); c = one draft forward's "
        "time over one verification forward's; estimated speedup = tau / (1 + n c), n = draft forwards per "
        "step (k for a chain draft, 1 for a DFlash block); wall speedup = "
        "plain decoding's time per token over the method's, measured in this simulator (batch 1, "
        "HF eager: indicative only; serving numbers come from bench/bench_vllm_speedup.py)."
    )
    lines += ["", "## Acceptance length", ""]
    lines.append(f"| T | k | {name} tau | prompt-lookup tau | ceiling | c | est. speedup | wall speedup | "
                 "prompt-lookup wall speedup | greedy exact |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for t in result.temperatures:
        for kk in result.ks:
            e, p = result.row(dm, kk, t), result.row("prompt_lookup", kk, t)
            exact = "–" if e is None or e.exact_match is None else f"{e.exact_match}/{e.n_prompts}"
            lines.append(
                f"| {t:g} | {kk} | {_f(e and e.tau)} | {_f(p and p.tau)} | {kk + 1} | {_f(e and e.c, 3)} | "
                f"{_f(e and e.est_speedup)} | {_f(e and e.wall_speedup)} | {_f(p and p.wall_speedup)} | {exact} |"
            )
    if len(result.drafted) > 1:
        lines += ["", "## Draft families side by side", ""]
        lines.append("| T | k | method | tau | draft forwards / step | c (one draft forward) | est. speedup |")
        lines.append("|---|---|---|---|---|---|---|")
        for t in result.temperatures:
            for kk in result.ks:
                for m in (*result.drafted, "prompt_lookup"):
                    if (r := result.row(m, kk, t)) is not None:
                        lines.append(f"| {t:g} | {kk} | {LABELS[m]} | {_f(r.tau)} | {r.forwards} | {_f(r.c, 3)} | "
                                     f"{_f(r.est_speedup)} |")
        compared = cfg.get("compared_drafts") or {}
        if compared:
            lines += ["", "Compared (simulated only; the gate and the release are the "
                      f"{name} draft's): " + ", ".join(f"{LABELS[m]} `{compared[m]}`" for m in sorted(compared)) + "."]
    elif cfg.get("compare_note"):
        lines += ["", "## Draft families side by side", "", cfg["compare_note"]]
    lines += ["", f"## Acceptance by position ({name}, P(accepted | reached))", ""]
    kmax = max(result.ks)
    lines.append("| T | k | " + " | ".join(f"pos {i + 1}" for i in range(kmax)) + " |")
    lines.append("|---|---|" + "---|" * kmax)
    for t in result.temperatures:
        for kk in result.ks:
            e = result.row(dm, kk, t)
            if e is None:
                continue
            cells = [_f(a) for a in e.acceptance] + [""] * (kmax - kk)
            lines.append(f"| {t:g} | {kk} | " + " | ".join(cells) + " |")
    if result.domains:
        lines += ["", f"## By domain (k={k})", ""]
        lines.append(f"| domain | T | prompts | {name} tau | prompt-lookup tau | {name} wall speedup |")
        lines.append("|---|---|---|---|---|---|")
        for d in result.domains:
            for t in result.temperatures:
                e, p = result.row(dm, k, t, d), result.row("prompt_lookup", k, t, d)
                n = e.n_prompts if e is not None else 0
                lines.append(f"| {d} | {t:g} | {n} | {_f(e and e.tau)} | {_f(p and p.tau)} | "
                             f"{_f(e and e.wall_speedup)} |")
    if result.served:
        lines += ["", "## Served by vLLM", ""]
        lines.append(f"The export decoded by real vLLM (`method: {dm}`) on the same prompt ids; tau = 1 + accepted / "
                     "drafts from vLLM's counters. vLLM drafts the argmax at every temperature, so a sampled row is "
                     "like-for-like with the simulator only when it ran with `argmax_draft`. Speedup: vLLM's "
                     "tokens/s with the draft over without, every prompt in one batch.")
        lines += ["", "| T | k | served tau | simulated tau | served / simulated | like-for-like | "
                  "greedy exact (vs vLLM without draft) | tokens/s | speedup |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result.served:
            lines.append(f"| {r['temperature']:g} | {r['k']} | {_f(r['served_tau'], 3)} | {_f(r['simulated_tau'], 3)} | "
                         f"{_f(r['ratio'], 3)} | {'yes' if r['like_for_like'] else 'no'} | {r['exact_match'] or '–'} | "
                         f"{_f(r['tokens_per_s'], 1)} | {_f(r['speedup'])} |")
    plain = [result.row("plain", 0, t) for t in result.temperatures]
    timing = [f"T={r.temperature:g}: {1e3 * r.time_per_token:.2f} ms/token"
              for r in plain if r is not None and r.tokens]
    if timing:
        lines += ["", "Plain decoding: " + ", ".join(timing) + "."]
    names = [n for n in PLOTS if (embed_png and n in embed_png) or links]
    if names:
        lines += ["", "## Plots", ""]
        for name in names:
            title = name.rsplit(".", 1)[0].replace("_", " ")
            if embed_png and name in embed_png:
                uri = "data:image/png;base64," + base64.b64encode(embed_png[name]).decode("ascii")
                lines.append(f"![{title}]({uri})")
            else:
                lines.append(f"![{title}]({name})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_report(result: EvalResult, writer, k: int | None = None) -> dict[str, Any]:
    """Write report.json, report.md (PNG links) and the PLOTS through `writer` (write_bytes /
    write_json, e.g. training.storage.ArtifactWriter). Returns {"markdown": the report with the
    plots embedded, for asset metadata, "summary": result.summary(k), "files": names written}."""
    pngs = render_plots(result, k)
    writer.write_json("report.json", result.to_json())
    writer.write_bytes("report.md", report_markdown(result, k=k, links=True).encode())
    for name, data in pngs.items():
        writer.write_bytes(name, data)
    return {
        "markdown": report_markdown(result, embed_png=pngs, k=k),
        "summary": result.summary(k),
        "files": ["report.json", "report.md", *pngs],
    }


def _clean(obj):
    """JSON-safe: NaN/inf become None (strict JSON has no NaN), tuples become lists."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def load_result(data: bytes | str | dict) -> EvalResult:
    """An EvalResult back from report.json's contents."""
    if isinstance(data, (bytes, str)):
        data = json.loads(data)
    return EvalResult.from_json(data)
