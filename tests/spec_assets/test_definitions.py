"""Every definition loads, fast, and `dagster definitions validate` accepts the code location."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from tests.conftest import parse_module

ROOT = Path(__file__).resolve().parents[2]


def test_every_definition_loads():
    from spec_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("source_corpus") in graph.materializable_asset_keys
    for job in defs.resolve_all_job_defs():
        assert job.name
    assert defs.resolve_sensor_def("corpus_sensor").default_status == dg.DefaultSensorStatus.STOPPED


def test_code_location_imports_without_heavy_libraries():
    # The UI reloads the code location often: torch/transformers must load inside asset bodies only.
    code = (
        "import sys, time; t=time.time(); import spec_assets.definitions; "
        "heavy=[m for m in ('torch','transformers','vllm','pyarrow.parquet','duckdb') if m in sys.modules]; "
        "print(heavy, time.time()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    heavy, seconds = out.stdout.rsplit("]", 1)
    assert heavy == "[", f"heavy modules imported at load: {heavy}]"
    assert float(seconds) < 10


def test_dagster_definitions_validate(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Validation successful" in out.stdout + out.stderr


def test_fan_ins_read_their_upstream_as_inputs():
    """eval_report and released_draft get their upstream pointers through the IO manager (real
    inputs, so the UI's lineage is what the code reads), never by listing partitions themselves."""
    from spec_assets.definitions import defs

    for asset, inputs in {"eval_report": {"draft_model", "source_corpus"},
                          "released_draft": {"draft_model", "eval_report"}}.items():
        assets_def = defs.resolve_assets_def(asset)
        assert {name for name, key in assets_def.keys_by_input_name.items()} == inputs, asset
        for name in inputs:
            assert not assets_def.op.ins[name].dagster_type.is_nothing, f"{asset}.{name} is a bare dep"
            assert assets_def.get_io_manager_key_for_asset_key(assets_def.key) == "artifact_refs"
    source = (ROOT / "spec_assets" / "evaluation.py").read_text()
    assert "read_ref" not in source and "get_dynamic_partitions" not in source


# Every variable a resource takes, the resource and its field (README "Configuration" lists them).
WIRED = {
    "SPECDRAFT_ROOT": ("object_store", "root"),
    "SPECDRAFT_TARGET": ("target", "target"),
    "SPECDRAFT_BACKEND": ("target", "backend"),
    "SPECDRAFT_CHAT_TEMPLATE_KWARGS": ("target", "chat_template_kwargs"),
    "SPECDRAFT_CORPUS": ("corpus", "location"),
    "SPECDRAFT_EVAL_PROMPTS": ("corpus", "eval_prompts"),
    "OPENAI_BASE_URL": ("generator", "base_url"),
    "SPECDRAFT_RAY_ADDRESS": ("ray_cluster", "address"),
}
VALUES = {"SPECDRAFT_BACKEND": "vllm", "SPECDRAFT_CHAT_TEMPLATE_KWARGS": '{"enable_thinking": false}',
          "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "SPECDRAFT_RAY_ADDRESS": "127.0.0.1:6379"}


def _env_reads(tree) -> list[int]:
    import ast

    lines = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
             and node.value.id == "os" and node.attr in ("environ", "getenv", "getenvb", "environb")]
    lines += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "os"
              and {a.name for a in node.names} & {"environ", "getenv", "getenvb", "environb"}]
    return lines


def test_environment_is_read_in_definitions_only():
    """resources/ and spec_assets/ never read os.environ, but for definitions.py, which wires every
    resource variable (EnvVar: the UI shows where a value comes from, a run config can override it),
    and the instance's own settings (cli.py: DAGSTER_HOME; instance.py: dagster.yaml, pools, parallelism),
    which are no resource's."""
    import ast

    files = sorted(p for package in ("spec_assets", "resources") for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 20  # the whole packages
    wired_in_definitions = {n.args[0].value for n in ast.walk(parse_module(ROOT / "spec_assets" / "definitions.py"))
                            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "_from_env"}
    assert wired_in_definitions == set(WIRED)
    for path in files:
        if path.name == "definitions.py":
            continue
        if path.name in ("cli.py", "instance.py") and path.parent.name == "spec_assets":
            strings = {n.value for n in ast.walk(parse_module(path)) if isinstance(n, ast.Constant)}
            assert set(WIRED) & strings == set(), f"{path.name} reads a resource's variable"
            continue
        assert _env_reads(parse_module(path)) == [], f"{path.relative_to(ROOT)} reads the environment"


def test_every_resource_variable_is_an_env_var_of_its_field(monkeypatch):
    """Set, a variable is an EnvVar on its resource's field (its name shows in the UI, never its value)
    and the initialized resource holds its value; unset, the field keeps the resource's default, and a
    variable set only later never reaches the resource (no resource reads os.environ itself)."""
    code = ("import json, dagster as dg; from spec_assets.definitions import build_resources\n"
            "res = build_resources(); out = {}\n"
            f"for name, (key, field) in {WIRED!r}.items():\n"
            "    raw = getattr(res[key], field)\n"
            "    env = raw.env_var_name if isinstance(raw, dg.EnvVar) else None\n"
            "    with res[key].process_config_and_initialize_cm() as resource:\n"
            "        out[name] = [env, getattr(resource, field)]\n"
            "print(json.dumps(out))\n")
    values = {name: VALUES.get(name, f"/tmp/{name.lower()}") for name in WIRED}
    base = {k: v for k, v in os.environ.items() if k not in WIRED}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**base, **values})
    assert json.loads(out.stdout) == {name: [name, values[name]] for name in WIRED}

    from spec_assets.definitions import build_resources

    for name in WIRED:
        monkeypatch.delenv(name, raising=False)
    unset = build_resources()
    for name, value in values.items():  # set after the definitions were built
        monkeypatch.setenv(name, value)
    for name, (key, field) in WIRED.items():
        with unset[key].process_config_and_initialize_cm() as resource:
            assert getattr(resource, field) == ("hf" if name == "SPECDRAFT_BACKEND" else ""), name
    with unset["ray_cluster"].process_config_and_initialize_cm() as ray_cluster:
        assert ray_cluster.enabled() is False
    assert unset["target"].process_config_and_initialize().template_kwargs() == {}


# Dagster storage internals and the implicit job's internal name: none of them is public API.
NON_PUBLIC = ("run_storage", "event_log_storage", "__ASSET_JOB", "all_logs", "get_cursor_values",
              "set_cursor_values", "concurrency_slots", "get_concurrency_info", "dagster._")


def test_public_dagster_apis_only():
    """No `dagster._...` import and no storage internal anywhere in the packages that run the
    pipeline, in their tests and in the benchmarks (the internals change between releases): tests
    read instances through DagsterInstance's record methods, the webserver's GraphQL API and
    Dagster's command lines."""
    import ast

    packages = ("spec_assets", "resources", "training", "tests", "bench")
    files = sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))
    assert len(files) > 150  # the whole packages, not a list of files
    for path in files:
        tree = parse_module(path)
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        private = [m for m in modules if m.startswith(("dagster._", "dagster_graphql.test"))]
        assert private == [], path
        if path == Path(__file__).resolve():
            continue  # the list below names them
        text = path.read_text()
        assert [name for name in NON_PUBLIC if name in text] == [], path
