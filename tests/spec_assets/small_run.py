"""The small run config the end-to-end tests share: tiny generation, 2 training steps, and a
quality gate above the k+1 = 3 ceiling, so it fails whatever the draft (released_draft is skipped)."""

SMALL = {
    "ops": {
        "source_corpus": {"config": {"heldout_fraction": 0.2}},
        "resampled_corpus": {"config": {"max_new_tokens": 8, "batch_size": 16}},
        "tokenized_shards": {"config": {"max_length": 128}},
        "draft_model": {"config": {"epochs": 1, "max_steps": 2, "ttt_length": 2, "max_tokens_per_batch": 1024}},
        "eval_report": {"config": {"ks": [1, 2], "temperatures": [0.0], "max_new_tokens": 4, "max_prompts": 2,
                                   "gate_k": 2, "min_tau": 4.0, "served": False}},
    }
}
