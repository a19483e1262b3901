"""draft_model's manifest summary: the numbers a person reads in the UI."""

import dagster as dg

from spec_assets.draft import training_summary, validation_plot_md
from spec_assets.metadata import summary_metadata
from training.recipe import TrainConfig


def test_training_summary_names_the_best_epoch_and_the_formatter_rounds_it():
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
    # the summary keeps full precision and names the best epoch (the highest held-out simulated tau) ...
    assert s["final_loss"] == 1.23456789 and s["heldout_tau"] == 2.0312345
    assert s["acc_by_k"][0] == {"k": 0, "train_acc": 0.6666666, "train_cond_acc": 0.6666666, "heldout_acc": 0.61234,
                                "heldout_cond_acc": 0.61234, "heldout_replayed_tau": 1.5123456}
    assert s["recipe"]["epochs"] == 2 and s["recipe"]["max_tokens_per_batch"] == 1024
    assert [r["replayed_tau"] for r in s["heldout_curve"]] == [None, 1.7345678]  # records from before the replay
    # export_checkpoint "last" that exported epoch 0's step: its record, not the best one, describes the draft
    assert training_summary({**result, "exported_step": 10}, "offline", 2)["heldout_tau"] == 1.8212345
    # ... and the one formatter (spec_assets/metadata.py) rounds it for the UI: floats, per-k table, plot
    md = summary_metadata(s)
    assert md["final_loss"] == 1.235 and md["heldout_tau"] == 2.031 and isinstance(md["heldout_tau"], float)
    assert md["train_seconds"] == 12.35
    acc = md["acc_by_k"]
    assert isinstance(acc, dg.TableMetadataValue)
    assert acc.records[0].data == {"k": 0, "train_acc": 0.6667, "train_cond_acc": 0.6667, "heldout_acc": 0.6123,
                                   "heldout_cond_acc": 0.6123, "heldout_replayed_tau": 1.512}
    assert [r.data["tau"] for r in md["heldout_curve"].records] == [1.821, 2.031]
    assert isinstance(md["heldout_plot"], dg.MarkdownMetadataValue)
    assert md["heldout_plot"].value.startswith("![held-out validation per epoch](data:image/png;base64,")
    assert validation_plot_md([]) == ""
