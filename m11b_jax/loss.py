"""Vocab-parallel softmax cross-entropy (fairseq `--criterion vocab_parallel_cross_entropy`).

Each `model` shard holds the logits of its vocabulary slice [batch, length, V/mp]. Per token:
    m = max over all shards (all-reduce max)
    s = sum over all shards of exp(l - m) (all-reduce sum)
    t = the target's logit, from the shard that owns it (all-reduce sum of a masked value)
    loss = log(s) - (t - m)
which equals full-vocabulary cross-entropy exactly, without ever gathering the [batch, length, V] logits.
Everything inside is fp32; pad targets are masked; the result is (summed loss in nats, token count),
summed over the whole global batch.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from m11b_jax.axis_names import BATCH, TP_LENGTH, VOCAB
from m11b_jax.sharding import mesh_axes, mesh_size, spec


def _over(reduce, x, axes):
    """A collective over the mesh axes the table gives a logical axis; nothing when no axis splits it."""
    return x if axes is None else reduce(x, axes)


def _nll_forward(logits, targets, vocab_axes):
    """Per device: logits [b, t, V/mp] (this device's vocab slice, any float dtype), targets [b, t] (global ids)."""
    v_local = logits.shape[-1]
    l32 = logits.astype(jnp.float32)
    local_idx = targets if vocab_axes is None else targets - jax.lax.axis_index(vocab_axes) * v_local
    owned = (local_idx >= 0) & (local_idx < v_local)
    # The max only shifts for stability; it cancels exactly in the result.
    m = _over(jax.lax.pmax, l32.max(axis=-1), vocab_axes)
    sum_exp = _over(jax.lax.psum, jnp.exp(l32 - m[..., None]).sum(axis=-1), vocab_axes)
    lse = jnp.log(sum_exp) + m
    picked = jnp.take_along_axis(l32, jnp.clip(local_idx, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit = _over(jax.lax.psum, jnp.where(owned, picked, 0.0), vocab_axes)
    return lse - target_logit, (logits, lse, local_idx, owned)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_nll(logits, targets, vocab_axes):
    return _nll_forward(logits, targets, vocab_axes)[0]


def _token_nll_bwd(vocab_axes, residuals, g):
    """d nll / d logits = softmax - onehot, computed from the saved logits and log-sum-exp: no collective, and
    no fp32 copy of the [b, t, V/mp] logits is kept between the forward and the backward pass."""
    logits, lse, local_idx, owned = residuals
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = (jnp.arange(logits.shape[-1]) == local_idx[..., None]) & owned[..., None]
    return ((probs - onehot) * g[..., None]).astype(logits.dtype), None


_token_nll.defvjp(_nll_forward, _token_nll_bwd)


def _local_xent(logits, targets, pad_idx, batch_axes, vocab_axes):
    mask = targets != pad_idx
    nll = _token_nll(logits, targets, vocab_axes)
    loss = _over(jax.lax.psum, jnp.where(mask, nll, 0.0).sum(), batch_axes)
    ntokens = _over(jax.lax.psum, mask.sum(dtype=jnp.int32), batch_axes)
    return loss, ntokens


def vocab_parallel_cross_entropy(logits: jax.Array, targets: jax.Array, mesh: Mesh, rules, pad_idx: int = 1):
    """Summed cross-entropy (nats) over non-pad targets, and their count. Logits: [batch, length, vocab], laid
    out as the sharding table `rules` places those axes."""
    batch_axes, vocab_axes = mesh_axes(BATCH, rules), mesh_axes(VOCAB, rules)
    fn = jax.shard_map(
        partial(_local_xent, pad_idx=pad_idx, batch_axes=batch_axes, vocab_axes=vocab_axes),
        mesh=mesh,
        in_specs=(spec((BATCH, TP_LENGTH, VOCAB), rules), spec((BATCH, TP_LENGTH), rules)),
        out_specs=(P(), P()),
    )
    return fn(logits, targets)


def cross_entropy(logits: jax.Array, targets: jax.Array, pad_idx: int = 1):
    """Reference: plain cross-entropy on (possibly XLA-gathered) logits; same results, for `--criterion cross_entropy`."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = targets != pad_idx
    return jnp.where(mask, nll, 0.0).sum(), mask.sum(dtype=jnp.int32)


def criterion_fn(name: str, mesh: Mesh, rules, pad_idx: int = 1):
    if name == "vocab_parallel_cross_entropy" and mesh_size(mesh, mesh_axes(VOCAB, rules)) > 1:
        return lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, mesh, rules, pad_idx)
    # With the vocabulary not split the plain form is the same function (and XLA fuses it better on CPU);
    # with it split it computes the same loss with XLA choosing the collectives.
    if name in ("cross_entropy", "vocab_parallel_cross_entropy"):
        return lambda logits, targets: cross_entropy(logits, targets, pad_idx)
    raise ValueError(f"unknown criterion {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Fused output projection + cross-entropy (config `loss_impl="fused"`, no model axis), composed in the train
# step from `TransformerLM.output_operands`.


# The shift c of exp(logits - c) may be any value close enough to the row max; `_shift_without_max` picks one
# from two cheap bounds on the max when they are tight enough, which saves the pass over the [n, V] logits that
# finding the max costs. See its docstring for why the result is as accurate as with the max.
_SHIFT_BELOW_BOUND = 64.0
_BRACKET = 124.0


def _shift_without_max(hidden, embed, target_logit):
    """(per-row shift c, whether c is safe for every row), from bounds on the row max m without computing it.

    Below: t = the target's logit <= m. Above: b = |h| max_v |e_v| >= m (Cauchy-Schwarz). With
    c = max(t, b - 64): m - c <= 64, so no exp(l - c) exceeds e^64 and their sum over any vocabulary stays far
    below fp32's (and bf16's) largest value. If b - t <= 124 in every row, the largest term exp(m - c) is at
    least e^-60, so every term within fp32's precision of it is a normal number: the sum, the loss and the
    gradients are as accurate as with c = m. Rows with a wider bracket (very large logits, or a target far
    below the max) make the caller fall back to the max."""
    h32 = hidden.astype(jnp.float32)
    e32 = embed.astype(jnp.float32)
    bound = jnp.sqrt((h32 * h32).sum(-1) * (e32 * e32).sum(-1).max())
    return jnp.maximum(target_logit, bound - _SHIFT_BELOW_BOUND), jnp.all(bound - target_logit <= _BRACKET)


def _output_xent_fwd(hidden, embed, targets, pad_idx):
    logits = jnp.einsum("nd,vd->nv", hidden, embed, preferred_element_type=jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]

    def exp_and_sum(shift):  # p in the compute dtype, like the logits: kept for the backward pass instead of them
        p = jnp.exp(logits - shift[:, None])
        return p.astype(hidden.dtype), p.sum(axis=-1), shift

    if jnp.finfo(hidden.dtype).maxexp < jnp.finfo(jnp.float32).maxexp:  # float16 holds p only below the max
        p, s, m = exp_and_sum(logits.max(axis=-1))
    else:
        shift, safe = _shift_without_max(hidden, embed, target_logit)
        # Both branches write p inside the conditional, so XLA places it in the conditional's output: no copy.
        p, s, m = jax.lax.cond(safe, exp_and_sum, lambda _: exp_and_sum(logits.max(axis=-1)), shift)
    mask = targets != pad_idx
    nll = jnp.where(mask, jnp.log(s) + m - target_logit, 0.0)
    return (nll.sum(), mask.sum(dtype=jnp.int32)), (hidden, embed, p, s, targets, mask)


def _output_xent_bwd(pad_idx, residuals, cotangents):
    """d loss / d logits = g * (p / s - onehot), never formed: the row scale g / s goes onto the small operand of
    each product (rows of p @ embed, rows of hidden) and the onehot part is a gather / scatter of embedding and
    hidden rows, so both products read p as it was stored."""
    hidden, embed, p, s, targets, mask = residuals
    g = jnp.where(mask, cotangents[0], 0.0)  # d loss / d nll, per token
    w = (g / s)[:, None]
    h32 = hidden.astype(jnp.float32)
    d_hidden = w * jnp.matmul(p, embed, preferred_element_type=jnp.float32) \
        - g[:, None] * jnp.take(embed, targets, axis=0).astype(jnp.float32)
    d_embed = jax.lax.dot_general(p, (w * h32).astype(p.dtype), (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32).at[targets].add(-g[:, None] * h32)
    return d_hidden.astype(hidden.dtype), d_embed.astype(embed.dtype), None


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def output_cross_entropy(hidden: jax.Array, embed: jax.Array, targets: jax.Array, pad_idx: int = 1):
    """(summed cross-entropy in nats over non-pad targets, their count) of the tied output projection, as one
    operation: hidden [n, d] (final LayerNorm output) and embed [V, d] (the tied embedding), both in the compute
    dtype, targets [n]. The same function as `cross_entropy(hidden @ embed.T, targets)` with fp32 logits. Its
    backward never forms the [n, V] gradient of the logits (see `_output_xent_bwd`), which saves writing and
    reading one [n, V] array per step. For meshes without a model axis (config `loss_impl="fused"`); with one,
    the vocab-parallel loss applies."""
    return _output_xent_fwd(hidden, embed, targets, pad_idx)[0]


output_cross_entropy.defvjp(_output_xent_fwd, _output_xent_bwd)
