"""The device mesh and the ONE table from logical axis names to mesh axes; every PartitionSpec comes from it.

Mesh axes: `data` (replicas; the batch is split over it) x `model` (Megatron intra-layer parallelism).
With the default table, on the `model` axis:
  - q/k/v and fc1 are column-parallel (their output features `heads` / `mlp` are split),
  - out_proj and fc2 are row-parallel (their input features are split; XLA all-reduces their output),
  - the tied embedding is vocab-parallel (rows split), so the logits come out split over the vocabulary,
  - LayerNorms and biases of row-parallel layers are replicated.
Changing the parallelism scheme is a change to `logical_rules`, never to the model. Nothing here imports the
model: `m11b_jax.param_tree` applies this table to the model's parameter tree.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from m11b_jax.axis_names import (ACTIVATION_EMBED, BATCH, EMBED, HEAD_DIM, HEADS, LAYERS, MLP, RESIDUAL_LENGTH,
                                 TP_LENGTH, VOCAB)
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
        # parameters, and the activation axes computed along them
        (VOCAB, MODEL),
        (HEADS, MODEL),
        (MLP, MODEL),
        (EMBED, DATA if fsdp else None),
        (LAYERS, None),
        # activations
        (BATCH, DATA),
        (RESIDUAL_LENGTH, MODEL if sequence_parallel else None),
        (TP_LENGTH, None),
        (ACTIVATION_EMBED, None),
        (HEAD_DIM, None),
    )


def spec(logical_axes: Sequence[str | None], rules) -> P:
    """The PartitionSpec of an array whose axes have these logical names (None: an axis no rule splits)."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def named_sharding(mesh: Mesh, rules, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, spec(logical_axes, rules))


def mesh_axes(logical_name: str, rules):
    """The mesh axis (or axes, or None) the table maps one logical axis to: the axis names of the collectives
    that reduce over it inside `shard_map`."""
    return spec((logical_name,), rules)[0]


def mesh_size(mesh: Mesh, axes) -> int:
    """How many shards `mesh_axes(...)`'s answer splits an axis into."""
    if axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


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


def batch_sharding(mesh: Mesh, ndim: int = 2, *, rules) -> NamedSharding:
    """Token batches [batch, length, ...]: the batch axis as the table places it (default: over `data`)."""
    return named_sharding(mesh, rules, (BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> dict:
    return {"shape": dict(mesh.shape), "devices": mesh.devices.size, "platform": mesh.devices.flat[0].platform}


def check_fsdp(cfg, mesh: Mesh) -> None:
    """--fsdp splits every weight's `embed` axis (d_model) over the data axis: it must divide d_model."""
    data = mesh.shape[DATA]
    if cfg.d_model % data:
        raise UserError(f"--fsdp splits d_model={cfg.d_model} over the {data} data-parallel replicas: choose a "
                        f"--model-parallel-size that leaves a data axis dividing {cfg.d_model}, or drop --fsdp")


def _fsdp_gathered(w: jax.Array, kernel_axes: tuple) -> jax.Array:
    """The kernel whole along `embed` (all-gathered over `data`), still split as the table says elsewhere."""
    return nn.with_logical_constraint(w, tuple(ACTIVATION_EMBED if a == EMBED else a for a in kernel_axes))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def fsdp_matmul(x: jax.Array, w: jax.Array, kernel_axes: tuple) -> jax.Array:
    """x [batch, ..., k] @ w [k, f] under --fsdp, w's `embed` axis stored split over `data` (ZeRO-3).

    Forward: w is all-gathered over `data` (one layer's weight, inside the layer loop) and multiplied. Backward:
    w is gathered again (not kept), and its gradient is each replica's own x^T g over its batch shard, summed
    over `data` with a reduce-scatter (`lax.psum_scatter`) straight into the shard each replica stores. The
    shard_map's specs come from the logical table: rows `batch`, x's and g's last axes the kernel's two."""
    return jax.lax.dot_general(x, _fsdp_gathered(w, kernel_axes), (((x.ndim - 1,), (0,)), ((), ())))


def _fsdp_matmul_fwd(x, w, kernel_axes):
    return fsdp_matmul(x, w, kernel_axes), (x, w)


def _fsdp_matmul_bwd(kernel_axes, residuals, g):
    x, w = residuals
    rules = nn.get_logical_axis_rules()
    dx = jax.lax.dot_general(g, _fsdp_gathered(w, kernel_axes), (((g.ndim - 1,), (1,)), ((), ())))
    # x's and g's last axes are the kernel's two, as activations (whole along d_model); rows split over data.
    act = tuple(ACTIVATION_EMBED if a == EMBED else a for a in kernel_axes)
    x_spec = spec((BATCH,) + (TP_LENGTH,) * (x.ndim - 2) + (act[0],), rules)
    g_spec = spec((BATCH,) + (TP_LENGTH,) * (g.ndim - 2) + (act[1],), rules)
    kernel = spec(kernel_axes, rules)

    def local_weight_grad(x_, g_):  # this device's rows only; its shard of the summed gradient out
        x2, g2 = x_.reshape(-1, x_.shape[-1]), g_.reshape(-1, g_.shape[-1])
        dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
        return jax.lax.psum_scatter(dw, DATA, scatter_dimension=list(kernel).index(DATA), tiled=True)

    dw = jax.shard_map(local_weight_grad, in_specs=(x_spec, g_spec), out_specs=kernel)(x, g)
    return dx, dw.astype(w.dtype)


fsdp_matmul.defvjp(_fsdp_matmul_fwd, _fsdp_matmul_bwd)


def fsdp_reduce_scatters(rules) -> bool:
    """Whether `fsdp_matmul` applies under this table: weights split over `data` (--fsdp), the rows of a batch
    over that same axis alone, and a block's tokens whole inside the tensor-parallel regions."""
    return (mesh_axes(EMBED, rules) == DATA and mesh_axes(BATCH, rules) == DATA
            and mesh_axes(TP_LENGTH, rules) is None)
