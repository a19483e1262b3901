"""The recipe rule: corpus-sized defaults, explicit values win (the draft vocabulary by coverage: test_vocab.py)."""

import pytest

from training import recipe
from training.recipe import CorpusStats, TrainConfig, resolve


def steps(cfg: TrainConfig, stats: CorpusStats, world: int = 1) -> float:
    return cfg.epochs * stats.tokens / (cfg.max_tokens_per_batch * world * cfg.grad_accum)


def test_small_and_large_corpora_both_get_a_run_of_enough_steps():
    small, large = CorpusStats(tokens=300_000, rows=1_500), CorpusStats(tokens=300_000_000, rows=1_000_000)
    s, big = resolve(TrainConfig(), small), resolve(TrainConfig(), large)
    # the small corpus repeats until the run has seen MIN_TOKENS_SEEN, the large one takes one pass
    assert s.epochs == 7 and s.epochs * small.tokens >= recipe.MIN_TOKENS_SEEN and big.epochs == 1
    # both take at least TARGET_STEPS / 2 optimizer steps (the batch is a power of two)
    assert steps(s, small) >= recipe.TARGET_STEPS / 2 and steps(big, large) >= recipe.TARGET_STEPS / 2
    assert s.max_tokens_per_batch == 512 and big.max_tokens_per_batch == recipe.MAX_BATCH_TOKENS
    assert s.lr == big.lr == recipe.BASE_LR and s.warmup_ratio == recipe.WARMUP_RATIO
    # a held-out slice at every size that can spare one: small corpora overfit first (bench_real_chat)
    assert s.validation_rows == 75 and big.validation_rows == recipe.MAX_VALIDATION_ROWS
    held = {rows: resolve(TrainConfig(), CorpusStats(tokens=5_000, rows=rows)).validation_rows
            for rows in (5, 10, 50, 131, 400)}
    assert held == {5: 0, 10: 1, 50: 5, 131: 8, 400: 20}
    assert s.resolved and big.resolved and not TrainConfig().resolved


def test_data_note_names_the_measured_floor():
    assert recipe.data_note(recipe.MIN_TRAINABLE_TOKENS + 1) is None
    note = recipe.data_note(17_887)
    assert note.startswith("the draft trained on 17,887 trainable tokens") and "replies_per_prompt" in note and "written_prompts" in note


def test_explicit_values_win_and_ranks_share_the_batch():
    stats = CorpusStats(tokens=300_000, rows=1_500)
    cfg = resolve(TrainConfig(epochs=2, lr=1e-4, max_tokens_per_batch=333, warmup_ratio=0.2, validation_rows=0), stats)
    assert (cfg.epochs, cfg.lr, cfg.max_tokens_per_batch, cfg.warmup_ratio, cfg.validation_rows) == (2, 1e-4, 333, 0.2, 0)
    assert recipe.derived_fields(TrainConfig(epochs=2)) == ["max_tokens_per_batch", "lr", "warmup_ratio",
                                                            "validation_rows"]
    # tokens per optimizer step stay the same over 4 ranks x 2 accumulation micro-batches
    one = resolve(TrainConfig(), CorpusStats(tokens=30_000_000, rows=100_000))
    eight = resolve(TrainConfig(grad_accum=2), CorpusStats(tokens=30_000_000, rows=100_000), world_size=4)
    assert one.max_tokens_per_batch == 8 * eight.max_tokens_per_batch
    # resolving twice changes nothing (a resumed run resolves to the stored config)
    assert resolve(one, CorpusStats(tokens=1, rows=1)) == one


def test_wide_drafts_get_a_smaller_lr():
    stats = CorpusStats(tokens=300_000, rows=1_500)
    assert resolve(TrainConfig(), stats, hidden_size=4096).lr == pytest.approx(recipe.BASE_LR / 2)
    assert resolve(TrainConfig(), stats, hidden_size=512).lr == recipe.BASE_LR


def test_empty_corpus_and_bad_fields_are_refused():
    with pytest.raises(ValueError, match="empty corpus"):
        CorpusStats(tokens=0, rows=0)
    with pytest.raises(ValueError, match="export_checkpoint"):
        TrainConfig(export_checkpoint="first")
    with pytest.raises(ValueError, match="validation_rows"):
        TrainConfig(validation_rows=-1)


def test_draft_width_widens_only_targets_narrower_than_the_floor():
    """Real targets keep their own width (the EAGLE-3 convention); a toy one gets the smallest
    power-of-two multiple of its width that reaches MIN_DRAFT_HIDDEN and an MLP of at least
    MIN_DRAFT_INTERMEDIATE (stories260K: 64 wide, 172 MLP)."""
    from training.eagle3.model import DraftConfig

    assert recipe.draft_width(4096, 14336) == (4096, 14336)  # Llama-3-8B
    assert recipe.draft_width(576, 1536) == (576, 1536)  # SmolLM-135M
    assert recipe.draft_width(64, 172) == (256, 2048)
    assert recipe.draft_width(96, 256) == (384, 2048)  # x4, not x3 (a width of 3 H_t is refused)
    assert recipe.draft_width(128, 1024) == (256, 2048) and recipe.draft_width(32, 512) == (256, 4096)
    # explicit widths win; a hidden size alone scales the target's MLP with it
    assert recipe.draft_width(64, 172, 128) == (128, 344) and recipe.draft_width(64, 172, 128, 1376) == (128, 1376)
    assert recipe.draft_width(64, 172, None, 688) == (256, 688) and recipe.draft_width(576, 1536, None, 4096) == (576, 4096)
    # every widened shape is one DraftConfig accepts: whole query heads over the target's KV heads
    for h, heads, kv in ((64, 8, 4), (96, 12, 4), (32, 4, 1), (128, 4, 2)):
        width, inter = recipe.draft_width(h, 4 * h)
        target = {"hidden_size": h, "num_attention_heads": heads, "num_key_value_heads": kv,
                  "num_hidden_layers": 8, "vocab_size": 100, "intermediate_size": 4 * h}
        cfg = DraftConfig.from_target_config(target, 50, intermediate_size=inter, hidden_size=width)
        assert (cfg.hidden_size, cfg.target_hidden_size, cfg.head_dim) == (width, h, h // heads)


def test_the_derived_fields_help_states_the_rule_s_constants():
    """draft_model's Dagster config shows these help texts: they read the constants the rule uses
    (validation_rows once said "none under 200 rows" after the rule went to 10)."""
    from dataclasses import fields

    doc = {f.name: f.metadata["doc"] for f in fields(recipe.TrainConfig)}
    assert f"under {recipe.MIN_ROWS_FOR_VALIDATION} rows" in doc["validation_rows"]
    assert f"at most {recipe.MAX_VALIDATION_ROWS}" in doc["validation_rows"]
    assert f"at most {recipe.MAX_EPOCHS}" in doc["epochs"] and f"{recipe.MIN_TOKENS_SEEN:,}" in doc["epochs"]
    assert f"{recipe.BASE_LR:g}" in doc["lr"] and f"{recipe.WARMUP_RATIO:.0%}" in doc["warmup_ratio"]
    assert f"{recipe.TARGET_STEPS:,}" in doc["max_tokens_per_batch"]
