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

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from m11b_jax.sharding import DATA, MODEL


def _nll_forward(logits, targets):
    """Per device: logits [b, t, V/mp] (this device's vocab slice, any float dtype), targets [b, t] (global ids)."""
    v_local = logits.shape[-1]
    l32 = logits.astype(jnp.float32)
    local_idx = targets - jax.lax.axis_index(MODEL) * v_local
    owned = (local_idx >= 0) & (local_idx < v_local)
    # The max only shifts for stability; it cancels exactly in the result.
    m = jax.lax.pmax(l32.max(axis=-1), MODEL)
    sum_exp = jax.lax.psum(jnp.exp(l32 - m[..., None]).sum(axis=-1), MODEL)
    lse = jnp.log(sum_exp) + m
    picked = jnp.take_along_axis(l32, jnp.clip(local_idx, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(owned, picked, 0.0), MODEL)
    return lse - target_logit, (logits, lse, local_idx, owned)


@jax.custom_vjp
def _token_nll(logits, targets):
    return _nll_forward(logits, targets)[0]


def _token_nll_bwd(residuals, g):
    """d nll / d logits = softmax - onehot, computed from the saved logits and log-sum-exp: no collective, and
    no fp32 copy of the [b, t, V/mp] logits is kept between the forward and the backward pass."""
    logits, lse, local_idx, owned = residuals
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = (jnp.arange(logits.shape[-1]) == local_idx[..., None]) & owned[..., None]
    return ((probs - onehot) * g[..., None]).astype(logits.dtype), None


_token_nll.defvjp(_nll_forward, _token_nll_bwd)


def _local_xent(logits, targets, pad_idx):
    mask = targets != pad_idx
    nll = _token_nll(logits, targets)
    loss = jax.lax.psum(jnp.where(mask, nll, 0.0).sum(), DATA)
    ntokens = jax.lax.psum(mask.sum(dtype=jnp.int32), DATA)
    return loss, ntokens


def vocab_parallel_cross_entropy(logits: jax.Array, targets: jax.Array, mesh: Mesh, pad_idx: int = 1):
    """Summed cross-entropy (nats) over non-pad targets, and their count. Logits: [batch, length, vocab]."""
    fn = jax.shard_map(
        lambda l, t: _local_xent(l, t, pad_idx),
        mesh=mesh,
        in_specs=(P(DATA, None, MODEL), P(DATA, None)),
        out_specs=(P(), P()),
    )
    return fn(logits, targets)


def cross_entropy(logits: jax.Array, targets: jax.Array, pad_idx: int = 1):
    """Reference: plain cross-entropy on (possibly XLA-gathered) logits; same results, for `--criterion cross_entropy`."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = targets != pad_idx
    return jnp.where(mask, nll, 0.0).sum(), mask.sum(dtype=jnp.int32)


def criterion_fn(name: str, mesh: Mesh, pad_idx: int = 1):
    if name == "vocab_parallel_cross_entropy" and mesh.shape[MODEL] > 1:
        return lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, mesh, pad_idx)
    # Without a model axis the vocabulary is not split and the plain form is the same function (and XLA
    # fuses it better on CPU); with one it computes the same loss with XLA choosing the collectives.
    if name in ("cross_entropy", "vocab_parallel_cross_entropy"):
        return lambda logits, targets: cross_entropy(logits, targets, pad_idx)
    raise ValueError(f"unknown criterion {name!r}")
