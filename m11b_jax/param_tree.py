"""The model's parameter tree placed on a mesh by the sharding table: abstract, or materialized already sharded.

`abstract_params` is the one target tree: of init, of the converter, of every checkpoint restore. It comes from
`model.abstract_variables` (shapes, dtypes, logical axis names) and `sharding`'s table (mesh axes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh

from m11b_jax.config import ModelConfig
from m11b_jax.model import abstract_variables, init_variables
from m11b_jax.sharding import activate, logical_to_sharding


def param_logical_specs(cfg: ModelConfig):
    """The parameter tree of logical PartitionSpecs (e.g. ('layers', 'embed', 'heads'))."""
    return nn.get_partition_spec(abstract_variables(cfg))["params"]


def abstract_params(cfg: ModelConfig, mesh: Mesh, rules):
    """The parameter tree as ShapeDtypeStructs carrying their NamedShardings: no memory is allocated."""
    boxed = abstract_variables(cfg)
    # The values out of their boxes without applying constraints (nn.unbox would, under an active mesh).
    shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed["params"],
                          is_leaf=lambda x: isinstance(x, nn.Partitioned))
    shardings = logical_to_sharding(nn.get_partition_spec(boxed)["params"], mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules):
    return jax.tree.map(lambda leaf: leaf.sharding, abstract_params(cfg, mesh, rules))


def init_params(cfg: ModelConfig, mesh: Mesh, rules, seed: int = 0):
    """Materialize the parameters with ONE jitted init whose out_shardings place every shard on its device.

    No host or device ever holds a full copy: XLA partitions the initializer itself.
    """
    init = jax.jit(lambda key: nn.unbox(init_variables(cfg, key))["params"],
                   out_shardings=param_shardings(cfg, mesh, rules))
    with activate(mesh, rules):
        return init(jax.random.key(seed))
