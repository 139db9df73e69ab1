"""weight_grad_impl="transposed" (ops.matmul_flat_weight_grad): every projection's weight gradient as one 2-D
product in the form XLA:CPU runs in YNNPACK. The same gradients as the default on sharded meshes (the parity with
XGLM's gradients on one device is in tests/test_model.py), and no projection left to XLA:CPU's generic dot kernel."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m11b_jax import sharding
from m11b_jax.config import load_config
from m11b_jax.loss import cross_entropy
from m11b_jax.model import TransformerLM
from m11b_jax.train_step import OptimConfig, init_train_state, make_train_step
from model_fixtures import PAD, tiny_problem


@pytest.mark.parametrize("model_parallel", [2, 8])
def test_transposed_weight_grads_equal_the_default_on_sharded_meshes(model_parallel):
    """Megatron's column/row-parallel weights, batch over data: (4, 2) and (1, 8). One device: test_model.py."""
    mesh, rules, cfg, params, source, target = tiny_problem(model_parallel)

    def loss(impl):
        model = TransformerLM(cfg.replace(weight_grad_impl=impl))
        return lambda p: cross_entropy(model.apply({"params": p}, source, deterministic=False,
                                                   rngs={"dropout": jax.random.key(7)}), target, PAD)[0]

    with sharding.activate(mesh, rules):
        (v_flat, g_flat), (v_t, g_t) = (jax.jit(jax.value_and_grad(loss(i)))(params) for i in ("flat", "transposed"))
    assert float(v_t) == float(v_flat)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_flat))  # ~10
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale), g_t, g_flat)


def test_no_projection_weight_gradient_runs_in_the_generic_dot_kernel():
    """On one CPU device the compiled train step keeps no layer product as a plain `dot` (XLA:CPU's generic
    kernel): all run as YNNPACK fusions. If XLA folded the transposes back into the products, this fails."""
    cfg = load_config("tiny", dropout=0.0, attention_dropout=0.0, max_positions=64, scan_layers=False,
                      weight_grad_impl="transposed")
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    rules, ocfg = sharding.logical_rules(), OptimConfig()
    state = init_train_state(cfg, mesh, rules, ocfg)
    tokens = np.random.default_rng(0).integers(4, 1024, (1, 4, 65)).astype(np.int32)
    batch = {"source": tokens[:, :, :-1], "target": tokens[:, :, 1:]}

    def generic_layer_dots(c):
        hlo = make_train_step(c, mesh, rules, ocfg).lower(state, batch).compile().as_text()
        return [line for line in hlo[hlo.index("ENTRY"):].splitlines()
                if re.search(r"\} dot\(", line) and "layers/" in line]

    assert generic_layer_dots(cfg) == []
    # The default leaves out_proj's and fc2's weight gradients (at least) to it: the check can see them.
    assert len(generic_layer_dots(cfg.replace(weight_grad_impl="flat"))) >= 2 * cfg.num_layers
