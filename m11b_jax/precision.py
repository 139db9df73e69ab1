"""Precision policies (fairseq's `--fp16`, `--bf16`, `--memory-efficient-fp16/-bf16`) and fairseq's dynamic
loss scaler as a jittable function of a small state.

| policy                  | parameters | Adam moments | matmuls, activations | loss scaling |
|-------------------------|------------|--------------|----------------------|--------------|
| fp32 (no flag)          | fp32       | fp32         | fp32                 | no           |
| bf16                    | fp32       | fp32         | bf16                 | no           |
| fp16                    | fp32       | fp32         | fp16                 | dynamic      |
| memory_efficient_bf16   | bf16       | fp32         | bf16                 | no           |
| memory_efficient_fp16   | fp16       | fp32         | fp16                 | dynamic      |

LayerNorm, softmax, GELU and the loss run in fp32 under every policy (see model.py). The Adam update is computed
in fp32 and cast to the parameters' dtype (`optim.fairseq_adam_apply`), as fairseq's memory-efficient
optimizers do: 2 + 4 + 4 bytes per parameter plus a 16-bit gradient, instead of 4 + 4 + 4 + 4.

The loss scaler is fairseq's `DynamicLossScaler` (fairseq/optim/dynamic_loss_scaler.py): the backward pass
differentiates `scale x summed loss`; a non-finite gradient norm is an overflow: the update is skipped (no
parameter, moment or update count changes), the scale is divided by 2 (once the share of overflowing steps
since the last rescale reaches the tolerance; never below --threshold-loss-scale), and reaching
--min-loss-scale stops training. After `scale_window` steps without an overflow the scale doubles. Unlike
fairseq, whose checkpoints keep only the scale, the whole scaler state is part of the train state, so a
resumed run continues the scale sequence exactly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from m11b_jax.errors import UserError


class Policy(NamedTuple):
    param_dtype: str
    compute_dtype: str
    loss_scaling: bool


POLICIES = {
    "fp32": Policy("float32", "float32", False),
    "bf16": Policy("float32", "bfloat16", False),
    "fp16": Policy("float32", "float16", True),
    "memory_efficient_bf16": Policy("bfloat16", "bfloat16", False),
    "memory_efficient_fp16": Policy("float16", "float16", True),
}

# fairseq's precision flags, strongest first: --memory-efficient-fp16 with --fp16 means memory-efficient.
FLAGS = ("memory_efficient_fp16", "fp16", "memory_efficient_bf16", "bf16")


def policy_from_flags(fp16: bool, memory_efficient_fp16: bool, bf16: bool, memory_efficient_bf16: bool) -> str:
    """The policy name for fairseq's four precision flags (one-line error when fp16 and bf16 are mixed)."""
    given = dict(fp16=fp16, memory_efficient_fp16=memory_efficient_fp16, bf16=bf16,
                 memory_efficient_bf16=memory_efficient_bf16)
    on = [f for f in FLAGS if given[f]]
    half = [f for f in on if "fp16" in f]
    brain = [f for f in on if "bf16" in f]
    if half and brain:
        raise UserError(f"--{half[0].replace('_', '-')} and --{brain[0].replace('_', '-')} ask for two precisions: "
                        "give the fp16 flags or the bf16 flags, not both")
    return on[0] if on else "fp32"


def describe(policy: str) -> str:
    p = POLICIES[policy]
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return (f"{policy}: {short[p.compute_dtype]} compute, {short[p.param_dtype]} params, fp32 Adam"
            + (", dynamic loss scaling" if p.loss_scaling else ""))


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    """fairseq's --fp16-init-scale, --fp16-scale-window, --fp16-scale-tolerance, --threshold-loss-scale,
    --min-loss-scale (scale_window None: fairseq's default, see `default_scale_window`)."""

    init_scale: float = 128.0
    scale_window: int | None = None
    tolerance: float = 0.0
    threshold: float | None = None
    min_scale: float = 1e-4
    factor: float = 2.0

    def validate(self) -> "LossScaleConfig":
        if not self.init_scale > 0:
            raise UserError(f"--fp16-init-scale {self.init_scale} must be > 0")
        if self.scale_window is not None and self.scale_window < 1:
            raise UserError(f"--fp16-scale-window {self.scale_window} must be >= 1")
        if not 0.0 <= self.tolerance <= 1.0:
            raise UserError(f"--fp16-scale-tolerance {self.tolerance} must be in [0, 1] (a share of overflowing steps)")
        if self.min_scale < 0 or (self.threshold is not None and self.threshold <= 0):
            raise UserError("--min-loss-scale must be >= 0 and --threshold-loss-scale > 0")
        return self

    def with_window(self, data_parallel_size: int, update_freq: int) -> "LossScaleConfig":
        if self.scale_window is not None:
            return self
        return dataclasses.replace(self, scale_window=default_scale_window(data_parallel_size, update_freq))


def default_scale_window(data_parallel_size: int, update_freq: int) -> int:
    """fairseq: int(2**14 / data-parallel world size / update_freq) (at least 1 here)."""
    return max(1, int(2 ** 14 / data_parallel_size / update_freq))


@flax.struct.dataclass
class LossScaleState:
    """fairseq DynamicLossScaler's fields: `loss_scale`, `_iter`, `_last_overflow_iter`, `_last_rescale_iter`,
    `_overflows_since_rescale` (replicated scalars)."""

    scale: jax.Array
    iter: jax.Array
    last_overflow_iter: jax.Array
    last_rescale_iter: jax.Array
    overflows_since_rescale: jax.Array


def init_loss_scale(cfg: LossScaleConfig) -> LossScaleState:
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    return LossScaleState(jnp.asarray(cfg.init_scale, jnp.float32), i32(0), i32(-1), i32(-1), i32(0))


def update_loss_scale(cfg: LossScaleConfig, s: LossScaleState, grad_norm: jax.Array):
    """One step of fairseq's scaler given this step's gradient norm: `check_overflow` then, on a good step,
    `update`. Returns (new state, overflow, min_scale_reached). When the minimum is reached the scale keeps its
    previous value (fairseq raises there; the caller stops training)."""
    if cfg.scale_window is None:
        raise ValueError("LossScaleConfig.scale_window must be resolved (with_window) before use")
    overflow = ~jnp.isfinite(grad_norm)
    # check_overflow, on an overflowing step.
    since = s.iter - s.last_rescale_iter
    since = jnp.where(since == 0, 1000, since)
    overflows = s.overflows_since_rescale + 1
    rescale = overflows.astype(jnp.float32) / since.astype(jnp.float32) >= cfg.tolerance
    lowered = s.scale / cfg.factor
    if cfg.threshold is not None:
        lowered = jnp.maximum(lowered, cfg.threshold)
    down_scale = jnp.where(rescale, lowered, s.scale)
    min_reached = overflow & (down_scale <= cfg.min_scale)
    on_overflow = LossScaleState(
        scale=jnp.where(min_reached, s.scale, down_scale),
        iter=jnp.where(min_reached, s.iter, s.iter + 1),
        last_overflow_iter=s.iter,
        last_rescale_iter=jnp.where(rescale, s.iter, s.last_rescale_iter),
        overflows_since_rescale=jnp.where(rescale, 0, overflows),
    )
    # update, on a good step.
    grow = (s.iter - s.last_overflow_iter) % cfg.scale_window == 0
    on_good = LossScaleState(
        scale=jnp.where(grow, s.scale * cfg.factor, s.scale),
        iter=s.iter + 1,
        last_overflow_iter=s.last_overflow_iter,
        last_rescale_iter=jnp.where(grow, s.iter, s.last_rescale_iter),
        overflows_since_rescale=s.overflows_since_rescale,
    )
    new = jax.tree.map(lambda a, b: jnp.where(overflow, a, b).astype(b.dtype), on_overflow, on_good)
    return new, overflow, min_reached


def warn_if_fp16_on_tpu(policy: str, backend: str) -> str | None:
    """The warning line for fp16 on a TPU (no fast float16 there), or None."""
    if backend == "tpu" and POLICIES[policy].compute_dtype == "float16":
        flag = "--memory-efficient-bf16" if policy.startswith("memory_efficient") else "--bf16"
        return (f"| warning: --{policy.replace('_', '-')} on a TPU: TPUs have no fast float16 matmuls; "
                f"use {flag} (bfloat16 needs no loss scaling)")
    return None
