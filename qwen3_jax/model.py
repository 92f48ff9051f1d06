"""The Qwen3 decoder in Flax NNX: embedding, scanned decoder layers, final RMSNorm.

Dimension letters: B batch, T tokens, D model width, N query heads, K kv heads, G query heads
per kv head, H head dim, F MLP width, V vocab, L layers.

Each stage of a layer runs under a `jax.named_scope` (LAYER_STAGES), so a profile of the compiled
program reads by stage (`qwen3-jax bench profile`).

The operations with hand-written gradients live in `ops/` and `attention/`, and the choices that
differ by platform in the `Backend` the model is built with; this file holds only the model's arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from typing import NamedTuple

from qwen3_jax.attention import attention, attention_at, attention_with_logsumexp, positions_from_segments
from qwen3_jax.attention.prefix import PrefixTable, merge_attention, prefix_attention
from qwen3_jax.backend import Backend
from qwen3_jax.checks import UsageError
from qwen3_jax.config import Qwen3Config
from qwen3_jax.ops.embedding import embed_tokens
from qwen3_jax.ops.projection import linear, projection_name
from qwen3_jax.ops.rms_norm import rms_norm

_init = nnx.initializers.normal(stddev=0.02)
ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo")
MLP_PROJECTIONS = ("w_gate", "w_up", "w_down")
# What each decoder layer keeps for the backward pass: everything ("off"), only its input ("full"), its
# projections' outputs too ("dots"; attention's own products are recomputed), or attention's projections
# alone ("dots_except_mlp", MaxText's policy of that name: the MLP's larger outputs are recomputed).
REMAT_POLICIES = {"off": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.save_only_these_names(
                      *map(projection_name, ATTENTION_PROJECTIONS + MLP_PROJECTIONS)),
                  "dots_except_mlp": jax.checkpoint_policies.save_only_these_names(
                      *map(projection_name, ATTENTION_PROJECTIONS))}


# The named scopes of a decoder layer, as they nest: what a profile is grouped by.
LAYER_STAGES = ("input_norm", "attention/qkv", "attention/qk_norm_rotary", "attention/kernel", "attention/out",
                "post_norm", "mlp/gate_up", "mlp/activation", "mlp/down")


def check_remat(remat: str) -> str:
    """A name of REMAT_POLICIES, or a UsageError listing them."""
    if remat not in REMAT_POLICIES:
        raise UsageError(f"remat={remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
    return remat


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
    not concatenated: XLA fuses a stack into the arithmetic that fills it (docs/design/numerics.md)."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-2)
    return rotated.reshape(x.shape).astype(x.dtype)


class LayerContext(NamedTuple):
    """What every decoder layer is given beside its input: the rotary angles [B, T, H/2] of each token's
    position, the segments [B, T] (int32), and with a prefix table the table tokens each token sees
    [B, T, P] (None without one)."""

    sin: jax.Array
    cos: jax.Array
    segments: jax.Array
    visible: jax.Array | None = None


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

    def __call__(self, x, context: LayerContext, *, backend: Backend, rng=None, at=None, prefix=None):
        """[B, T, D] -> ([B, T, D], this layer's keys and values [B, T, K, H]), or the output only at the
        positions `at` [B, S]: then only those positions ask (their queries alone are projected and
        attend), while every token is still a key. `prefix`: this layer's keys and values [P, K, H] of
        the prefix table, which each token also attends to where `context.visible` says."""
        sin, cos, segments = context.sin, context.cos, context.segments
        q_x, q_sin, q_cos = (x, sin, cos) if at is None else (gather_tokens(a, at) for a in (x, sin, cos))
        with jax.named_scope("qkv"):
            q = linear(self, "wq", "BTD,DNH->BTNH", q_x, backend, _fold(rng, 0))
            k = linear(self, "wk", "BTD,DKH->BTKH", x, backend, _fold(rng, 1))
            v = linear(self, "wv", "BTD,DKH->BTKH", x, backend, _fold(rng, 2))
        with jax.named_scope("qk_norm_rotary"):
            q = apply_rotary(rms_norm(q, self.q_norm[...], self.eps), q_sin, q_cos)
            k = apply_rotary(rms_norm(k, self.k_norm[...], self.eps), sin, cos)
        with jax.named_scope("kernel"):
            if at is not None:
                if prefix is not None:
                    raise ValueError("a prefix table needs every position: leave `at` out")
                out = attention_at(q, k, v, segments, at)
            elif prefix is None:
                out = attention(q, k, v, segments, backend=backend)
            else:
                out = merge_attention((attention_with_logsumexp(q, k, v, segments, backend=backend),
                                       prefix_attention(q, *prefix, context.visible)), q.dtype)
        with jax.named_scope("out"):
            return linear(self, "wo", "BTNH,NHD->BTD", out, backend, _fold(rng, 3)), (k, v)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config, *, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w_gate = nnx.Param(_init(rngs.params(), (d, f), param_dtype))
        self.w_up = nnx.Param(_init(rngs.params(), (d, f), param_dtype))
        self.w_down = nnx.Param(_init(rngs.params(), (f, d), param_dtype))

    def __call__(self, x, *, backend: Backend, rng=None):
        with jax.named_scope("gate_up"):
            gate = linear(self, "w_gate", "BTD,DF->BTF", x, backend, _fold(rng, 4))
            up = linear(self, "w_up", "BTD,DF->BTF", x, backend, _fold(rng, 5))
        with jax.named_scope("activation"):
            hidden = jax.nn.silu(gate) * up
        with jax.named_scope("down"):
            return linear(self, "w_down", "BTF,FD->BTD", hidden, backend, _fold(rng, 6))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Qwen3Config, *, param_dtype, rngs: nnx.Rngs):
        self.input_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
        self.attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, context: LayerContext, *, backend: Backend, rng=None, at=None, prefix=None):
        """[B, T, D] -> ([B, T, D] (or [B, S, D] at the positions `at` [B, S] only), the attention's
        keys and values [B, T, K, H]); `prefix` as for Attention."""
        residual = x if at is None else gather_tokens(x, at)
        with jax.named_scope("input_norm"):
            normed = rms_norm(x, self.input_norm[...], self.eps)
        with jax.named_scope("attention"):
            attended, keys_values = self.attn(normed, context, backend=backend, rng=rng, at=at, prefix=prefix)
            x = residual + attended
        with jax.named_scope("post_norm"):
            normed = rms_norm(x, self.post_norm[...], self.eps)
        with jax.named_scope("mlp"):
            return x + self.mlp(normed, backend=backend, rng=rng), keys_values


class Qwen3Model(nnx.Module):
    """Qwen3 backbone returning the final-normed hidden states [B, T, D].

    The decoder layers are one DecoderLayer whose parameters carry a leading L axis, applied with
    `jax.lax.scan`, so compile time does not grow with depth. The platform's choices (`attention_impl`
    among them) are resolved here, once, into `self.backend`, never inside a trace; `platform` builds
    the program of another platform (default: JAX's backend).
    """

    def __init__(self, cfg: Qwen3Config, *, param_dtype=jnp.float32, dtype=jnp.float32,
                 attention_impl: str = "auto", platform: str | None = None, with_lm_head: bool = False,
                 vocab_multiple: int = 1, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.backend = Backend.resolve(attention_impl, platform)
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
                 prefix: PrefixTable | None = None, return_layer_states: bool = False,
                 return_keys_values: bool = False, rng: jax.Array | None = None, remat: str = "off",
                 prune_last: bool = False):
        """ids [B, T] and segments [B, T] -> normed hidden states [B, T, D] (and each layer's output).

        `segments` is 0 on padding and a positive id per text, so several texts can share a row; a
        boolean mask of real tokens (one text per row) works as well. `at` [B, S] asks for the states
        at those positions only, [B, S, D] (the last token of each text, for pooling). `prefix` is a
        table of shared prefixes the texts continue (attention/prefix.py): their positions start after
        it and they attend to it. `return_keys_values` returns every layer's keys and values
        [L, B, T, K, H] instead of the states: what a prefix table is built from. `prune_last`
        then runs the last layer apart, its queries, output projection and MLP at those positions
        alone (training does; inference keeps one compiled layer and picks the states after it).
        `rng` drives adapter dropout in training (None: none); `remat` picks what a layer keeps for
        the backward pass (REMAT_POLICIES).
        """
        check_remat(remat)
        if at is not None and return_layer_states:
            raise ValueError("return_layer_states needs every position: leave `at` out")
        if prune_last and at is None:
            raise ValueError("prune_last needs the positions `at` the last layer computes")
        cfg = self.config
        x, context = self.inputs(ids, segments, prefix)
        graphdef, layer_state = nnx.split(self.layers)
        layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_hidden_layers)
        prefix_keys_values = None if prefix is None else (prefix.keys, prefix.values)

        def step(h, per_layer):
            one_layer_state, layer_rng, layer_prefix = per_layer
            h, keys_values = self.apply_layer(graphdef, one_layer_state, h, context, rng=layer_rng,
                                              prefix=layer_prefix, keys_values=True)
            return h, (h if return_layer_states else None, keys_values if return_keys_values else None)

        if remat != "off":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
        scanned = cfg.num_hidden_layers - prune_last
        per_layer = (layer_state, layer_rngs, prefix_keys_values)
        if prune_last:
            # The scan still runs over the whole stacks (a slice of them would be a copy of the weights)
            # and leaves the last layer to run apart, at the positions `at` alone.
            if return_layer_states or return_keys_values or prefix is not None:
                raise ValueError("prune_last gives the pooled states only")
            whole_step = step
            step = lambda h, xs: (jax.lax.cond(xs[0] < scanned, lambda h: whole_step(h, xs[1])[0], lambda h: h, h),
                                  (None, None))
            per_layer = (jnp.arange(cfg.num_hidden_layers), per_layer)
        x, (layer_outputs, keys_values) = jax.lax.scan(step, x, per_layer)
        if prune_last:
            last = jax.tree.map(lambda a: a[scanned], (layer_state, layer_rngs))
            x = self.apply_layer(graphdef, last[0], x, context, rng=last[1], at=at)
            at = None
        if return_keys_values:
            return keys_values
        x = self.outputs(x, at)
        return (x, layer_outputs) if return_layer_states else x

    def inputs(self, ids: jax.Array, segments: jax.Array,
               prefix: PrefixTable | None = None) -> tuple[jax.Array, LayerContext]:
        """The first layer's input [B, T, D] and what every layer is given beside it (LayerContext):
        positions count from each text's start, or from the end of the prefix it continues."""
        cfg = self.config
        segments = segments.astype(jnp.int32)
        x = embed_tokens(self.embed[...], ids).astype(self.dtype)
        positions = positions_from_segments(segments)
        if prefix is None:
            return x, LayerContext(*rotary_angles(positions, cfg.head_dim, cfg.rope_theta), segments)
        sin, cos = rotary_angles(positions + prefix.offset, cfg.head_dim, cfg.rope_theta)
        return x, LayerContext(sin, cos, segments, prefix.visible())

    def apply_layer(self, graphdef, layer_state, x: jax.Array, context: LayerContext, *, rng=None, at=None,
                    prefix=None, keys_values: bool = False):
        """One decoder layer, its parameters `layer_state` (of `nnx.split(self.layers)`'s graphdef, with
        no layer axis), on x and the `inputs`' context; `prefix`: this layer's keys and values of the
        prefix table. Returns the layer's output, and with `keys_values` its keys and values too."""
        out, layer_keys_values = nnx.merge(graphdef, layer_state)(x, context, backend=self.backend, rng=rng,
                                                                  at=at, prefix=prefix)
        return (out, layer_keys_values) if keys_values else out

    def outputs(self, x: jax.Array, at: jax.Array | None = None) -> jax.Array:
        """The last layer's states [B, T, D] (at the positions `at` [B, S]: [B, S, D]), final-normed."""
        if at is not None:
            x = gather_tokens(x, at)
        return rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)

    def output_rows(self, token_ids) -> jax.Array:
        """Rows of the output projection for the given vocabulary ids [V', D] (tied or separate head)."""
        table = self.lm_head if hasattr(self, "lm_head") else self.embed
        return table[...][jnp.asarray(token_ids)].astype(self.dtype)
