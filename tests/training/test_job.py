"""TrainJob: the typed job train_main runs, as JSON for torchrun, with the resolved target."""

import pytest

from training.job import TargetSpec, TrainJob
from training.recipe import TrainConfig


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
        TrainJob.from_dict(job.to_dict() | {"target": {"spec": "/x", "kind": "hf"}})
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
    assert vllm == {"trust_remote_code": True, "dtype": "bf16", "chat_template_kwargs": {"enable_thinking": False},
                    "tensor_parallel_size": 2}  # no device argument: vLLM places itself
    hf = TargetSpec("/m", device="auto", dtype="float32").load_kwargs(device="cuda:1")
    assert hf == {"trust_remote_code": False, "dtype": "float32", "device": "cuda:1"}  # each rank its own GPU
    assert TargetSpec("/m", device="cpu").load_kwargs(device="cuda:1")["device"] == "cpu"  # explicit wins
    assert TargetSpec("http://h:8000/v1", backend="openai", model_dir="/m").weights_dir() == "/m"


def test_draft_asset_hands_the_resource_target_to_the_job():
    from resources.target_model import TargetModelResource
    from spec_assets.draft import target_spec

    spec = target_spec(TargetModelResource(target="/models/t", backend="vllm", device="cuda", trust_remote_code=True))
    assert (spec.spec, spec.backend, spec.device, spec.trust_remote_code) == ("/models/t", "vllm", "cuda", True)
    assert spec.chat_template_kwargs is None
    # The chat settings arrive as the dict the field holds (SPECDRAFT_CHAT_TEMPLATE_KWARGS reaches the
    # field through definitions.py).
    on_resource = TargetModelResource(target="/m", chat_template_kwargs='{"enable_thinking": false}')
    assert target_spec(on_resource).chat_template_kwargs == {"enable_thinking": False}
