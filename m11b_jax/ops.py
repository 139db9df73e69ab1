"""Operations the model calls through a config name, written for how XLA:CPU runs them (attention.py holds the
attention kernel, `attention_impl="manual"`). Each computes the same function as the plain JAX expression it
replaces; the measured effect of each is in benchmarks/RESULTS.md.

* `projection_dot_general(cfg, column_parallel, kernel_axes)`: the `dot_general` a layer's projection runs,
  chosen by `cfg.weight_grad_impl` ("flat" / "transposed"): the weight gradient as one 2-D product over the
  flattened token axes instead of autodiff's 3-D contraction. Under --fsdp: `sharding.fsdp_matmul` instead.
* `keep_mask_16bit` / `dropout_16bit`: dropout drawing 16 random bits per element instead of 32.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from m11b_jax import sharding
from m11b_jax.config import MATMUL_SAVING_POLICIES, ModelConfig


def _contract_last_first(lhs, rhs):
    """lhs [..., k] . rhs [k, f] -> [..., f]."""
    return jax.lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_flat_weight_grad(x, w, transposed: bool = False):
    """x [..., k] @ w [k, f], whose weight gradient is one 2-D product over the flattened leading axes.

    Autodiff's weight gradient of a 3-D x contracts two leading axes, which XLA:CPU answers with a transposed
    copy of the output gradient plus a slow generic dot. The forward stays 3-D, so sharding and the memory XLA
    plans are unchanged.

    transposed=False: dw = x_2d^T g_2d, contracting the token axis that leads both operands.
    transposed=True: the same product in the plain [k, n] x [n, f] form, on a transposed copy of the narrower
    operand (see `_weight_grad_nn`)."""
    return _contract_last_first(x, w)


def _matmul_fwd(x, w, transposed):
    return matmul_flat_weight_grad(x, w, transposed), (x, w)


def _weight_grad_nn(x2, g2):
    """x2^T g2 ([n, k], [n, f] -> [k, f]) as a product whose left operand is contracted on its last axis and
    right operand on its first: XLA:CPU runs that form in YNNPACK, while x2^T g2 as written (both operands
    contracted on their leading axis) goes to a slower generic kernel. The narrower of x2 and g2 is transposed
    (a copy of [n, d] is cheap; of the [n, ffn] activation it is not). The optimization barriers stop XLA from
    folding the transposes back into the product's dimension numbers."""
    barrier = jax.lax.optimization_barrier
    if x2.shape[1] <= g2.shape[1]:
        return _contract_last_first(barrier(x2.T), g2)
    return barrier(_contract_last_first(barrier(g2.T), x2)).T


def _matmul_bwd(transposed, residuals, g):
    x, w = residuals
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if transposed:
        dw = _weight_grad_nn(x2, g2)
    else:
        dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    return dx, dw.astype(w.dtype)


matmul_flat_weight_grad.defvjp(_matmul_fwd, _matmul_bwd)


def _flat_weight_grad_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                                  transposed: bool = False):
    """`lax.dot_general` as nn.Dense calls it (contract lhs's last axis with rhs's first), through the above."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
        raise ValueError(f"expected nn.Dense's dimension numbers, got {dimension_numbers}")
    return matmul_flat_weight_grad(lhs, rhs, transposed)


def projection_dot_general(cfg: ModelConfig, column_parallel: bool, kernel_axes: tuple | None = None):
    """The `dot_general` of one of a layer's projections: `_projection_product`'s; under --fsdp (when the table
    being traced splits the kernel, logical axes `kernel_axes`, over `data`) `sharding.fsdp_matmul`, whose
    weight gradient is reduce-scattered over `data`. Not under the remat policies that save matmul outputs
    (a custom VJP hides the product from them): there the compiler gathers and reduces the weights itself."""
    product = _projection_product(cfg, column_parallel)
    if (kernel_axes is None or cfg.remat_policy in MATMUL_SAVING_POLICIES
            or not sharding.fsdp_reduce_scatters(nn.get_logical_axis_rules())):
        return product

    def fsdp_product(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
            raise ValueError(f"expected nn.Dense's dimension numbers, got {dimension_numbers}")
        return sharding.fsdp_matmul(lhs, rhs, tuple(kernel_axes))

    return fsdp_product


def _projection_product(cfg: ModelConfig, column_parallel: bool):
    """The `dot_general` of one of a layer's projections (None: nn.Dense's own, differentiated by autodiff).

    weight_grad_impl="flat": the column-parallel projections (q/k/v, fc1), whose wide output gradient makes the
    3-D weight gradient slow on XLA:CPU, get the 2-D product; the row-parallel ones (out_proj, fc2) autodiff.
    weight_grad_impl="transposed": every projection gets the 2-D product in the form XLA:CPU runs fastest.
    Neither applies under the remat policies that save matmul outputs: they must see the forward product as a
    `dot_general`, and a custom VJP hides it."""
    if cfg.remat_policy in MATMUL_SAVING_POLICIES:
        return None
    if cfg.weight_grad_impl == "transposed":
        return partial(_flat_weight_grad_dot_general, transposed=True)
    return _flat_weight_grad_dot_general if column_parallel else None


def keep_mask_16bit(shape, rate: float, key):
    """Dropout's keep mask drawing 16 random bits per element instead of 32: the [batch, heads, len, len]
    attention mask is the largest random tensor of a step, and its generator's temporaries cost ~0.7 GiB per
    device at the release size. The drop probability is rate rounded to a multiple of 2^-16 (0.1 -> 0.100006);
    returns (keep, 1 / (1 - that probability)), the scale that keeps the layer unbiased."""
    threshold = round(rate * 65536)
    if shape[-1] % 2 == 0:  # two 16-bit draws from each 32-bit word of the generator
        words = jax.random.bits(key, (*shape[:-1], shape[-1] // 2), jnp.uint32)
        bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(shape)
    else:
        bits = jax.random.bits(key, shape, jnp.uint16)
    return bits >= threshold, 1.0 / (1.0 - threshold / 65536)


def dropout_16bit(x, rate: float, key):
    keep, scale = keep_mask_16bit(x.shape, rate, key)
    return jnp.where(keep, x * scale, 0.0).astype(x.dtype)
