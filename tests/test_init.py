"""fairseq's initialization, per parameter: mean, standard deviation and bounds of our sharded init against a
numpy draw by the same rule and against the closed-form values, within sampling error.

The rules are written out here again from fairseq's source (not imported from m11b_jax.init_rules), as
(distribution, scale) per parameter of a torch [out, in] matrix:
- megatron (fairseq's model-parallel layers, Megatron `_initialize_affine_weight` with model-parallel size > 1):
  every projection xavier_uniform with gain 2^-0.5 on the full matrix, every bias 0.
- megatron_mp1: the same with gain 1.
- fairseq (single-device transformer_lm): q/k/v xavier_uniform gain 2^-0.5 with nn.Linear's default bias
  U(+-1/sqrt(in)); out_proj xavier_uniform gain 1, bias 0; fc1/fc2 nn.Linear's default, weight and bias
  U(+-1/sqrt(in)).
- all: embedding N(0, d^-0.5) with the pad row 0; LayerNorm weight 1, bias 0.
"""

import math

import numpy as np
import pytest

from m11b_jax import sharding as S
from m11b_jax.param_tree import init_params
from m11b_jax.config import load_config

Z = 5.0  # tolerance in standard errors


def xavier(fan_in, fan_out, gain=1.0):
    return ("uniform", gain * math.sqrt(6.0 / (fan_in + fan_out)))


def linear_default(fan_in):
    return ("uniform", 1.0 / math.sqrt(fan_in))


def reference_rule(rule: str, name: str, fan_in: int, fan_out: int):
    """(weight, bias) distributions of projection `name`; ("zero", 0) for zeros."""
    zero = ("zero", 0.0)
    if rule in ("megatron", "megatron_mp1"):
        return xavier(fan_in, fan_out, 2 ** -0.5 if rule == "megatron" else 1.0), zero
    if name in ("q_proj", "k_proj", "v_proj"):
        return xavier(fan_in, fan_out, 2 ** -0.5), linear_default(fan_in)
    if name == "out_proj":
        return xavier(fan_in, fan_out), zero
    return linear_default(fan_in), linear_default(fan_in)


def numpy_draw(dist, n, rng):
    kind, scale = dist
    if kind == "zero":
        return np.zeros(n)
    if kind == "uniform":
        return rng.uniform(-scale, scale, n)
    return rng.normal(0.0, scale, n)


def closed_form(dist):
    """(mean, std, bound) of the distribution (bound None: unbounded)."""
    kind, scale = dist
    if kind == "zero":
        return 0.0, 0.0, 0.0
    if kind == "uniform":
        return 0.0, scale / math.sqrt(3.0), scale
    return 0.0, scale, None


def check_stats(values: np.ndarray, dist, rng, what: str):
    values = np.asarray(values, np.float64).ravel()
    mean, std, bound = closed_form(dist)
    if dist[0] == "zero":
        assert np.all(values == 0), f"{what}: not all zero"
        return
    n = values.size
    ref = numpy_draw(dist, n, rng)
    kurt = 1.8 if dist[0] == "uniform" else 3.0
    se_mean, se_std = std / math.sqrt(n), std * math.sqrt((kurt - 1) / (4 * n))
    # against the closed form
    assert abs(values.mean() - mean) < Z * se_mean, (what, values.mean(), mean)
    assert abs(values.std() - std) < Z * se_std, (what, values.std(), std)
    # against the numpy draw by the same rule (difference of two estimates: sqrt(2) x the error)
    assert abs(values.mean() - ref.mean()) < Z * math.sqrt(2) * se_mean, (what, values.mean(), ref.mean())
    assert abs(values.std() - ref.std()) < Z * math.sqrt(2) * se_std, (what, values.std(), ref.std())
    if bound is not None:
        assert values.min() >= -bound and values.max() <= bound, (what, values.min(), values.max(), bound)
        # the gap between the largest of n uniform draws and the bound is ~ 2 bound Exp(n): beyond 12 x its
        # mean with probability e^-12, as for the numpy draw
        edge = bound * (1 - 24 / n)
        assert values.max() > edge and values.min() < -edge and ref.max() > edge and ref.min() < -edge, what
    else:
        assert np.abs(values).max() > 3 * std, what  # a normal's tail, not a uniform's edge


def init_stats_check(cfg, mesh, seed=0):
    rng = np.random.default_rng(seed)
    params = init_params(cfg, mesh, S.logical_rules(), seed=seed)
    d, f = cfg.d_model, cfg.ffn_dim
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d), "fc1": (d, f), "fc2": (f, d)}
    layers = params["layers"]
    for name, (fan_in, fan_out) in shapes.items():
        p = layers["self_attn"][name] if name.endswith("_proj") else layers[name]
        kernel, bias = np.asarray(p["kernel"]), np.asarray(p["bias"])
        assert kernel.shape == (cfg.num_layers, fan_in, fan_out) and bias.shape == (cfg.num_layers, fan_out)
        w, b = reference_rule(cfg.init, name, fan_in, fan_out)
        check_stats(kernel, w, rng, f"{cfg.init} {name}.kernel")
        check_stats(bias, b, rng, f"{cfg.init} {name}.bias")
        # layers are independent draws: no two layers equal
        assert not np.array_equal(kernel[0], kernel[1])
    emb = np.asarray(params["embed_tokens"])
    assert np.all(emb[cfg.pad_idx] == 0)
    rows = np.delete(emb, cfg.pad_idx, axis=0)
    check_stats(rows, ("normal", d ** -0.5), rng, f"{cfg.init} embed_tokens")
    for ln in (layers["self_attn_layer_norm"], layers["final_layer_norm"], params["layer_norm"]):
        assert np.all(np.asarray(ln["scale"]) == 1) and np.all(np.asarray(ln["bias"]) == 0)


@pytest.mark.parametrize("rule,mp", [("fairseq", 1), ("megatron", 8), ("megatron_mp1", 2)])
def test_init_statistics_match_fairseqs_rule(rule, mp):
    # d 256 so each projection has >= 2 x 65536 samples; the init runs sharded on a (8/mp, mp) mesh.
    cfg = load_config("tiny", d_model=256, ffn_dim=1024, num_heads=8, init=rule)
    init_stats_check(cfg, S.make_mesh(mp))


def test_rules_differ_where_fairseq_differs():
    """A mutation check: the closed-form test above would fail with another rule's scales."""
    from m11b_jax.init_rules import projection_bounds

    d = 128
    assert projection_bounds("megatron", "fc1", d, 4 * d)[0] == pytest.approx(math.sqrt(6 / (5 * d)) / math.sqrt(2))
    assert projection_bounds("fairseq", "fc1", d, 4 * d) == (pytest.approx(d ** -0.5), pytest.approx(d ** -0.5))
    assert projection_bounds("fairseq", "out_proj", d, d)[1] == 0.0
    assert projection_bounds("fairseq", "q_proj", d, d)[1] == pytest.approx(d ** -0.5)
    assert projection_bounds("megatron_mp1", "q_proj", d, d) == (pytest.approx(math.sqrt(3 / d)), 0.0)
