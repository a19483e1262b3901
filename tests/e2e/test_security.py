"""Security properties of the pipeline, each checked against the real thing:

- secrets (S3 credentials, the OpenAI-compatible API key, an HF token) set to recognizable canaries
  while the whole graph runs in-process on the loopback S3 server with resampling through an
  OpenAI-compatible server: no canary in any Dagster event, run record, run config, job or plan
  snapshot, the code location's snapshot (what the UI shows), the console or Python logs, or any
  object written to the store, even when the generation server echoes the key in an error;
- no pickle is ever loaded: a malicious pickle put where a checkpoint, vocab map, serving export,
  hidden-state part, warm-start weights or target weights are expected is refused, and its
  payload (writing a marker file) never runs; no unpickling call exists in the code;
- trust_remote_code stays off unless the target resource turns it on: a target directory whose
  config and tokenizer need remote code is refused and its code never runs, and every
  from_pretrained call the assets make passes the resource's setting;
- keys, shard keys, partition keys, artifact file names and manifest entries cannot escape the
  storage root.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import threading
import urllib.parse
from http.server import ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from resources.ray_cluster import RayClusterResource
from tests.conftest import JsonHandler
from tests.spec_assets.conftest import new_dagster_home
from tests.webserver import dagster_webserver

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[2]
CANARIES = {
    "AWS_ACCESS_KEY_ID": "AKIACANARYKEYID7Q3Z",
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-5b0e9d7c41a2",
    "AWS_SESSION_TOKEN": "canary-aws-session-token-88f1c3",
    "OPENAI_API_KEY": "sk-canary-openai-key-3f9a1b77d2",
    "HF_TOKEN": "hf_canaryHuggingFaceToken42",
}
SMALL = {
    "source_corpus": {"heldout_fraction": 0.25},
    "resampled_corpus": {"max_new_tokens": 8, "batch_size": 8},
    "tokenized_shards": {"max_length": 256},
    "hidden_states": {"max_tokens_per_batch": 2048},
    "draft_model": {"epochs": 1, "max_steps": 2, "ttt_length": 2, "max_tokens_per_batch": 2048, "checkpoint_every": 1},
    "eval_report": {"ks": [1, 2], "temperatures": [0.0], "max_new_tokens": 4, "max_prompts": 2, "gate_k": 2,
                    "min_tau": 1.0, "served": False},
}
PER_SHARD = ["source_corpus", "resampled_corpus", "tokenized_shards", "hidden_states"]
FAN_IN = ["vocab_map", "draft_model", "eval_report", "released_draft"]


def _forms(secret: str) -> list[str]:
    """The secret as it could appear: raw, URL-encoded, base64 (of itself and as a Bearer value)."""
    return [secret, urllib.parse.quote(secret, safe=""), base64.b64encode(secret.encode()).decode(),
            base64.b64encode(f"Bearer {secret}".encode()).decode()]


def assert_no_canary(where: str, text: str) -> None:
    for name, secret in CANARIES.items():
        for form in _forms(secret):
            assert form not in text, f"{name} leaked into {where}: ...{text[max(0, text.find(form) - 200):text.find(form) + 60]}..."


# -- a fake OpenAI-compatible server ------------------------------------------------------------------
class FakeOpenAI:
    """/v1/models and /v1/chat/completions on loopback; records the Authorization headers it got.
    With echo_key, chat requests get a 401 whose body repeats the key (as careless servers do)."""

    def __init__(self, echo_key: bool = False):
        self.auth: list[str] = []
        self.echo_key = echo_key
        fake = self

        class Handler(JsonHandler):
            def do_GET(self):
                fake.auth.append(self.headers.get("Authorization", ""))
                self.send_json(200, {"object": "list", "data": [{"id": "tiny-served", "object": "model"}]})

            def do_POST(self):
                auth = self.headers.get("Authorization", "")
                fake.auth.append(auth)
                request = self.read_json()
                if fake.echo_key:
                    self.send_json(401, {"error": {"message": f"invalid api key: {auth.removeprefix('Bearer ')}"}})
                    return
                n = len(request["messages"])
                self.send_json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"reply after {n} turns"},
                                              "finish_reason": "stop"}], "usage": {"completion_tokens": 4}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canaries(monkeypatch, s3_server):
    """Every secret set to a canary (moto accepts any credentials, so S3 really signs with them)."""
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    return CANARIES


def _resources(generator_url: str, trust_remote_code: bool = False) -> dict:
    """The definitions' resources, as deployed: values from environment variables (EnvVar), with
    generation through an OpenAI-compatible server."""
    from resources.corpus_source import CorpusSourceResource
    from resources.generation_backend import GenerationBackendResource
    from resources.object_store import ArtifactRefIOManager, ObjectStoreResource
    from resources.target_model import TargetModelResource

    object_store = ObjectStoreResource(root=dg.EnvVar("SPECDRAFT_ROOT"))
    target = TargetModelResource(target=dg.EnvVar("SPECDRAFT_TARGET"), trust_remote_code=trust_remote_code)
    return {
        "object_store": object_store,
        "artifact_refs": ArtifactRefIOManager(object_store=object_store),
        "corpus": CorpusSourceResource(location=dg.EnvVar("SPECDRAFT_CORPUS")),
        "target": target,
        "generator": GenerationBackendResource(backend="openai", base_url=generator_url, model="tiny-served",
                                               max_concurrency=4, target=target),
        "ray_cluster": RayClusterResource(),
    }


def _materialize(instance, resources, selection, partition=None):
    from spec_assets.definitions import all_assets

    ops = {name: {"config": SMALL[name]} for name in selection if name in SMALL}
    return dg.materialize(all_assets, selection=selection, partition_key=partition, instance=instance,
                          resources=resources, run_config={"ops": ops}, raise_on_error=False)


def _everything_dagster_kept(instance) -> str:
    """Every run, its config, job and plan snapshots, and every event of it, serialized."""
    from dagster import serialize_value

    from tests.conftest import run_events

    parts = []
    for run in instance.get_runs():
        parts.append(serialize_value(run))
        parts.append(json.dumps(run.run_config, default=str))
        if run.job_snapshot_id:
            parts.append(serialize_value(instance.get_job_snapshot(run.job_snapshot_id)))
        if run.execution_plan_snapshot_id:
            parts.append(serialize_value(instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)))
        parts.extend(serialize_value(entry) for entry in run_events(instance, run.run_id))
    return "\n".join(parts)


class _Spy:
    """Records the trust_remote_code every from_pretrained call receives."""

    def __init__(self, monkeypatch):
        import transformers

        self.calls: list[tuple[str, object]] = []
        for cls_name in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"):
            cls = getattr(transformers, cls_name)
            original = cls.from_pretrained

            def spy(*args, _original=original, _name=cls_name, **kwargs):
                self.calls.append((_name, kwargs.get("trust_remote_code", "<not passed>")))
                return _original(*args, **kwargs)

            monkeypatch.setattr(cls, "from_pretrained", spy)


# -- secrets ------------------------------------------------------------------------------------------
def test_secrets_never_reach_metadata_logs_config_or_the_store(canaries, s3_bucket, tiny_target, tmp_path, monkeypatch,
                                                               capfd, caplog):
    import logging

    from spec_assets.partitions import corpus_shards
    from training.demo.corpus import write_demo_corpus
    from training.storage import ObjectStore

    caplog.set_level(logging.INFO)
    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n_shards=1, rows_per_shard=16, seed=3)
    root = f"{s3_bucket}/specdraft"
    monkeypatch.setenv("SPECDRAFT_ROOT", root)
    monkeypatch.setenv("SPECDRAFT_TARGET", str(tiny_target))
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(corpus))
    server = FakeOpenAI()
    spy = _Spy(monkeypatch)
    try:
        resources = _resources(server.url)
        with dg.DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions(corpus_shards.name, ["demo-00000"])
            shard = _materialize(instance, resources, PER_SHARD, "demo-00000")
            assert shard.success
            fan_in = _materialize(instance, resources, FAN_IN)  # the random draft fails the gate
            done = [e.asset_key.to_user_string() for e in fan_in.get_asset_materialization_events()]
            assert done == ["vocab_map", "draft_model", "eval_report"], done
            kept = _everything_dagster_kept(instance)
    finally:
        server.close()

    # The secrets were really in use: S3 requests were signed with them, the API key was sent.
    assert server.auth and all(a == f"Bearer {CANARIES['OPENAI_API_KEY']}" for a in server.auth)
    # The scan covers what matters: metadata, asset logs (context.log lines), checks, the run config.
    assert "rows_read" in kept and "tokens_generated" in kept and "beats_prompt_lookup" in kept
    assert "read 16, accepted 16" in kept and "max_new_tokens" in kept
    assert f"openai:{server.url}" in kept  # the generator identity is recorded, its key is not
    assert_no_canary("the Dagster event log, runs and snapshots", kept)
    out, err = capfd.readouterr()
    assert_no_canary("stdout/stderr", out + err)
    assert_no_canary("Python logging", "\n".join(r.getMessage() for r in caplog.records))

    store = ObjectStore(root)
    keys = store.list("", recursive=True)
    assert any(k.endswith("manifest.json") for k in keys) and any(k.endswith(".safetensors") for k in keys)
    blob = b"".join(store.read_bytes(k) for k in keys)
    for name, secret in CANARIES.items():
        for form in _forms(secret):
            assert form.encode() not in blob, f"{name} written to the store"
    # The trust_remote_code the assets passed: always the resource's default, False.
    assert spy.calls and {value for _, value in spy.calls} == {False}, spy.calls


def test_api_key_echoed_by_a_failing_server_is_not_logged(canaries, tiny_target, tmp_path, monkeypatch):
    """A generation server answering 401 with the key in its message: the step fails, clearly,
    and the key is not in the failure Dagster records."""
    from spec_assets.partitions import corpus_shards
    from training.demo.corpus import write_demo_corpus

    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n_shards=1, rows_per_shard=8, seed=4)
    monkeypatch.setenv("SPECDRAFT_ROOT", (tmp_path / "store").as_uri())
    monkeypatch.setenv("SPECDRAFT_TARGET", str(tiny_target))
    monkeypatch.setenv("SPECDRAFT_CORPUS", str(corpus))
    server = FakeOpenAI(echo_key=True)
    try:
        with dg.DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions(corpus_shards.name, ["demo-00000"])
            result = _materialize(instance, _resources(server.url), ["source_corpus", "resampled_corpus"], "demo-00000")
            assert not result.success
            (failure,) = [e for e in result.all_events if e.is_step_failure]
            message = failure.step_failure_data.error.to_string()
            assert "HTTP 401" in message and "/chat/completions" in message
            kept = _everything_dagster_kept(instance)
    finally:
        server.close()
    assert server.auth  # the key was sent
    assert_no_canary("the failure of a step", kept)


RESOURCES = """
query Resources($selector: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $selector) {
    __typename
    ... on ResourceDetailsList { results { name resourceType description
      configFields { name description configType { key } defaultValueAsJson }
      configuredValues { key value type } } }
  }
}
"""


def test_code_location_snapshot_shows_env_var_names_not_values(s3_bucket, tmp_path):
    """What `dagster-webserver` serves the UI about resources (its GraphQL API), over the code location
    loaded in a fresh process with every secret set."""
    env = {**CANARIES, "SPECDRAFT_ROOT": f"{s3_bucket}/x", "SPECDRAFT_TARGET": str(tmp_path),
           "SPECDRAFT_CORPUS": str(tmp_path), "PYTHONPATH": str(ROOT),
           "DAGSTER_HOME": str(new_dagster_home(tmp_path / "home"))}
    with dagster_webserver(["-w", "workspace.yaml"], env, tmp_path / "webserver.log") as server:
        repos = server.graphql("{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
        (repo,) = repos["repositoriesOrError"]["nodes"]
        selector = {"repositoryName": repo["name"], "repositoryLocationName": repo["location"]["name"]}
        answer = server.graphql(RESOURCES, {"selector": selector})["allTopLevelResourceDetailsOrError"]
    resources = {r["name"]: r for r in answer["results"]}
    root = {v["key"]: v for v in resources["object_store"]["configuredValues"]}["root"]
    assert (root["type"], root["value"]) == ("ENV_VAR", "SPECDRAFT_ROOT")  # the variable's name, not its value
    snap = json.dumps(answer)
    assert "ObjectStoreResource" in snap and f"{s3_bucket}/x" not in snap
    assert_no_canary("the code location snapshot", snap + (tmp_path / "webserver.log").read_text())


# -- pickles ----------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle payload ran')",))


def _malicious(marker: Path) -> dict[str, bytes]:
    """A plain pickle and a torch.save zip (what a .pt/.bin checkpoint is), both running the payload on load."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buf)
    return {"pickle": pickle.dumps({"weight": _Payload(marker)}), "torch.save": buf.getvalue()}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a pickle payload was executed"


def _refused(exc_info) -> str:
    message = f"{type(exc_info.value).__name__}: {exc_info.value}"
    assert re.search(r"safetensors|Safetensor|deserializ", message, re.I), message
    return message


def test_checkpoint_that_is_a_pickle_is_refused(local_store, marker):
    import torch

    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.storage import StoreError

    for kind, payload in _malicious(marker).items():
        run = f"runs/{kind.replace('.', '-')}"
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        save_checkpoint(local_store, run, step=1, model_state={"w": torch.zeros(2)}, optimizer_state=opt.state_dict(),
                        param_names=["w"], rng={"cpu": torch.get_rng_state()}, state={"step": 1}, keep=1)
        # The attacker controls the store: swap the weights for a pickle and fix up the manifest.
        prefix = f"{run}/checkpoints/step-00000001"
        manifest = local_store.read_json(f"{prefix}/manifest.json")
        entry = manifest["files"]["model.safetensors"]
        local_store.write_bytes(f"{prefix}/{entry['path']}", payload)
        entry.update(bytes=len(payload), sha256=__import__("hashlib").sha256(payload).hexdigest())
        local_store.write_json(f"{prefix}/manifest.json", manifest)
        with pytest.raises(StoreError, match="never unpickled") as err:
            load_checkpoint(local_store, run)
        assert local_store.url(prefix) in str(err.value)
        _refused(err)


def test_vocab_map_export_part_and_warm_start_pickles_are_refused(local_store, marker, tmp_path):
    from training.export import load_draft
    from training.hidden_states import HiddenStateDataset, load_part
    from training.train_main import warm_start
    from training.vocab import load_vocab_map, read_vocab_map

    for kind, payload in _malicious(marker).items():
        tag = kind.replace(".", "-")
        # vocab map: as bytes, as a store key, and as an artifact whose manifest names it
        with pytest.raises(Exception) as err:
            load_vocab_map(payload)
        _refused(err)
        with local_store.artifact(f"vocab_map/_/{tag}", tag) as w:
            w.write_bytes("vocab_map.safetensors", payload)
        with pytest.raises(Exception) as err:
            read_vocab_map(local_store, f"vocab_map/_/{tag}")
        _refused(err)
        # serving export
        export = tmp_path / f"export-{tag}"
        export.mkdir()
        (export / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
        (export / "model.safetensors").write_bytes(payload)
        with pytest.raises(Exception) as err:
            load_draft(export)
        _refused(err)
        # hidden-state part, in a complete artifact
        with local_store.artifact(f"hidden_states/s0/{tag}", tag) as w:
            w.write_bytes("part-00000.safetensors", payload)
        m = local_store.manifest(f"hidden_states/s0/{tag}")
        with pytest.raises(Exception) as err:
            load_part(local_store, m.key("part-00000.safetensors"))
        _refused(err)
        with pytest.raises(Exception):
            HiddenStateDataset(local_store, [m]).parts  # the range-read index refuses it too
        # warm start from an earlier export's weights
        local_store.write_bytes(f"warm/{tag}/model.safetensors", payload)
        with pytest.raises(Exception) as err:
            warm_start(None, local_store, f"warm/{tag}/model.safetensors")
        _refused(err)


def test_target_weights_that_are_pickles_never_run(tiny_target, tmp_path, marker):
    """A target directory with pytorch_model.bin (a pickle) instead of safetensors: the hf backend
    and the head reader refuse it; transformers reads a .bin with weights_only, no payload."""
    import shutil

    from training.targets import load_target
    from training.targets.weights import load_head_weights

    evil = tmp_path / "evil-target"
    shutil.copytree(tiny_target, evil)
    (evil / "model.safetensors").unlink()
    (evil / "pytorch_model.bin").write_bytes(_malicious(marker)["torch.save"])
    with pytest.raises(Exception, match="safetensors"):
        load_head_weights(str(evil))
    with pytest.raises(Exception) as err:
        load_target(str(evil), backend="hf", device="cpu").model
    assert re.search(r"weights_only|Unpickl|unsupported|safetensors|GLOBAL", f"{type(err.value).__name__}: {err.value}"), err.value


def test_no_unpickling_calls_in_the_code():
    """The static side of "no pickles": nothing in the library, assets or resources unpickles."""
    forbidden = [
        (r"\bpickle\.loads?\(", "the pickle module's loaders"),
        (r"\bcPickle\b|\bdill\b|\bcloudpickle\b|\bjoblib\.load\b", "a pickle library"),
        (r"\bread_pickle\(", "pandas.read_pickle"),
        (r"allow_pickle\s*=\s*True", "numpy allow_pickle=True"),
        (r"weights_only\s*=\s*False", "weights_only=False"),
        (r"\bshelve\b|\bmarshal\.loads?\(", "shelve/marshal"),
    ]
    offenders = []
    for package in ("training", "spec_assets", "resources"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            for pattern, what in forbidden:
                if re.search(pattern, text):
                    offenders.append(f"{path.relative_to(ROOT)}: {what}")
            for call in re.finditer(r"(?<![\w.])torch\.load\(([^)]*)\)", text):  # safetensors' own loader is no pickle
                if "weights_only=True" not in call.group(1):
                    offenders.append(f"{path.relative_to(ROOT)}: torch's loader without weights_only=True")
    assert not offenders, offenders


# -- trust_remote_code -------------------------------------------------------------------------------
def _remote_code_target(base: Path, dest: Path, marker: Path) -> Path:
    """A copy of a target whose config and tokenizer point at code shipped in the directory; the
    code writes `marker` as soon as it is imported."""
    import shutil

    shutil.copytree(base, dest)
    code = f"open({str(marker)!r}, 'w').write('remote code ran')\n"
    (dest / "configuration_evil.py").write_text(code + "from transformers import LlamaConfig\n"
                                                "class EvilConfig(LlamaConfig):\n    model_type = 'evil_remote'\n")
    (dest / "tokenization_evil.py").write_text(code + "from transformers import PreTrainedTokenizerFast\n"
                                               "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (dest / "modeling_evil.py").write_text(code)
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="evil_remote", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                      "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (dest / "config.json").write_text(json.dumps(config))
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    tok["tokenizer_class"] = "EvilTokenizer"
    (dest / "tokenizer_config.json").write_text(json.dumps(tok))
    return dest


def test_remote_code_target_is_refused_by_default(tiny_target, tmp_path, marker):
    from resources.target_model import TargetModelResource
    from training.targets import load_target

    evil = _remote_code_target(tiny_target, tmp_path / "remote-code-target", marker)
    assert TargetModelResource().trust_remote_code is False
    target = load_target(str(evil), backend="hf", device="cpu")
    assert target.trust_remote_code is False
    for what in ("facts", "tokenizer", "model"):
        with pytest.raises(Exception, match="trust_remote_code|remote code|evil_remote"):
            getattr(target, what)
    with pytest.raises(Exception, match="trust_remote_code|remote code|evil_remote"):
        TargetModelResource(target=str(evil), device="cpu").load().facts


def test_assets_pass_trust_remote_code_from_the_resource(tiny_target, tmp_path, monkeypatch):
    """Turned on in the resource, every from_pretrained call of the token and feature stages gets
    True (the default-off case is checked on the full pipeline above)."""
    from resources.corpus_source import CorpusSourceResource
    from resources.generation_backend import GenerationBackendResource
    from resources.object_store import ArtifactRefIOManager, ObjectStoreResource
    from resources.target_model import TargetModelResource
    from spec_assets.partitions import corpus_shards
    from training.demo.corpus import write_demo_corpus

    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n_shards=1, rows_per_shard=8, seed=5)
    spy = _Spy(monkeypatch)
    store = ObjectStoreResource(root=(tmp_path / "store").as_uri())
    target = TargetModelResource(target=str(tiny_target), trust_remote_code=True, device="cpu")
    resources = {"object_store": store, "artifact_refs": ArtifactRefIOManager(object_store=store),
                 "corpus": CorpusSourceResource(location=str(corpus)), "target": target,
                 "generator": GenerationBackendResource(target=target), "ray_cluster": RayClusterResource()}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(corpus_shards.name, ["demo-00000"])
        from spec_assets.definitions import all_assets

        run_config = {"ops": {"resampled_corpus": {"config": {"resample": False}},
                              "tokenized_shards": {"config": {"max_length": 128}}}}
        result = dg.materialize(all_assets, selection=PER_SHARD, partition_key="demo-00000", instance=instance,
                                resources=resources, run_config=run_config)
        assert result.success
        result = dg.materialize(all_assets, selection=["vocab_map"], instance=instance, resources=resources)
        assert result.success
    names = {name for name, _ in spy.calls}
    assert {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"} <= names, spy.calls
    assert {value for _, value in spy.calls} == {True}, spy.calls


# -- paths ----------------------------------------------------------------------------------------------
ESCAPES = ["../x", "a/../../x", "..", "a/..", "./a", "a/./b", "a\\..\\b", "a/\x00b", "../../../../etc/passwd"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_store_keys_cannot_escape_the_root(kind, tmp_path, request):
    from training.storage import StoreError, artifact_prefix

    store = request.getfixturevalue(f"{kind}_store")
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched")
    for key in ESCAPES:
        for call in (lambda: store.write_bytes(key, b"x"), lambda: store.read_bytes(key), lambda: store.exists(key),
                     lambda: store.open(key, "wb"), lambda: store.list(key), lambda: store.delete(key),
                     lambda: store.manifest(key), lambda: store.artifact(key, "fp"), lambda: store.url(key)):
            with pytest.raises(StoreError, match="escapes the storage root"):
                call()
    # Components of artifact prefixes: asset names, shard (partition) keys, fingerprints.
    for bad in ["..", ".", "a/b", "a\\b", "", "x\x00"]:
        for args in ((bad, "shard", "fp"), ("asset", bad or "..", "fp"), ("asset", None, bad)):
            with pytest.raises(StoreError):
                artifact_prefix(*args)
    # Artifact file names.
    with store.artifact("x/_/fp", "fp") as w:
        for name in ["../escape", "/abs", "a/../../b", "a//b", ""]:
            with pytest.raises(StoreError):
                w.open(name)
            with pytest.raises(StoreError):
                w.write_bytes(name, b"x")
        w.write_bytes("ok/inside.bin", b"fine")
    # Absolute-looking and percent-encoded keys stay inside the root.
    store.write_bytes("/etc/passwd-lookalike", b"inside")
    store.write_bytes("%2e%2e/enc", b"inside")
    assert store.read_bytes("etc/passwd-lookalike") == b"inside"
    if kind == "local":
        root = Path(store.local_path(""))
        for key in ("etc/passwd-lookalike", "%2e%2e/enc", "x/_/fp/manifest.json"):
            assert Path(store.local_path(key)).resolve().is_relative_to(root.resolve())
        assert outside.read_text() == "untouched"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.txt", "store"]


def test_tampered_manifest_cannot_point_outside_the_artifact(local_store, tmp_path):
    from training.storage import StoreError

    with local_store.artifact("draft_model/_/fp", "fp") as w:
        w.write_bytes("export/config.json", b"{}")
    good = local_store.read_json("draft_model/_/fp/manifest.json")
    for tamper in (
        lambda m: m["files"]["export/config.json"].update(path="../../../outside"),
        lambda m: m["files"].update({"export/../../../../tmp/evil": dict(m["files"]["export/config.json"])}),
        lambda m: m["files"].update({"/etc/cron.d/evil": dict(m["files"]["export/config.json"])}),
        lambda m: m["files"]["export/config.json"].update(path="/etc/passwd"),
    ):
        bad = json.loads(json.dumps(good))
        tamper(bad)
        local_store.write_json("draft_model/_/fp/manifest.json", bad)
        with pytest.raises(StoreError, match="corrupt manifest"):
            local_store.manifest("draft_model/_/fp")


def test_shard_keys_from_file_names_are_single_safe_components():
    from training.corpus import CorpusError, shard_key
    from training.storage import safe_component

    for url in ["/data/../../etc/x.jsonl", "s3://b/..%2f..%2fx.jsonl", "/d/a b\\c.jsonl", "/d/.hidden..x.jsonl",
                "/d/....x....json", "/d/\u202eevil.jsonl"]:
        key = shard_key(url)
        assert safe_component(key) == key and "/" not in key and ".." not in key, (url, key)
    with pytest.raises(CorpusError):
        shard_key("/d/...jsonl")


def test_partition_keys_that_climb_are_refused_by_the_assets(tmp_path):
    """Dagster accepts any dynamic partition key; the assets refuse ones that would leave the root."""
    from spec_assets.definitions import all_assets
    from spec_assets.partitions import corpus_shards
    from tests.spec_assets.conftest import make_resources
    from training.demo.corpus import write_demo_corpus

    corpus = tmp_path / "corpus"
    write_demo_corpus(corpus, n_shards=1, rows_per_shard=4, seed=6)
    store_dir = tmp_path / "store"
    from resources.generation_backend import GenerationBackendResource
    from resources.target_model import TargetModelResource

    target = TargetModelResource(target=str(tmp_path / "never-loaded"))
    resources = make_resources(store_dir.as_uri(), str(corpus), target=target,
                               generator=GenerationBackendResource(target=target))
    bad_keys = ["../../escape", "a/../../../b", ".."]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(corpus_shards.name, bad_keys)
        for key in bad_keys:
            for selection in (["source_corpus"], ["resampled_corpus"]):
                result = dg.materialize(all_assets, selection=selection, partition_key=key, instance=instance,
                                        resources=resources, raise_on_error=False,
                                        run_config={"ops": {"resampled_corpus": {"config": {"resample": False}}}}
                                        if selection == ["resampled_corpus"] else None)
                assert not result.success, (key, selection)
                (failure,) = [e for e in result.all_events if e.is_step_failure]
                message = failure.step_failure_data.error.to_string()
                # A climbing key is refused; ".." alone names a harmless file ("_refs/source_corpus/...json").
                assert "escapes the storage root" in message or "has no source file" in message or \
                    (key == ".." and "has not been materialized" in message), message
    outside = [p for p in tmp_path.rglob("*") if not (p.is_relative_to(store_dir) or p.is_relative_to(corpus))
               and p != store_dir and p != corpus]
    assert outside == [], outside
