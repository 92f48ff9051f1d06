"""Packing texts into rows: few compiled programs, little padding, results independent of layout."""

import numpy as np

from qwen3_jax.pooling import TOKENS_PER_TEXT, layout_batch, plan_batches


def _check_plan(lengths, batches):
    placed = sorted(i for b in batches for row in b.rows for i in row)
    assert placed == list(range(len(lengths)))
    for b in batches:
        assert len(b.rows) <= b.num_rows
        for row in b.rows:
            assert sum(lengths[i] for i in row) <= b.length and len(row) <= b.slots


def test_a_thousand_texts_compile_few_programs_and_pad_little():
    for seed in range(3):
        lengths = list(np.random.default_rng(seed).integers(1, 2001, 1000))
        batches = plan_batches(lengths, token_budget=32 * TOKENS_PER_TEXT, max_length=32768)
        _check_plan(lengths, batches)
        shapes = {(b.num_rows, b.length) for b in batches}
        padded = sum(b.num_rows * b.length for b in batches)
        assert len(shapes) <= 12
        assert padded <= 1.15 * sum(lengths)


def test_short_texts_share_rows():
    lengths = [100] * 20 + [30] * 20
    batches = plan_batches(lengths, token_budget=32 * TOKENS_PER_TEXT, max_length=8192)
    _check_plan(lengths, batches)
    assert sum(b.num_rows * b.length for b in batches) <= 1.25 * sum(lengths)
    assert max(len(row) for b in batches for row in b.rows) > 1


def test_rows_are_laid_out_with_segments_and_ends():
    texts = [[5, 6, 7], [8, 9], [1]]
    batch = plan_batches([3, 2, 1], token_budget=512, max_length=512)[0]
    ids, segments, ends = layout_batch(batch, texts, pad_id=0)
    for r, row in enumerate(batch.rows):
        for slot, i in enumerate(row):
            end = ends[r, slot]
            assert ids[r, end] == texts[i][-1] and segments[r, end] == slot + 1
            assert (segments[r] == slot + 1).sum() == len(texts[i])
    assert (segments > 0).sum() == 6 and batch.num_rows * batch.length <= 64


def test_data_parallel_rows_are_a_multiple_of_the_shards():
    batches = plan_batches([7] * 5, token_budget=512, max_length=512, multiple=8)
    assert all(b.num_rows % 8 == 0 for b in batches)


def test_real_encode_compiles_what_was_planned(embedder):
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(10, 300, n)) for n in rng.integers(1, 600, 200)]
    before = embedder.compiled_programs
    pooled = embedder.runner(rows, batch_size=8, max_length=1024)
    planned = {(b.num_rows, b.length) for b in plan_batches([len(r) for r in rows], token_budget=8 * TOKENS_PER_TEXT,
                                                             max_length=1024)}
    assert embedder.compiled_programs - before <= len(planned)
    alone = np.concatenate([embedder.runner([r], batch_size=1, max_length=1024) for r in rows[:5]])
    assert np.abs(pooled[:5] - alone).max() <= 1e-5
