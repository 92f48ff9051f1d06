"""Fine-tuning against PyTorch: the same batch and loss in torch (transformers, peft, sentence-transformers,
torch.optim.AdamW) on the same random checkpoint files; losses, gradients and updated parameters compared."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import load_model, make_mesh
from qwen3_jax.backend import Backend
from qwen3_jax.reranker import Qwen3Reranker
from qwen3_jax.tokenization import TextTokenizer
from qwen3_jax.train import (ContrastiveExample, LoRAConfig, Objective, OptimizerConfig, TrainStep, add_lora,
                             contrastive_batch, infonce, load_peft_adapter, pointwise_batch)
from qwen3_jax.train.lora import peft_tensors
from qwen3_jax.weights import iter_hf_tensors
from tests.conftest import CORPUS

WORDS = "river mountain history science music city garden winter paper light energy market water".split()


def _texts(seed: int, count: int, low: int = 3, high: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(n))) for n in rng.integers(low, high, count)]


def _string_examples(negatives=(0, 1, 3, 2)):
    """Four queries with 0..3 hard negatives: the batch has queries, positives and negatives of many lengths."""
    docs = iter(_texts(1, 16, 5, 30))
    return [(query, next(docs), [next(docs) for _ in range(k)]) for query, k in zip(_texts(0, 4), negatives)]


def _tokenized(tokenizer: TextTokenizer, examples):
    encode = lambda texts: tokenizer.encode(texts, 1024)
    return [ContrastiveExample(encode([q])[0], encode([p])[0], encode(n)) for q, p, n in examples]


# --- torch side: the loss written again in torch, the models from transformers / peft -------------------

def torch_infonce(q, docs, mask, *, temperature, use_batch=True, include_qq=False, include_dd=False, margin=None):
    """ms-swift's InfoNCE in torch: qd over the batch's documents, optional q-q and positive-d blocks,
    false negatives above positive + margin masked, cross-entropy against each query's positive."""
    import torch
    import torch.nn.functional as F

    num_queries, per_query = mask.shape
    q = F.normalize(q, dim=-1)
    d = F.normalize(docs.reshape(num_queries * per_query, -1), dim=-1)
    valid = mask.reshape(-1)
    rows, target = torch.arange(num_queries), torch.arange(num_queries) * per_query
    owner = torch.arange(num_queries * per_query) // per_query
    qd = q @ d.T
    positive = qd[rows, target]
    threshold = positive.detach()[:, None] + (margin or 0.0)
    keep = valid[None, :] & ((owner[None, :] == rows[:, None]) | use_batch)
    if margin is not None:
        keep &= ~((qd > threshold) & (torch.arange(num_queries * per_query)[None, :] != target[:, None]))
    blocks = [qd.masked_fill(~keep, float("-inf"))]
    if include_qq:
        qq = (q @ q.T).masked_fill(torch.eye(num_queries, dtype=torch.bool), float("-inf"))
        if margin is not None:
            qq = qq.masked_fill(qq > threshold, float("-inf"))
        blocks.append(qq)
    if include_dd:
        dd = d[target] @ d.T
        itself = torch.arange(num_queries * per_query)[None, :] == target[:, None]
        blocks.append(dd.masked_fill(itself | ~valid[None, :], float("-inf")))
    return F.cross_entropy(torch.cat(blocks, dim=1) / temperature, target)


def _torch_last_states(model, token_lists):
    """Each text run alone (no padding) through a transformers model: its last hidden state, with grad."""
    import torch

    return torch.stack([model(input_ids=torch.as_tensor([ids])).last_hidden_state[0, -1] for ids in token_lists])


def _torch_contrastive_loss(model, examples, negatives, **loss_kwargs):
    import torch

    queries = _torch_last_states(model, [e.query for e in examples])
    doc_lists = [[e.positive, *e.negatives[:negatives]] for e in examples]
    states = iter(_torch_last_states(model, [d for docs in doc_lists for d in docs]))
    docs = torch.zeros(len(examples), 1 + negatives, queries.shape[-1])
    mask = torch.zeros(len(examples), 1 + negatives, dtype=torch.bool)
    for q, docs_of_query in enumerate(doc_lists):
        for c in range(len(docs_of_query)):
            docs[q, c], mask[q, c] = next(states), True
    return torch_infonce(queries, docs, mask, **loss_kwargs)


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def _our_grads_by_hf_name(step: TrainStep, grads, prefix: str = "") -> dict[str, np.ndarray]:
    flat = [(path, np.asarray(var.get_value())) for path, var in nnx.to_flat_state(grads)]
    return dict(iter_hf_tensors(flat, step.model(grads).config, prefix=prefix))


# --- the tests --------------------------------------------------------------------------------------------

LOSS_SETTINGS = {
    "in-batch": dict(temperature=0.05),
    "qq dd masked": dict(temperature=0.1, include_qq=True, include_dd=True, false_negative_margin=0.1),
    "own negatives only": dict(temperature=0.02, use_batch=False),
}


@pytest.mark.parametrize("setting", LOSS_SETTINGS)
def test_infonce_and_its_gradient_match_the_torch_loss(setting):
    import torch

    rng = np.random.default_rng(0)
    q, docs = rng.standard_normal((5, 16)).astype(np.float32), rng.standard_normal((5, 4, 16)).astype(np.float32)
    docs[2] = docs[0] + 0.01 * docs[2]             # near-duplicates, so false-negative masking has work to do
    q[3] = q[1] + 0.01 * q[3]                      # (queries too: a q-q term far above any positive)
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    ours = dict(LOSS_SETTINGS[setting])
    theirs = {name: value for name, value in ours.items() if name != "false_negative_margin"}
    theirs["margin"] = ours.get("false_negative_margin")
    (loss, _), grads = jax.value_and_grad(lambda a, b: infonce(a, b, mask, **ours), argnums=(0, 1),
                                          has_aux=True)(q, docs)
    tq, td = torch.tensor(q, requires_grad=True), torch.tensor(docs, requires_grad=True)
    reference = torch_infonce(tq, td, torch.tensor(mask), **theirs)
    reference.backward()
    assert abs(float(loss) - reference.item()) <= 1e-5
    assert _relative_error(np.asarray(grads[0]), tq.grad.numpy()) <= 1e-5
    assert _relative_error(np.asarray(grads[1]) * mask[..., None], td.grad.numpy()) <= 1e-5


def test_infonce_equals_the_published_formula_on_a_case_worked_by_hand():
    """The report's and ms-swift's InfoNCE, L = mean_i -log(exp(s(q_i, d_i+)/t) / Z_i), worked out by hand on
    unit vectors whose cosines are exact (t = 1): Z_1 sums the positive, q1's own negative and the batch's
    other documents; with the 0.1 margin, n2 (cosine 0.96 > 0.8 + 0.1 with q1) leaves Z_1 as a false
    negative. Both our loss and the torch reference of these tests must give it."""
    import math

    import torch

    q = np.array([[1, 0], [0, 1]], np.float32)
    docs = np.array([[[0.8, 0.6], [0.6, 0.8]],               # q1: positive d1, negative n1
                     [[0, 1], [0.96, 0.28]]], np.float32)      # q2: positive d2, negative n2
    mask = np.ones((2, 2), bool)
    # cosines: q1 . (d1, n1, d2, n2) = 0.8, 0.6, 0, 0.96; q2 . (d1, n1, d2, n2) = 0.6, 0.8, 1, 0.28
    e = math.exp
    second = math.log(e(1) + e(0.28) + e(0.6) + e(0.8)) - 1
    in_batch = (math.log(e(0.8) + e(0.6) + e(0) + e(0.96)) - 0.8 + second) / 2
    masked = (math.log(e(0.8) + e(0.6) + e(0)) - 0.8 + second) / 2
    for margin, by_hand in ((None, in_batch), (0.1, masked)):
        ours, _ = infonce(q, docs, mask, temperature=1.0, false_negative_margin=margin)
        reference = torch_infonce(torch.tensor(q), torch.tensor(docs), torch.tensor(mask), temperature=1.0,
                                  margin=margin)
        assert abs(float(ours) - by_hand) <= 1e-6 and abs(reference.item() - by_hand) <= 1e-6, margin


def test_in_batch_infonce_is_sentence_transformers_mnrl():
    """MultipleNegativesRankingLoss(scale=20) is InfoNCE at temperature 1/20 over the batch's documents;
    with directions=("query_to_doc", "query_to_query") it is our include_qq."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rng = np.random.default_rng(1)
    q, docs = rng.standard_normal((6, 32)).astype(np.float32), rng.standard_normal((6, 3, 32)).astype(np.float32)
    mask = np.ones((6, 3), bool)
    for directions, include_qq in ((("query_to_doc",), False), (("query_to_doc", "query_to_query"), True)):
        mnrl = MultipleNegativesRankingLoss(model=None, scale=20.0, directions=directions)
        columns = [torch.tensor(q)] + [torch.tensor(docs[:, c]) for c in range(3)]
        reference = mnrl.compute_loss_from_embeddings(columns, None).item()
        ours, _ = infonce(q, docs, mask, temperature=1 / 20, include_qq=include_qq)
        assert abs(float(ours) - reference) <= 1e-5


@pytest.mark.parametrize("setting", ["in-batch", "qq dd masked"])
def test_full_fine_tuning_gradients_match_torch(checkpoint, setting):
    import torch
    from transformers import AutoModel

    tokenizer = TextTokenizer.from_folder(checkpoint)
    examples = _tokenized(tokenizer, _string_examples())
    kwargs = dict(LOSS_SETTINGS[setting])
    step = TrainStep(load_model(checkpoint), objective=Objective(**kwargs), optimizer=OptimizerConfig())
    batch = step.place(contrastive_batch(examples, negatives=3, pad_id=tokenizer.end_of_text_id))
    (loss, _), grads = jax.jit(step.loss_and_grads)(step.init().trainable, step.frozen, batch, jax.random.PRNGKey(0))

    model = AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager", dtype=torch.float32)
    kwargs["margin"] = kwargs.pop("false_negative_margin", None)
    reference = _torch_contrastive_loss(model, examples, 3, **kwargs)
    reference.backward()
    assert abs(float(loss) - reference.item()) <= 1e-5
    ours = _our_grads_by_hf_name(step, grads)
    theirs = {name: p.grad.numpy() for name, p in model.named_parameters()}
    assert sorted(ours) == sorted(theirs)
    for name, grad in theirs.items():
        assert _relative_error(ours[name], grad) <= 1e-4, name
    assert np.abs(theirs["layers.0.self_attn.q_proj.weight"]).max() > 0


def _peft_model(checkpoint, tmp_path, rank=4, alpha=8.0):
    """transformers + peft with random A and B (neither gradient trivially zero), saved and loaded into ours."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager", dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = load_model(checkpoint)
    config = load_peft_adapter(ours, tmp_path / "adapter")
    assert config.rank == rank and config.scale == alpha / rank
    return peft_model, ours


def _peft_params(peft_model) -> dict:
    """peft's trainable parameters under the names its saved adapters use."""
    return {name.replace(".default", ""): p for name, p in peft_model.named_parameters() if p.requires_grad}


def test_lora_gradients_and_three_adamw_steps_match_peft_and_torch(checkpoint, tmp_path):
    import torch

    tokenizer = TextTokenizer.from_folder(checkpoint)
    examples = _tokenized(tokenizer, _string_examples())
    peft_model, ours = _peft_model(checkpoint, tmp_path)
    optimizer = OptimizerConfig(learning_rate=2e-3, total_steps=4, warmup_steps=1, schedule="linear",
                                weight_decay=0.01, max_grad_norm=1.0)
    step = TrainStep(ours, objective=Objective(temperature=0.05), optimizer=optimizer)
    batch = contrastive_batch(examples, negatives=3, pad_id=tokenizer.end_of_text_id)
    state = step.init()
    (loss, _), grads = jax.jit(step.loss_and_grads)(state.trainable, step.frozen, step.place(batch),
                                                   jax.random.PRNGKey(0))

    params = _peft_params(peft_model)
    reference = _torch_contrastive_loss(peft_model, examples, 3, temperature=0.05)
    reference.backward()
    assert abs(float(loss) - reference.item()) <= 1e-5
    ours_grads = peft_tensors(step.model(grads))
    assert sorted(ours_grads) == sorted(params)
    for name, p in params.items():
        assert np.abs(p.grad.numpy()).max() > 0, name
        assert _relative_error(ours_grads[name], p.grad.numpy()) <= 1e-4, name

    # Three steps of our jitted step against torch.optim.AdamW given the same gradients (ours, at the same
    # parameters): clipping, decay, the schedule and the update must agree to float rounding. (Fed each its
    # own gradients, the two drift apart on elements whose clipped gradient is near Adam's eps = 1e-8,
    # where g / (|g| + eps) turns rounding noise in g into a visible share of a step; the gradients
    # themselves are compared above.)
    torch_opt = torch.optim.AdamW(list(params.values()), lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda s: s / 1 if s < 1 else max(0.0, (4 - s) / 3))
    for _ in range(3):
        _, grads = jax.jit(step.loss_and_grads)(state.trainable, step.frozen, step.place(batch), jax.random.PRNGKey(0))
        state, _ = step(state, batch)
        for name, gradient in peft_tensors(step.model(grads)).items():
            params[name].grad = torch.tensor(gradient)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        torch_opt.step()
        schedule.step()
    updated = peft_tensors(step.model(state.trainable))
    for name, p in params.items():
        assert np.abs(updated[name] - p.detach().numpy()).max() <= 1e-5, name


@pytest.mark.parametrize("spec, x_shape, w_shape", [("BTD,DNH->BTNH", (2, 5, 6), (6, 3, 4)),
                                                     ("BTNH,NHD->BTD", (2, 5, 3, 4), (3, 4, 6))])
def test_lora_folded_into_the_weight_equals_the_adapter_added_apart(spec, x_shape, w_shape):
    """float32 without dropout folds the adapter into the weight (peft parity above tests that path);
    with dropout it is added apart. A dropout that keeps everything makes the two comparable."""
    from qwen3_jax.train.lora import LoRA

    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    inputs = 1 if spec.startswith("BTD") else 2
    x, weight = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
    a = jax.random.normal(keys[2], (*w_shape[:inputs], 3))
    b = jax.random.normal(keys[3], (3, *w_shape[inputs:]))
    cotangent = jax.random.normal(keys[4], (*x_shape[:2], *w_shape[inputs:]))

    def output_and_grads(rng):
        def run(x, weight, a, b):
            return LoRA(a, b, scale=2.0, dropout=1e-12)(spec, x, weight, Backend.resolve(), rng)
        out, pullback = jax.vjp(run, x, weight, a, b)
        return (out, *pullback(cotangent))

    folded, apart = output_and_grads(None), output_and_grads(jax.random.PRNGKey(0))
    for name, one, other in zip(("output", "d_x", "d_weight", "d_a", "d_b"), folded, apart):
        np.testing.assert_allclose(one, other, rtol=1e-5, atol=1e-5, err_msg=name)


def test_reranker_loss_gradients_match_the_causal_lm(reranker_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    reranker = Qwen3Reranker.from_pretrained(reranker_checkpoint)
    pairs = [("What is the capital of China?", CORPUS[0]), ("Explain gravity", CORPUS[0]),
             ("Explain gravity", CORPUS[1]), ("code", CORPUS[7])]
    labels = [1, 0, 1, 0]
    prompts = reranker.prompt_ids(pairs, "Given a web search query, retrieve relevant passages that answer the query")
    step = TrainStep(load_model(reranker_checkpoint, with_lm_head=True),
                     objective=Objective(loss="reranker", answer_ids=(reranker.no_id, reranker.yes_id)),
                     optimizer=OptimizerConfig())
    batch = step.place(pointwise_batch(prompts, labels, pad_id=reranker.tokenizer.end_of_text_id))
    (loss, _), grads = jax.jit(step.loss_and_grads)(step.init().trainable, step.frozen, batch, jax.random.PRNGKey(0))

    model = AutoModelForCausalLM.from_pretrained(str(reranker_checkpoint), attn_implementation="eager",
                                                 dtype=torch.float32)
    logits = torch.stack([model(input_ids=torch.as_tensor([p])).logits[0, -1, [reranker.no_id, reranker.yes_id]]
                          for p in prompts])
    reference = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
    reference.backward()
    assert abs(float(loss) - reference.item()) <= 1e-5
    ours = _our_grads_by_hf_name(step, grads, prefix="model.")
    for name, p in model.named_parameters():
        if p.grad is not None and name in ours:
            assert _relative_error(ours[name], p.grad.numpy()) <= 1e-4, name
    assert "model.layers.1.mlp.down_proj.weight" in ours


def test_gradcache_and_remat_give_the_plain_gradients(checkpoint):
    tokenizer = TextTokenizer.from_folder(checkpoint)
    examples = _tokenized(tokenizer, _string_examples())
    model = add_lora(load_model(checkpoint), LoRAConfig(rank=4, alpha=8), seed=3)
    objective = Objective(temperature=0.05, include_qq=True, false_negative_margin=0.1)
    results = {}
    for mini_batches, remat in [(1, "off"), (3, "full"), (4, "dots")]:
        step = TrainStep(model, objective=objective, optimizer=OptimizerConfig(), mini_batches=mini_batches,
                         remat=remat)
        batch = step.place(contrastive_batch(examples, negatives=3, pad_id=tokenizer.end_of_text_id,
                                             mini_batches=mini_batches))
        assert batch["ids"].shape[0] == mini_batches
        results[mini_batches] = jax.jit(step.loss_and_grads)(step.init().trainable, step.frozen, batch,
                                                             jax.random.PRNGKey(0))
    (plain_loss, _), plain = results[1]
    for mini_batches in (3, 4):
        (loss, _), grads = results[mini_batches]
        assert abs(float(loss - plain_loss)) <= 1e-5
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain)):
            assert float(jnp.abs(a - b).max()) <= 1e-5


def test_sharded_step_equals_the_one_device_step(checkpoint):
    """8 simulated devices (data=4 x model=2, FSDP): the global batch's loss and every gradient, and the
    optimizer state sharded like the parameters."""
    from qwen3_jax.loader import load_model as load

    tokenizer = TextTokenizer.from_folder(checkpoint)
    examples = _tokenized(tokenizer, _string_examples((2, 1, 3, 0)) + _string_examples((1, 0, 2, 3)))
    objective = Objective(temperature=0.05, include_dd=True)
    single = TrainStep(load(checkpoint), objective=objective, optimizer=OptimizerConfig())
    batch = contrastive_batch(examples, negatives=3, pad_id=tokenizer.end_of_text_id)
    (loss, _), grads = jax.jit(single.loss_and_grads)(single.init().trainable, single.frozen, single.place(batch),
                                                      jax.random.PRNGKey(0))
    mesh = make_mesh(data=4, model=2, devices=jax.devices()[:8])
    sharded = TrainStep(load(checkpoint, mesh=mesh, fsdp=True), objective=objective, optimizer=OptimizerConfig(),
                        mesh=mesh)
    mesh_batch = contrastive_batch(examples, negatives=3, pad_id=tokenizer.end_of_text_id, rows_multiple=4)
    state = sharded.init()
    (mesh_loss, _), mesh_grads = jax.jit(sharded.loss_and_grads)(state.trainable, sharded.frozen,
                                                                 sharded.place(mesh_batch), jax.random.PRNGKey(0))
    assert abs(float(loss) - float(mesh_loss)) <= 1e-5
    vocab = single.model(grads).config.vocab_size
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(mesh_grads)):
        b = np.asarray(b)[:vocab] if b.shape[0] > a.shape[0] else np.asarray(b)
        assert _relative_error(b, np.asarray(a)) <= 1e-5
    wq = state.trainable["layers"]["attn"]["wq"].get_value()
    mu = state.opt_state[1][0].mu["layers"]["attn"]["wq"].get_value()
    assert mu.sharding == wq.sharding and wq.addressable_shards[0].data.shape != wq.shape
    new_state, metrics = sharded(state, mesh_batch)
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1


def test_bad_settings_fail_before_anything_compiles(checkpoint):
    model = load_model(checkpoint)
    with pytest.raises(ValueError, match="temperature=0"):
        TrainStep(model, objective=Objective(temperature=0.0), optimizer=OptimizerConfig())
    with pytest.raises(ValueError, match="matryoshka dim 16 is outside 32..64"):
        TrainStep(model, objective=Objective(matryoshka_dims=(64, 16)), optimizer=OptimizerConfig())
    with pytest.raises(ValueError, match="LoRA targets lm_proj do not exist"):
        LoRAConfig(targets=("q_proj", "lm_proj"))
    with pytest.raises(ValueError, match="do not fit together"):
        infonce(np.ones((3, 8)), np.ones((4, 2, 8)), np.ones((4, 2), bool), temperature=0.1)
    with pytest.raises(ValueError, match="GradCache"):
        TrainStep(model, objective=Objective(loss="reranker", answer_ids=(1, 2)), optimizer=OptimizerConfig(),
                  mini_batches=2)
    with pytest.raises(ValueError, match="remat='some'"):
        TrainStep(model, objective=Objective(), optimizer=OptimizerConfig(), remat="some")


def _gradient_working_memory(*, remat: str = "off", layers: int = 4, vocab: int = 256,
                             used_inside: bool = False) -> int:
    """XLA's working memory for the gradient of a tiny model of the 0.6B layout (dense attention, one row
    of 8 texts of 128 tokens); `used_inside` sums the gradients' squares in the program, as an optimizer
    uses them, instead of returning them."""
    from qwen3_jax.config import preset
    from qwen3_jax.model import Qwen3Model

    cfg = preset("0.6B", vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    graphdef, params = nnx.split(Qwen3Model(cfg, attention_impl="dense", rngs=nnx.Rngs(0)))
    ids = jnp.ones((1, 1024), jnp.int32)
    segments = jnp.repeat(jnp.arange(1, 9, dtype=jnp.int32), 128)[None]

    def loss(params):
        return (nnx.merge(graphdef, params)(ids, segments, remat=remat)[:, ::128] ** 2).sum()

    def squared_gradients(params):
        return sum(jnp.vdot(g, g) for g in jax.tree.leaves(jax.grad(loss)(params)))
    program = jax.jit(squared_gradients if used_inside else jax.grad(loss))
    return program.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_remat_keeps_one_layer_of_activations_instead_of_all():
    """XLA's working memory for the gradient of the scanned layers: remat "full" keeps each layer's input
    only, "dots" keeps the projections too; without remat it grows with every layer's activations, with
    "full" by one layer's input per layer."""
    off, full, dots = (_gradient_working_memory(remat=remat) for remat in ("off", "full", "dots"))
    assert full < off / 2.5 and full < dots < off, (off, full, dots)
    deeper_off, deeper_full = (_gradient_working_memory(remat=remat, layers=8) for remat in ("off", "full"))
    layer_input = 1024 * 64 * 4              # 4 layers more: without remat each keeps all it computes
    assert deeper_off - off > 40 * layer_input and deeper_full - full < 5 * layer_input, (off, deeper_off, full,
                                                                                          deeper_full)


def test_remat_dots_except_mlp_keeps_attention_s_products_and_not_the_mlp_s():
    """MaxText's save_dot_except_mlp: remat "dots_except_mlp" keeps attention's projections and recomputes
    the MLP's, so its gradient's working memory lies strictly between "full" (none kept) and "dots" (all
    kept); a policy that kept every projection would equal "dots"."""
    full, except_mlp, dots = (_gradient_working_memory(remat=remat) for remat in ("full", "dots_except_mlp", "dots"))
    assert full < except_mlp < dots, (full, except_mlp, dots)


def test_the_embedding_gradient_is_not_held_through_the_backward_pass():
    """XLA's working memory for full fine-tuning's gradients grows by nothing with the vocabulary while
    the layers' activations set the peak: the embedding table's gradient (zeros, then the tokens' rows
    added) is made once the backward pass reaches it. A plain gather's zeros were allocated as the
    backward pass began, a whole table beside every layer's activations."""
    table = 8192 * 64 * 4
    small, large = (_gradient_working_memory(layers=2, vocab=vocab, used_inside=True) for vocab in (256, 8192))
    assert large - small < table / 4, (small, large, table)


def _stream(tmp_path, count: int, batch_size: int, seed: int):
    import json

    from qwen3_jax.train.data import ExampleStream, JsonlSource

    path = tmp_path / f"lines-{count}.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(count)))
    return ExampleStream(JsonlSource(path, "infonce"), batch_size=batch_size, seed=seed)


@pytest.mark.parametrize("count, batch_size", [(6, 4), (7, 3), (10, 4), (8, 8)])
def test_every_batch_holds_distinct_examples_and_each_epoch_is_one_pass(tmp_path, count, batch_size):
    """6 examples in batches of 4: a batch straddling two epochs still holds 4 different examples (a
    query's own positive is never an in-batch negative), and k epochs use each example k times."""
    stream = _stream(tmp_path, count, batch_size, seed=0)
    steps = 12 * count                                     # positions of 12 * batch_size whole epochs
    flat = [i for step in range(steps) for i in stream.indices(step)]
    assert all(len(set(flat[s * batch_size:(s + 1) * batch_size])) == batch_size for s in range(steps))
    for epochs in range(1, 12 * batch_size + 1):
        assert np.bincount(flat[:epochs * count], minlength=count).tolist() == [epochs] * count


def test_the_order_is_shuffled_per_epoch_and_seed_and_repeats_for_a_seed(tmp_path):
    order = lambda seed, epoch: _stream(tmp_path, 40, 8, seed).epoch_order(epoch).tolist()
    assert order(0, 0) == order(0, 0) and order(3, 2) == order(3, 2)           # a resumed run reads the same
    assert order(0, 0) != sorted(order(0, 0))                                  # shuffled
    assert len({tuple(order(0, epoch)) for epoch in range(4)}) == 4            # afresh every epoch
    assert order(0, 1) != order(1, 0) and order(0, 0) != order(1, 0)           # seeds give other orders


def test_lora_dropout_keeps_the_expected_output():
    """Inverted dropout, as peft's nn.Dropout: at p = 0.5 each input of the adapter is kept with
    probability 0.5 and doubled, so averaged over many keys the output is the output without dropout.
    (Without the 1/(1-p) scale the average falls to W x + 0.5 * the adapter's share.)"""
    from qwen3_jax.train.lora import LoRA

    keys = jax.random.split(jax.random.PRNGKey(7), 5)
    spec = "BTD,DNH->BTNH"
    x, weight = jax.random.normal(keys[0], (2, 5, 6)), jax.random.normal(keys[1], (6, 3, 4))
    a, b = jax.random.normal(keys[2], (6, 3)), jax.random.normal(keys[3], (3, 3, 4))
    plain = LoRA(a, b, scale=2.0, dropout=0.0)(spec, x, weight, Backend.resolve(), None)
    dropped = LoRA(a, b, scale=2.0, dropout=0.5)
    samples = jax.vmap(lambda key: dropped(spec, x, weight, Backend.resolve(), key))(jax.random.split(keys[4], 8000))
    standard_error = np.asarray(samples.std(axis=0)) / np.sqrt(len(samples))
    adapter_share = np.abs(np.asarray(plain - jnp.einsum(spec, x, weight)))
    assert np.all(np.abs(np.asarray(samples.mean(axis=0) - plain)) <= 5 * standard_error + 1e-5)
    assert np.median(adapter_share / standard_error) > 20        # the test could tell a missing scale apart


@pytest.mark.parametrize("lora", [False, True])
def test_a_bf16_step_runs_on_the_cpu_and_its_gradients_follow_float32(checkpoint, lora):
    """bf16 compute (float32 weights) trains on the CPU, whose dot lacks some bf16 products (they take
    float32 operands there): its loss and gradients follow the float32 step's (cosine of all gradients)."""
    tokenizer = TextTokenizer.from_folder(checkpoint)
    examples = _tokenized(tokenizer, _string_examples())
    batch = contrastive_batch(examples, negatives=3, pad_id=tokenizer.end_of_text_id)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(checkpoint, dtype=dtype, param_dtype="float32")
        if lora:
            add_lora(model, LoRAConfig(rank=4, alpha=8.0), seed=1)
        step = TrainStep(model, objective=Objective(temperature=0.05), optimizer=OptimizerConfig(learning_rate=1e-3))
        state = step.init()
        (loss, _), grads = jax.jit(step.loss_and_grads)(state.trainable, step.frozen, step.place(batch),
                                                       jax.random.PRNGKey(0))
        results[dtype] = float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
        state, metrics = step(state, batch)                      # the whole step, AdamW included
        assert np.isfinite(float(metrics["loss"]))
    (loss32, grads32), (loss16, grads16) = results["float32"], results["bfloat16"]
    assert abs(loss16 - loss32) <= 0.05 * abs(loss32)
    assert grads16 @ grads32 / (np.linalg.norm(grads16) * np.linalg.norm(grads32)) >= 0.99
