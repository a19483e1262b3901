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
    # a held-out slice when the corpus can spare one
    assert s.validation_rows == 75 and big.validation_rows == recipe.MAX_VALIDATION_ROWS
    assert resolve(TrainConfig(), CorpusStats(tokens=5_000, rows=50)).validation_rows == 0
    assert s.resolved and big.resolved and not TrainConfig().resolved


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
