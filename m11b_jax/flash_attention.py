"""Fused causal attention for GPUs: `attention_impl` "flash" (Pallas/Triton, with attention dropout) and "cudnn".

flash: a flash-attention forward and two backward kernels (dQ; dK and dV) written in Pallas for Triton. No
[batch, heads, T, T] array is ever stored: each kernel walks key (or query) blocks, recomputes the scores from
q and k, and the forward saves only the output and the per-query log-sum-exp (lse).

Attention dropout without a stored mask. The keep bit of score (query q, key k) of head h in batch row b is
a counter-based hash:  bits = H(H(H(seed, b, h), q), k) >= threshold, with H built from murmur3's 32-bit
finalizer (a bijection with full avalanche) and `seed` a 32-bit word drawn from the layer's dropout key, which
the train step derives from (--seed, update number, micro-batch) and `nn.scan` splits per layer. b and h are
*global* indices (shard offsets added under the mesh), so the mask is a pure function of (seed, update,
layer, row, head, query, key): the same on every mesh, in the forward and both backward kernels, and after a
resume. P(drop) = threshold / 2^32 (the rate rounded to a multiple of 2^-32), kept values scaled by
1 / (1 - P(drop)).

Key padding is a per-row length (training blocks are right-padded): key k is visible to query q iff
k <= q and k < length. A query that sees no key at all (a row of length 0) outputs 0.

The same kernels run on a CPU in Pallas interpret mode (`jax.lax.platform_dependent` picks it when the
program is lowered for a CPU): slow, for tests. `reference_attention` is the same function in plain JAX,
building the same hash mask as a [b, h, T, T] array.

cudnn: `jax.nn.dot_product_attention(implementation="cudnn")` (bf16/fp16, no dropout).

Both run per shard under `jax.shard_map` with the specs the logical-axis table gives the attention
activations (batch over `data`, heads over `model`), so XLA never has to partition a custom call.
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from m11b_jax.errors import UserError

# checkpoint_name tags of the flash forward's residuals: the remat policy "save_attention" keeps them.
OUT_NAME, LSE_NAME = "attention_out", "attention_lse"
_NEG = -1e30  # masked scores: finite, so a block with no visible key never makes inf - inf

# ---------------------------------------------------------------------------------------------- the hash mask


def _u32(x):
    if isinstance(x, int):
        return np.uint32(x)
    return jnp.asarray(x).astype(jnp.uint32)


def _fmix32(x):
    """murmur3's finalizer: a bijection of uint32 with full avalanche."""
    x = x ^ jax.lax.shift_right_logical(x, _u32(16))
    x = x * _u32(0x85EBCA6B)
    x = x ^ jax.lax.shift_right_logical(x, _u32(13))
    x = x * _u32(0xC2B2AE35)
    return x ^ jax.lax.shift_right_logical(x, _u32(16))


def row_head_hash(seed, row, head):
    """H(seed, batch row, head) (uint32, broadcasting): one word per (row, head) pair, made outside the kernels."""
    return _fmix32(_fmix32(_u32(seed) ^ (_u32(row) * _u32(0x9E3779B1))) ^ (_u32(head) * _u32(0x27D4EB2F)))


def _query_hash(rh, q):
    return _fmix32(rh ^ (_u32(q) * _u32(0x165667B1)))


def _element_bits(qh, k):
    return _fmix32(qh ^ (_u32(k) * _u32(0xD3A2646C)))


def dropout_threshold(rate: float) -> tuple[int, float]:
    """(threshold, keep scale): a score is kept iff its hash bits >= threshold."""
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    return threshold, 1.0 / (1.0 - threshold / 2.0**32)


def keep_mask(seed, rows, heads, queries, keys, rate: float):
    """The keep bits for the given global indices (broadcasting int arrays): the pure function the kernels use."""
    threshold, _ = dropout_threshold(rate)
    qh = _query_hash(row_head_hash(seed, rows, heads), queries)
    return _element_bits(qh, keys) >= _u32(threshold)


# ------------------------------------------------------------------------------------------------- kernels


def _load(ref, hd: int):
    """A [rows, hd_padded] tile; the columns past hd (head dims padded to a power of two) read as 0."""
    if ref.shape[-1] == hd:
        return ref[...]
    return plgpu.load(ref, mask=(jnp.arange(ref.shape[-1]) < hd)[None, :], other=0.0)


def _store(ref, x, hd: int):
    if ref.shape[-1] == hd:
        ref[...] = x.astype(ref.dtype)
    else:
        plgpu.store(ref, x.astype(ref.dtype), mask=(jnp.arange(ref.shape[-1]) < hd)[None, :])


def _keep(base_ref, qpos, kpos, threshold):
    qh = _query_hash(base_ref[0], qpos)
    return _element_bits(qh[:, None], kpos[None, :]) >= _u32(threshold)


def _fwd_kernel(q_ref, k_ref, v_ref, len_ref, base_ref, o_ref, lse_ref, *, bq, bk, hd, threshold, keep_scale):
    iq = pl.program_id(0)
    length = len_ref[0]
    q = _load(q_ref, hd)
    qpos = iq * bq + jnp.arange(bq)

    def body(j, carry):
        acc, m, l = carry
        kpos = j * bk + jnp.arange(bk)
        k = _load(k_ref.at[pl.ds(j * bk, bk), :], hd)
        v = _load(v_ref.at[pl.ds(j * bk, bk), :], hd)
        allowed = (qpos[:, None] >= kpos[None, :]) & (kpos[None, :] < length)
        s = jnp.where(allowed, plgpu.dot(q, k, trans_b=True), _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
        l = alpha * l + p.sum(axis=1)
        if base_ref is not None:
            p = jnp.where(_keep(base_ref, qpos, kpos, threshold), p, 0.0)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    hdp = q_ref.shape[-1]
    carry = (jnp.zeros((bq, hdp), jnp.float32), jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
    upper = jnp.minimum(pl.cdiv((iq + 1) * bq, bk), pl.cdiv(length, bk))
    acc, m, l = jax.lax.fori_loop(0, upper, body, carry)
    seen = l > 0.0
    _store(o_ref, acc * (keep_scale / jnp.where(seen, l, 1.0))[:, None], hd)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _probs_and_ds(q, k, v, do, lse, delta, qpos, kpos, length, base_ref, threshold, keep_scale):
    """Recomputed P (dropout applied, for dV) and dS of one [bq, bk] tile."""
    allowed = (qpos[:, None] >= kpos[None, :]) & (kpos[None, :] < length)
    p = jnp.where(allowed, jnp.exp(plgpu.dot(q, k, trans_b=True) - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v, trans_b=True)  # d loss / d (dropped-out probabilities)
    pd = p
    if base_ref is not None:
        keep = _keep(base_ref, qpos, kpos, threshold)
        dp = jnp.where(keep, dp * keep_scale, 0.0)
        pd = jnp.where(keep, p * keep_scale, 0.0)
    return pd, p * (dp - delta[:, None])


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, len_ref, base_ref, dq_ref, *, bq, bk, hd,
               threshold, keep_scale):
    iq = pl.program_id(0)
    length = len_ref[0]
    q, do = _load(q_ref, hd), _load(do_ref, hd)
    lse, delta = lse_ref[...], delta_ref[...]
    qpos = iq * bq + jnp.arange(bq)

    def body(j, dq):
        kpos = j * bk + jnp.arange(bk)
        k = _load(k_ref.at[pl.ds(j * bk, bk), :], hd)
        v = _load(v_ref.at[pl.ds(j * bk, bk), :], hd)
        _, ds = _probs_and_ds(q, k, v, do, lse, delta, qpos, kpos, length, base_ref, threshold, keep_scale)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    upper = jnp.minimum(pl.cdiv((iq + 1) * bq, bk), pl.cdiv(length, bk))
    dq = jax.lax.fori_loop(0, upper, body, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
    _store(dq_ref, dq, hd)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, len_ref, base_ref, dk_ref, dv_ref, *, bq, bk, hd,
                threshold, keep_scale):
    jk = pl.program_id(0)
    length = len_ref[0]
    k, v = _load(k_ref, hd), _load(v_ref, hd)
    kpos = jk * bk + jnp.arange(bk)
    t = q_ref.shape[0]

    def body(i, carry):
        dk, dv = carry
        qpos = i * bq + jnp.arange(bq)
        q = _load(q_ref.at[pl.ds(i * bq, bq), :], hd)
        do = _load(do_ref.at[pl.ds(i * bq, bq), :], hd)
        lse, delta = lse_ref[pl.ds(i * bq, bq)], delta_ref[pl.ds(i * bq, bq)]
        pd, ds = _probs_and_ds(q, k, v, do, lse, delta, qpos, kpos, length, base_ref, threshold, keep_scale)
        dv = dv + plgpu.dot(pd.astype(do.dtype), do, trans_a=True)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lower = (jk * bk) // bq  # earlier query blocks see none of these keys
    upper = jnp.where(jk * bk < length, t // bq, lower)  # keys past the row's length are never seen
    zeros = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
    dk, dv = jax.lax.fori_loop(lower, upper, body, (zeros, zeros))
    _store(dk_ref, dk, hd)
    _store(dv_ref, dv, hd)


# ------------------------------------------------------------------------------------------- pallas calls


@functools.lru_cache(maxsize=None)
def _blocks(t: int, block_q: int, block_k: int) -> tuple[int, int]:
    bq, bk = min(block_q, t), min(block_k, t)
    if t % bq or t % bk:
        raise UserError(f"attention_impl='flash' needs the sequence length ({t}) to be a multiple of the blocks "
                        f"({bq}, {bk}): use a --tokens-per-sample that is a multiple of {max(bq, bk)}")
    return bq, bk


def _params(hd: int, interpret: bool):
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=4 if hd <= 64 else 8, num_stages=2)


def _specs(dropout: bool, t: int, hdp: int, rows: int, kind: str):
    """BlockSpecs over a grid (block index, batch row, head): a `rows`-long tile or the whole sequence of q/k/v-like
    [b, T, h, hd] arrays or of [b, h, T] vectors (lse, delta); the row's length; the (row, head) hash word."""
    tile = pl.BlockSpec((None, rows, None, hdp), lambda i, b, h: (b, i, h, 0))
    whole = pl.BlockSpec((None, t, None, hdp), lambda i, b, h: (b, 0, h, 0))
    vec_tile = pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, i))
    vec_whole = pl.BlockSpec((None, None, t), lambda i, b, h: (b, h, 0))
    length = pl.BlockSpec((None, 1), lambda i, b, h: (b, 0))
    base = pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, 0)) if dropout else None
    return {"tile": tile, "whole": whole, "vec_tile": vec_tile, "vec_whole": vec_whole, "len": length, "base": base}[kind]


def _flash_fwd_call(q, k, v, lengths, base, *, threshold, keep_scale, block_q, block_k, interpret):
    b, t, h, hd = q.shape
    bq, bk = _blocks(t, block_q, block_k)
    hdp = pl.next_power_of_2(hd)
    drop = base is not None
    spec = functools.partial(_specs, drop, t, hdp)
    kernel = functools.partial(_fwd_kernel, bq=bq, bk=bk, hd=hd, threshold=threshold, keep_scale=keep_scale)
    return pl.pallas_call(
        kernel, grid=(t // bq, b, h),
        in_specs=[spec(bq, "tile"), spec(bq, "whole"), spec(bq, "whole"), spec(bq, "len"), spec(bq, "base")],
        out_specs=[spec(bq, "tile"), spec(bq, "vec_tile")],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_params(hd, interpret), interpret=interpret, name="flash_attention_fwd",
    )(q, k, v, lengths, base)


def _flash_bwd_calls(q, k, v, out, lse, d_out, lengths, base, *, threshold, keep_scale, block_q, block_k, interpret):
    b, t, h, hd = q.shape
    bq, bk = _blocks(t, block_q, block_k)
    hdp = pl.next_power_of_2(hd)
    drop = base is not None
    # rowsum(dP * P) = rowsum(dO * O), with or without dropout: an elementwise pass XLA fuses.
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    common = dict(hd=hd, threshold=threshold, keep_scale=keep_scale, bq=bq, bk=bk)
    spec = functools.partial(_specs, drop, t, hdp)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common), grid=(t // bq, b, h),
        in_specs=[spec(bq, "tile"), spec(bq, "whole"), spec(bq, "whole"), spec(bq, "tile"), spec(bq, "vec_tile"),
                  spec(bq, "vec_tile"), spec(bq, "len"), spec(bq, "base")],
        out_specs=spec(bq, "tile"), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(hd, interpret), interpret=interpret, name="flash_attention_bwd_dq",
    )(q, k, v, d_out, lse, delta, lengths, base)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common), grid=(t // bk, b, h),
        in_specs=[spec(bk, "whole"), spec(bk, "tile"), spec(bk, "tile"), spec(bk, "whole"), spec(bk, "vec_whole"),
                  spec(bk, "vec_whole"), spec(bk, "len"), spec(bk, "base")],
        out_specs=[spec(bk, "tile"), spec(bk, "tile")],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(hd, interpret), interpret=interpret, name="flash_attention_bwd_dkv",
    )(q, k, v, d_out, lse, delta, lengths, base)
    return dq, dk, dv


def _on_platform(fn, *args, interpret, **kw):
    """interpret=None: Pallas interpret mode where the program is lowered for a CPU, Triton elsewhere."""
    if interpret is not None:
        return fn(*args, interpret=interpret, **kw)
    return jax.lax.platform_dependent(*args, cpu=functools.partial(fn, interpret=True, **kw),
                                      default=functools.partial(fn, interpret=False, **kw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, lengths, base, static):
    return _flash_fwd(q, k, v, lengths, base, static)[0]


def _flash_fwd(q, k, v, lengths, base, static):
    out, lse = _on_platform(_flash_fwd_call, q, k, v, lengths, base, **dict(static))
    out = checkpoint_name(out, OUT_NAME)
    lse = checkpoint_name(lse, LSE_NAME)
    return out, (q, k, v, out, lse, lengths, base)


def _flash_bwd(static, residuals, d_out):
    q, k, v, out, lse, lengths, base = residuals
    dq, dk, dv = _on_platform(_flash_bwd_calls, q, k, v, out, lse, d_out, lengths, base, **dict(static))
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, lengths, seed=None, *, rate: float = 0.0, row_offset=0, head_offset=0,
                    block_q: int = 64, block_k: int = 64, interpret: bool | None = None):
    """q (already scaled), k, v: [batch, T, heads, head_dim]; lengths: int32 [batch] (keys >= length are
    padding); seed: uint32 scalar (None or rate 0: no dropout); row_offset/head_offset: the global index of
    this shard's first batch row / head. Returns [batch, T, heads, head_dim] in q's dtype."""
    b, _, h, _ = q.shape
    base = None
    threshold, keep_scale = 0, 1.0
    if seed is not None and rate > 0:
        threshold, keep_scale = dropout_threshold(rate)
        rows = jnp.arange(b, dtype=jnp.uint32) + _u32(row_offset)
        heads = jnp.arange(h, dtype=jnp.uint32) + _u32(head_offset)
        base = row_head_hash(seed, rows[:, None], heads[None, :])[..., None]
    static = (("threshold", threshold), ("keep_scale", keep_scale), ("block_q", block_q), ("block_k", block_k),
              ("interpret", interpret))
    return _flash(q, k, v, lengths.astype(jnp.int32).reshape(b, 1), base, static)


def reference_attention(q, k, v, lengths, seed=None, *, rate: float = 0.0, row_offset=0, head_offset=0):
    """`flash_attention` in plain JAX with the [b, h, T, T] scores and the same hash mask (for tests)."""
    b, t, h, _ = q.shape
    qpos, kpos = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed = (qpos >= kpos)[None, None] & (kpos[None, None] < lengths[:, None, None, None])
    s = jnp.where(allowed, jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), _NEG)
    p = jnp.where(allowed, jnp.exp(s - s.max(axis=-1, keepdims=True)), 0.0)
    p = p / jnp.maximum(p.sum(axis=-1, keepdims=True), 1e-30)
    if seed is not None and rate > 0:
        rows = (jnp.arange(b) + row_offset)[:, None, None, None]
        heads = (jnp.arange(h) + head_offset)[None, :, None, None]
        keep = keep_mask(seed, rows, heads, qpos[None, None], kpos[None, None], rate)
        p = jnp.where(keep, p * dropout_threshold(rate)[1], 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(q.dtype), v)


def cudnn_attention(q, k, v, lengths):
    """jax.nn.dot_product_attention's cuDNN kernel (causal, key lengths; q already scaled; no dropout)."""
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True, key_value_seq_lengths=lengths,
                                        implementation="cudnn")


# ----------------------------------------------------------------------------------- the model's entry point


def _axis_index(axes):
    """Linear index of this shard along mesh axes `axes` (None, a name, or a tuple of names)."""
    if axes is None:
        return 0
    return jax.lax.axis_index(axes)


def fused_attention(impl: str, q, k, v, key_mask, seed=None, rate: float = 0.0, axes=(None, None, None, None)):
    """The model's attention core for `attention_impl` "flash" or "cudnn": q (scaled), k, v [b, T, h, hd],
    key_mask [b, T] (right padding: the length is its count of True). axes: the logical names of q's axes; under
    a mesh the kernels run per shard, with the specs the logical-axis table gives those names."""
    lengths = key_mask.sum(axis=1, dtype=jnp.int32)
    if impl == "cudnn":
        local = lambda q, k, v, n, s: cudnn_attention(q, k, v, n)  # noqa: E731
    else:
        def local(q, k, v, n, s):
            return flash_attention(q, k, v, n, s, rate=rate, row_offset=_axis_index(spec[0]) * q.shape[0],
                                   head_offset=_axis_index(spec[2]) * q.shape[2])
    seed = jnp.zeros((), jnp.uint32) if seed is None else seed
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        spec = (None, None, None, None)
        return local(q, k, v, lengths, seed)
    spec = tuple(nn.logical_to_mesh_axes(axes))
    P = jax.sharding.PartitionSpec
    fn = jax.shard_map(local, in_specs=(P(*spec), P(*spec), P(*spec), P(spec[0]), P()), out_specs=P(*spec),
                       check_vma=False)
    return fn(q, k, v, lengths, seed)


def _save_attention(prim, *avals, **params) -> bool:
    """Remat policy "save_attention": keep the projections (matmuls without batch dims), the flash forward's
    output and log-sum-exp (by name) and cuDNN's forward outputs (its residuals carry no name), so the backward
    pass never re-runs an attention forward; everything else (LayerNorms, GELU, biases) is recomputed."""
    return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)
            or prim.name in ("name", "dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")
            and (prim.name != "name" or params.get("name") in (OUT_NAME, LSE_NAME)))


SAVE_ATTENTION_POLICY = _save_attention


def dropout_seed(key):
    """The 32-bit word the hash mask starts from, drawn from a layer's dropout key."""
    return jax.random.bits(key, (), jnp.uint32)


# ------------------------------------------------------------------------------------------ platform checks


def check_platform(attention_impl: str, platform: str) -> None:
    """cudnn on a CPU is an error; flash on a CPU runs the kernels in Pallas interpret mode, with a warning."""
    if platform != "cpu":
        return
    if attention_impl == "cudnn":
        raise UserError("attention_impl='cudnn' needs an NVIDIA GPU (cuDNN), and this run is on CPU devices: use "
                        "--attention-impl flash (interpret mode, slow) or manual on a CPU")
    if attention_impl == "flash":
        warnings.warn("attention_impl='flash' on CPU devices runs its Pallas kernels in interpret mode (correct but "
                      "slow: meant for tests); use --attention-impl manual for CPU training", stacklevel=2)


def causal_flops(batch: int, t: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention counting only the visible half of the scores (QK^T and PV)."""
    return 2 * 2 * batch * heads * head_dim * t * (t + 1) / 2

