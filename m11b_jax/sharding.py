"""The device mesh, the ONE table from logical axis names to mesh axes, and sharded parameter creation.

Mesh axes: `data` (replicas; the batch is split over it) x `model` (Megatron intra-layer parallelism).
With the default table, on the `model` axis:
  - q/k/v and fc1 are column-parallel (their output features `heads` / `mlp` are split),
  - out_proj and fc2 are row-parallel (their input features are split; XLA all-reduces their output),
  - the tied embedding is vocab-parallel (rows split), so the logits come out split over the vocabulary,
  - LayerNorms and biases of row-parallel layers are replicated.
Changing the parallelism scheme is a change to `logical_rules`, never to the model.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from m11b_jax.config import ModelConfig
from m11b_jax.errors import UserError

DATA, MODEL = "data", "model"


def logical_rules(sequence_parallel: bool = False, fsdp: bool = False) -> tuple[tuple[str, str | None], ...]:
    """Logical axis name -> mesh axis.

    sequence_parallel: the residual stream's length axis is split over `model` between the tensor-parallel
      regions (Megatron-SP): LayerNorms, dropout and residual adds run on 1/mp of the tokens, the layer
      inputs saved for the backward pass shrink by mp, and the all-reduce after each row-parallel matmul
      becomes a reduce-scatter + all-gather pair (same bytes on the wire).
    fsdp: additionally split every weight's `embed` axis over `data` (ZeRO-3 style); off for the release.
    """
    return (
        # parameters
        ("vocab", MODEL),
        ("heads", MODEL),
        ("mlp", MODEL),
        ("embed", DATA if fsdp else None),
        ("layers", None),
        # activations
        ("activation_batch", DATA),
        ("activation_length", MODEL if sequence_parallel else None),
        ("activation_seq", None),
        ("activation_embed", None),
        ("activation_heads", MODEL),
        ("activation_kv", None),
        ("activation_mlp", MODEL),
        ("activation_vocab", MODEL),
    )


def make_mesh(model_parallel_size: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all), with Auto axes so sharding constraints apply.

    Devices are laid out so a `model` group is contiguous (on GPUs: the NVLink-connected chips of one host).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model_parallel_size < 1 or n % model_parallel_size:
        raise UserError(
            f"--model-parallel-size {model_parallel_size} does not divide the {n} available devices: "
            f"pick a divisor of {n}")
    grid = np.asarray(devices, dtype=object).reshape(n // model_parallel_size, model_parallel_size)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Trace model code under this mesh and table (needed by logical sharding constraints)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_tree, mesh: Mesh, rules):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def _boxed_abstract(cfg: ModelConfig, tokens_shape=(1, 8)):
    from m11b_jax.model import TransformerLM

    tokens = jax.ShapeDtypeStruct(tokens_shape, jnp.int32)
    return jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros(tokens.shape, tokens.dtype)))


def param_logical_specs(cfg: ModelConfig):
    """The parameter tree of logical PartitionSpecs (e.g. ('layers', 'embed', 'heads'))."""
    return nn.get_partition_spec(_boxed_abstract(cfg))["params"]


def abstract_params(cfg: ModelConfig, mesh: Mesh, rules):
    """The parameter tree as ShapeDtypeStructs carrying their NamedShardings: no memory is allocated.

    This one tree is the init target, the converter's target and the checkpoint restore target.
    """
    boxed = _boxed_abstract(cfg)["params"]
    # Take the values out of their boxes without applying constraints (this runs outside any trace).
    shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    shardings = logical_to_sharding(param_logical_specs(cfg), mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules):
    return jax.tree.map(lambda a: a.sharding, abstract_params(cfg, mesh, rules))


def init_params(cfg: ModelConfig, mesh: Mesh, rules, seed: int = 0):
    """Materialize the parameters with ONE jitted init whose out_shardings place every shard on its device.

    No host or device ever holds a full copy: XLA partitions the initializer itself.
    """
    from m11b_jax.model import TransformerLM

    shardings = param_shardings(cfg, mesh, rules)

    @jax.jit
    def _init(key):
        tokens = jnp.zeros((1, 8), jnp.int32)
        return nn.unbox(TransformerLM(cfg).init(key, tokens))["params"]

    with activate(mesh, rules):
        return jax.jit(_init, out_shardings=shardings)(jax.random.key(seed))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Token batches [batch, length, ...]: batch split over `data`, replicated over `model`."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> dict:
    return {"shape": dict(mesh.shape), "devices": mesh.devices.size, "platform": mesh.devices.flat[0].platform}
