"""Every definition loads, fast, and `dagster definitions validate` accepts the code location."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

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
