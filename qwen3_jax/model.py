"""The Qwen3 decoder in Flax NNX: embedding, scanned decoder layers, final RMSNorm.

Dimension letters: B batch, T tokens, D model width, N query heads, K kv heads, G query heads
per kv head, H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen3_jax.attention import attention, attention_at, positions_from_segments
from qwen3_jax.config import Qwen3Config
from qwen3_jax.numerics import einsum

_init = nnx.initializers.normal(stddev=0.02)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as Qwen3 computes it: normalise in float32, cast back, then scale. The gradient is
    written out (see _rms_norm_bwd)."""
    return _rms_norm(x, weight, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return weight.astype(x.dtype) * (x32 * _inverse_rms(x32, eps)).astype(x.dtype)


def _inverse_rms(x32: jax.Array, eps: float) -> jax.Array:
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def _rms_norm_fwd(x: jax.Array, weight: jax.Array, eps: float):
    return _rms_norm(x, weight, eps), (x, weight)


def _rms_norm_bwd(eps: float, saved, d_out: jax.Array):
    """In float32. The weight's gradient sums over all tokens at once: left to autodiff, the sum
    kept the leading batch axis ([1, D]), which XLA's CPU compiler ran as a strided reduction, 0.36 s
    for 10,240 tokens of width 1,024 (a 2-layer 0.6B-width training step spent 2.2 s in them)."""
    x, weight = saved
    x32 = x.astype(jnp.float32)
    inv_rms = _inverse_rms(x32, eps)
    normed = x32 * inv_rms
    d_out = d_out.astype(jnp.float32)
    d_weight = einsum("TD,TD->D", d_out.reshape(-1, x.shape[-1]), normed.reshape(-1, x.shape[-1]))
    d_normed = d_out * weight.astype(jnp.float32)
    d_x = inv_rms * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_weight.astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def project(spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """`einsum(spec, x, weight)` in x's dtype. On the CPU, bf16 and fp16 products leave the matrix unit
    in float32 before the cast back: XLA's CPU backend has a fast bf16 x bf16 -> f32 kernel (AVX512-BF16,
    about 2x its bf16 -> bf16 rate); accelerators accumulate in float32 either way. The gradient is
    written out (see _project_bwd)."""
    return _project(spec, x, weight)


def _accumulation(dtype) -> jnp.dtype | None:
    return jnp.float32 if jax.default_backend() == "cpu" and dtype != jnp.float32 else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _project(spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    return einsum(spec, x, weight.astype(x.dtype), preferred_element_type=_accumulation(x.dtype)).astype(x.dtype)


def _project_fwd(spec: str, x: jax.Array, weight: jax.Array):
    return _project(spec, x, weight), (x, weight)


def _project_bwd(spec: str, saved, d_out: jax.Array):
    """The two products of a projection's gradient (XLA drops the weight's where nothing reads it)."""
    x, weight = saved
    d_out = materialised(d_out)
    return input_gradient(spec, d_out, weight, x.dtype), weight_gradient(spec, x, d_out, weight.dtype)


def materialised(d_out: jax.Array) -> jax.Array:
    """On the CPU a projection's incoming gradient is materialised first: left to itself, XLA fuses its
    producer (the SwiGLU or norm backward) into a transposing copy that writes with a stride, which took
    1.6 s of a 7 s training step of one 0.6B-width layer."""
    return jax.lax.optimization_barrier(d_out) if jax.default_backend() == "cpu" else d_out


def input_gradient(spec: str, d_out: jax.Array, weight: jax.Array, dtype) -> jax.Array:
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    return einsum(f"{out},{w_spec}->{x_spec}", d_out, weight.astype(d_out.dtype),
                  preferred_element_type=_accumulation(d_out.dtype)).astype(dtype)


def weight_gradient(spec: str, x: jax.Array, d_out: jax.Array, dtype) -> jax.Array:
    """x^T d_out, summed over the tokens, in the weight's layout. XLA's CPU dots read their left operand
    with the summed axes last, so it is first copied transposed: there the smaller of x and d_out goes
    left and the product is laid out as the weight afterwards (a LoRA matrix's gradient, [input, R],
    transposed 40 MB of x for 160 KB of result, 77 ms for each projection at 10,240 tokens)."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    if jax.default_backend() != "cpu" or x.size <= d_out.size:
        return einsum(f"{x_spec},{out}->{w_spec}", x, d_out, preferred_element_type=jnp.float32).astype(dtype)
    swapped = "".join(sorted(w_spec, key=lambda letter: letter in x_spec))     # d_out's letters first
    product = einsum(f"{out},{x_spec}->{swapped}", d_out, x, preferred_element_type=jnp.float32)
    return jnp.einsum(f"{swapped}->{w_spec}", product).astype(dtype)


_project.defvjp(_project_fwd, _project_bwd)


# Rematerialisation of each decoder layer in the backward pass: keep everything ("off"), only the
# layer's input ("full"), or the layer's matrix products too ("dots": the projections, not attention).
# (`project` is a custom_vjp, opaque to the dot policies: its outputs are saved by name.)
PROJECTION = "projection"
REMAT_POLICIES = {"off": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.save_only_these_names(PROJECTION)}
# A projection `name` of a module gains a low-rank adapter when the module has an attribute
# `name + ADAPTER_SUFFIX` (see qwen3_jax/train/lora.py); the model itself knows no adapter class.
ADAPTER_SUFFIX = "_lora"


def _zero_after(gradient) -> jax.Array:
    """A zero computed from (the first leaf of) an incoming gradient: XLA cannot schedule what is made
    of it before that gradient exists."""
    return jax.tree.leaves(gradient)[0].reshape(-1)[0] * 0


def recompute_in_order(fn, policy):
    """`jax.checkpoint(fn, policy=policy)` for layers applied one after another outside a scan.

    jax.checkpoint keeps XLA from merging the recomputation back into the forward pass with an
    optimization barrier, which XLA's CPU compiler removes: there every layer's activations stayed live
    again (8 layers of the 0.6B width, 10,240 tokens: 11.4 of 12.3 GiB). Here the saved values pass
    through an add of a zero taken from the incoming gradient instead: XLA can neither merge the
    recomputation with the forward pass nor start it before the layer above has passed its gradient down.
    """
    layer = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def forward(*args):
        return jax.vjp(layer, *args)          # the output, and a pullback holding what the policy saves

    def backward(pullback, d_out):
        zero = _zero_after(d_out)
        tie = lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return jax.tree.map(tie, pullback)(d_out)

    run.defvjp(forward, backward)
    return run


def linear(module: nnx.Module, name: str, spec: str, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """The projection `module.<name>` of x; an attached adapter computes it with its own addition."""
    weight = getattr(module, name)[...]
    adapter = getattr(module, name + ADAPTER_SUFFIX, None)
    return checkpoint_name(project(spec, x, weight) if adapter is None else adapter(spec, x, weight, rng), PROJECTION)


@jax.custom_vjp
def embed_tokens(table: jax.Array, ids: jax.Array) -> jax.Array:
    """The rows of `table` [V, D] at the token ids [...]: [..., D].

    Its gradient adds the rows' gradients into a table of zeros made from the incoming gradient: a
    plain gather's zeros depend on nothing, and XLA allocated them as the backward pass began, so a
    table-sized buffer (0.58 GiB at the 0.6B width, float32) sat beside every layer's backward.
    """
    return table[ids]


def _embed_tokens_fwd(table: jax.Array, ids: jax.Array):
    return table[ids], (table, ids)


def _embed_tokens_bwd(saved, d_out: jax.Array):
    table, ids = saved
    zeros = jnp.broadcast_to(_zero_after(d_out).astype(table.dtype), table.shape)
    return zeros.at[ids].add(d_out.astype(table.dtype)), None


embed_tokens.defvjp(_embed_tokens_fwd, _embed_tokens_bwd)


def gather_tokens(x: jax.Array, at: jax.Array) -> jax.Array:
    """x [B, T, ...] at the positions `at` [B, S] of each row: [B, S, ...]."""
    return jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)


def _fold(rng: jax.Array | None, index: int) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, index)


def rotary_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin and cos [B, T, H/2] in float32 for integer positions [B, T]."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate-half RoPE on [B, T, heads, H], computed in float32. The two rotated halves are stacked,
    not concatenated: XLA's CPU compiler fuses a stack into the arithmetic that fills it, while a
    concatenate ran as a pass of its own (10,240 tokens of 16 heads: 93 against 29 ms)."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-2)
    return rotated.reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention with per-head q/k RMSNorm before RoPE."""

    def __init__(self, cfg: Qwen3Config, *, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.wq = nnx.Param(_init(rngs.params(), (d, n, h), param_dtype))
        self.wk = nnx.Param(_init(rngs.params(), (d, k, h), param_dtype))
        self.wv = nnx.Param(_init(rngs.params(), (d, k, h), param_dtype))
        self.wo = nnx.Param(_init(rngs.params(), (n, h, d), param_dtype))
        self.q_norm = nnx.Param(jnp.ones((h,), param_dtype))
        self.k_norm = nnx.Param(jnp.ones((h,), param_dtype))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, sin, cos, segments, *, impl: str, rng=None, at=None):
        """[B, T, D] -> [B, T, D], or only at the positions `at` [B, S]: then only those positions
        ask (their queries alone are projected and attend), while every token is still a key."""
        q_x, q_sin, q_cos = (x, sin, cos) if at is None else (gather_tokens(a, at) for a in (x, sin, cos))
        q = linear(self, "wq", "BTD,DNH->BTNH", q_x, _fold(rng, 0))
        k = linear(self, "wk", "BTD,DKH->BTKH", x, _fold(rng, 1))
        v = linear(self, "wv", "BTD,DKH->BTKH", x, _fold(rng, 2))
        q = apply_rotary(rms_norm(q, self.q_norm[...], self.eps), q_sin, q_cos)
        k = apply_rotary(rms_norm(k, self.k_norm[...], self.eps), sin, cos)
        out = attention(q, k, v, segments, impl=impl) if at is None else attention_at(q, k, v, segments, at)
        return linear(self, "wo", "BTNH,NHD->BTD", out, _fold(rng, 3))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config, *, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w_gate = nnx.Param(_init(rngs.params(), (d, f), param_dtype))
        self.w_up = nnx.Param(_init(rngs.params(), (d, f), param_dtype))
        self.w_down = nnx.Param(_init(rngs.params(), (f, d), param_dtype))

    def __call__(self, x, rng=None):
        gate = linear(self, "w_gate", "BTD,DF->BTF", x, _fold(rng, 4))
        up = linear(self, "w_up", "BTD,DF->BTF", x, _fold(rng, 5))
        return linear(self, "w_down", "BTF,FD->BTD", jax.nn.silu(gate) * up, _fold(rng, 6))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Qwen3Config, *, param_dtype, rngs: nnx.Rngs):
        self.input_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
        self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, sin, cos, segments, *, impl: str, rng=None, at=None):
        """[B, T, D] -> [B, T, D], or [B, S, D] at the positions `at` [B, S] only."""
        residual = x if at is None else gather_tokens(x, at)
        x = residual + self.attn(rms_norm(x, self.input_norm[...], self.eps), sin, cos, segments, impl=impl,
                                 rng=rng, at=at)
        return x + self.mlp(rms_norm(x, self.post_norm[...], self.eps), rng)


class Qwen3Model(nnx.Module):
    """Qwen3 backbone returning the final-normed hidden states [B, T, D].

    The decoder layers are one DecoderLayer whose parameters carry a leading L axis, applied with
    `jax.lax.scan`, so compile time does not grow with depth.
    """

    def __init__(self, cfg: Qwen3Config, *, param_dtype=jnp.float32, dtype=jnp.float32,
                 attention_impl: str = "auto", with_lm_head: bool = False, vocab_multiple: int = 1,
                 rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.attention_impl = attention_impl
        # Vocabulary rows padded to a multiple of the tensor-parallel axis; the extra rows stay zero.
        vocab_rows = -(-cfg.vocab_size // vocab_multiple) * vocab_multiple
        self.embed = nnx.Param(_init(rngs.params(), (vocab_rows, cfg.hidden_size), param_dtype))

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(layer_rngs):
            return DecoderLayer(cfg, param_dtype=param_dtype, rngs=layer_rngs)

        self.layers = stacked_layers(rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
        if with_lm_head and not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(_init(rngs.params(), (vocab_rows, cfg.hidden_size), param_dtype))

    def __call__(self, ids: jax.Array, segments: jax.Array, *, at: jax.Array | None = None,
                 return_layer_states: bool = False, rng: jax.Array | None = None, remat: str = "off",
                 scan_layers: bool = True, prune_last: bool | None = None):
        """ids [B, T] and segments [B, T] -> normed hidden states [B, T, D] (and each layer's output).

        `segments` is 0 on padding and a positive id per text, so several texts can share a row; a
        boolean mask of real tokens (one text per row) works as well. `at` [B, S] asks for the states
        at those positions only, [B, S, D] (the last token of each text, for pooling); `prune_last`
        then has the last layer run its output projection and MLP on those tokens alone. It does by
        default with unrolled layers; a scan by default keeps one compiled layer for all and picks the
        states after it (pruning compiles the layer a second time). `rng` drives adapter dropout in
        training (None: none); `remat` picks what a layer keeps for the backward pass (REMAT_POLICIES).
        `scan_layers=False` runs the layers as an unrolled loop: training does, since differentiating
        the blockwise attention (its window switch and query-block loop) inside a layer scan makes XLA
        allocate far beyond the activations (93 GiB asked for the 10,240-token step of `bench --train`
        at the 0.6B width with 2 layers, which needs 3.7 GiB unrolled), while inference keeps the scan,
        whose compile time does not grow with depth.
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
        if at is not None and return_layer_states:
            raise ValueError("return_layer_states needs every position: leave `at` out")
        cfg = self.config
        segments = segments.astype(jnp.int32)
        x = embed_tokens(self.embed[...], ids).astype(self.dtype)
        sin, cos = rotary_angles(positions_from_segments(segments), cfg.head_dim, cfg.rope_theta)
        graphdef, layer_state = nnx.split(self.layers)
        layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_hidden_layers)

        def layer_step(at, remat):
            def step(h, layer):
                one_layer_state, layer_rng = layer
                h = nnx.merge(graphdef, one_layer_state)(h, sin, cos, segments, impl=self.attention_impl,
                                                         rng=layer_rng, at=at)
                return h, (h if return_layer_states else None)
            if remat == "off":
                return step
            if scan_layers:
                return jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
            return recompute_in_order(step, REMAT_POLICIES[remat])

        pruned = at is not None and (not scan_layers if prune_last is None else prune_last)
        step = layer_step(None, remat)
        # The last full-width layer never rematerialises: its backward pass comes first (after the pruned
        # layer's, which is small), right after its forward one, so recomputing its activations would
        # repeat its work while the peak grew only by the pruned layer's share.
        kept = layer_step(None, "off")
        layer = lambda index: jax.tree.map(lambda a: a[index], (layer_state, layer_rngs))
        unpruned = cfg.num_hidden_layers - pruned
        if scan_layers:
            x, layer_outputs = jax.lax.scan(lambda h, index: step(h, layer(index)), x, jnp.arange(unpruned))
        else:
            outputs = []
            for index in range(unpruned):
                x, output = (step if index < unpruned - 1 else kept)(x, layer(index))
                outputs.append(output)
            layer_outputs = jnp.stack(outputs) if return_layer_states else None
        if pruned:
            x, _ = layer_step(at, "off")(x, layer(unpruned))
        elif at is not None:
            x = gather_tokens(x, at)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        return (x, layer_outputs) if return_layer_states else x

    def output_rows(self, token_ids) -> jax.Array:
        """Rows of the output projection for the given vocabulary ids [V', D] (tied or separate head)."""
        table = self.lm_head if hasattr(self, "lm_head") else self.embed
        return table[...][jnp.asarray(token_ids)].astype(self.dtype)
