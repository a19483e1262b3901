"""DraftModelConfig (Dagster) against TrainConfig (the library): one source of training defaults."""

from dataclasses import fields

from spec_assets.draft import DraftModelConfig, training_summary, validation_plot_md
from training.recipe import TrainConfig

ASSET_ONLY = {"mode", "nproc", "warm_start", "export_embed_tokens", "head_init", "draft_intermediate_size",
              "draft_hidden_size", "draft_family", "dflash_layers"}


def test_every_train_field_is_settable_from_dagster_with_the_library_default():
    train = {f.name: f for f in fields(TrainConfig)}
    dagster = DraftModelConfig.model_fields
    assert set(dagster) - ASSET_ONLY == set(train), "DraftModelConfig and TrainConfig name different fields"
    library = TrainConfig()
    for name in train:
        default = dagster[name].default
        want = getattr(library, name)
        assert (tuple(default) if isinstance(default, list) else default) == want, \
            f"DraftModelConfig.{name} defaults to {default!r}, TrainConfig to {want!r}"
    from training.job import TrainJob

    job_default = {f.name: f.default for f in fields(TrainJob)}["export_embed_tokens"]
    assert DraftModelConfig.model_fields["export_embed_tokens"].default is job_default is False
    head_default = {f.name: f.default for f in fields(TrainJob)}["head_init"]
    assert DraftModelConfig.model_fields["head_init"].default == head_default == "target"
    assert DraftModelConfig.model_fields["draft_intermediate_size"].default is None
    assert {f.name: f.default for f in fields(TrainJob)}["draft_intermediate_size"] is None
    # and the values travel: every field set in Dagster reaches the library config
    cfg = DraftModelConfig(lr=1e-3, epochs=3, max_tokens_per_batch=512, validation_rows=7, export_checkpoint="last",
                           betas=[0.8, 0.9])
    tc = cfg.train_config()
    assert (tc.lr, tc.epochs, tc.max_tokens_per_batch, tc.validation_rows, tc.export_checkpoint, tc.betas) == \
        (1e-3, 3, 512, 7, "last", (0.8, 0.9))


def test_training_summary_rounds_and_names_the_best_epoch():
    val = [{"epoch": 0, "step": 10, "loss": 2.123456, "acc": [0.51234, 0.3], "cond_acc": [0.51234, 0.6],
            "simulated_acceptance_length": 1.8212345},
           {"epoch": 1, "step": 20, "loss": 1.9876543, "acc": [0.61234, 0.4], "cond_acc": [0.61234, 0.66],
            "simulated_acceptance_length": 2.0312345, "replayed_acceptance_length": [1.5123456, 1.7345678]}]
    result = {"steps": 20, "tokens_seen": 999, "final_loss": 1.23456789, "simulated_acceptance_length": 2.1234567,
              "wall_seconds": 12.345, "exported_step": 20, "recipe_fields": ["epochs"], "validation": val,
              "acc": [0.6666666, 0.4444444], "cond_acc": [0.6666666, 0.6666666],
              "config": {**TrainConfig(epochs=2, max_tokens_per_batch=1024, lr=3e-3, warmup_ratio=0.05,
                                       validation_rows=4).to_dict()}}
    s = training_summary(result, "offline", 2)
    assert s["final_loss"] == 1.235 and s["heldout_tau"] == 2.031 and isinstance(s["heldout_tau"], float)
    assert s["acc_by_k"][0] == {"k": 0, "train_acc": 0.667, "train_cond_acc": 0.667, "heldout_acc": 0.612,
                                "heldout_cond_acc": 0.612, "heldout_replayed_tau": 1.51}
    assert s["acc_by_k"][1]["heldout_replayed_tau"] == 1.73
    assert s["recipe"]["epochs"] == 2 and s["recipe"]["max_tokens_per_batch"] == 1024
    assert [r["tau"] for r in s["heldout_curve"]] == [1.821, 2.031]
    assert [r["replayed_tau"] for r in s["heldout_curve"]] == [None, 1.735]  # records from before the replay
    assert s["heldout_plot_md"].startswith("![held-out validation per epoch](data:image/png;base64,")
    assert validation_plot_md([]) == ""
