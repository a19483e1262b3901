"""Acceptance bookkeeping, the quality gate, and the report files (markdown with embedded PNGs)."""

import base64
import json
import re
from types import SimpleNamespace

import pytest

from training.evaluation import (
    PLOTS,
    EvalResult,
    MethodStats,
    gate,
    load_result,
    render_plots,
    report_markdown,
    write_report,
)


def gen(accepted, proposed, tokens=None, draft=0.0, target=0.0, wall=1.0):
    return SimpleNamespace(
        steps=len(accepted), accepted=list(accepted), proposed=list(proposed),
        tokens=[0] * (tokens if tokens is not None else sum(a + 1 for a in accepted)),
        draft_time=draft, target_time=target, prefill_time=0.0, wall_time=wall,
    )


def test_per_position_bookkeeping():
    r = MethodStats("eagle3", 3, 0.0, "all")
    r.add(gen([3, 0, 1, 2], [3, 3, 3, 3], draft=0.6, target=2.0))
    assert r.reached == [4, 3, 2] and r.accepted_at == [3, 2, 1]
    assert r.acceptance == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert r.acceptance_rate == pytest.approx([0.75, 0.5, 0.25])
    assert r.tau == pytest.approx(2.5) == pytest.approx(1 + sum(r.acceptance_rate))
    # c: 0.6 s over 4 steps x 3 draft forwards vs 2.0 s over 4 verifications
    assert r.c == pytest.approx((0.6 / 12) / (2.0 / 4))
    assert r.est_speedup == pytest.approx(2.5 / (1 + 3 * r.c))

    # prompt lookup: short or empty proposals reach fewer positions
    p = MethodStats("prompt_lookup", 3, 0.0, "all")
    p.add(gen([2, 0, 1], [2, 0, 3]))
    assert p.reached == [2, 2, 0] and p.accepted_at == [2, 1, 0]
    assert p.acceptance == [1.0, 0.5, None]
    assert p.tau == pytest.approx(6 / 3)


def rows_for(taus: dict, ks=(1, 3), temperatures=(0.0,), domains=("chat", "code"), config=None):
    """An EvalResult whose tau per (method, k, T) is taus[(method, k, T)] (methods: eagle3, dflash,
    prompt_lookup); config: added to the result's."""
    rows = []
    for t in temperatures:
        for dom in (*domains, "all"):
            rows.append(MethodStats("plain", 0, t, dom, n_prompts=1, steps=10, tokens=10, wall_time=1.0))
            for k in ks:
                for method in dict.fromkeys(m for m, _, _ in taus):
                    tau = taus[(method, k, t)]
                    steps = 100
                    acc = round((tau - 1) * steps)
                    per = [max(0, min(steps, acc - i * steps // 2)) for i in range(k)]
                    rows.append(MethodStats(method, k, t, dom, n_prompts=1, steps=steps, tokens=steps + acc,
                                            accepted=acc, proposed=k * steps, reached=[steps] * k,
                                            accepted_at=per, draft_time=0.1 * k, target_time=1.0,
                                            wall_time=(steps + acc) / (tau * 10), exact_match=1 if t == 0 else None))
    return EvalResult(config={"target": "tiny", "draft": "d", "n_prompts": 2, "max_new_tokens": 8, "seed": 0,
                              "device": "cpu", **(config or {})}, rows=rows).finalize()


TAUS = {("eagle3", 1, 0.0): 1.7, ("eagle3", 3, 0.0): 2.6, ("prompt_lookup", 1, 0.0): 1.2,
        ("prompt_lookup", 3, 0.0): 1.4, ("eagle3", 1, 0.7): 1.5, ("eagle3", 3, 0.7): 2.0,
        ("prompt_lookup", 1, 0.7): 1.1, ("prompt_lookup", 3, 0.7): 1.2}


def test_gate():
    res = rows_for(TAUS, temperatures=(0.0, 0.7))
    ok, detail = gate(res, 3, 2.0)
    assert ok and "passed" in detail and "2.600" in detail
    ok, detail = gate(res, 3, 2.7)
    assert not ok and "below the minimum" in detail
    ok, detail = gate(res, 3, 2.0, temperature=0.7)
    assert ok
    ok, detail = gate(res, 5, 1.0)
    assert not ok and "no EAGLE-3 measurement" in detail
    worse = dict(TAUS)
    worse[("eagle3", 1, 0.0)] = 1.1
    ok, detail = gate(rows_for(worse, temperatures=(0.0, 0.7)), 1, 1.0)
    assert not ok and "does not beat prompt lookup" in detail


def test_the_gate_and_headline_are_the_released_familys_only():
    """A compared family beside the released one neither passes nor fails the gate for it."""
    taus = {("eagle3", 1, 0.0): 1.7, ("eagle3", 3, 0.0): 2.6, ("dflash", 1, 0.0): 1.05, ("dflash", 3, 0.0): 1.1,
            ("prompt_lookup", 1, 0.0): 1.2, ("prompt_lookup", 3, 0.0): 1.4}
    released_dflash = rows_for(taus, config={"draft_family": "dflash"})
    ok, detail = gate(released_dflash, 3, 1.5)
    assert not ok and "tau 1.100" in detail and "2.600" not in detail  # the weak DFlash draft fails
    ok, detail = gate(rows_for(taus, config={"draft_family": "eagle3"}), 3, 1.5)
    assert ok and "tau 2.600" in detail  # the same rows pass when EAGLE-3 is the one released
    out = released_dflash.summary(k=3)
    assert out["tau"] == pytest.approx(1.1) and out["compared_families"] == ["eagle3"]
    assert out["eagle3_tau"] == pytest.approx(2.6) and out["eagle3_est_speedup"] == released_dflash.row("eagle3", 3).est_speedup
    md = report_markdown(released_dflash)
    assert "## Draft families side by side" in md and "| 0 | 3 | EAGLE-3 draft | 2.60 | 3 |" in md
    # Without another family the section is one line, the note eval_report writes.
    alone = rows_for({k: v for k, v in taus.items() if k[0] != "dflash"},
                     config={"compare_note": "No dflash draft trained on the same data to compare."})
    assert alone.summary(k=3)["compared_families"] == []
    assert "## Draft families side by side\n\nNo dflash draft trained on the same data to compare.\n" in report_markdown(alone)


def test_summary_has_headline_floats_and_rows_per_k_and_position():
    res = rows_for(TAUS, temperatures=(0.0, 0.7))
    out = res.summary(k=3)
    assert (out["k"], out["temperature"], out["ceiling"]) == (3, 0.0, 4)
    assert isinstance(out["tau"], float) and out["tau"] == pytest.approx(2.6)
    assert isinstance(out["prompt_lookup_tau"], float) and out["prompt_lookup_tau"] == pytest.approx(1.4)
    # one row per (temperature, k), every temperature evaluated, for the CLI summary and the UI table
    rows = {(r["temperature"], r["k"]): r for r in out["tau_by_k"]}
    assert set(rows) == {(0.0, 1), (0.0, 3), (0.7, 1), (0.7, 3)}
    for (t, k), r in rows.items():
        assert r["tau"] == pytest.approx(TAUS[("eagle3", k, t)])
        assert r["prompt_lookup_tau"] == pytest.approx(TAUS[("prompt_lookup", k, t)])
        assert r["ceiling"] == k + 1 and r["est_speedup"] <= r["tau"]
    # per draft position at (k, T): EAGLE-3's and prompt lookup's P(accepted | reached)
    e, p = res.row("eagle3", 3, 0.0), res.row("prompt_lookup", 3, 0.0)
    assert out["acceptance_by_position"] == [
        {"position": i + 1, "eagle3": pytest.approx(a), "prompt_lookup": pytest.approx(b)}
        for i, (a, b) in enumerate(zip(e.acceptance, p.acceptance))]
    json.dumps(out, allow_nan=False)  # strict JSON: it goes into the manifest


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class DictWriter:
    def __init__(self):
        self.files = {}

    def write_bytes(self, name, data):
        self.files[name] = data

    def write_json(self, name, obj):
        self.files[name] = json.dumps(obj).encode()


def test_report_files_and_embedded_markdown(local_store):
    res = rows_for(TAUS, temperatures=(0.0, 0.7))
    pngs = render_plots(res)
    assert set(pngs) == set(PLOTS)
    for data in pngs.values():
        assert png_size(data) == (560, 360)
        assert len(data) < 100_000  # small enough for Dagster metadata

    md = report_markdown(res, embed_png=pngs)
    uris = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert len(uris) == 3 and base64.b64decode(uris[0]) in pngs.values()
    assert "| 0 | 3 | 2.60 | 1.40 | 4 |" in md  # T, k, tau, prompt-lookup tau, ceiling
    assert "chat" in md and "code" in md

    w = DictWriter()
    out = write_report(res, w, k=3)
    assert set(w.files) == {"report.json", "report.md", *PLOTS} == set(out["files"])
    assert "data:image/png;base64," in out["markdown"]
    text = w.files["report.md"].decode()
    assert "](tau_vs_k.png)" in text and "base64" not in text
    assert out["summary"]["tau"] == pytest.approx(2.6) and out["summary"]["prompt_lookup_tau"] == pytest.approx(1.4)
    back = load_result(w.files["report.json"])
    assert back.tau("eagle3", 3, 0.7, "code") == pytest.approx(res.tau("eagle3", 3, 0.7, "code"))
    assert back.row("eagle3", 3).wall_speedup == pytest.approx(res.row("eagle3", 3).wall_speedup)

    # the real artifact writer of the object store
    from training.storage import artifact_prefix

    prefix = artifact_prefix("eval_report", None, "f" * 16)
    with local_store.artifact(prefix, "f" * 16) as aw:
        write_report(res, aw)
    manifest = local_store.manifest(prefix)
    assert manifest is not None and {"report.json", "report.md", *PLOTS} <= set(manifest.names())


def test_stratified_prompts_cover_every_domain_in_any_order():
    from training.evaluation.prompts import stratified_prompts

    rows = [{"id": f"{d}-{i}", "source": d, "messages": []} for d in ("a", "b", "c") for i in range(5)]
    picked = stratified_prompts(rows, 4)
    assert [p["domain"] for p in picked] == ["a", "b", "c", "a"]
    assert picked == stratified_prompts(list(reversed(rows)), 4)
    assert len(stratified_prompts(rows, 100)) == 15
