"""fairseq's Adam and inverse_sqrt schedule as optax pieces, plus fairseq-style gradient clipping.

fairseq Adam (`fairseq/optim/adam.py`, PyTorch's convention), for update t = 1, 2, ...:
    m = b1 m + (1-b1) g;   v = b2 v + (1-b2) g^2
    p -= lr * wd * p                                       (decoupled weight decay, on every parameter)
    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)   (eps added to the *uncorrected* sqrt(v))
Both terms use the parameter from before the update. State and arithmetic are fp32, whatever the
parameters' dtype (16-bit parameters: the result is cast back, fairseq's memory-efficient step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def inverse_sqrt_schedule(lr: float, warmup_updates: int, warmup_init_lr: float = -1.0):
    """fairseq's inverse_sqrt: the update taken after n completed updates uses

        lr(n) = warmup_init_lr + n * (lr - warmup_init_lr) / W     for n < W
        lr(n) = lr * sqrt(W / n)                                    for n >= W

    so the very first update (n = 0) uses warmup_init_lr (0 by default when W > 0, like fairseq).
    """
    if warmup_init_lr < 0:
        warmup_init_lr = 0.0 if warmup_updates > 0 else lr
    w = max(int(warmup_updates), 0)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        if w == 0:
            return lr * jnp.where(n > 0, jax.lax.rsqrt(jnp.maximum(n, 1.0)), 1.0)
        warm = warmup_init_lr + n * (lr - warmup_init_lr) / w
        decay = lr * jnp.sqrt(w / jnp.maximum(n, 1.0))
        return jnp.where(n < w, warm, decay)

    return schedule


def fixed_schedule(lr: float, warmup_updates: int = 0):
    """fairseq's `fixed` scheduler (one --lr, no --force-anneal): the update taken after n completed updates uses

        lr * (n + 1) / W    for n < W (warmup; fairseq sets the first update's lr to lr / W)
        lr                  otherwise (and always when W = 0)
    """
    w = max(int(warmup_updates), 0)

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        if w == 0:
            return jnp.full_like(n, lr)
        return jnp.where(n < w, lr * (n + 1) / w, lr)

    return schedule


class FairseqAdamState(NamedTuple):
    count: jax.Array  # completed updates
    mu: optax.Updates
    nu: optax.Updates


def fairseq_adam_apply(params, grads, state: FairseqAdamState, lr, b1: float, b2: float, eps: float,
                       weight_decay: float, grad_scale=1.0):
    """One fairseq Adam step: (new params, new state). Gradients of any float dtype are multiplied by
    `grad_scale` (the loss scaler's unscaling, clipping) in fp32; the moments and the whole update are fp32, in
    fairseq's order (weight decay first, then the Adam term), and the result is cast to each parameter's dtype:
    fairseq's memory-efficient step for 16-bit parameters, the plain step for fp32 ones."""
    t = (state.count + 1).astype(jnp.float32)
    g32 = lambda g: g.astype(jnp.float32) * grad_scale  # noqa: E731
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g32(g), state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g32(g)), state.nu, grads)
    step_size = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)

    def new_param(p, m, v):
        p32 = p.astype(jnp.float32)
        if weight_decay:
            p32 = p32 + (-weight_decay * lr) * p32
        return (p32 - step_size * (m / (jnp.sqrt(v) + eps))).astype(p.dtype)

    return jax.tree.map(new_param, params, mu, nu), FairseqAdamState(state.count + 1, mu, nu)


def fairseq_adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """`fairseq_adam_apply` as an optax transformation: updates to *add* to the params (optax convention)."""
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
        return FairseqAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("fairseq_adam needs params (weight decay uses them)")
        new, state = fairseq_adam_apply(params, grads, state, schedule(state.count), b1, b2, eps, weight_decay)
        return jax.tree.map(lambda n, p: n.astype(jnp.float32) - p.astype(jnp.float32), new, params), state

    return optax.GradientTransformationExtraArgs(init, update)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm_fairseq(grads, max_norm: float):
    """fairseq's clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)); max_norm 0 = off. Returns (grads, norm)."""
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads), norm
