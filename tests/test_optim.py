"""fairseq Adam, inverse_sqrt and clipping against plain-numpy transcriptions of fairseq's update rules,
and --update-freq accumulation against one big batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m11b_jax import sharding
from m11b_jax.config import load_config
from m11b_jax.optim import clip_by_global_norm_fairseq, fairseq_adam, inverse_sqrt_schedule
from m11b_jax.train_step import OptimConfig, batch_shardings, init_train_state, make_train_step


def numpy_fairseq_adam(params, grads_seq, lr_of, b1, b2, eps, wd):
    """fairseq/optim/adam.py's step, transcribed per parameter with float64 numpy."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        lr = lr_of(t - 1)  # lr for the update after t-1 completed updates
        for k in p:
            g = grads[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            denom = np.sqrt(v[k]) + eps  # eps on the uncorrected sqrt(v), PyTorch style
            step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            if wd != 0:
                p[k] = p[k] + (-wd * lr) * p[k]
            p[k] = p[k] - step_size * m[k] / denom
    return p


def fairseq_inverse_sqrt(n, lr, warmup, warmup_init_lr=0.0):
    """fairseq's InverseSquareRootSchedule after n completed updates."""
    if n < warmup:
        return warmup_init_lr + n * (lr - warmup_init_lr) / warmup
    return lr * warmup ** 0.5 * n ** -0.5


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_matches_numpy_fairseq_several_updates(wd):
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(7, 5)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
    # Gradients of very different scales, so the eps placement matters for the small ones.
    grads_seq = [{"w": (rng.normal(size=(7, 5)) * 10.0 ** rng.integers(-9, 1)).astype(np.float32),
                  "b": (rng.normal(size=(5,)) * 1e-7).astype(np.float32)} for _ in range(6)]
    lr, warmup, b1, b2, eps = 1e-2, 3, 0.9, 0.98, 1e-8
    sched = inverse_sqrt_schedule(lr, warmup)
    tx = fairseq_adam(sched, b1, b2, eps, wd)
    p = jax.tree.map(jnp.asarray, params)
    st = tx.init(p)
    for g in grads_seq:
        upd, st = tx.update(jax.tree.map(jnp.asarray, g), st, p)
        p = optax.apply_updates(p, upd)
    want = numpy_fairseq_adam(params, grads_seq, lambda n: fairseq_inverse_sqrt(n, lr, warmup), b1, b2, eps, wd)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-6, atol=1e-7)
    # The first update used lr 0: with only it, nothing may change.
    p1, _ = tx.update(jax.tree.map(jnp.asarray, grads_seq[0]), tx.init(params), params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(p1))


def test_eps_is_added_to_uncorrected_sqrt_v():
    # With a tiny gradient the two eps conventions differ by orders of magnitude; pin fairseq's.
    g = np.full((3,), 1e-9, np.float32)
    tx = fairseq_adam(1.0, 0.9, 0.98, 1e-8, 0.0)
    upd, _ = tx.update({"x": jnp.asarray(g)}, tx.init({"x": jnp.zeros(3)}), {"x": jnp.zeros(3)})
    m, v = 0.1 * 1e-9, 0.02 * 1e-18
    fairseq = math.sqrt(1 - 0.98) / (1 - 0.9) * m / (math.sqrt(v) + 1e-8)
    bias_corrected_eps = (m / 0.1) / (math.sqrt(v / 0.02) + 1e-8)
    assert abs(fairseq - bias_corrected_eps) > 0.1 * fairseq
    np.testing.assert_allclose(-np.asarray(upd["x"]), fairseq, rtol=1e-5)


@pytest.mark.parametrize("warmup_init_lr", [-1.0, 1e-7])
def test_inverse_sqrt_lr_at_key_updates(warmup_init_lr):
    L, W = 1.5e-4, 3000
    sched = inverse_sqrt_schedule(L, W, warmup_init_lr)
    init = 0.0 if warmup_init_lr < 0 else warmup_init_lr
    expect = {0: init, 1: init + (L - init) / W, W - 1: init + (W - 1) * (L - init) / W, W: L, 4 * W: L / 2}
    for n, lr in expect.items():
        np.testing.assert_allclose(float(sched(n)), lr, rtol=1e-6, atol=1e-12, err_msg=f"update {n}")
    assert float(sched(0)) == pytest.approx(init, rel=1e-6, abs=0)  # the first update uses warmup_init_lr (0 by default)


def test_clipping_matches_fairseq_rule():
    rng = np.random.default_rng(1)
    grads = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(6,)).astype(np.float32)}
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    for max_norm in (0.5 * norm, 2 * norm):
        clipped, got_norm = clip_by_global_norm_fairseq(jax.tree.map(jnp.asarray, grads), max_norm)
        coef = min(max_norm / (norm + 1e-6), 1.0)
        np.testing.assert_allclose(float(got_norm), norm, rtol=1e-6)
        for k in grads:
            np.testing.assert_allclose(np.asarray(clipped[k]), grads[k] * coef, rtol=1e-6)
    same, got_norm = clip_by_global_norm_fairseq(jax.tree.map(jnp.asarray, grads), 0.0)  # 0 = off
    np.testing.assert_allclose(float(got_norm), norm, rtol=1e-6)
    for k in grads:
        np.testing.assert_array_equal(np.asarray(same[k]), grads[k])


def test_update_freq_2_equals_one_big_batch():
    """Two accumulated micro-batches == one batch of both, including the token-count normalization."""
    cfg = load_config("tiny", dropout=0.0, attention_dropout=0.0, max_positions=32)
    mesh = sharding.make_mesh(2)  # (4, 2)
    rules = sharding.logical_rules()
    ocfg = OptimConfig(lr=1e-3, warmup_updates=0, weight_decay=0.01, clip_norm=0.5)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, size=(2, 8, 32)).astype(np.int32)
    tokens[0, 3, 20:] = 1  # pads (different counts per micro-batch) must not count
    tokens[1, :2, 10:] = 1
    source, target = tokens, np.roll(tokens, -1, axis=-1)
    bs = batch_shardings(mesh, rules)
    results = []
    for k in (2, 1):
        batch = {"source": source.reshape(k, 16 // k, 32), "target": target.reshape(k, 16 // k, 32)}
        batch = {n: jax.device_put(v, bs[n]) for n, v in batch.items()}
        state = init_train_state(cfg, mesh, rules, ocfg, seed=3)
        step = make_train_step(cfg, mesh, rules, ocfg, seed=3)
        state, m = step(state, batch)
        results.append((jax.device_get(state.params), jax.device_get(m)))
    (p2, m2), (p1, m1) = results
    for key in ("loss", "gnorm", "ntokens", "nll_sum"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    assert m1["ntokens"] == (target != 1).sum()
    # Adam's first step is nearly scale-free (m / sqrt(v)), so a wrong gradient scale shows in gnorm above;
    # here the parameters must agree far below the size of one update (lr 1e-3).
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
