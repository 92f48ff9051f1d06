"""Padding-free batches: computed tokens near the real ones for every length mix, few compiled
programs, and embeddings that do not depend on which texts share a row."""

import numpy as np
import pytest

from qwen3_jax.packing import TOKENS_PER_TEXT, layout_batch, plan_batches, row_length

BUDGET = 32 * TOKENS_PER_TEXT          # encode's default batch_size=32


def _lengths(mix: str, count: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    if mix == "short 5-30":
        return list(rng.integers(5, 31, count))
    if mix == "80-185":
        return list(rng.integers(80, 186, count))
    if mix == "long tail 10-4000":
        return list(np.exp(rng.uniform(np.log(10), np.log(4001), count)).astype(int))
    if mix == "all 512":
        return [512] * count
    if mix == "one 32k among short":
        return [32768] + list(rng.integers(5, 31, count - 1))
    raise ValueError(mix)


MIXES = ["short 5-30", "80-185", "long tail 10-4000", "all 512", "one 32k among short"]


def _check_plan(lengths, batches):
    placed = sorted(i for b in batches for row in b.rows for i in row)
    assert placed == list(range(len(lengths)))                        # every text exactly once
    for b in batches:
        assert len(b.rows) <= b.num_rows
        for row in b.rows:
            assert sum(lengths[i] for i in row) <= b.length and len(row) <= b.slots


def _ratio(lengths, batches):
    return sum(b.computed_tokens for b in batches) / sum(lengths)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("count", [32, 100])
def test_single_calls_compute_within_ten_percent_of_their_tokens(mix, count):
    for seed in range(5):
        lengths = _lengths(mix, count, seed)
        batches = plan_batches(lengths, token_budget=BUDGET)
        _check_plan(lengths, batches)
        assert _ratio(lengths, batches) <= 1.10, (mix, seed)
        assert len({(b.num_rows, b.length, b.slots) for b in batches}) <= 2


@pytest.mark.parametrize("count,bound", [(1000, 12), (10_000, 12), (100_000, 12)])
def test_streams_of_many_lengths_compile_few_programs(count, bound):
    for seed in range(2):
        lengths = list(np.random.default_rng(seed).integers(1, 2001, count))
        batches = plan_batches(lengths, token_budget=BUDGET)
        _check_plan(lengths, batches)
        assert len({(b.num_rows, b.length, b.slots) for b in batches}) <= bound
        assert _ratio(lengths, batches) <= 1.02


def test_tiny_texts_get_enough_output_slots():
    """Texts of one or two tokens (an empty document is one) still fill their rows: a row has as many
    output slots as it can hold texts."""
    lengths = [1] * 10_000 + [2] * 10_000
    batches = plan_batches(lengths, token_budget=BUDGET)
    _check_plan(lengths, batches)
    assert max(len(row) for b in batches for row in b.rows) > BUDGET // 4
    assert _ratio(lengths, batches) <= 1.07


def test_row_lengths_pad_at_most_a_sixteenth():
    assert all(0 <= row_length(n) - n < max(16, n / 16) for n in range(1, 70_000))
    assert len({row_length(n) for n in range(1025, 2049)}) == 16          # 16 lengths per power of two


def test_a_mesh_gets_one_row_per_data_shard_and_short_rows_where_the_kernel_needs_them():
    lengths = _lengths("80-185", 64)
    for b in plan_batches(lengths, token_budget=BUDGET, rows_multiple=8):
        assert b.num_rows % 8 == 0
    capped = plan_batches(lengths, token_budget=BUDGET, row_limit=2048)
    _check_plan(lengths, capped)
    assert all(b.length <= 2048 for b in capped) and _ratio(lengths, capped) <= 1.10
    unpacked = plan_batches(lengths, token_budget=BUDGET, pack=False)
    _check_plan(lengths, unpacked)
    assert all(len(row) == 1 for b in unpacked for row in b.rows)


@pytest.mark.parametrize("pack", [True, False])
def test_a_long_tail_compiles_few_programs_packed_or_one_text_a_row(pack):
    """The accelerator bench's long tail (512 texts, batch 64) and 10,000 texts of 1..4,000 tokens: packed
    rows (the CPU's and the GPU's Pallas kernel) take 2 programs each; cuDNN's one text a row, on coarse
    lengths, at most 12 (16 for 512 texts when each batch took its fine length)."""
    budget = 64 * TOKENS_PER_TEXT
    for lengths, packed_ratio in ((_lengths("long tail 10-4000", 512), 1.02),
                                  (list(np.random.default_rng(0).integers(1, 4001, 10_000)), 1.02)):
        batches = plan_batches(lengths, token_budget=budget, pack=pack)
        _check_plan(lengths, batches)
        programs = len({(b.num_rows, b.length, b.slots) for b in batches})
        assert programs <= (2 if pack else 12), programs
        if pack:
            assert _ratio(lengths, batches) <= packed_ratio


def test_fixed_shapes_hold_every_batch_the_server_forms():
    """The server compiles `fixed_shapes` before it listens: every batch of any mix must be one of them."""
    from qwen3_jax.packing import fixed_shapes

    rng = np.random.default_rng(0)
    for budget in (512, 2048, 16384):
        for longest in (100, 4000, 40000):
            shapes = set(fixed_shapes(budget, max_text_tokens=longest))
            assert len(shapes) <= 24
            for _ in range(20):
                lengths = list(rng.integers(1, longest + 1, int(rng.integers(1, 200))))
                batches = plan_batches(lengths, token_budget=budget, fixed=True)
                _check_plan(lengths, batches)
                assert {(b.num_rows, b.length, b.slots) for b in batches} <= shapes


def test_rows_are_laid_out_with_segments_and_ends():
    texts = [[5, 6, 7], [8, 9], [1]]
    batch = plan_batches([3, 2, 1], token_budget=512)[0]
    for side in ("right", "left"):
        ids, segments, ends = layout_batch(batch, texts, pad_id=0, side=side)
        for r, row in enumerate(batch.rows):
            for slot, i in enumerate(row):
                end = ends[r, slot]
                assert ids[r, end] == texts[i][-1] and segments[r, end] == slot + 1
                assert (segments[r] == slot + 1).sum() == len(texts[i])
        assert (segments > 0).sum() == 6 and batch.computed_tokens == 16
        assert (segments[0, :6] > 0).all() if side == "right" else (segments[0, -6:] > 0).all()


def _transformers_last_states(folder, rows):
    """The last hidden state of each text, run alone (no padding at all) through transformers."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        return np.stack([model(input_ids=torch.as_tensor([row])).last_hidden_state[0, -1].numpy() for row in rows])


def _normalized(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("mix", MIXES)
def test_each_mix_embeds_as_each_text_alone(checkpoint, embedder, mix):
    """Packed rows through the runner against each text run alone through transformers (fp32)."""
    lengths = _lengths(mix, 12, seed=1)
    if mix == "one 32k among short":
        lengths[0] = 3000           # a 32k text through torch's eager attention takes minutes here
    rng = np.random.default_rng(2)
    rows = [list(rng.integers(0, embedder.config.vocab_size, n)) for n in lengths]
    before = embedder.tokens_computed
    ours = embedder.runner(rows, batch_size=2)
    assert embedder.tokens_computed - before <= 1.10 * sum(lengths)
    reference = _transformers_last_states(checkpoint, rows)
    assert np.abs(_normalized(ours) - _normalized(reference)).max() <= 1e-5


def test_encode_packs_texts_and_counts_what_it_compiled(checkpoint):
    """Through the public encode: several texts share a row, the computed tokens stay near the real
    ones, and every new batch shape is one compiled program (a fresh model compiles at least one)."""
    from qwen3_jax import Qwen3Embedder

    model = Qwen3Embedder.from_pretrained(checkpoint)
    texts = [" ".join([f"w{n}"] + ["word"] * n) for n in range(1, 200, 3)]      # no prefix to share
    real = sum(len(r) for r in model.tokenizer.encode(texts, model.max_length))
    model.encode(texts, batch_size=8)
    first = model.compiled_programs
    assert first >= 1
    assert model.tokens_embedded == real
    assert real <= model.tokens_computed <= 1.10 * real
    model.encode(texts, batch_size=8)
    assert model.compiled_programs == first                       # the same shapes again: no compile
    model.encode(texts[::2], batch_size=8)
    assert model.compiled_programs <= first + 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cpu_runs_a_layer_at_a_time_over_views_of_the_stacked_weights(checkpoint, dtype):
    """On one CPU device the runner calls one compiled layer per layer (a scanned layer's weights are
    copied out of the stacks by XLA's CPU compiler before each product): the same numbers as the
    scanned pass, bit for bit, from views that share the stacks' memory, after `use` as well."""
    import jax
    from flax import nnx

    from qwen3_jax import load_model
    from qwen3_jax.runner import LastTokenRunner

    model = load_model(checkpoint, dtype=dtype)
    layered, scanned = LastTokenRunner(model, pad_id=0), LastTokenRunner(model, pad_id=0, layer_by_layer=False)
    assert model.config.num_hidden_layers >= 2
    rng = np.random.default_rng(3)
    rows = [list(rng.integers(3, model.config.vocab_size, n)) for n in [1, 9, 40, 130, 7, 300, 2]]
    assert np.array_equal(layered(rows, batch_size=1), scanned(rows, batch_size=1))
    layered.compile([(1, 16, 1)])                       # ahead of time, as the server compiles
    compiled = layered.compiled_programs
    assert np.array_equal(layered(rows[1:2], batch_size=1), scanned(rows[1:2], batch_size=1))
    assert layered.compiled_programs == compiled
    for stack, *views in zip(jax.tree.leaves(nnx.state(model.layers)),
                             *[jax.tree.leaves(layer) for layer in layered._layered._layers]):
        assert [v.unsafe_buffer_pointer() for v in views] == [stack.unsafe_buffer_pointer() + i * views[0].nbytes
                                                              for i in range(len(views))]
    other = load_model(checkpoint, dtype=dtype)
    nnx.update(other, jax.tree.map(lambda a: a * 0.5, nnx.state(other)))
    layered.use(other)
    scanned.use(other)
    assert np.array_equal(layered(rows, batch_size=1), scanned(rows, batch_size=1))
    assert not np.array_equal(layered(rows, batch_size=1), LastTokenRunner(model, pad_id=0)(rows, batch_size=1))
