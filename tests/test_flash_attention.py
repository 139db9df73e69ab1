"""attention_impl="flash" (m11b_jax.flash_attention): the Pallas kernels, run here in interpret mode, against a
plain-JAX reference that builds the same hash dropout mask; the mask as a pure function of global indices
(mesh- and resume-independent, also through the train step); the "save_attention" remat policy; config and
platform errors.

Interpret mode compiles slowly, so shapes are tiny and each test compiles one program."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m11b_jax import flash_attention as F
from m11b_jax import sharding as S
from m11b_jax.config import load_config
from m11b_jax.errors import UserError
from m11b_jax.axis_names import BATCH, HEAD_DIM, HEADS, TP_LENGTH
from m11b_jax.model import TransformerLM

PAD = 1
AXES = (BATCH, TP_LENGTH, HEADS, HEAD_DIM)  # the logical names of the model's q/k/v axes
# Interpret-mode kernels make large CPU programs: compile them with XLA's cheap settings (2-3x faster).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                                 "xla_llvm_disable_expensive_passes": True})


def _qkv(b, t, h, hd, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, t, h, hd)) * s, jnp.float32) for s in (0.5, 1.0, 1.0, 1.0)]


@pytest.mark.parametrize("rate, hd", [(0.0, 16), (0.25, 24)])  # hd 24: the masked, padded-head-dim path (like 96)
def test_flash_matches_reference_values_and_gradients(rate, hd):
    q, k, v, g = _qkv(2, 64, 2, hd)
    lengths = jnp.array([64, 41])  # row 1 right-padded
    seed = jnp.uint32(0xC0FFEE)
    kw = dict(rate=rate, row_offset=3, head_offset=5)

    def flash(q, k, v):
        return F.flash_attention(q, k, v, lengths, seed, block_q=16, block_k=32, **kw)

    def ref(q, k, v):
        return F.reference_attention(q, k, v, lengths, seed, **kw)

    @jit
    def out_and_grads(q, k, v, g):  # one program: the forward and both backward kernels
        out, vjp = jax.vjp(flash, q, k, v)
        return out, vjp(g)

    out, grads = out_and_grads(q, k, v, g)
    r_out, r_vjp = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(out, r_out, atol=1e-5, rtol=0)
    for name, a, b in zip("qkv", grads, r_vjp(g)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)
    if rate:  # dropout really dropped something: without the mask the reference differs
        assert np.abs(np.asarray(out) - np.asarray(F.reference_attention(q, k, v, lengths))).max() > 1e-2


def test_dropout_mask_is_a_pure_function_of_global_indices():
    rate = 0.1
    rows, heads, qs, ks = np.ix_(np.arange(4), np.arange(8), np.arange(64), np.arange(64))
    full = np.asarray(F.keep_mask(7, rows, heads, qs, ks, rate))
    assert abs(1 - full.mean() - rate) < 0.005  # 131072 draws: P(drop) = rate
    # rows/heads/queries/keys are independent: no row, head, query or key is all-kept or all-dropped
    assert full.mean(axis=(1, 2, 3)).std() < 0.01 and full.mean(axis=(0, 1, 2)).std() < 0.05
    # a shard (rows 2-3, heads 4-7, queries 32-63) computes the same bits from its global indices
    shard = jax.jit(lambda s: F.keep_mask(s, rows[2:] + 0, heads[:, 4:], qs[:, :, 32:], ks, rate))(jnp.uint32(7))
    np.testing.assert_array_equal(shard, full[2:, 4:, 32:])
    # any other seed, row, head, query or key: different bits
    for other in (F.keep_mask(8, rows, heads, qs, ks, rate), F.keep_mask(7, rows + 4, heads, qs, ks, rate),
                  F.keep_mask(7, rows, heads + 8, qs, ks, rate), F.keep_mask(7, rows, heads, qs + 1, ks, rate),
                  F.keep_mask(7, rows, heads, qs, ks + 1, rate)):
        assert 0.1 < (np.asarray(other) != full).mean() < 0.3
    # the seed word: a function of the layer's dropout key only, which the train step derives from
    # (--seed, update, micro-batch) and nn.scan from the layer: a resumed run redraws the same words
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), 1234), 0)
    assert int(F.dropout_seed(key)) == int(jax.jit(F.dropout_seed)(jax.random.fold_in(
        jax.random.fold_in(jax.random.key(1), 1234), 0)))


def test_sharded_flash_equals_the_global_reference():
    """On mesh (1,8) each shard runs the kernel on its heads with global offsets: the result (dropout included) is
    the one-device (mesh (1,1)) reference of the whole batch. (Row offsets: the pure-function test above.)"""
    q, k, v, _ = _qkv(2, 32, 8, 16, seed=1)
    key_mask = jnp.arange(32)[None, :] < jnp.array([32, 19])[:, None]
    seed, rate = jnp.uint32(99), 0.2
    mesh = S.make_mesh(8, jax.devices()[:8])
    rules = S.logical_rules()
    spec = NamedSharding(mesh, P(S.DATA, None, S.MODEL, None))
    with S.activate(mesh, rules):
        out = jit(lambda q, k, v: F.fused_attention("flash", q, k, v, key_mask, seed, rate, AXES))(
            *(jax.device_put(x, spec) for x in (q, k, v)))
    expect = F.reference_attention(q, k, v, key_mask.sum(1), seed, rate=rate)
    np.testing.assert_allclose(out, expect, atol=1e-5, rtol=0)


def _count_eqns(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "pallas_call" and str(eqn.params.get("name")) == name
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_eqns(sub, name)
    return n


def test_flash_model_with_save_attention_policy_gives_autodiff_gradients_without_attention_rerun():
    """The model with attention_impl="flash" and remat "save_attention" has the gradients of the einsum path
    without remat ("none"); its gradient program holds one attention forward per scanned layer body, fewer than
    with "full" (which re-runs each layer's forward in the backward pass)."""
    cfg = load_config("tiny", d_model=64, ffn_dim=128, num_heads=2, num_layers=2, max_positions=32, vocab_size=256,
                      dropout=0.0, attention_dropout=0.2)
    tok = np.random.default_rng(3).integers(4, 256, size=(2, 32))
    tok[1, 20:] = PAD  # right padding
    tok = jnp.asarray(tok, jnp.int32)
    params = TransformerLM(cfg).init(jax.random.key(0), tok)["params"]

    def grad(impl, policy, deterministic):
        def loss(p):
            logits = TransformerLM(cfg.replace(attention_impl=impl, remat_policy=policy)).apply(
                {"params": p}, tok, deterministic=deterministic, rngs={"dropout": jax.random.key(5)})
            return jnp.mean(jnp.where(tok != PAD, jax.nn.log_softmax(logits)[..., 4], 0.0))
        return jax.grad(loss)

    def forwards(policy):  # flash forward kernels in the gradient program, dropout on
        return _count_eqns(jax.make_jaxpr(grad("flash", policy, False))(params).jaxpr, "flash_attention_fwd")

    assert forwards("save_attention") == 2 < forwards("full")  # 1 per scanned layer body x 2 (CPU/GPU branches)
    base = jax.jit(grad("autodiff", "none", True))(params)
    ours = jit(grad("flash", "save_attention", True))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), base, ours)


def test_config_and_platform_errors():
    with pytest.raises(UserError, match="no attention dropout.*--attention-impl flash"):
        load_config("tiny", attention_impl="cudnn", compute_dtype="bfloat16", attention_dropout=0.1).validate()
    with pytest.raises(UserError, match="bfloat16 or float16"):
        load_config("tiny", attention_impl="cudnn", attention_dropout=0.0).validate()
    load_config("tiny", attention_impl="cudnn", compute_dtype="bfloat16", attention_dropout=0.0).validate()
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        F.check_platform("cudnn", "cpu")
    # a CPU-only run: the train step refuses cudnn before compiling anything, and warns for flash
    from m11b_jax.train_step import OptimConfig, make_train_step

    mesh = S.make_mesh(1, jax.devices()[:1])
    cudnn = load_config("tiny", attention_impl="cudnn", compute_dtype="bfloat16", attention_dropout=0.0)
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        make_train_step(cudnn, mesh, S.logical_rules(), OptimConfig())
    with pytest.warns(UserWarning, match="interpret mode"):
        make_train_step(cudnn.replace(attention_impl="flash"), mesh, S.logical_rules(), OptimConfig())
    with pytest.warns(UserWarning, match="interpret mode"):
        F.check_platform("flash", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.check_platform("flash", "gpu")
        F.check_platform("cudnn", "gpu")
    with pytest.raises(UserError, match="multiple of the blocks"):
        F.flash_attention(*_qkv(1, 48, 1, 16)[:3], jnp.array([48]), block_q=32, block_k=32)


def test_flash_train_step_masks_are_the_same_on_meshes_1x1_and_1x8_and_after_a_resume(tmp_path):
    """The train step with flash attention dropout 0.3 (remat save_attention): update 2 of a run on mesh (1,8)
    equals update 2 of a run whose update-1 state was checkpointed on mesh (1,8) and restored onto mesh (1,1).
    A mask that depended on the mesh (head or row offsets) or was not redrawn after the resume would change
    the loss by far more than the tolerance (float reassociation of the model-parallel sums)."""
    from m11b_jax import checkpoint as ckpt
    from m11b_jax.train_step import OptimConfig, abstract_train_state, batch_shardings, init_train_state, make_train_step

    cfg = load_config("tiny", d_model=64, ffn_dim=128, num_heads=8, num_layers=2, max_positions=32, vocab_size=256,
                      dropout=0.0, attention_dropout=0.3, attention_impl="flash", remat_policy="save_attention")
    ocfg = OptimConfig(lr=1e-3, warmup_updates=0, clip_norm=1.0)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tok = rng.integers(4, cfg.vocab_size, size=(1, 4, 33)).astype(np.int32)
        tok[0, 1, 20:] = PAD
        batches.append({"source": tok[..., :-1], "target": tok[..., 1:]})

    def stepper(model):
        mesh = S.make_mesh(model, jax.devices()[:model])
        rules = S.logical_rules()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flash on CPU: the interpret-mode warning
            step = make_train_step(cfg, mesh, rules, ocfg, seed=3,
                                   compiler_options={"xla_backend_optimization_level": 0})
        bs = batch_shardings(mesh, rules)
        return mesh, rules, lambda state, b: step(state, {k: jax.device_put(v, bs[k]) for k, v in b.items()})

    mesh8, rules8, step8 = stepper(8)
    state = init_train_state(cfg, mesh8, rules8, ocfg, seed=5)
    state, m1 = step8(state, batches[0])
    saver = ckpt.Checkpointer(tmp_path / "run")
    saver.save(1, state, {})
    saver.close()
    _, m2 = step8(state, batches[1])  # straight on (1, 8)

    mesh1, rules1, step1 = stepper(1)
    restored, _ = ckpt.restore(tmp_path / "run", 1, abstract_train_state(cfg, mesh1, rules1, ocfg))
    assert int(restored.step) == 1
    _, r2 = step1(restored, batches[1])  # resumed on (1, 1)
    np.testing.assert_allclose(float(r2["loss"]), float(m2["loss"]), rtol=2e-6)
    assert abs(float(m2["loss"]) - float(m1["loss"])) > 1e-3  # the batches (and masks) differ
