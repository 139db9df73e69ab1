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


def _local_xent(logits, targets, pad_idx):
    """Runs per device: logits [b, t, V/mp] (this device's vocab slice), targets [b, t] (global ids)."""
    logits = logits.astype(jnp.float32)
    v_local = logits.shape[-1]
    start = jax.lax.axis_index(MODEL) * v_local
    # The max only shifts for stability; log-sum-exp's gradient does not depend on it.
    m = jax.lax.pmax(jax.lax.stop_gradient(logits.max(axis=-1)), MODEL)
    sum_exp = jax.lax.psum(jnp.exp(logits - m[..., None]).sum(axis=-1), MODEL)
    local_idx = targets - start
    owned = (local_idx >= 0) & (local_idx < v_local)
    picked = jnp.take_along_axis(logits, jnp.clip(local_idx, 0, v_local - 1)[..., None], axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(owned, picked, 0.0), MODEL)
    nll = jnp.log(sum_exp) - (target_logit - m)
    mask = targets != pad_idx
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
    if name == "vocab_parallel_cross_entropy":
        return lambda logits, targets: vocab_parallel_cross_entropy(logits, targets, mesh, pad_idx)
    if name == "cross_entropy":
        return lambda logits, targets: cross_entropy(logits, targets, pad_idx)
    raise ValueError(f"unknown criterion {name!r}")
