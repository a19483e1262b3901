"""What a `specdraft run` made, said at its end: the draft's tau against prompt lookup at the gate's
k (per temperature evaluated; the other families' drafts eval_report compared beside it), whether
the quality gate passed, where the export is, the vLLM and SGLang commands that serve it, and `make ui` to look closer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from spec_assets.evaluation import GATE_CHECK


def serve_commands(target: str, export_dir: str, k: int, family: str = "eagle3") -> list[str]:
    """The vLLM and SGLang command lines that serve `target` with the draft in `export_dir` proposing
    k tokens per step (EAGLE-3, a chain: SGLang's top-k 1, k steps, k+1 tokens verified). A DFlash
    block draft: vLLM only (specdraft checks no other engine's DFlash)."""
    speculative_config = json.dumps({"method": family, "model": export_dir, "num_speculative_tokens": k})
    if family == "dflash":
        return [f"vllm serve {target} --speculative-config '{speculative_config}'"]
    return [
        f"vllm serve {target} --speculative-config '{speculative_config}'",
        f"python -m sglang.launch_server --model-path {target} --speculative-algorithm EAGLE3 "
        f"--speculative-draft-model-path {export_dir} --speculative-num-steps {k} "
        f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {k + 1}",
    ]


def _local(url: str) -> str:
    """A file:// URL as a plain path (what vllm and sglang take); other URLs as they are."""
    return url.removeprefix("file://")


def _fmt(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"


def _materialized(result, asset: str) -> bool:
    """Whether `result` (an in-process run's result, or a parallel run's RunOutcome: both carry
    the run's events as `all_events`) materialized `asset`."""
    return any(e.is_step_materialization and e.asset_key.to_user_string() == asset for e in result.all_events)


def _gate_evaluations(result) -> list:
    return [e.event_specific_data for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == GATE_CHECK]


def draft_summary(results, defs) -> list[str]:
    """The lines about the draft, from the last run in `results` that materialized eval_report
    (its report.json, its gate check, released_draft if the same run released it); [] if none did.
    The artifacts are found by their pointers: that run wrote the latest ones."""
    from resources.object_store import read_ref
    from training.evaluation import load_result
    from training.evaluation.report import LABELS

    runs = [r for r in results if _materialized(r, "eval_report")]
    if not runs:
        return []
    run = runs[-1]
    store = defs.resources["object_store"].process_config_and_initialize().store()
    report = store.manifest(read_ref(store, "eval_report").prefix)
    result = load_result(store.read_json(report.key("report.json")))
    k = report.summary["k"]
    lines = [f"draft vs prompt lookup at k={k} (tau: tokens per target forward; ceiling {k + 1}):"]
    for t in result.temperatures:
        served = result.served_row(k, t)
        tau_of = lambda m: f"{LABELS[m].removesuffix(' draft')} tau {_fmt(result.tau(m, k, t))}"  # noqa: E731
        compared = ", ".join(tau_of(m) for m in result.drafted[1:])
        lines.append(f"  T={t:g}: {tau_of(result.draft_method)}, prompt lookup {_fmt(result.tau('prompt_lookup', k, t))}"
                     + (f"; served by vLLM {_fmt(served['served_tau'])}" if served else "")
                     + (f"; compared (simulated, not gated): {compared}" if compared else ""))
    note = store.manifest(read_ref(store, "draft_model").prefix).summary.get("data_note")
    if note:
        lines.append(f"note: {note}")
    checks = _gate_evaluations(run)
    passed = bool(checks) and checks[-1].passed
    detail = checks[-1].metadata.get("detail") if checks else None
    lines.append(f"quality gate {GATE_CHECK}: {'PASSED' if passed else 'FAILED'}"
                 + (f" ({detail.value})" if detail is not None else ""))
    if _materialized(run, "released_draft"):
        released = store.manifest(read_ref(store, "released_draft").prefix)
        export = _local(store.url(released.key("config.json")).rsplit("/", 1)[0])
        lines.append(f"released export: {export}  (releases/latest.json points at it)")
    else:
        export = _local(result.config["draft"])
        lines.append(f"not released; the evaluated draft's export: {export}")
    target = defs.resources["target"].process_config_and_initialize().model_path()
    lines.append("serve it with" + ("" if passed else " (it did not pass the gate)") + ":")
    lines += [f"  {command}" for command in serve_commands(target, export, k, result.draft_method)]
    if not export.startswith("/"):
        lines.append(f"  (copy {export} to a local folder first and name that folder)")
    return lines


def print_summary(results, home: Path, seconds: float, failed: list[str]) -> None:
    """The end of `specdraft run`: failures (stderr) or the run count, then what the draft is."""
    from spec_assets.definitions import build_defs

    out = sys.stderr if failed else sys.stdout
    if failed:
        print("specdraft run failed:\n  " + "\n  ".join(failed), file=sys.stderr)
    else:
        print(f"specdraft run finished in {seconds:.1f}s: {len(results)} runs; recorded in DAGSTER_HOME={home}")
    for line in draft_summary(results, build_defs()):
        print(line, file=out)
    if failed:
        print("re-run what failed with: specdraft run --resume", file=sys.stderr)
    print(f"look closer: make ui  (or DAGSTER_HOME={home} dagster dev -w workspace.yaml)", file=out)
