"""The decoder's forward pass with TransformerLens' hook points, built from the model's own parameters.

It computes what `Qwen3Model.__call__` computes, a layer at a time in plain Python, calling a hook at
every point TransformerLens names (shapes per text, B batch, T tokens: see HOOK_SHAPES). Hooks run while
the pass is traced, so they become part of the compiled program. The attention pattern is computed
explicitly (dense, causal, GQA) only where a hook or the cache asks for it; elsewhere the model's own
attention kernel computes the heads' outputs, which needs no T x T matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.attention import attention
from qwen3_jax.attention.masking import MASKED, group_queries, segment_mask
from qwen3_jax.checks import UsageError
from qwen3_jax.model import Qwen3Model, apply_rotary
from qwen3_jax.numerics import einsum
from qwen3_jax.ops.projection import linear
from qwen3_jax.ops.rms_norm import rms_norm

# Each hook point of a layer and its shape (letters of model.py; Q the pattern's query rows).
HOOK_SHAPES = {
    "hook_resid_pre": "BTD", "attn.hook_q": "BTNH", "attn.hook_k": "BTKH", "attn.hook_v": "BTKH",
    "attn.hook_pattern": "BNQT", "attn.hook_z": "BTNH", "hook_attn_out": "BTD", "hook_resid_mid": "BTD",
    "mlp.hook_pre": "BTF", "mlp.hook_pre_linear": "BTF", "mlp.hook_post": "BTF", "hook_mlp_out": "BTD",
    "hook_resid_post": "BTD",
}
EMBED, FINAL = "hook_embed", "ln_final.hook_normalized"


@dataclass(frozen=True)
class HookPoint:
    """What a hook function gets beside the activation: the point's name and the batch's mask of real
    tokens [B, T] (True where a token is real, False on padding)."""

    name: str
    mask: jax.Array

    def layer(self) -> int | None:
        """The block this point belongs to (None for hook_embed and ln_final)."""
        return int(self.name.split(".")[1]) if self.name.startswith("blocks.") else None


HookFn = Callable[[jax.Array, HookPoint], "jax.Array | None"]


def hook_names(num_layers: int) -> list[str]:
    """Every hook point of a model of `num_layers` layers, in the order the forward pass reaches them."""
    return [EMBED, *(f"blocks.{l}.{point}" for l in range(num_layers) for point in HOOK_SHAPES), FINAL]


def attention_pattern(q: jax.Array, k: jax.Array, segments: jax.Array, rows: jax.Array) -> jax.Array:
    """Attention probabilities [B, N, Q, T] of the queries at positions `rows` [Q] over every key of
    rows holding one text each: causal, scores and softmax in float32."""
    q_rows = group_queries(q[:, rows], k.shape[2])                                      # [B, Q, K, G, H]
    scores = einsum("BQKGH,BTKH->BKGQT", q_rows, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    mask = segment_mask(segments[:, rows], segments, rows, jnp.arange(k.shape[1]))[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1)
    b, k_heads, g, n_rows, t = probs.shape
    return probs.reshape(b, k_heads * g, n_rows, t)                                    # head j*G + g


def mix_values(pattern: jax.Array, v: jax.Array) -> jax.Array:
    """The heads' outputs z [B, T, N, H] of a full pattern [B, N, T, T] over the values [B, T, K, H]."""
    b, n, t, _ = pattern.shape
    grouped = pattern.reshape(b, v.shape[2], n // v.shape[2], t, t).astype(v.dtype)
    z = einsum("BKGQT,BTKH->BQKGH", grouped, v, preferred_element_type=jnp.float32)
    return z.reshape(b, t, n, v.shape[-1]).astype(v.dtype)


def run_hooked(model: Qwen3Model, ids: jax.Array, mask: jax.Array, hooks: Mapping[str, Sequence[HookFn]],
               record: Collection[str] = (), pattern_window: tuple[int, int] | None = None):
    """ids and mask [B, T] -> (final normed states [B, T, D], {name: activation} of the `record`ed points).

    Each point passes its activation through its `hooks` in order (a hook returning None leaves it as
    it was), then records it. With `pattern_window` (start, stop) a recorded pattern holds only those
    query rows, [B, N, stop - start, T], and the heads' outputs come from the model's attention kernel:
    no T x T matrix is made, so a hook may not change the pattern then.
    """
    cfg, backend, eps = model.config, model.backend, model.config.rms_norm_eps
    recorded = {}

    def point(name: str, x: jax.Array) -> jax.Array:
        for fn in hooks.get(name, ()):
            out = fn(x, HookPoint(name, mask))
            x = x if out is None else out
        if name in record:
            recorded[name] = x
        return x

    x, context = model.inputs(ids, mask)
    sin, cos, segments = context.sin, context.cos, context.segments
    x = point(EMBED, x)
    graphdef, stacked = nnx.split(model.layers)
    for l in range(cfg.num_hidden_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[l], stacked))
        at = f"blocks.{l}."
        x = point(at + "hook_resid_pre", x)
        h = rms_norm(x, layer.input_norm[...], eps)
        attn = layer.attn
        q = rms_norm(linear(attn, "wq", "BTD,DNH->BTNH", h, backend), attn.q_norm[...], eps)
        k = rms_norm(linear(attn, "wk", "BTD,DKH->BTKH", h, backend), attn.k_norm[...], eps)
        q = point(at + "attn.hook_q", apply_rotary(q, sin, cos))
        k = point(at + "attn.hook_k", apply_rotary(k, sin, cos))
        v = point(at + "attn.hook_v", linear(attn, "wv", "BTD,DKH->BTKH", h, backend))
        pattern_name = at + "attn.hook_pattern"
        if pattern_window is None and (pattern_name in hooks or pattern_name in record):
            pattern = point(pattern_name, attention_pattern(q, k, segments, jnp.arange(ids.shape[1])))
            z = mix_values(pattern, v)
        else:
            if pattern_name in hooks:
                raise UsageError(f"a hook on {pattern_name} needs the whole pattern: leave pattern_window out")
            if pattern_name in record:
                point(pattern_name, attention_pattern(q, k, segments, jnp.arange(*pattern_window)))
            z = attention(q, k, v, segments, backend=backend)
        z = point(at + "attn.hook_z", z)
        x = point(at + "hook_resid_mid", x + point(at + "hook_attn_out",
                                                   linear(attn, "wo", "BTNH,NHD->BTD", z, backend)))
        h = rms_norm(x, layer.post_norm[...], eps)
        mlp = layer.mlp
        gate = point(at + "mlp.hook_pre", linear(mlp, "w_gate", "BTD,DF->BTF", h, backend))
        up = point(at + "mlp.hook_pre_linear", linear(mlp, "w_up", "BTD,DF->BTF", h, backend))
        post = point(at + "mlp.hook_post", jax.nn.silu(gate) * up)
        x = point(at + "hook_resid_post", x + point(at + "hook_mlp_out",
                                                    linear(mlp, "w_down", "BTF,FD->BTD", post, backend)))
    return point(FINAL, model.outputs(x)), recorded
