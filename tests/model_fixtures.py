"""A small model problem shared by the tests that compare two ways of computing the same gradients."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from m11b_jax import sharding
from m11b_jax.config import load_config
from m11b_jax.train_step import OptimConfig, init_train_state

PAD = 1


def tiny_problem(model_parallel: int):
    """(mesh over the 8 devices, rules, the tiny config at 32 positions, its parameters placed on the mesh,
    source and target [8, 32] with pads in one row)."""
    mesh = sharding.make_mesh(model_parallel)
    rules = sharding.logical_rules()
    tokens = np.random.default_rng(0).integers(4, 1024, size=(8, 33)).astype(np.int32)
    tokens[3, 20:] = PAD
    cfg = load_config("tiny", max_positions=32)
    params = init_train_state(cfg, mesh, rules, OptimConfig(), seed=5).params
    return mesh, rules, cfg, params, jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
