"""The inference forward pass behind eval_lm: log p(target) at a few positions of each window.

`score_positions(params, tokens, first, targets, cfg)` returns, for each row of `tokens` and each of the
`n = targets.shape[1]` positions `first[row] + j`, the natural-log probability the model gives to
`targets[row, j]`: the same number `log_softmax(TransformerLM(cfg)(tokens))[row, first + j, target]` gives,
computed from the same parameter tree, without the work whose result is never read:

* The last layer runs its query projection, attention, out_proj, feed-forward block and the final
  LayerNorm only at the n scored positions (its keys and values still come from every position).
  Everything before the last layer is needed in full: later layers read every earlier position.
* Causal attention runs in query chunks of `attention_chunk` positions; chunk [c0, c1) is scored only
  against keys [0, c1), so almost none of the masked upper triangle is computed.
* Logits exist only for the scored positions; log-softmax and the target pick run in fp32 over the
  vocabulary-parallel logits (a sharded reduction; the [batch, n, vocab] logits are never gathered).

The numerics follow model.py: LayerNorm statistics, GELU and softmax in fp32, matmuls in
`cfg.compute_dtype`, the residual stream in promote(compute, param) dtype. One deliberate difference:
attention probabilities are normalized after the PV product (p = exp(s - max), out = (p @ v) / sum p),
which is the same function in exact arithmetic and saves a pass over the [heads, q, k] scores; in fp32
the two agree to rounding (the eval tests hold it to 1e-5 against a PyTorch reference).

Activations carry model.py's logical axis names, so the same code runs on a (data, model) mesh with
the sharding table of `m11b_jax.sharding`, or on one device.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from m11b_jax.attention import causal_allowed
from m11b_jax.axis_names import ACTIVATION_EMBED, BATCH, HEAD_DIM, HEADS, MLP, RESIDUAL_LENGTH, TP_LENGTH, VOCAB
from m11b_jax.config import ModelConfig, jax_dtype
from m11b_jax.model import fairseq_positions, gelu_erf, sinusoidal_embedding

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, as in model.py: a fully masked row stays finite


def _layer_norm(x, p, eps: float):
    """flax nn.LayerNorm as model.py configures it: fp32 statistics (fast variance) and output."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def _dense(x, p, dtype):
    """flax nn.Dense with dtype=compute dtype: inputs, kernel and bias cast, [in, out] kernel."""
    return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def _attend(q, k, v, allowed):
    """Softmax attention for one block. q [b,h,nq,hd], k/v [b,h,nk,hd], allowed [b,1|h,nq,nk] -> [b,h,nq,hd].

    Scores in the compute dtype then fp32 (as model.py); normalization after the PV product.
    """
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    s = jnp.where(allowed, s, _MASKED)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - m)
    total = p.sum(-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total).astype(v.dtype)


def _layer(p, x, key_mask, cfg: ModelConfig, attention_chunk: int, query_index=None):
    """One pre-LN decoder layer. Returns the residual stream at every position, or at `query_index` [b, n]."""
    cdt = jax_dtype(cfg.compute_dtype)
    b, t, d = x.shape
    h, hd = cfg.num_heads, cfg.head_dim

    def heads(y):  # [b, n, d] -> [b, h, n, hd]
        y = y.reshape(b, y.shape[1], h, hd).transpose(0, 2, 1, 3)
        return nn.with_logical_constraint(y, (BATCH, HEADS, TP_LENGTH, HEAD_DIM))

    a = p["self_attn"]
    y = _layer_norm(x, p["self_attn_layer_norm"], cfg.layernorm_eps).astype(cdt)
    k, v = heads(_dense(y, a["k_proj"], cdt)), heads(_dense(y, a["v_proj"], cdt))
    if query_index is None:  # every position, in causal chunks
        q = heads(_dense(y, a["q_proj"], cdt) * (hd ** -0.5))
        chunks = []
        for c0 in range(0, t, attention_chunk):
            c1 = min(c0 + attention_chunk, t)
            chunks.append(_attend(q[:, :, c0:c1], k[:, :, :c1], v[:, :, :c1], causal_allowed(key_mask, c0, c1)))
        out = jnp.concatenate(chunks, axis=2) if len(chunks) > 1 else chunks[0]
        xq = x
    else:  # only the rows in query_index (their keys: every position up to them)
        take = lambda z: jnp.take_along_axis(z, query_index[..., None], axis=1)  # noqa: E731
        xq = take(x)
        q = heads(_dense(take(y), a["q_proj"], cdt) * (hd ** -0.5))
        allowed = (jnp.arange(t)[None, None, :] <= query_index[:, :, None])[:, None] & key_mask[:, None, None, :]
        out = _attend(q, k, v, allowed)
    n = xq.shape[1]
    out = nn.with_logical_constraint(out, (BATCH, HEADS, TP_LENGTH, HEAD_DIM)).transpose(0, 2, 1, 3).reshape(b, n, d)
    residual = (BATCH, RESIDUAL_LENGTH, ACTIVATION_EMBED)
    xq = nn.with_logical_constraint(xq + _dense(out, a["out_proj"], cdt).astype(xq.dtype), residual)

    y = _layer_norm(xq, p["final_layer_norm"], cfg.layernorm_eps).astype(cdt)
    y = nn.with_logical_constraint(_dense(y, p["fc1"], cdt), (BATCH, TP_LENGTH, MLP))
    y = gelu_erf(y.astype(jnp.float32)).astype(cdt)
    return nn.with_logical_constraint(xq + _dense(y, p["fc2"], cdt).astype(xq.dtype), residual)


def _layer_params(layers, i):
    """Layer i of the stacked [layers, ...] parameter tree (a dynamic slice: no copy of the stack)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False), layers)


def score_positions(params, tokens, first, targets, cfg: ModelConfig, *, attention_chunk: int = 64):
    """log p(targets[r, j] | tokens[r, :first[r] + j + 1]) as fp32 [b, n]; 0 where the target is pad.

    tokens [b, T] int (right padding with cfg.pad_idx is masked; positions restart at 2 in every row),
    first [b] int: the first scored position of each row, targets [b, n] int. Positions first + j past
    the end of a row (T) are clamped and must carry a pad target.
    """
    cdt = jax_dtype(cfg.compute_dtype)
    pdt = jax_dtype(cfg.param_dtype)
    b, t = tokens.shape
    n = targets.shape[1]
    if attention_chunk < 1:
        raise ValueError(f"attention_chunk must be >= 1, got {attention_chunk}")
    tokens = nn.with_logical_constraint(tokens, (BATCH, TP_LENGTH))
    key_mask = tokens != cfg.pad_idx
    embed = params["embed_tokens"]
    x = math.sqrt(cfg.d_model) * jnp.take(embed, tokens, axis=0).astype(jnp.float32)
    x = x + sinusoidal_embedding(fairseq_positions(tokens, cfg.pad_idx), cfg.d_model, cfg.pad_idx)
    x = nn.with_logical_constraint(x.astype(jnp.promote_types(cdt, pdt)), (BATCH, RESIDUAL_LENGTH, ACTIVATION_EMBED))

    layers = params["layers"]
    last = cfg.num_layers - 1
    if cfg.scan_layers:  # one compiled layer body (the 72-layer release)
        x = jax.lax.fori_loop(0, last, lambda i, x: _layer(_layer_params(layers, i), x, key_mask, cfg,
                                                           attention_chunk), x)
    else:
        for i in range(last):
            x = _layer(_layer_params(layers, i), x, key_mask, cfg, attention_chunk)
    query_index = jnp.minimum(first[:, None] + jnp.arange(n)[None, :], t - 1)
    x = _layer(_layer_params(layers, last), x, key_mask, cfg, attention_chunk, query_index=query_index)
    hidden = _layer_norm(x, params["layer_norm"], cfg.layernorm_eps).astype(cdt)
    hidden = nn.with_logical_constraint(hidden, (BATCH, TP_LENGTH, ACTIVATION_EMBED))

    logits = jnp.einsum("bnd,vd->bnv", hidden, embed.astype(cdt), preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, (BATCH, TP_LENGTH, VOCAB))
    top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    log_total = jnp.log(jnp.exp(logits - top).sum(-1)) + top[..., 0]
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    picked = jnp.where(vocab_ids == targets[..., None], logits, 0.0).sum(-1)
    return jnp.where(targets != cfg.pad_idx, picked - log_total, 0.0)


def score_in_passes(params, tokens, first, targets, cfg: ModelConfig, *, passes: int = 1, attention_chunk: int = 64):
    """score_positions over the batch in `passes` sequential passes (a lax.map), same results.

    Fewer rows per pass means smaller temporary buffers: on a CPU this keeps the working set in cache and
    the per-call allocation small (XLA allocates its temporaries on every call, and fresh pages cost a
    fault each), which is faster than one pass over a large batch. Pass i takes rows i, i + passes, ...,
    so when the batch axis is split over `data` in contiguous blocks, every device keeps its own rows.
    """
    b = tokens.shape[0]
    if passes <= 1:
        return score_positions(params, tokens, first, targets, cfg, attention_chunk=attention_chunk)
    if b % passes:
        raise ValueError(f"batch {b} is not divisible into {passes} passes")

    def split(a):  # [b, ...] -> [passes, b / passes, ...]: pass i holds rows i, i + passes, ...
        return jnp.swapaxes(a.reshape(b // passes, passes, *a.shape[1:]), 0, 1)

    out = jax.lax.map(lambda xs: score_positions(params, *xs, cfg, attention_chunk=attention_chunk),
                      (split(tokens), split(first), split(targets)))
    return jnp.swapaxes(out, 0, 1).reshape(b, targets.shape[1])
