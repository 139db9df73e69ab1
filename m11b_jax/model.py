"""fairseq's `transformer_lm_megatron_11b` as a Flax (linen) module.

What it computes (../shared/REFERENCE.md, Architecture):
    x = sqrt(d) * E[tokens] + sinusoid(positions)          positions = cumsum(tokens != pad) + pad
    for each layer:  x = x + Attn(LN1(x));  x = x + fc2(gelu(fc1(LN2(x))))      (pre-LN, eps 1e-5)
    logits = LN_final(x) @ E^T                               (tied embedding, no output bias)

No parallelism logic lives here: every parameter and activation carries *logical* axis names
(`vocab`, `embed`, `heads`, `mlp`, `layers`, `activation_*`) and `m11b_jax.sharding` maps them to mesh axes
in one table. Weights use Flax's [in, out] kernel layout (fairseq's nn.Linear is [out, in]).
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from m11b_jax.attention import causal_allowed, causal_attention
from m11b_jax.config import MATMUL_SAVING_POLICIES, ModelConfig, parse_dtype_flag
from m11b_jax.loss import output_cross_entropy

# Logical names of activations. The sharding table decides what each maps to.
BATCH, LENGTH, EMBED = "activation_batch", "activation_length", "activation_embed"
SEQ = "activation_seq"  # the sequence axis inside a tensor-parallel region (never sharded)
HEADS, KV, MLP, VOCAB = "activation_heads", "activation_kv", "activation_mlp", "activation_vocab"

REMAT_POLICIES = {
    "full": None,  # save nothing but the layer input; recompute the whole layer in the backward pass
    "save_dots": jax.checkpoint_policies.dots_saveable,  # keep every matmul output
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections, not scores
}


def fairseq_positions(tokens: jax.Array, pad_idx: int) -> jax.Array:
    """fairseq's `make_positions`: first real token gets pad+1 (=2), pads get pad (=1)."""
    mask = (tokens != pad_idx).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + pad_idx


def sinusoidal_embedding(positions: jax.Array, dim: int, pad_idx: int) -> jax.Array:
    """fairseq's SinusoidalPositionalEmbedding: [sin | cos] halves, f_i = exp(-i ln(1e4) / (d/2 - 1)); pad row 0."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    angles = positions.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.where((positions == pad_idx)[..., None], 0.0, emb)


def gelu_erf(x: jax.Array) -> jax.Array:
    """x * Phi(x) written with erf, as PyTorch's GELU computes it (jax.nn.gelu uses erfc, which XLA:CPU
    expands into a slow exp/select chain)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _dense(features, axes, cfg: ModelConfig, name: str, init=nn.initializers.xavier_uniform(), dot_general=None):
    return nn.Dense(
        features,
        dtype=parse_dtype_flag(cfg.compute_dtype),
        param_dtype=parse_dtype_flag(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        dot_general=dot_general,
        name=name,
    )


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_flat_weight_grad(x, w, transposed: bool = False):
    """x [..., k] @ w [k, f], whose weight gradient is one 2-D product over the flattened leading axes.

    Autodiff's weight gradient of a 3-D x contracts two leading axes; XLA:CPU answers that with a transposed
    copy of the output gradient plus a slow generic dot (fc1 forward + backward: 43 ms vs 11 ms on the CPU
    benchmark's shapes). The forward stays 3-D, so sharding and the memory XLA plans are unchanged.

    transposed=False: dw = x_2d^T g_2d, contracting the token axis that leads both operands.
    transposed=True (config `weight_grad_impl="transposed"`): the same product in the plain [k, n] x [n, f] form,
    on a transposed copy of the narrower operand (see `_weight_grad_nn`)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, w, transposed):
    return _matmul_flat_weight_grad(x, w, transposed), (x, w)


def _weight_grad_nn(x2, g2):
    """x2^T g2 ([n, k], [n, f] -> [k, f]) as a product whose left operand is contracted on its last axis and
    right operand on its first: XLA:CPU runs that form in YNNPACK, while x2^T g2 as written (both operands
    contracted on their leading axis) goes to a generic kernel that runs 1.1-1.5x slower alone and much slower
    beside other work in a train step. The narrower of x2 and g2 is transposed (a copy of [n, 256] is cheap; of
    the [n, ffn] activation it is not). The optimization barriers stop XLA from folding the transposes back
    into the product's dimension numbers."""
    dot = lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())))  # noqa: E731  [m, n] @ [n, p]
    barrier = jax.lax.optimization_barrier
    if x2.shape[1] <= g2.shape[1]:
        return dot(barrier(x2.T), g2)
    return barrier(dot(barrier(g2.T), x2)).T


def _matmul_bwd(transposed, residuals, g):
    x, w = residuals
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if transposed:
        dw = _weight_grad_nn(x2, g2)
    else:
        dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    return dx, dw.astype(w.dtype)


_matmul_flat_weight_grad.defvjp(_matmul_fwd, _matmul_bwd)


def _projection(x: jax.Array, features: int, axes, cfg: ModelConfig, name: str, column_parallel: bool) -> jax.Array:
    """`_dense` for one of a layer's projections, with its weight gradient as `cfg.weight_grad_impl` says:
    "flat" gives the column-parallel ones (q/k/v, fc1), whose wide output gradient makes the 3-D weight gradient
    slow on XLA:CPU, the 2-D product of `_matmul_flat_weight_grad` and leaves the row-parallel ones (out_proj,
    fc2) to autodiff; "transposed" gives every projection the 2-D product in the form XLA:CPU runs fastest.
    Neither applies under the remat policies that save matmul outputs: they must see the forward product as a
    `dot_general`, and a custom VJP hides it."""
    dot_general = None
    if cfg.remat_policy not in MATMUL_SAVING_POLICIES:
        if cfg.weight_grad_impl == "transposed":
            dot_general = partial(_flat_weight_grad_dot_general, transposed=True)
        elif column_parallel:
            dot_general = _flat_weight_grad_dot_general
    return _dense(features, axes, cfg, name, dot_general=dot_general)(x)


def _flat_weight_grad_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                                  transposed: bool = False):
    """`lax.dot_general` as nn.Dense calls it (contract lhs's last axis with rhs's first), through the above."""
    assert dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())), dimension_numbers
    return _matmul_flat_weight_grad(lhs, rhs, transposed)


def _layer_norm(cfg: ModelConfig, name: str):
    # Statistics and output in fp32 whatever the compute dtype; callers cast.
    return nn.LayerNorm(
        epsilon=cfg.layernorm_eps,
        dtype=jnp.float32,
        param_dtype=parse_dtype_flag(cfg.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def _keep_mask_16bit(shape, rate: float, key):
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


def _dropout_16bit(x, rate: float, key):
    keep, scale = _keep_mask_16bit(x.shape, rate, key)
    return jnp.where(keep, x * scale, 0.0).astype(x.dtype)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention; q/k/v column-parallel over heads, out_proj row-parallel."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool):
        cfg = self.cfg
        b, t, d = x.shape
        h, hd = cfg.num_heads, cfg.head_dim

        def heads(y):
            return nn.with_logical_constraint(y.reshape(b, t, h, hd), (BATCH, SEQ, HEADS, KV))

        q = _projection(x, d, ("embed", "heads"), cfg, "q_proj", column_parallel=True)
        q = heads(q * (hd ** -0.5))  # scaled after its bias
        k = heads(_projection(x, d, ("embed", "heads"), cfg, "k_proj", column_parallel=True))
        v = heads(_projection(x, d, ("embed", "heads"), cfg, "v_proj", column_parallel=True))

        dropout = not deterministic and cfg.attention_dropout > 0
        if cfg.attention_impl == "manual":
            keep, keep_scale = None, 1.0
            if dropout:
                keep, keep_scale = _keep_mask_16bit((b, h, t, t), cfg.attention_dropout, self.make_rng("dropout"))
            heads_major = lambda y: y.transpose(0, 2, 1, 3)  # noqa: E731  [b, t, h, hd] <-> [b, h, t, hd]
            out = heads_major(causal_attention(heads_major(q), heads_major(k), heads_major(v), key_mask, keep,
                                               keep_scale))
            out = nn.with_logical_constraint(out, (BATCH, SEQ, HEADS, KV)).reshape(b, t, d)
            return _projection(out, d, ("heads", "embed"), cfg, "out_proj", column_parallel=False)

        # Like fairseq in mixed precision: scores in the compute dtype, the softmax in fp32, probs cast back.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        allowed = causal_allowed(key_mask, 0, t)
        # A finite minimum (not -inf) keeps fully masked rows (pad queries) finite.
        scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        if dropout:
            probs = _dropout_16bit(probs, cfg.attention_dropout, self.make_rng("dropout"))
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = nn.with_logical_constraint(out, (BATCH, SEQ, HEADS, KV)).reshape(b, t, d)
        return _projection(out, d, ("heads", "embed"), cfg, "out_proj", column_parallel=False)


class DecoderLayer(nn.Module):
    """One pre-LayerNorm transformer block. Called as a scan body: (carry, broadcast) -> (carry, None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool):
        cfg = self.cfg
        cdt = parse_dtype_flag(cfg.compute_dtype)
        residual = (BATCH, LENGTH, EMBED)
        x = nn.with_logical_constraint(x, residual)

        h = _layer_norm(cfg, "self_attn_layer_norm")(x).astype(cdt)
        h = SelfAttention(cfg, name="self_attn")(h, key_mask, deterministic)
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        x = nn.with_logical_constraint(x + h.astype(x.dtype), residual)

        h = _layer_norm(cfg, "final_layer_norm")(x).astype(cdt)
        h = _projection(h, cfg.ffn_dim, ("embed", "mlp"), cfg, "fc1", column_parallel=True)
        h = nn.with_logical_constraint(h, (BATCH, SEQ, MLP))
        h = gelu_erf(h.astype(jnp.float32)).astype(cdt)  # exact erf GELU in fp32
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
        h = _projection(h, cfg.d_model, ("mlp", "embed"), cfg, "fc2", column_parallel=False)
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        x = nn.with_logical_constraint(x + h.astype(x.dtype), residual)
        return x, None


class TransformerLM(nn.Module):
    """Decoder-only LM. `__call__(tokens) -> logits [batch, length, vocab]` in the compute dtype."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(self._embed_init, ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            parse_dtype_flag(cfg.param_dtype),
        )
        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False,
                             static_argnums=(3,))
        # Always a scan, so the parameter tree is the same stacked [layers, ...] tree; `scan_layers=False`
        # unrolls the loop in the compiled program (faster for tiny CPU models, slower to compile).
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        self.layer_norm = _layer_norm(cfg, "layer_norm")
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed_init(self, key, shape, dtype):
        # fairseq: N(0, d^-0.5) with the padding row zeroed.
        w = jax.random.normal(key, shape, dtype) * (shape[1] ** -0.5)
        return w.at[self.cfg.pad_idx].set(0)

    def hidden_states(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """Final-LayerNorm output [batch, length, d] (fp32)."""
        cfg = self.cfg
        cdt = parse_dtype_flag(cfg.compute_dtype)
        tokens = nn.with_logical_constraint(tokens, (BATCH, SEQ))
        key_mask = tokens != cfg.pad_idx
        emb = jnp.take(self.embed_tokens, tokens, axis=0).astype(jnp.float32)
        pos = sinusoidal_embedding(fairseq_positions(tokens, cfg.pad_idx), cfg.d_model, cfg.pad_idx)
        x = nn.with_logical_constraint(math.sqrt(cfg.d_model) * emb + pos, (BATCH, LENGTH, EMBED))
        x = self.dropout(x, deterministic=deterministic)
        # The residual stream is carried in fp32 when params are fp32 (bf16 only inside matmuls).
        x = nn.with_logical_constraint(x.astype(jnp.promote_types(cdt, parse_dtype_flag(cfg.param_dtype))),
                                       (BATCH, LENGTH, EMBED))
        x, _ = self.layers(x, key_mask, deterministic)
        return self.layer_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection: hidden @ E^T, vocab-parallel (each model shard makes its vocab slice)."""
        (b, t), hidden, embed = self._output_operands(hidden)
        # One 2-D matmul: its weight gradient is a plain 2-D product too (see `_matmul_flat_weight_grad`).
        out = jnp.einsum("nd,vd->nv", hidden, embed)
        return nn.with_logical_constraint(out.reshape(b, t, -1), (BATCH, SEQ, VOCAB))

    def _output_operands(self, hidden: jax.Array):
        """((batch, length), hidden [batch * length, d], tied embedding [V, d]) in the compute dtype: what the
        output projection multiplies, in `logits` and in `output_loss` alike."""
        cdt = parse_dtype_flag(self.cfg.compute_dtype)
        hidden = nn.with_logical_constraint(hidden.astype(cdt), (BATCH, SEQ, EMBED))
        b, t, d = hidden.shape
        return (b, t), hidden.reshape(b * t, d), self.embed_tokens.astype(cdt)

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.logits(self.hidden_states(tokens, deterministic))

    def output_loss(self, tokens: jax.Array, targets: jax.Array, deterministic: bool = True):
        """(summed cross-entropy in nats over non-pad targets, their count) with the output projection and the
        loss as one operation (`loss.output_cross_entropy`, config `loss_impl="fused"`): no logits returned."""
        _, hidden, embed = self._output_operands(self.hidden_states(tokens, deterministic))
        return output_cross_entropy(hidden, embed, targets.reshape(-1), self.cfg.pad_idx)
