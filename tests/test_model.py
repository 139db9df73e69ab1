"""The model computes fairseq's transformer_lm: parity with XGLM (an implementation we did not write)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m11b_jax import param_tree, sharding
from m11b_jax.config import REMAT_POLICIES, ModelConfig, load_config
from m11b_jax.errors import UserError
from m11b_jax.fairseq_layout import to_fairseq_state_dict
from m11b_jax.model import TransformerLM, fairseq_positions, sinusoidal_embedding
from xglm_reference import xglm_from_params, xglm_logits

CFG = load_config("tiny", dropout=0.0, attention_dropout=0.0, vocab_size=512, max_positions=64)
PAD = 1


def random_params(cfg, seed=0):
    """Random weights everywhere, LayerNorms and biases included, so every term of the forward matters."""
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    params = jax.device_get(param_tree.init_params(cfg, mesh, sharding.logical_rules(), seed=seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), params)


def batch_with_padding(cfg, seed=1, t=24):
    rng = np.random.default_rng(seed)
    tok = rng.integers(4, cfg.vocab_size, size=(4, t))
    tok[0, 17:] = PAD  # right padding
    tok[1, :5] = PAD  # left padding
    tok[2, 9] = 2  # an in-stream </s>
    tok[3, 0] = 2
    return tok.astype(np.int32)


def test_positions_and_sinusoids_follow_fairseq():
    tok = jnp.array([[PAD, PAD, 7, 8, 9], [7, 8, PAD, 9, 10]])
    pos = fairseq_positions(tok, PAD)
    assert pos.tolist() == [[1, 1, 2, 3, 4], [2, 3, 1, 4, 5]]
    d = 8
    emb = np.asarray(sinusoidal_embedding(pos, d, PAD))
    assert np.all(emb[0, :2] == 0)  # pads get the zero vector
    half = d // 2
    f = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))  # the d/2 - 1 denominator
    np.testing.assert_allclose(emb[0, 2], np.concatenate([np.sin(2 * f), np.cos(2 * f)]), atol=1e-6)


@pytest.mark.parametrize("attention_impl", ["autodiff", "manual"])
def test_logits_match_xglm_with_right_left_padding_and_eos(attention_impl):
    params = random_params(CFG)
    tok = batch_with_padding(CFG)
    ours = np.asarray(TransformerLM(CFG.replace(attention_impl=attention_impl)).apply({"params": params}, jnp.asarray(tok)))
    ref = xglm_logits(xglm_from_params(params, CFG), tok)
    real = tok != PAD  # outputs at pad positions are unused (fairseq yields NaN rows there)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-5, rtol=0)


def _mean_nll(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = targets != PAD
    return jnp.where(mask, nll, 0.0).sum() / mask.sum()


@pytest.mark.parametrize("attention_impl, weight_grad_impl",
                         [("autodiff", "flat"), ("manual", "flat"), ("manual", "transposed")])
def test_gradients_match_xglm(attention_impl, weight_grad_impl):
    params = random_params(CFG, seed=3)
    tok = batch_with_padding(CFG, seed=4)
    src, tgt = tok[:, :-1], tok[:, 1:]
    tgt = np.where(src == PAD, PAD, tgt)
    model = TransformerLM(CFG.replace(attention_impl=attention_impl, weight_grad_impl=weight_grad_impl))
    grads = jax.grad(lambda p: _mean_nll(model.apply({"params": p}, jnp.asarray(src)), tgt))(params)
    ours = to_fairseq_state_dict(jax.device_get(grads), CFG.num_layers)

    model = xglm_from_params(params, CFG)
    ids = torch.from_numpy(src.astype(np.int64))
    m = (ids != PAD).long()
    logits = model(input_ids=ids, attention_mask=m, position_ids=torch.cumsum(m, 1) * m - 1).logits
    t = torch.from_numpy(tgt.astype(np.int64))
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t, ignore_index=PAD, reduction="mean")
    loss.backward()
    named = dict(model.named_parameters())
    for key, g in ours.items():
        ref = named["model." + key.removeprefix("decoder.")].grad.numpy()
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (2, 4), (8, 1)])
def test_same_logits_on_every_mesh(shape):
    params = random_params(CFG, seed=5)
    tok = batch_with_padding(CFG, seed=6)
    tok = np.concatenate([tok, tok[::-1]])  # 8 rows: divisible by every data axis
    expect = np.asarray(TransformerLM(CFG).apply({"params": params}, jnp.asarray(tok)))
    data, model = shape
    mesh = sharding.make_mesh(model, jax.devices()[: data * model])
    rules = sharding.logical_rules(sequence_parallel=model > 1)
    sharded = jax.device_put(params, param_tree.param_shardings(CFG, mesh, rules))
    with sharding.activate(mesh, rules):
        got = jax.jit(lambda p, t: TransformerLM(CFG).apply({"params": p}, t),
                      in_shardings=(param_tree.param_shardings(CFG, mesh, rules), sharding.batch_sharding(mesh, rules=rules)))(sharded, tok)
    real = tok != PAD
    np.testing.assert_allclose(np.asarray(got)[real], expect[real], atol=2e-5, rtol=0)


def test_parameters_are_placed_per_the_table_without_full_copies():
    mesh = sharding.make_mesh(8)
    params = param_tree.init_params(CFG, mesh, sharding.logical_rules())
    d, f, v, L = CFG.d_model, CFG.ffn_dim, CFG.vocab_size, CFG.num_layers
    layers = params["layers"]
    expect = {  # our [in, out] kernels: column-parallel splits `out`, row-parallel splits `in`
        "q": (layers["self_attn"]["q_proj"]["kernel"], (L, d, d // 8)),
        "out": (layers["self_attn"]["out_proj"]["kernel"], (L, d // 8, d)),
        "fc1": (layers["fc1"]["kernel"], (L, d, f // 8)),
        "fc1.b": (layers["fc1"]["bias"], (L, f // 8)),
        "fc2": (layers["fc2"]["kernel"], (L, f // 8, d)),
        "emb": (params["embed_tokens"], (v // 8, d)),
        "ln": (layers["final_layer_norm"]["scale"], (L, d)),  # replicated
        "fc2.b": (layers["fc2"]["bias"], (L, d)),  # replicated
    }
    for name, (arr, shard_shape) in expect.items():
        shapes = {s.data.shape for s in arr.addressable_shards}
        assert shapes == {shard_shape}, (name, shapes)
    # Column block r holds heads 4r..4r+3 (contiguous), as fairseq's rank r does.
    q = layers["self_attn"]["q_proj"]["kernel"]
    for s in q.addressable_shards:
        r = list(mesh.devices.flat).index(s.device)  # the device's place along `model` on the (1, 8) mesh
        assert s.index[2] == slice(r * (d // 8), (r + 1) * (d // 8))


@functools.cache
def _remat_problem(attention_impl):
    """(params, source, target, gradients without remat, layers scanned) for the remat-policy comparison."""
    tok = batch_with_padding(CFG, seed=14)
    src, tgt = jnp.asarray(tok[:, :-1]), np.where(tok[:, :-1] == PAD, PAD, tok[:, 1:])
    params = random_params(CFG, seed=15)
    return params, src, tgt, _grads(CFG.replace(attention_impl=attention_impl, remat_policy="none"), params, src, tgt)


def _grads(cfg, params, src, tgt):
    return jax.jit(jax.grad(lambda p: _mean_nll(TransformerLM(cfg).apply({"params": p}, src), tgt)))(params)


@pytest.mark.parametrize("attention_impl", ["autodiff", "manual"])
@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_policies_and_unrolled_layers_give_identical_gradients(policy, attention_impl):
    """Every remat policy, with the layers unrolled (all but `full`), gives the gradients of no remat. The
    projections take a custom-VJP product (2-D weight gradient) except under the policies that save matmul
    outputs, which must see plain dot_generals: both forms are compared here."""
    params, src, tgt, base = _remat_problem(attention_impl)
    cfg = CFG.replace(attention_impl=attention_impl, remat_policy=policy, scan_layers=policy != "full")
    other = _grads(cfg, params, src, tgt)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5, err_msg=policy), base, other)


def test_bf16_compute_stays_close_to_fp32():
    params = random_params(CFG, seed=9)
    tok = jnp.asarray(batch_with_padding(CFG, seed=10))
    f32 = TransformerLM(CFG).apply({"params": params}, tok)
    b16 = TransformerLM(CFG.replace(compute_dtype="bfloat16")).apply({"params": params}, tok)
    real = np.asarray(tok != PAD)
    err = np.abs(np.asarray(b16, np.float32) - np.asarray(f32))[real]
    assert err.max() < 0.05 * np.abs(np.asarray(f32)[real]).max()


def test_dropout_is_active_in_training_and_keyed():
    cfg = CFG.replace(dropout=0.1, attention_dropout=0.1)
    params = random_params(cfg, seed=11)
    tok = jnp.asarray(batch_with_padding(cfg, seed=12))
    m = TransformerLM(cfg)
    a = m.apply({"params": params}, tok, deterministic=False, rngs={"dropout": jax.random.key(0)})
    b = m.apply({"params": params}, tok, deterministic=False, rngs={"dropout": jax.random.key(0)})
    c = m.apply({"params": params}, tok, deterministic=False, rngs={"dropout": jax.random.key(1)})
    ev = m.apply({"params": params}, tok)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, ev)


@pytest.mark.parametrize("change, mp, message", [
    ({"num_heads": 4}, 8, "num_heads=4 is not divisible by the model-parallel size 8"),
    ({"ffn_dim": 500}, 8, "ffn_dim=500 is not divisible"),
    ({"vocab_size": 1001}, 8, "vocab_size=1001 is not divisible"),
    ({"num_heads": 7}, 1, "not divisible by num_heads=7"),
    ({"remat_policy": "some"}, 1, "unknown remat policy"),
    ({"weight_grad_impl": "tn"}, 1, "unknown weight_grad_impl 'tn': choose one of flat, transposed"),
    ({"weight_grad_impl": "transposed", "remat_policy": "save_dots"}, 1,
     "weight_grad_impl='transposed' hides the projections from remat policy 'save_dots'.*weight_grad_impl='flat'"),
])
def test_config_validation_errors_are_one_line(change, mp, message):
    with pytest.raises(UserError, match=message) as e:
        CFG.replace(**change).validate(mp)
    assert "\n" not in str(e.value)


def test_positions_limit_and_release_config():
    with pytest.raises(UserError, match="exceeds the model's max_positions=64"):
        CFG.validate(1, tokens_per_sample=128)
    rel = load_config("transformer_lm_megatron_11b")
    assert (rel.d_model, rel.ffn_dim, rel.num_layers, rel.num_heads, rel.max_positions, rel.vocab_size) == (
        3072, 18432, 72, 32, 1024, 51200)
    assert (rel.dropout, rel.attention_dropout, rel.head_dim) == (0.1, 0.1, 96)
    rel.validate(8, tokens_per_sample=1024)
    assert abs(rel.num_params() - 11.03e9) < 0.01e9
    with pytest.raises(UserError, match="unknown arch"):
        load_config("no_such_arch")
    assert ModelConfig.from_dict(json_roundtrip(rel)) == rel


def json_roundtrip(cfg):
    import json

    return json.loads(cfg.to_json())
