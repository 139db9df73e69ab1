"""How each parameter is initialized: fairseq's rules, by name (config `init`).

Read from fairseq's source (and the Megatron-LM fork its model-parallel layers import), not assumed:

`megatron` — fairseq's model-parallel `transformer_lm` (`transformer_lm_megatron*`, the release's 8-way run).
    q/k/v and fc1 are Megatron `ColumnParallelLinear`, out_proj and fc2 `RowParallelLinear`, built without an
    `init_method`, so the layer's default `xavier_uniform_` applies. With a model-parallel size > 1 the fork's
    `_initialize_affine_weight` draws the FULL [out, in] master weight with `gain=1/sqrt(2)` and keeps its
    rank's slice: every projection is U(-b, b), b = 2^-0.5 * sqrt(6 / (fan_in + fan_out)) of the full matrix.
    Every bias is zero. The embedding (`VocabParallelEmbedding` with fairseq's `_vocab_init`, which ignores the
    gain) is N(0, d^-0.5) with row 1 (`<pad>`) zero.
`megatron_mp1` — the same layers with `--model-parallel-size 1`: the fork calls the init on the weight itself,
    so the gain is 1 (b = sqrt(6 / (fan_in + fan_out))). Biases zero, the same embedding.
`fairseq` — fairseq's single-device `transformer_lm` (`transformer_lm`, `transformer_lm_gpt*`):
    `MultiheadAttention.reset_parameters`: q/k/v weights xavier_uniform gain 2^-0.5, out_proj xavier_uniform gain
    1 and its bias 0; the q/k/v biases keep nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). fc1/fc2 are
    plain nn.Linear: weight kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same.
    The embedding is N(0, d^-0.5) with the padding row zero.

LayerNorms are weight 1, bias 0 in every rule. fan_in/fan_out are of the whole (unsharded) matrix: the init
runs under jit with sharded outputs, so each device draws only its slice of one global draw.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from m11b_jax.config import INIT_RULES  # noqa: F401  (the names, for callers)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
MEGATRON_GAIN = 2 ** -0.5


def uniform(bound: float):
    """U(-bound, bound) as a Flax initializer."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def zeros(key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def xavier_bound(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """torch.nn.init.xavier_uniform_'s bound."""
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def projection_bounds(rule: str, name: str, fan_in: int, fan_out: int) -> tuple[float, float]:
    """(weight bound, bias bound) of projection `name` ([fan_in -> fan_out]) under `rule`; a bound of 0 = zeros.

    Every weight and bias of every rule is uniform on [-bound, bound]: this is the whole rule."""
    if name not in PROJECTIONS:
        raise ValueError(f"unknown projection {name!r}")
    if rule == "megatron":
        return xavier_bound(fan_in, fan_out, MEGATRON_GAIN), 0.0
    if rule == "megatron_mp1":
        return xavier_bound(fan_in, fan_out), 0.0
    if rule == "fairseq":
        linear_default = 1.0 / math.sqrt(fan_in)  # nn.Linear: kaiming_uniform(a=sqrt(5)) and its bias
        if name in ("q_proj", "k_proj", "v_proj"):
            return xavier_bound(fan_in, fan_out, 2 ** -0.5), linear_default
        if name == "out_proj":
            return xavier_bound(fan_in, fan_out), 0.0
        return linear_default, linear_default
    raise ValueError(f"unknown init rule {rule!r}: one of {', '.join(INIT_RULES)}")


def projection_inits(rule: str, name: str, fan_in: int, fan_out: int):
    """(kernel_init, bias_init) Flax initializers for projection `name` under `rule`."""
    w, b = projection_bounds(rule, name, fan_in, fan_out)
    return uniform(w), (uniform(b) if b > 0 else zeros)


def embedding_init(pad_idx: int):
    """N(0, d^-0.5) with the padding row zero (every rule; d = the row width)."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, jnp.float32) * (shape[-1] ** -0.5)
        return w.at[pad_idx].set(0).astype(dtype)

    return init
