"""loss_impl="fused" (m11b_jax.loss.output_cross_entropy): the tied output projection and the cross-entropy as one
operation with a backward that never forms the gradient of the logits. The same function as the logits path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m11b_jax import sharding
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.loss import _shift_without_max, cross_entropy, output_cross_entropy
from m11b_jax.model import TransformerLM
from m11b_jax.train_step import OptimConfig, batch_shardings, init_train_state, make_train_step
from model_fixtures import PAD, tiny_problem


def _problem(n=96, d=32, vocab=200, scale=3.0):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    embed = jnp.asarray(rng.standard_normal((vocab, d)) * scale / np.sqrt(d), jnp.float32)
    targets = rng.integers(4, vocab, n)
    targets[5:9] = PAD
    targets[-1] = PAD
    return hidden, embed, jnp.asarray(targets, jnp.int32)


@pytest.mark.parametrize("data", [1, 8])
def test_fused_loss_equals_cross_entropy_of_the_logits_value_and_gradients(data):
    hidden, embed, targets = _problem()
    mesh = sharding.make_mesh(1, jax.devices()[:data])
    hidden_s = jax.device_put(hidden, NamedSharding(mesh, P(sharding.DATA, None)))
    targets_s = jax.device_put(targets, NamedSharding(mesh, P(sharding.DATA)))

    def ref(h, e):
        return cross_entropy(h @ e.T, targets, PAD)[0]

    (value, ntok), vjp = jax.vjp(lambda h, e: output_cross_entropy(h, e, targets_s, PAD), hidden_s, embed)
    grads = vjp((jnp.float32(0.37), np.zeros((), jax.dtypes.float0)))
    ref_value, ref_vjp = jax.vjp(ref, hidden, embed)
    ref_grads = ref_vjp(jnp.float32(0.37))
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    assert int(ntok) == int((targets != PAD).sum()) == 91
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # Pad targets contribute nothing: the loss does not depend on a pad position's hidden state.
    assert float(jnp.abs(grads[0][5:9]).max()) == 0.0


@pytest.mark.parametrize("scale, without_max", [(3.0, True), (10.0, True), (20.0, False), (60.0, False)])
def test_fused_loss_shifts_without_the_max_only_when_the_bounds_allow(scale, without_max):
    """The forward skips the pass for the row max when the target logit and the Cauchy-Schwarz bound bracket it
    tightly enough (logits up to ~12 and ~40 here), and falls back to the max otherwise (up to ~80 and ~240):
    the same value and gradients either way."""
    hidden, embed, targets = _problem(scale=scale)
    logits = hidden @ embed.T
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    shift, safe = _shift_without_max(hidden, embed, target_logit)
    assert bool(safe) is without_max
    if without_max:  # the shift stays within the window that keeps every exp(l - shift) finite and accurate
        gap = logits.max(axis=-1) - shift
        assert float(gap.max()) <= 64.0 and float(gap.min()) >= -60.0

    def fused(h, e):
        return output_cross_entropy(h, e, targets, PAD)[0]

    def ref(h, e):
        return cross_entropy(h @ e.T, targets, PAD)[0]

    (value, grads), (ref_value, ref_grads) = (jax.value_and_grad(f, (0, 1))(hidden, embed) for f in (fused, ref))
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


def test_fused_loss_is_stable_for_large_logits_and_bfloat16():
    hidden, embed, targets = _problem(scale=60.0)  # logits up to ~170: exp(170) overflows fp32 unshifted
    value = output_cross_entropy(hidden, embed, targets, PAD)[0]
    np.testing.assert_allclose(value, cross_entropy(hidden @ embed.T, targets, PAD)[0], rtol=1e-6)
    hb, eb = hidden.astype(jnp.bfloat16), embed.astype(jnp.bfloat16)
    value_b, grads_b = jax.value_and_grad(lambda h, e: output_cross_entropy(h, e, targets, PAD)[0], (0, 1))(hb, eb)
    ref_b, ref_grads_b = jax.value_and_grad(
        lambda h, e: cross_entropy(jnp.einsum("nd,vd->nv", h, e, preferred_element_type=jnp.float32), targets, PAD)[0],
        (0, 1))(hb, eb)
    assert grads_b[0].dtype == grads_b[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(value_b, ref_b, rtol=1e-6)
    for got, want in zip(grads_b, ref_grads_b):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0.05, atol=0.05)


def test_fused_loss_in_the_model_and_the_train_step_equals_the_logits_path():
    """Same parameter gradients through the whole model (dropout on, pads in the batch, batch split over 8 devices),
    and the same train-step metrics."""
    mesh, rules, cfg, params, source, target = tiny_problem(1)  # mesh (8, 1)
    key = jax.random.key(7)

    def loss_logits(p):
        logits = TransformerLM(cfg).apply({"params": p}, source, deterministic=False, rngs={"dropout": key})
        return cross_entropy(logits, target, PAD)[0]

    def loss_fused(p):  # as the train step composes it
        hidden, embed = TransformerLM(cfg.replace(loss_impl="fused")).apply(
            {"params": p}, source, deterministic=False, rngs={"dropout": key}, method=TransformerLM.output_operands)
        return output_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), embed, target.reshape(-1), PAD)[0]

    with sharding.activate(mesh, rules):
        (v_ref, g_ref), (v_fused, g_fused) = (jax.jit(jax.value_and_grad(f))(params) for f in (loss_logits, loss_fused))
    np.testing.assert_allclose(v_fused, v_ref, rtol=1e-6)
    # Summed-loss gradients (entries up to ~3; the key bias's are 0 up to rounding): fp32 summation-order
    # differences only, measured against the largest entry.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale), g_fused, g_ref)

    ocfg = OptimConfig(lr=1e-3, warmup_updates=0, weight_decay=0.01, clip_norm=0.5)
    bs = batch_shardings(mesh, rules)
    batch = {"source": jax.device_put(source[None], bs["source"]), "target": jax.device_put(target[None], bs["target"])}
    metrics = {}
    for impl in ("logits", "fused"):
        c = cfg.replace(loss_impl=impl)
        state = init_train_state(c, mesh, rules, ocfg, seed=5)
        metrics[impl] = jax.device_get(make_train_step(c, mesh, rules, ocfg, seed=5)(state, batch)[1])
    for k in ("loss", "nll_sum", "ntokens", "gnorm"):
        np.testing.assert_allclose(metrics["fused"][k], metrics["logits"][k], rtol=2e-6, err_msg=k)


def test_fused_loss_with_a_model_axis_is_a_clear_error():
    cfg = load_config("tiny", loss_impl="fused")
    with pytest.raises(UserError, match=r"loss_impl='fused' works without a model axis.*--model-parallel-size 1"):
        make_train_step(cfg, sharding.make_mesh(2), sharding.logical_rules(), OptimConfig())
    with pytest.raises(UserError, match=r"unknown loss_impl 'chunked': choose one of logits, fused"):
        load_config("tiny", loss_impl="chunked").validate()
