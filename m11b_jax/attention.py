"""Causal attention core with a hand-written backward pass (config `attention_impl="manual"`).

Same function as the einsum + autodiff path in `model.SelfAttention` (scores in the compute dtype, masked
softmax in fp32, optional attention dropout on the probabilities), arranged for XLA:CPU:

* forward keeps the *unnormalized* exponentials e = exp(s - max) and normalizes the [.., t, head_dim] output
  instead of the [.., t, t] probabilities: out = (e @ v) / sum(e);
* backward uses the flash-attention identity rowsum(dP * P) = rowsum(dO * O), a reduction over head_dim
  instead of over the key axis;
* queries go in blocks (config `attention_query_block`, 128 by default) and block i reads keys [0, end of
  block i) only: the causally masked rest of each row is never computed (a quarter of the [t, t] work at
  t=256, 7/16 at t=1024);
* every product is a plain batched GEMM. The two products that contract the query axis (dK = dS^T Q,
  dV = P^T dO) are computed as (Q^T dS)^T and (dO^T P)^T with the small [t, head_dim] operand transposed;
  autodiff instead contracts the large [t, t] operand along its first axis, which XLA:CPU runs through a
  slow generic kernel. Optimization barriers keep XLA from folding those transposes back into the products.

Saved for the backward pass: q, k, v, e (fp32, the computed blocks of [b, h, t, t]), 1/sum(e), the output and
the dropout mask. One difference from autodiff, at positions nothing reads: a query that sees no key at all (a
pad in a left-padded prefix) outputs 0 here and the mean of every value there (fairseq: NaN). The einsum path
stays the default: under `jax.checkpoint` policies and on GPUs it is the measured one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)  # finite: fully masked rows (pad queries) stay finite
_BATCH = ((0, 1), (0, 1))  # [b, h, ...] batch axes of every product


def _qk(a, b):
    """a [b,h,m,d] . b [b,h,n,d] -> [b,h,m,n] (contract the last axis of both)."""
    return jax.lax.dot_general(a, b, (((3,), (3,)), _BATCH))


def _pv(a, b):
    """a [b,h,m,k] . b [b,h,k,n] -> [b,h,m,n]."""
    return jax.lax.dot_general(a, b, (((3,), (2,)), _BATCH))


def _at_b(a, b):
    """a^T b over axis 2: a [b,h,t,m] (large), b [b,h,t,n] (small) -> [b,h,m,n].

    Computed as (b^T a)^T with b^T materialized: both the product and the transposes stay plain."""
    b_t = jax.lax.optimization_barrier(jnp.swapaxes(b, 2, 3))
    return jnp.swapaxes(jax.lax.optimization_barrier(_pv(b_t, a)), 2, 3)


def _blocks(t: int, query_block: int):
    """(q_start, q_end) of each query block (the last one shorter when query_block does not divide t); block i
    sees keys [0, q_end) only (the rest is causally masked)."""
    size = query_block if 0 < query_block < t else t
    return [(i, min(i + size, t)) for i in range(0, t, size)]


def causal_allowed_at(key_mask, query_positions):
    """[b, 1, n, K] bool for queries at query_positions ([n] or [b, n]; may be traced: a decode step's cache
    columns) and every key 0..K-1 of key_mask [b, K]: causal and not a pad key. With
    query_positions = arange(t) and K = t it equals causal_allowed(key_mask, 0, t)."""
    causal = jnp.asarray(query_positions)[..., :, None] >= jnp.arange(key_mask.shape[1])
    causal = causal if causal.ndim == 3 else causal[None]
    return causal[:, None] & key_mask[:, None, None, :]


def causal_allowed(key_mask, q0: int, q1: int):
    """[b, 1, q1 - q0, q1] bool for queries q0..q1-1 and keys 0..q1-1: causal and not a pad key: the mask of this
    module's blocks (model.py uses causal_allowed_at, the same rule at any positions)."""
    causal = jnp.arange(q0, q1)[:, None] >= jnp.arange(q1)[None, :]
    return causal[None, None] & key_mask[:, None, None, :q1]


def _forward(q, k, v, key_mask, keep, keep_scale, query_block):
    outs, saved = [], []
    # Queries that see no key at all (pads in a left-padded prefix) output 0 (not the autodiff path's mean over
    # every value; fairseq gives NaN there). Nothing reads those positions.
    sees_a_key = (jnp.cumsum(key_mask, axis=1) > 0)[:, None, :, None]
    for q0, q1 in _blocks(q.shape[2], query_block):
        allowed = causal_allowed(key_mask, q0, q1)
        s = jnp.where(allowed, _qk(q[:, :, q0:q1], k[:, :, :q1]).astype(jnp.float32), _NEG)
        # e is exactly 0 at every masked score of a row that sees a key (exp(_NEG - max) underflows), with no
        # second select over the [q, k] block: XLA:CPU fuses max, subtract and exp into one YNNPACK kernel, and a
        # select there would cost another pass per consumer. A row that sees no key has e = 1 everywhere and
        # inv_l = 0, so its output and every gradient through it are 0.
        e = jnp.exp(s - s.max(axis=-1, keepdims=True))
        inv_l = jnp.where(sees_a_key[:, :, q0:q1], 1.0 / e.sum(axis=-1, keepdims=True), 0.0)
        pe = e if keep is None else jnp.where(keep[:, :, q0:q1, :q1], e * keep_scale, 0.0)
        outs.append((_pv(pe.astype(q.dtype), v[:, :, :q1]).astype(jnp.float32) * inv_l).astype(q.dtype))
        saved.append((e, inv_l))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out, (q, k, v, saved, out, key_mask, keep)


def _backward(keep_scale, query_block, residuals, d_out):
    q, k, v, saved, out, key_mask, keep = residuals
    # rowsum(dP * P) = rowsum(dO * O): the softmax backward without a [t, t] reduction.
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(axis=-1, keepdims=True)
    dqs, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
    for (q0, q1), (e, inv_l) in zip(_blocks(q.shape[2], query_block), saved):
        do = d_out[:, :, q0:q1]
        p = e * inv_l
        dp = _qk(do, v[:, :, :q1]).astype(jnp.float32)  # d loss / d (dropped-out probabilities)
        pd = p
        if keep is not None:
            kb = keep[:, :, q0:q1, :q1]
            dp = jnp.where(kb, dp * keep_scale, 0.0)
            pd = jnp.where(kb, p * keep_scale, 0.0)
        ds = (p * (dp - delta[:, :, q0:q1])).astype(q.dtype)  # p is 0 at every masked score
        dqs.append(_pv(ds, k[:, :, :q1]))
        dk = dk.at[:, :, :q1].add(_at_b(ds, q[:, :, q0:q1]))  # ds^T q
        dv = dv.at[:, :, :q1].add(_at_b(pd.astype(q.dtype), do))  # p^T dO
    dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=2)
    return dq, dk, dv, None, None


_core = jax.custom_vjp(lambda q, k, v, key_mask, keep, keep_scale, query_block:
                       _forward(q, k, v, key_mask, keep, keep_scale, query_block)[0], nondiff_argnums=(5, 6))
_core.defvjp(_forward, _backward)


def causal_attention(q, k, v, key_mask, keep=None, keep_scale: float = 1.0, query_block: int = 128):
    """q (already scaled), k, v: [batch, heads, length, head_dim] in the compute dtype; key_mask [batch, length]
    (False at pads); keep: None or the attention-dropout keep mask [batch, heads, length, length] with
    keep_scale = 1 / P(keep); query_block: queries per block (0: one block; the last block may be shorter).
    Returns [batch, heads, length, head_dim] in the compute dtype."""
    return _core(q, k, v, key_mask, keep, keep_scale, query_block)
