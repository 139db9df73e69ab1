"""The train state, its abstract (sharded) form, and the jitted, sharded train step.

One step = `update_freq` micro-batches (accumulated inside the step) -> fairseq Adam update. Like fairseq,
the gradient is that of the *summed* token loss divided by the number of target tokens in the update.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from m11b_jax import sharding
from m11b_jax.axis_names import BATCH
from m11b_jax.config import ModelConfig
from m11b_jax.flash_attention import check_platform
from m11b_jax.loss import criterion_fn, output_cross_entropy
from m11b_jax.model import TransformerLM, init_variables
from m11b_jax.param_tree import abstract_params, param_shardings
from m11b_jax.optim import (FairseqAdamState, clip_by_global_norm_fairseq, fairseq_adam, fairseq_adam_apply,
                            fixed_schedule, global_norm, inverse_sqrt_schedule)
from m11b_jax.precision import LossScaleConfig, LossScaleState, init_loss_scale, update_loss_scale


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """fairseq's optimizer flags (`--lr`, `--adam-betas`, ...)."""

    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_updates: int = 3000
    warmup_init_lr: float = -1.0
    clip_norm: float = 0.0
    lr_scheduler: str = "inverse_sqrt"  # or "fixed" (optim.LR_SCHEDULERS)

    def schedule(self):
        """lr of the update taken after n completed updates, as a function of n."""
        if self.lr_scheduler == "fixed":
            return fixed_schedule(self.lr, self.warmup_updates)
        return inverse_sqrt_schedule(self.lr, self.warmup_updates, self.warmup_init_lr)

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        return fairseq_adam(self.schedule(), self.betas[0], self.betas[1], self.eps, self.weight_decay)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed updates (int32 scalar)
    params: dict
    opt_state: FairseqAdamState
    loss_scale: LossScaleState | None = None  # fp16 policies only (precision.py); None is an empty subtree


def _fresh_state(params, tx, loss_scale: LossScaleConfig | None) -> TrainState:
    scaler = init_loss_scale(loss_scale) if loss_scale is not None else None
    return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params), scaler)


def state_shardings(cfg: ModelConfig, mesh: Mesh, rules, loss_scale: LossScaleConfig | None = None) -> TrainState:
    """Adam moments are sharded like their parameters; counters (and the loss scaler) are replicated."""
    ps = param_shardings(cfg, mesh, rules)
    rep = sharding.replicated(mesh)
    scaler = None if loss_scale is None else LossScaleState(rep, rep, rep, rep, rep)
    return TrainState(step=rep, params=ps, opt_state=FairseqAdamState(count=rep, mu=ps, nu=ps), loss_scale=scaler)


def abstract_train_state(cfg: ModelConfig, mesh: Mesh, rules, ocfg: OptimConfig,
                         loss_scale: LossScaleConfig | None = None) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the whole train state: nothing is allocated."""
    params = abstract_params(cfg, mesh, rules)
    shapes = jax.eval_shape(lambda p: _fresh_state(p, ocfg.optimizer(), loss_scale), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings(cfg, mesh, rules, loss_scale))


def init_train_state(cfg: ModelConfig, mesh: Mesh, rules, ocfg: OptimConfig, seed: int = 1,
                     loss_scale: LossScaleConfig | None = None) -> TrainState:
    """Parameters and Adam state created by one jitted init, each shard on its own device."""
    tx = ocfg.optimizer()

    def _init(key):
        params = flax.linen.unbox(init_variables(cfg, key))["params"]
        return _fresh_state(params, tx, loss_scale)

    shardings = state_shardings(cfg, mesh, rules, loss_scale)
    with sharding.activate(mesh, rules):
        return jax.jit(_init, out_shardings=shardings)(jax.random.key(seed))


def state_from_params(params, ocfg: OptimConfig, shardings: TrainState,
                      loss_scale: LossScaleConfig | None = None) -> TrainState:
    """A fresh train state (update 0, zero Adam moments, the initial loss scale) around given (e.g. converted)
    parameters, already in the run's parameter dtype (params_io.load_params casts)."""
    tx = ocfg.optimizer()
    make = jax.jit(lambda p: _fresh_state(p, tx, loss_scale), out_shardings=shardings)
    return make(params)


def batch_shardings(mesh: Mesh, rules) -> dict:
    """Batches are [update_freq, batch, length]: the batch axis as the table places it (default: over `data`)."""
    s = sharding.named_sharding(mesh, rules, (None, BATCH, None))
    return {"source": s, "target": s}


def make_train_step(cfg: ModelConfig, mesh: Mesh, rules, ocfg: OptimConfig, *, criterion: str = "vocab_parallel_cross_entropy",
                    seed: int = 1, donate: bool = True, rng_impl: str = "threefry2x32",
                    compiler_options: dict | None = None, loss_scale: LossScaleConfig | None = None):
    """Returns a jitted `step(state, batch) -> (state, metrics)`; metrics are replicated scalars.

    loss_scale (the fp16 policies): the backward pass differentiates `loss scale x summed loss` (fairseq's
    convention); the gradients are unscaled in fp32 inside the Adam step. A non-finite gradient norm skips the
    update inside the step (parameters, Adam state and the update count keep their values) and the scaler
    lowers the scale (precision.update_loss_scale); metrics then hold overflow 1 (and min_scale_reached 1 when
    the scale would go below --min-loss-scale: the caller stops).

    rng_impl: the dropout generator, `threefry2x32` (JAX's default: identical masks on any backend and
    mesh) or `rbg` (XLA's RngBitGenerator: much cheaper on GPUs; deterministic for a given program).
    compiler_options: XLA options for the step's compile (m11b_jax.targets.GPU_COMPILER_SETTINGS on GPUs)."""
    if cfg.loss_impl == "fused":
        cfg.validate(mesh.shape[sharding.MODEL])  # the fused loss has no model axis: a one-line error otherwise
    check_platform(cfg.attention_impl, mesh.devices.flat[0].platform)  # cudnn needs a GPU; flash on CPU: a warning
    model = TransformerLM(cfg)
    loss_of = criterion_fn(criterion, mesh, rules, cfg.pad_idx)
    shardings = state_shardings(cfg, mesh, rules, loss_scale)
    base_key = jax.random.key(seed, impl=rng_impl)
    deterministic = cfg.dropout == 0 and cfg.attention_dropout == 0 and cfg.activation_dropout == 0

    def micro_loss(params, source, target, key, mult):
        if cfg.loss_impl == "fused":  # the output projection inside the loss: no logits formed
            hidden, embed = model.apply({"params": params}, source, deterministic=deterministic,
                                        rngs={"dropout": key}, method=TransformerLM.output_operands)
            loss, ntok = output_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), embed, target.reshape(-1),
                                              cfg.pad_idx)
        else:
            logits = model.apply({"params": params}, source, deterministic=deterministic, rngs={"dropout": key})
            loss, ntok = loss_of(logits, target)  # summed nats, target count
        # mult = 1 / ntokens: fairseq's grad(sum) / ntokens without a separate pass (and buffer) over the
        # gradients. With loss scaling mult = the scale, and the step divides by scale x ntokens in fp32.
        return loss * mult, (loss, ntok)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        # Dropout keys depend only on (seed, update number, micro-batch): a resumed run draws the same masks.
        step_key = jax.random.fold_in(base_key, state.step)
        k = batch["source"].shape[0]
        denom = jnp.maximum((batch["target"] != cfg.pad_idx).sum(), 1).astype(jnp.float32)
        mult = 1.0 / denom if loss_scale is None else state.loss_scale.scale
        if k == 1:
            grads, (loss, ntok) = grad_fn(state.params, batch["source"][0], batch["target"][0],
                                          jax.random.fold_in(step_key, 0), mult)
        else:
            def body(carry, xs):
                g_acc, l_acc, n_acc = carry
                i, src, tgt = xs
                g, (l, n) = grad_fn(state.params, src, tgt, jax.random.fold_in(step_key, i), mult)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss, ntok), _ = jax.lax.scan(
                body, (zeros, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)),
                (jnp.arange(k), batch["source"], batch["target"]))
        lr = ocfg.schedule()(state.opt_state.count)
        adam = lambda g, scale=1.0: fairseq_adam_apply(  # noqa: E731
            state.params, g, state.opt_state, lr, *ocfg.betas, ocfg.eps, ocfg.weight_decay, grad_scale=scale)
        extra = {}
        if loss_scale is None:
            grads, gnorm = clip_by_global_norm_fairseq(grads, ocfg.clip_norm)
            params, opt_state = adam(grads)
            new_state = TrainState(state.step + 1, params, opt_state)
        else:
            # fairseq's FP16Optimizer: norm of the unscaled gradients; clipping scales by max_norm / norm.
            unscale = 1.0 / (state.loss_scale.scale * denom)
            gnorm = global_norm(grads) * unscale
            if ocfg.clip_norm > 0:
                unscale = unscale * jnp.where(gnorm > ocfg.clip_norm, ocfg.clip_norm / gnorm, 1.0)
            params, opt_state = adam(grads, unscale)
            scaler, overflow, min_reached = update_loss_scale(loss_scale, state.loss_scale, gnorm)
            stepped = TrainState(state.step + 1, params, opt_state, scaler)
            kept = TrainState(state.step, state.params, state.opt_state, scaler)
            # An overflowing step changes nothing but the scaler: one elementwise select, fused into the update.
            new_state = jax.tree.map(lambda a, b: jnp.where(overflow, b, a), stepped, kept)
            extra = {"loss_scale": scaler.scale, "overflow": overflow.astype(jnp.float32),
                     "min_scale_reached": min_reached.astype(jnp.float32)}
        metrics = {
            "loss": loss / denom / math.log(2),  # base 2, like fairseq
            "nll_sum": loss,
            "ntokens": ntok.astype(jnp.float32),
            "gnorm": gnorm,
            "lr": lr,
            "update": new_state.step,
            **extra,
        }
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(shardings, batch_shardings(mesh, rules)),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,) if donate else (),
                     compiler_options=compiler_options or None)

    def run(state, batch):
        with sharding.activate(mesh, rules):
            return jitted(state, batch)

    run.jitted = jitted
    run.lower = lambda state, batch: _lower(jitted, mesh, rules, state, batch)
    return run


def _lower(jitted, mesh, rules, state, batch):
    with sharding.activate(mesh, rules):
        return jitted.lower(state, batch)


def make_eval_loss(cfg: ModelConfig, mesh: Mesh, rules, criterion: str = "vocab_parallel_cross_entropy"):
    """Jitted `(params, source, target) -> (summed nats, ntokens)` without dropout, for validation."""
    model = TransformerLM(cfg)
    loss_of = criterion_fn(criterion, mesh, rules, cfg.pad_idx)
    bs = sharding.batch_sharding(mesh, 2, rules=rules)
    f = jax.jit(lambda p, s, t: loss_of(model.apply({"params": p}, s, deterministic=True), t),
                in_shardings=(param_shardings(cfg, mesh, rules), bs, bs), out_shardings=sharding.replicated(mesh))

    def run(params, source, target):
        with sharding.activate(mesh, rules):
            return f(params, source, target)

    return run
