"""attention_impl="manual" (m11b_jax.attention: hand-written backward, query blocks that skip causally masked keys)
computes the same function as the einsum + autodiff path, values and gradients, with padding and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m11b_jax import param_tree, sharding
from m11b_jax.attention import causal_attention
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.model import TransformerLM

PAD = 1
NEG = jnp.finfo(jnp.float32).min


def reference(q, k, v, key_mask, keep=None, keep_scale=1.0):
    """The autodiff path's attention core, on [b, h, t, d] inputs."""
    t = q.shape[2]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None] & key_mask[:, None, None, :]
    p = jax.nn.softmax(jnp.where(allowed, s, NEG), axis=-1).astype(q.dtype)
    if keep is not None:
        p = jnp.where(keep, p * keep_scale, 0.0).astype(q.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


@pytest.mark.parametrize("query_block", [0, 8, 16, 12])  # one block, 4 blocks, 2 blocks, 12+12+8
@pytest.mark.parametrize("dropout", [False, True])
def test_core_matches_autodiff_values_and_gradients(query_block, dropout):
    rng = np.random.default_rng(query_block)
    q, k, v, g = (jnp.asarray(rng.standard_normal((2, 3, 32, 8)), jnp.float32) for _ in range(4))
    key_mask = jnp.ones((2, 32), bool).at[0, :5].set(False).at[1, -3:].set(False)  # left and right padding
    keep = jnp.asarray(rng.random((2, 3, 32, 32)) > 0.1) if dropout else None
    scale = 1 / 0.9
    sees_a_key = (jnp.cumsum(key_mask, axis=1) > 0)[:, None, :, None]  # False for the left-pad prefix
    g = g * sees_a_key  # as in training: nothing reads positions that see no key

    ours = causal_attention(q, k, v, key_mask, keep, scale, query_block)
    ref = reference(q, k, v, key_mask, keep, scale)
    np.testing.assert_allclose(np.where(sees_a_key, ours, 0), np.where(sees_a_key, ref, 0), atol=2e-6, rtol=0)
    assert np.all(np.asarray(ours)[~np.broadcast_to(sees_a_key, ours.shape)] == 0)  # defined: zeros, not NaN

    grads = jax.grad(lambda *a: (causal_attention(*a, key_mask, keep, scale, query_block) * g).sum(), (0, 1, 2))(q, k, v)
    expect = jax.grad(lambda *a: (reference(*a, key_mask, keep, scale) * g).sum(), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads, expect):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


def _batch(t=64, seed=0):
    tok = np.random.default_rng(seed).integers(4, 512, size=(4, t))
    tok[0, t - 24:] = PAD  # right padding
    tok[1, :6] = PAD  # left padding
    tok[2, 9] = 2  # an in-stream </s>
    return tok.astype(np.int32)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_manual_equals_autodiff(dropout):
    """Whole model, training mode (dropout masks come from the same keys): logits at real positions and the
    gradients of a pad-masked loss agree to fp32 round-off. t=256 runs two 128-query blocks."""
    cfg = load_config("tiny", dropout=dropout, attention_dropout=dropout, vocab_size=512, max_positions=256)
    tok = _batch(t=256)
    tgt = np.where(tok == PAD, PAD, np.roll(tok, -1, axis=1))
    params = param_tree.init_params(cfg, sharding.make_mesh(1, jax.devices()[:1]), sharding.logical_rules(), seed=3)

    def loss(impl, p):
        logits = TransformerLM(cfg.replace(attention_impl=impl)).apply(
            {"params": p}, jnp.asarray(tok), deterministic=dropout == 0.0, rngs={"dropout": jax.random.key(7)})
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, jnp.asarray(tgt)[..., None], axis=-1)[..., 0]
        return jnp.where(tgt != PAD, nll, 0.0).sum() / (tgt != PAD).sum(), logits

    (la, lga), ga = jax.value_and_grad(lambda p: loss("autodiff", p), has_aux=True)(params)
    (lm, lgm), gm = jax.value_and_grad(lambda p: loss("manual", p), has_aux=True)(params)
    real = tok != PAD
    np.testing.assert_allclose(np.asarray(lgm)[real], np.asarray(lga)[real], atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(lm), float(la), rtol=1e-6)
    manual = dict(jax.tree_util.tree_leaves_with_path(gm))
    for path, a in jax.tree_util.tree_leaves_with_path(ga):
        np.testing.assert_allclose(np.asarray(manual[path]), np.asarray(a), atol=2e-6, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
def test_manual_attention_on_meshes(shape):
    """Heads split over `model`, batch over `data`, with sequence parallelism: the logits of (1, 1)."""
    cfg = load_config("tiny", dropout=0.0, attention_dropout=0.0, vocab_size=512, max_positions=64,
                      attention_impl="manual")
    tok = np.concatenate([_batch(seed=1), _batch(seed=2)])
    params = jax.device_get(param_tree.init_params(cfg, sharding.make_mesh(1, jax.devices()[:1]), sharding.logical_rules(), seed=5))
    expect = np.asarray(TransformerLM(cfg).apply({"params": params}, jnp.asarray(tok)))
    data, model = shape
    mesh = sharding.make_mesh(model, jax.devices()[: data * model])
    rules = sharding.logical_rules(sequence_parallel=True)
    with sharding.activate(mesh, rules):
        got = jax.jit(lambda p, t: TransformerLM(cfg).apply({"params": p}, t),
                      in_shardings=(param_tree.param_shardings(cfg, mesh, rules), sharding.batch_sharding(mesh, rules=rules)))(
            jax.device_put(params, param_tree.param_shardings(cfg, mesh, rules)), tok)
    real = tok != PAD
    np.testing.assert_allclose(np.asarray(got)[real], expect[real], atol=2e-5, rtol=0)


def test_unknown_attention_impl_is_a_clear_error():
    with pytest.raises(UserError, match="unknown attention_impl 'fast'.*autodiff, manual, flash, cudnn"):
        load_config("tiny", attention_impl="fast").validate()
