"""TrainJob: the typed job train_main runs, as JSON for torchrun, with the resolved target."""

import pytest

from training.job import TrainJob
from training.recipe import TrainConfig
from training.targets.spec import TargetSpec


def _job(**kw):
    base = dict(store_root="file:///tmp/s", run_prefix="runs/x", vocab_map="vocab_map/_/fp",
                target=TargetSpec("/models/t", backend="vllm", dtype="bf16", trust_remote_code=True,
                                  chat_template_kwargs={"enable_thinking": False}, kwargs={"tensor_parallel_size": 2}),
                tokenized=["tokenized_shards/s0/fp/a/data.parquet"], aux_layer_ids=[1, 2, 3],
                train=TrainConfig(lr=1e-3, validation_rows=4))
    return TrainJob(**(base | kw))


def test_json_round_trip_keeps_every_field():
    job = _job()
    again = TrainJob.from_json(job.to_json())
    assert again == job and again.mode == "online" and isinstance(again.train, TrainConfig)
    assert again.target.kwargs == {"tensor_parallel_size": 2} and again.aux_layer_ids == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown TrainJob fields"):
        TrainJob.from_dict(job.to_dict() | {"target_dir": "/x"})
    with pytest.raises(ValueError, match="unknown TargetSpec fields"):
        TrainJob.from_dict(job.to_dict() | {"target": {"path": "/x", "kind": "hf"}})
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainJob.from_dict(job.to_dict() | {"train": {"learning_rate": 1}})


def test_exactly_one_data_source():
    with pytest.raises(ValueError, match="exactly one of hidden_states"):
        _job(hidden_states=["hidden_states/s0/fp"])
    with pytest.raises(ValueError, match="exactly one of hidden_states"):
        _job(tokenized=[])
    assert _job(tokenized=[], hidden_states=["h/s0/fp"]).mode == "offline"


def test_target_spec_carries_the_resource_settings_to_the_backend():
    vllm = _job().target.load_kwargs(device="cuda:1")
    assert vllm == {"trust_remote_code": True, "dtype": "bf16", "device": "auto", "tensor_parallel_size": 2,
                    "chat_template_kwargs": {"enable_thinking": False}}  # device "auto": vLLM places itself
    hf = TargetSpec("/m", device="auto", dtype="float32").load_kwargs(device="cuda:1")
    assert hf == {"trust_remote_code": False, "dtype": "float32", "device": "cuda:1"}  # each rank its own GPU
    assert TargetSpec("/m", device="cpu").load_kwargs(device="cuda:1")["device"] == "cpu"  # explicit wins
    assert TargetSpec("http://h:8000/v1", backend="openai", model_dir="/m").weights_dir() == "/m"


def test_dtype_is_resolved_where_the_spec_is_built():
    assert TargetSpec("/m").resolved(on_cuda=True).dtype == "bfloat16"
    assert TargetSpec("/m").resolved(on_cuda=False).dtype == "float32"
    assert TargetSpec("/m", device="cpu").resolved(on_cuda=True).dtype == "float32"  # the named device decides
    assert TargetSpec("/m", device="cuda:0").resolved(on_cuda=False).dtype == "bfloat16"
    assert TargetSpec("/m", dtype="bf16").resolved(on_cuda=False).dtype == "bfloat16"  # explicit wins, in torch's name
    assert TargetSpec("/m", backend="vllm").resolved(on_cuda=True).dtype == "auto"  # vLLM's own rule
    with pytest.raises(ValueError, match="unknown dtype 'fp12'"):
        TargetSpec("/m", dtype="fp12").resolved()
    # Hashable and equal by value: the resource's load cache and the Ray pools key on it.
    a, b = TargetSpec("/m", chat_template_kwargs={"x": 1}), TargetSpec("/m", chat_template_kwargs={"x": 1})
    assert a == b and hash(a) == hash(b) and len({a, b, TargetSpec("/m")}) == 2


def test_draft_asset_hands_the_resource_target_to_the_job():
    from resources.target_model import TargetModelResource

    spec = TargetModelResource(target="/models/t", backend="vllm", device="cuda", trust_remote_code=True).spec()
    assert (spec.path, spec.backend, spec.device, spec.trust_remote_code) == ("/models/t", "vllm", "cuda", True)
    assert spec.chat_template_kwargs == {}
    cpu = TargetModelResource(target="/m", device="cpu")
    assert cpu.spec().dtype == "float32" and cpu.identity() == TargetModelResource(target="/m").identity()
    bf16 = TargetModelResource(target="/m", device="cpu", dtype="bf16")
    assert bf16.spec().dtype == "bfloat16" and bf16.identity().endswith("+dtype=bfloat16")  # features change
    # The chat settings arrive as the dict the field holds (SPECDRAFT_CHAT_TEMPLATE_KWARGS reaches the
    # field through definitions.py).
    on_resource = TargetModelResource(target="/m", chat_template_kwargs='{"enable_thinking": false}')
    assert on_resource.spec().chat_template_kwargs == {"enable_thinking": False}
    # The job carries the resolved spec through JSON unchanged.
    job = _job(target=on_resource.spec())
    assert TrainJob.from_json(job.to_json()).target == on_resource.spec()
