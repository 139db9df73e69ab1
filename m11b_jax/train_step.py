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
from m11b_jax.optim import FairseqAdamState, clip_by_global_norm_fairseq, fairseq_adam, inverse_sqrt_schedule


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

    def schedule(self):
        return inverse_sqrt_schedule(self.lr, self.warmup_updates, self.warmup_init_lr)

    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        return fairseq_adam(self.schedule(), self.betas[0], self.betas[1], self.eps, self.weight_decay)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed updates (int32 scalar)
    params: dict
    opt_state: FairseqAdamState


def state_shardings(cfg: ModelConfig, mesh: Mesh, rules) -> TrainState:
    """Adam moments are sharded like their parameters; counters are replicated."""
    ps = param_shardings(cfg, mesh, rules)
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=ps, opt_state=FairseqAdamState(count=rep, mu=ps, nu=ps))


def abstract_train_state(cfg: ModelConfig, mesh: Mesh, rules, ocfg: OptimConfig) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the whole train state: nothing is allocated."""
    params = abstract_params(cfg, mesh, rules)
    shapes = jax.eval_shape(lambda p: TrainState(jnp.zeros([], jnp.int32), p, ocfg.optimizer().init(p)), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings(cfg, mesh, rules))


def init_train_state(cfg: ModelConfig, mesh: Mesh, rules, ocfg: OptimConfig, seed: int = 1) -> TrainState:
    """Parameters and Adam state created by one jitted init, each shard on its own device."""
    tx = ocfg.optimizer()

    def _init(key):
        params = flax.linen.unbox(init_variables(cfg, key))["params"]
        return TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))

    shardings = state_shardings(cfg, mesh, rules)
    with sharding.activate(mesh, rules):
        return jax.jit(_init, out_shardings=shardings)(jax.random.key(seed))


def state_from_params(params, ocfg: OptimConfig, shardings: TrainState) -> TrainState:
    """A fresh train state (update 0, zero Adam moments) around given (e.g. converted) parameters."""
    tx = ocfg.optimizer()
    make = jax.jit(lambda p: TrainState(jnp.zeros([], jnp.int32), p, tx.init(p)), out_shardings=shardings)
    return make(params)


def batch_shardings(mesh: Mesh, rules) -> dict:
    """Batches are [update_freq, batch, length]: the batch axis as the table places it (default: over `data`)."""
    s = sharding.named_sharding(mesh, rules, (None, BATCH, None))
    return {"source": s, "target": s}


def make_train_step(cfg: ModelConfig, mesh: Mesh, rules, ocfg: OptimConfig, *, criterion: str = "vocab_parallel_cross_entropy",
                    seed: int = 1, donate: bool = True, rng_impl: str = "threefry2x32",
                    compiler_options: dict | None = None):
    """Returns a jitted `step(state, batch) -> (state, metrics)`; metrics are replicated fp32 scalars.

    rng_impl: the dropout generator, `threefry2x32` (JAX's default: identical masks on any backend and
    mesh) or `rbg` (XLA's RngBitGenerator: much cheaper on GPUs; deterministic for a given program).
    compiler_options: XLA options for the step's compile (m11b_jax.targets.GPU_COMPILER_SETTINGS on GPUs)."""
    if cfg.loss_impl == "fused":
        cfg.validate(mesh.shape[sharding.MODEL])  # the fused loss has no model axis: a one-line error otherwise
    check_platform(cfg.attention_impl, mesh.devices.flat[0].platform)  # cudnn needs a GPU; flash on CPU: a warning
    model = TransformerLM(cfg)
    tx = ocfg.optimizer()
    loss_of = criterion_fn(criterion, mesh, rules, cfg.pad_idx)
    shardings = state_shardings(cfg, mesh, rules)
    base_key = jax.random.key(seed, impl=rng_impl)
    deterministic = cfg.dropout == 0 and cfg.attention_dropout == 0 and cfg.activation_dropout == 0

    def micro_loss(params, source, target, key, denom):
        if cfg.loss_impl == "fused":  # the output projection inside the loss: no logits formed
            hidden, embed = model.apply({"params": params}, source, deterministic=deterministic,
                                        rngs={"dropout": key}, method=TransformerLM.output_operands)
            loss, ntok = output_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), embed, target.reshape(-1),
                                              cfg.pad_idx)
        else:
            logits = model.apply({"params": params}, source, deterministic=deterministic, rngs={"dropout": key})
            loss, ntok = loss_of(logits, target)  # summed nats, target count
        # Dividing inside the differentiated function gives fairseq's grad(sum)/ntokens without a
        # separate pass (and buffer) over the gradients.
        return loss / denom, (loss, ntok)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch):
        # Dropout keys depend only on (seed, update number, micro-batch): a resumed run draws the same masks.
        step_key = jax.random.fold_in(base_key, state.step)
        k = batch["source"].shape[0]
        denom = jnp.maximum((batch["target"] != cfg.pad_idx).sum(), 1).astype(jnp.float32)
        if k == 1:
            grads, (loss, ntok) = grad_fn(state.params, batch["source"][0], batch["target"][0],
                                          jax.random.fold_in(step_key, 0), denom)
        else:
            def body(carry, xs):
                g_acc, l_acc, n_acc = carry
                i, src, tgt = xs
                g, (l, n) = grad_fn(state.params, src, tgt, jax.random.fold_in(step_key, i), denom)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss, ntok), _ = jax.lax.scan(
                body, (zeros, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)),
                (jnp.arange(k), batch["source"], batch["target"]))
        grads, gnorm = clip_by_global_norm_fairseq(grads, ocfg.clip_norm)
        lr = ocfg.schedule()(state.opt_state.count)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(state.step + 1, params, opt_state)
        metrics = {
            "loss": loss / denom / math.log(2),  # base 2, like fairseq
            "nll_sum": loss,
            "ntokens": ntok.astype(jnp.float32),
            "gnorm": gnorm,
            "lr": lr,
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
