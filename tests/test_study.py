"""The study toolkit against transformers with torch forward hooks, on the same random checkpoints:
every cache entry, each intervention, the lenses; the hooked pass against Qwen3Model; meshes, long texts,
the pictures."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder, load_model, make_mesh
from qwen3_jax.checks import UsageError
from qwen3_jax.study import (HookedQwen3, ablate_heads, ablate_neurons, layer_cosines, layer_scores, logit_lens,
                             patching_sweep, steer, yes_no_margins)

from tests.conftest import CORPUS

TEXTS = ["The capital of China is Beijing.", "Explain gravity", CORPUS[4]]
PAIRS = [("What is the capital of China?", CORPUS[0]), ("Explain gravity", CORPUS[1])]


@pytest.fixture(scope="module")
def hooked(embedder):
    return HookedQwen3.from_loaded(embedder)


@pytest.fixture(scope="module")
def hooked_reranker(reranker_folder):
    return HookedQwen3.from_pretrained(reranker_folder, reranker=True)


@pytest.fixture(scope="module")
def torch_embedder(checkpoint):
    return _torch_model(checkpoint, causal_lm=False)


@pytest.fixture(scope="module")
def torch_reranker(reranker_folder):
    return _torch_model(reranker_folder, causal_lm=True)


def _torch_model(folder, causal_lm):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    kind = AutoModelForCausalLM if causal_lm else AutoModel
    return kind.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()


def _decoder(model):
    return getattr(model, "model", model)


def _torch_run(model, tokens, edits=()):
    """(TransformerLens-named activations recorded by torch hooks, readout) of transformers on `tokens`;
    `edits` are (module, pre_hook) pairs registered for the run (interventions)."""
    import torch
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    decoder, acts, handles = _decoder(model), {}, []
    to_np = lambda t: t.detach().float().numpy()

    def keep(name, reshape=None):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            acts[name] = to_np(out if reshape is None else reshape(out))
        return hook

    def keep_input(name, reshape=None):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            acts[name] = to_np(x if reshape is None else reshape(x))
        return hook

    heads = lambda x: x.reshape(*x.shape[:2], -1, model.config.head_dim)
    handles.append(decoder.embed_tokens.register_forward_hook(keep("hook_embed")))
    for module, hook in edits:
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for l, layer in enumerate(decoder.layers):
        at, attn, mlp = f"blocks.{l}.", layer.self_attn, layer.mlp
        handles += [
            layer.register_forward_pre_hook(keep_input(at + "hook_resid_pre"), with_kwargs=True),
            attn.register_forward_pre_hook(lambda m, a, kw, at=at: acts.__setitem__(at + "rotary",
                                                                                    kw["position_embeddings"]),
                                           with_kwargs=True),
            attn.q_norm.register_forward_hook(lambda m, a, out, at=at: acts.__setitem__(at + "q_normed", out)),
            attn.k_norm.register_forward_hook(lambda m, a, out, at=at: acts.__setitem__(at + "k_normed", out)),
            attn.v_proj.register_forward_hook(keep(at + "attn.hook_v", heads)),
            attn.register_forward_hook(lambda m, a, out, at=at: acts.__setitem__(at + "attn.hook_pattern",
                                                                                 to_np(out[1]))),
            attn.o_proj.register_forward_pre_hook(keep_input(at + "attn.hook_z", heads), with_kwargs=True),
            attn.register_forward_hook(keep(at + "hook_attn_out")),
            layer.post_attention_layernorm.register_forward_pre_hook(keep_input(at + "hook_resid_mid"),
                                                                     with_kwargs=True),
            mlp.gate_proj.register_forward_hook(keep(at + "mlp.hook_pre")),
            mlp.up_proj.register_forward_hook(keep(at + "mlp.hook_pre_linear")),
            mlp.down_proj.register_forward_pre_hook(keep_input(at + "mlp.hook_post"), with_kwargs=True),
            mlp.register_forward_hook(keep(at + "hook_mlp_out")),
            layer.register_forward_hook(keep(at + "hook_resid_post")),
        ]
    handles.append(decoder.norm.register_forward_hook(keep("ln_final.hook_normalized")))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(tokens.ids, dtype=torch.long),
                        attention_mask=torch.as_tensor(tokens.mask, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    for l in range(len(decoder.layers)):                # q, k after the norms and transformers' own rotary
        at = f"blocks.{l}."
        cos, sin = acts.pop(at + "rotary")
        q, k = apply_rotary_pos_emb(acts.pop(at + "q_normed").transpose(1, 2), acts.pop(at + "k_normed").transpose(1, 2),
                                    cos, sin)
        acts[at + "attn.hook_q"], acts[at + "attn.hook_k"] = to_np(q.transpose(1, 2)), to_np(k.transpose(1, 2))
    last = tokens.mask.sum(axis=1) - 1
    rows = np.arange(len(last))
    if hasattr(out, "logits"):
        return acts, to_np(out.logits)[rows, last]    # [B, V] at each input's last token
    final = to_np(out.last_hidden_state)[rows, last]
    return acts, final / np.linalg.norm(final, axis=-1, keepdims=True)


def _margin(logits, hooked_reranker):
    no, yes = hooked_reranker.answers
    return logits[:, yes] - logits[:, no]


def _compare(ours, theirs, mask, name):
    """Max abs difference at real tokens (real query rows of a pattern; its padded keys are zero on both sides)."""
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, f"{name}: {ours.shape} against {theirs.shape}"
    if name.endswith("hook_pattern"):
        ours, theirs = np.moveaxis(ours, 1, 2)[mask], np.moveaxis(theirs, 1, 2)[mask]
    else:
        ours, theirs = ours[mask], theirs[mask]
    return np.abs(ours - theirs).max()


def _assert_all_match(cache, reference):
    assert set(cache) == set(reference)
    for name, theirs in reference.items():
        limit = 1e-5 if name.endswith("hook_pattern") else 1e-4
        assert _compare(cache[name], theirs, cache.mask, name) <= limit, name


def test_every_cache_entry_matches_transformers(hooked, torch_embedder):
    """Texts of different lengths in one batch: every hook point's activation at the real tokens."""
    out, cache = hooked.run_with_cache(TEXTS)
    reference, final = _torch_run(torch_embedder, hooked.to_tokens(TEXTS))
    assert len(cache) == len(hooked.hook_names) == 2 + 13 * hooked.cfg.num_hidden_layers
    _assert_all_match(cache, reference)
    assert cache["pattern", 1].shape == (3, hooked.cfg.num_attention_heads, *cache.mask.shape[1:] * 2)
    assert np.abs(np.asarray(out) - final).max() <= 1e-4


def test_reranker_cache_and_margin_match_transformers(hooked_reranker, torch_reranker):
    margin, cache = hooked_reranker.run_with_cache(PAIRS)
    reference, logits = _torch_run(torch_reranker, hooked_reranker.to_tokens(PAIRS))
    _assert_all_match(cache, reference)
    assert np.abs(np.asarray(margin) - _margin(logits, hooked_reranker)).max() <= 1e-4


def test_hooked_pass_equals_the_model_and_encode(hooked, embedder, checkpoint):
    """The final states equal Qwen3Model's forward pass; the readout equals Qwen3Embedder.encode."""
    tokens = hooked.to_tokens(TEXTS)
    out, cache = hooked.run_with_cache(TEXTS, names_filter="ln_final.hook_normalized")
    model = load_model(checkpoint)
    states = np.asarray(model(jnp.asarray(tokens.ids), jnp.asarray(tokens.mask)))
    assert np.abs(np.asarray(cache["ln_final.hook_normalized"])[tokens.mask] - states[tokens.mask]).max() <= 1e-5
    assert np.abs(np.asarray(out) - embedder.encode(TEXTS)).max() <= 1e-5
    assert list(cache) == ["ln_final.hook_normalized"]


def _torch_edit(fn):
    """A forward pre-hook that replaces a module's first input x by fn(x)."""
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return hook


def _torch_ablation(index, how, mask, split=None):
    """Entries `index` of the last axis (of heads, when `split` is the head dim) zeroed or set to their
    mean over the real tokens, as TransformerLens' ablations do."""
    import torch

    real = torch.as_tensor(mask)

    def fn(x):
        y = x.reshape(*x.shape[:2], -1, split) if split else x.clone()
        y = y.clone()
        y[:, :, list(index)] = 0.0 if how == "zero" else y[real].mean(dim=0)[list(index)]
        return y.reshape(x.shape)
    return fn


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_head_and_neuron_ablations_match_transformers(hooked, torch_embedder, how):
    tokens = hooked.to_tokens(TEXTS)
    heads, neurons = [(0, 1), (1, 0), (1, 3)], [(0, 5), (0, 77), (1, 127)]
    ours = hooked.run_with_hooks(TEXTS, fwd_hooks=ablate_heads(hooked, heads, how) + ablate_neurons(hooked, neurons, how))
    layers = torch_embedder.layers
    edits = [(layers[l].self_attn.o_proj, _torch_ablation([h], how, tokens.mask, hooked.cfg.head_dim)) for l, h in heads]
    edits += [(layers[l].mlp.down_proj, _torch_ablation([i], how, tokens.mask)) for l, i in neurons]
    _, theirs = _torch_run(torch_embedder, tokens, [(module, _torch_edit(fn)) for module, fn in edits])
    _, plain = _torch_run(torch_embedder, tokens)
    assert np.abs(theirs - plain).max() > 1e-3                   # the ablations change the embeddings
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4


def test_steering_matches_transformers(hooked, torch_embedder):
    import torch

    vector = np.random.default_rng(0).normal(size=hooked.cfg.hidden_size).astype(np.float32)
    ours = hooked.run_with_hooks(TEXTS, fwd_hooks=steer(hooked, 1, vector, scale=0.5))
    edit = _torch_edit(lambda x: x + 0.5 * torch.as_tensor(vector))
    _, theirs = _torch_run(torch_embedder, hooked.to_tokens(TEXTS), [(torch_embedder.layers[1], edit)])
    assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4
    assert np.abs(np.asarray(ours) - np.asarray(hooked(TEXTS))).max() > 1e-3


def _corrupted_pair(model, text):
    clean = [int(i) for i in model.to_tokens(text).ids[0]]
    corrupted = list(clean)
    corrupted[2] = clean[3]                                    # one token changed, the same length
    return clean, corrupted


def _torch_patching(model, clean, corrupted, metric):
    """metric [L, T] of transformers' corrupted runs with the clean run's layer input at one position."""
    import torch

    tokens = lambda ids: type("T", (), {"ids": np.array([ids]), "mask": np.ones((1, len(ids)), bool)})
    clean_acts, _ = _torch_run(model, tokens(clean))
    layers = _decoder(model).layers
    grid = np.zeros((len(layers), len(clean)))
    for l, layer in enumerate(layers):
        for p in range(len(clean)):
            def put(x, l=l, p=p):
                x = x.clone()
                x[:, p] = torch.as_tensor(clean_acts[f"blocks.{l}.hook_resid_pre"][:, p])
                return x
            grid[l, p] = metric(_torch_run(model, tokens(corrupted), [(layer, _torch_edit(put))])[1])
    return grid


def test_patching_sweep_matches_transformers(hooked, torch_embedder):
    clean, corrupted = _corrupted_pair(hooked, TEXTS[0])
    ours = patching_sweep(hooked, clean, corrupted)
    clean_vector = np.asarray(hooked([clean]))[0]
    theirs = _torch_patching(torch_embedder, clean, corrupted, lambda out: out[0] @ clean_vector)
    assert ours.shape == (hooked.cfg.num_hidden_layers, len(clean))
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours[0, 2] - 1.0) <= 1e-5 and ours[0, 0] < 0.9999  # patching the changed token restores it


def test_hooks_key_the_compiled_program(hooked):
    """A hooked trace is never reused for an unhooked call, nor the other way round; the same hook
    function runs again without compiling."""
    zero = lambda x, hook: jnp.zeros_like(x)
    plain = np.asarray(hooked(TEXTS[:2]))
    before = hooked._run._cache_size()
    hooked_out = np.asarray(hooked.run_with_hooks(TEXTS[:2], fwd_hooks=[("blocks.1.hook_mlp_out", zero)]))
    assert np.abs(hooked_out - plain).max() > 1e-3
    assert np.array_equal(np.asarray(hooked(TEXTS[:2])), plain)
    assert np.array_equal(np.asarray(hooked.run_with_hooks(TEXTS[:2], fwd_hooks=[("blocks.1.hook_mlp_out", zero)])),
                          hooked_out)
    assert hooked._run._cache_size() == before + 1


def _torch_layer_states(model, tokens):
    """Each decoder layer's output at each input's last token through transformers' final norm, [B, L, D]."""
    import torch

    acts, _ = _torch_run(model, tokens)
    decoder, last = _decoder(model), tokens.mask.sum(axis=1) - 1
    with torch.no_grad():
        return np.stack([decoder.norm(torch.as_tensor(acts[f"blocks.{l}.hook_resid_post"])).numpy()[np.arange(len(last)), last]
                         for l in range(len(decoder.layers))], axis=1)


def test_logit_lens_matches_transformers(hooked, torch_embedder):
    import torch

    lens = logit_lens(hooked, TEXTS, top_k=3)
    acts, _ = _torch_run(torch_embedder, hooked.to_tokens(TEXTS))
    table = torch_embedder.embed_tokens.weight                   # tied: an embedding model has no LM head
    for l in range(hooked.cfg.num_hidden_layers):
        with torch.no_grad():
            logits = torch_embedder.norm(torch.as_tensor(acts[f"blocks.{l}.hook_resid_post"])) @ table.T
        best, ids = logits.topk(3, dim=-1)
        mask = lens.mask
        assert np.array_equal(lens.ids[:, l][mask], ids.numpy()[mask]), f"layer {l}"
        assert np.abs(lens.logits[:, l][mask] - best.numpy()[mask]).max() <= 1e-4
        probs = torch.gather(logits.softmax(-1), -1, ids).numpy()
        assert np.abs(lens.probs[:, l][mask] - probs[mask]).max() <= 1e-5


def test_reranker_margin_per_layer_matches_transformers(hooked_reranker, torch_reranker):
    margins = yes_no_margins(hooked_reranker, PAIRS)
    states = _torch_layer_states(torch_reranker, hooked_reranker.to_tokens(PAIRS))
    no, yes = hooked_reranker.answers
    head = torch_reranker.lm_head.weight.detach().numpy()
    assert np.abs(margins - states @ (head[yes] - head[no])).max() <= 1e-4
    assert np.abs(margins[:, -1] - np.asarray(hooked_reranker(PAIRS))).max() <= 1e-5


def test_embedder_layer_cosines_and_scores_match_transformers(hooked, torch_embedder):
    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    queries, documents = TEXTS[1:], CORPUS[:2]
    normed = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = normed(_torch_layer_states(torch_embedder, hooked.to_tokens(queries, instruction=instruction)))
    d = normed(_torch_layer_states(torch_embedder, hooked.to_tokens(documents)))
    cosines = layer_cosines(hooked, documents)
    assert np.abs(cosines - np.einsum("BLD,BD->BL", d, d[:, -1])).max() <= 1e-4
    assert np.abs(cosines[:, -1] - 1).max() <= 1e-5
    scores = layer_scores(hooked, queries, documents, instruction=instruction)
    assert np.abs(scores - np.einsum("QLD,SLD->LQS", q, d)).max() <= 1e-4
    assert np.abs(scores[-1] - Qwen3Embedder.similarity(np.asarray(hooked(queries, instruction=instruction)),
                                                         np.asarray(hooked(documents)))).max() <= 1e-5


def test_a_pattern_window_of_a_long_text(hooked, torch_embedder):
    """pattern_window keeps the chosen query rows (equal to transformers'), changes nothing else, and the
    compiled program of a 2,048-token text needs less memory than one head's whole pattern."""
    from tests.conftest import long_text

    text = [long_text(120)]
    tokens = hooked.to_tokens(text)
    length = tokens.ids.shape[1]
    names = ["blocks.1.attn.hook_pattern", "ln_final.hook_normalized"]
    out, cache = hooked.run_with_cache(text, names_filter=names, pattern_window=(length - 5, length))
    reference, final = _torch_run(torch_embedder, tokens)
    assert cache["pattern", 1].shape == (1, hooked.cfg.num_attention_heads, 5, length)
    assert np.abs(np.asarray(cache["pattern", 1]) - reference["blocks.1.attn.hook_pattern"][:, :, -5:]).max() <= 1e-5
    assert np.abs(np.asarray(out) - final).max() <= 1e-4
    with pytest.raises(UsageError, match="whole pattern"):
        hooked.run_with_cache(text, fwd_hooks=[(names[0], lambda x, hook: x)], pattern_window=(0, 4))
    with pytest.raises(UsageError, match="pattern_window"):
        hooked.run_with_cache(text, pattern_window=(5, length + 1))
    long = 2048
    ids, mask = jax.ShapeDtypeStruct((1, long), jnp.int32), jax.ShapeDtypeStruct((1, long), jnp.bool_)
    patterns = frozenset(name for name in hooked.hook_names if name.endswith("pattern"))
    program = hooked._run.lower(hooked._state, ids, mask, hooks=(), record=patterns,
                                pattern_window=(long - 8, long), answers=None).compile()
    memory = program.memory_analysis()
    assert memory.temp_size_in_bytes + memory.output_size_in_bytes < long * long * 4


def test_on_a_mesh_the_cache_equals_one_device(checkpoint, hooked):
    assert len(jax.devices()) >= 8, "conftest asks XLA for 8 CPU devices"
    sharded = HookedQwen3.from_pretrained(checkpoint, mesh=make_mesh(data=2, model=4, devices=jax.devices()[:8]))
    assert len(sharded.model.layers.attn.wq[...].sharding.device_set) == 8
    hooks = ablate_heads(sharded, [(1, 2)], "mean")
    out, cache = sharded.run_with_cache(TEXTS, fwd_hooks=hooks)
    one_out, one_cache = hooked.run_with_cache(TEXTS, fwd_hooks=hooks)
    assert np.abs(np.asarray(out) - np.asarray(one_out)).max() <= 1e-5
    for name in hooked.hook_names:
        assert _compare(cache[name], np.asarray(one_cache[name]), cache.mask, name) <= 1e-5, name


def test_the_embedders_program_is_unchanged_by_the_study(checkpoint):
    """In a fresh process: the embedder's compiled program (its lowered text) and its vectors are the same
    before the study package is imported and after a hooked run on the same model."""
    script = textwrap.dedent(f"""
        import sys
        import jax, numpy as np
        from qwen3_jax import Qwen3Embedder
        embedder = Qwen3Embedder.from_pretrained({str(checkpoint)!r})
        rows, ends = jax.ShapeDtypeStruct((2, 64), np.int32), jax.ShapeDtypeStruct((2, 4), np.int32)
        program = lambda: embedder.runner._forward.lower(embedder.runner._state, rows, rows, ends).as_text()
        before, vectors = program(), embedder.encode(["a b c", "d"])
        assert "qwen3_jax.study" not in sys.modules
        from qwen3_jax.study import HookedQwen3
        hooked = HookedQwen3.from_loaded(embedder)
        hooked.run_with_cache(["a b c"])
        hooked.run_with_hooks(["d"], fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: 2 * x)])
        assert program() == before, "the lowered program changed"
        assert np.array_equal(embedder.encode(["a b c", "d"]), vectors), "the vectors changed"
        print("unchanged")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "unchanged" in done.stdout, done.stderr[-3000:]


def test_bad_arguments_say_what_to_do(hooked, hooked_reranker):
    with pytest.raises(UsageError, match="not a hook point"):
        hooked.run_with_hooks(TEXTS, fwd_hooks=[("blocks.9.hook_resid_pre", lambda x, hook: x)])
    with pytest.raises(UsageError, match="not a hook point"):
        hooked.run_with_cache(TEXTS, names_filter=["resid_pre"])
    with pytest.raises(UsageError, match="how="):
        ablate_heads(hooked, [(0, 0)], "half")
    with pytest.raises(UsageError, match="heads are numbered"):
        ablate_heads(hooked, [(0, hooked.cfg.num_attention_heads)])
    with pytest.raises(UsageError, match="same count"):
        patching_sweep(hooked, TEXTS[0], TEXTS[1])
    with pytest.raises(UsageError, match="pairs"):
        hooked_reranker.to_tokens(TEXTS)
    with pytest.raises(UsageError, match="needs a reranker"):
        yes_no_margins(hooked, TEXTS)
    assert hooked.to_str_tokens(TEXTS[0])[-1] == "<|endoftext|>"


def _study_command(argv):
    """`qwen3-jax study ...` as a user types it, through the command's own main."""
    from qwen3_jax.cli import main

    return main(["study", *argv])


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("picture, extra", [
    ("attention", ["--layer", "0"]), ("lens", []), ("layers", ["--query", "Explain gravity"]),
    ("patching", ["--corrupted", "The river of China is Beijing."]),
])
def test_study_command_writes_each_picture(checkpoint, tmp_path, picture, extra):
    output = tmp_path / f"{picture}.png"
    assert _study_command([picture, "--model", str(checkpoint), "--text", "The capital of China is Beijing.",
                           *TEXTS[1:], "--output", str(output), *extra]) == 0
    assert output.read_bytes().startswith(PNG) and output.stat().st_size > 5000


def test_study_command_for_a_reranker(reranker_folder, tmp_path):
    output = tmp_path / "margins.png"
    assert _study_command(["layers", "--model", str(reranker_folder), "--reranker", "--query", PAIRS[0][0],
                           "--text", *CORPUS[:2], "--output", str(output)]) == 0
    assert output.read_bytes().startswith(PNG)


@pytest.mark.parametrize("argv", [
    ["attention", "--text", "a", "--output", "x.jpg"],
    ["attention", "--text", "a", "--output", "x.png", "--layer", "7"],
    ["patching", "--text", "a", "--output", "x.png"],
    ["layers", "--reranker", "--text", "a", "--output", "x.png"],
    ["patching", "--text", "The capital of China is Beijing.", "--corrupted", "Gravity", "--output", "x.png"],
])
def test_study_command_bad_arguments_exit_2(checkpoint, tmp_path, argv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _study_command([*argv, "--model", str(checkpoint)]) == 2
    assert not (tmp_path / "x.png").exists()


def test_the_model_and_a_cache_render_with_treescope(hooked):
    _, cache = hooked.run_with_cache(TEXTS[:1], names_filter="blocks.0.hook_resid_pre")
    assert "wq" in hooked.display()                      # the attention's query projection, by its name
    assert hooked.display(cache).startswith("<") and len(hooked.display(cache)) > 1000
