"""fairseq's `transformer_lm_megatron_11b` as a Flax (linen) module.

What it computes (../shared/REFERENCE.md, Architecture):
    x = sqrt(d) * E[tokens] + sinusoid(positions)          positions = cumsum(tokens != pad) + pad
    for each layer:  x = x + Attn(LN1(x));  x = x + fc2(gelu(fc1(LN2(x))))      (pre-LN, eps 1e-5)
    logits = LN_final(x) @ E^T                               (tied embedding, no output bias)

No parallelism logic lives here: every parameter and activation carries *logical* axis names
(`m11b_jax.axis_names`) and `m11b_jax.sharding.logical_rules` maps them to mesh axes in one table.
Weights use Flax's [in, out] kernel layout (fairseq's nn.Linear is [out, in]).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from m11b_jax.attention import causal_allowed_at, causal_attention
from m11b_jax.axis_names import (ACTIVATION_EMBED, BATCH, EMBED, HEAD_DIM, HEADS, LAYERS, MLP, RESIDUAL_LENGTH,
                                 TP_LENGTH, VOCAB)
from m11b_jax.config import ModelConfig, jax_dtype
from m11b_jax.flash_attention import SAVE_ATTENTION_POLICY, dropout_seed, fused_attention
from m11b_jax.init_rules import embedding_init, projection_inits
from m11b_jax.ops import dropout_16bit, keep_mask_16bit, projection_dot_general

# What the backward pass of each remat policy (config REMAT_POLICIES, "none" aside) may keep from the forward.
_REMAT_SAVEABLE = {
    "full": None,  # nothing but the layer input: the whole layer is recomputed
    "save_dots": jax.checkpoint_policies.dots_saveable,  # every matmul output
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # projections, not scores
    "save_attention": SAVE_ATTENTION_POLICY,  # projections + fused attention's output and lse: no attention re-run
}


def fairseq_positions(tokens: jax.Array, pad_idx: int, seen: jax.Array | None = None) -> jax.Array:
    """fairseq's `make_positions`: first real token gets pad+1 (=2), pads get pad (=1). `seen` [batch]: real
    tokens before these (decoding continues each row's count)."""
    mask = (tokens != pad_idx).astype(jnp.int32)
    count = jnp.cumsum(mask, axis=1) if seen is None else seen[:, None] + jnp.cumsum(mask, axis=1)
    return count * mask + pad_idx


def _cache_variable(module: nn.Module, name: str, shape, dtype, names):
    """A zero-initialized `cache` collection variable carrying logical axis names (decoding only)."""
    return module.variable("cache", name, lambda: nn.LogicallyPartitioned(jnp.zeros(shape, dtype), names))


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


def _dense(features, axes, cfg: ModelConfig, name: str, inits, dot_general=None):
    """nn.Dense with (kernel_init, bias_init) `inits` (m11b_jax.init_rules: fairseq's rule `cfg.init`)."""
    return nn.Dense(
        features,
        dtype=jax_dtype(cfg.compute_dtype),
        param_dtype=jax_dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(inits[0], axes),
        bias_init=nn.with_logical_partitioning(inits[1], axes[1:]),
        dot_general=dot_general,
        name=name,
    )


def _projection(x: jax.Array, features: int, axes, cfg: ModelConfig, name: str, column_parallel: bool) -> jax.Array:
    """`_dense` for one of a layer's projections, through the `dot_general` config `weight_grad_impl` picks."""
    inits = projection_inits(cfg.init, name, x.shape[-1], features)
    return _dense(features, axes, cfg, name, inits, dot_general=projection_dot_general(cfg, column_parallel, axes))(x)


def _layer_norm(cfg: ModelConfig, name: str):
    # Statistics and output in fp32 whatever the compute dtype; callers cast.
    return nn.LayerNorm(
        epsilon=cfg.layernorm_eps,
        dtype=jnp.float32,
        param_dtype=jax_dtype(cfg.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
        name=name,
    )


class SelfAttention(nn.Module):
    """Causal multi-head self-attention; q/k/v column-parallel over heads, out_proj row-parallel.

    decode=True: keys and values also go into a `cache` collection [batch, cache_len, heads, head_dim] (created
    by `init` on a [batch, cache_len] input) at column `index`, and the queries attend to the whole cache;
    key_mask is then the cache's [batch, cache_len] mask. query_index [batch, n] (scoring's last layer): queries
    only at these positions, keys and values from every position."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, index=0, query_index=None):
        cfg = self.cfg
        b, t, d = x.shape
        h, hd = cfg.num_heads, cfg.head_dim
        xq = x if query_index is None else jnp.take_along_axis(x, query_index[..., None], axis=1)
        n = xq.shape[1]
        fused = not self.decode and query_index is None  # every query of the sequence: the fused/blocked kernels

        def heads(y):
            return nn.with_logical_constraint(y.reshape(b, y.shape[1], h, hd), (BATCH, TP_LENGTH, HEADS, HEAD_DIM))

        q = _projection(xq, d, (EMBED, HEADS), cfg, "q_proj", column_parallel=True)
        q = heads(q * (hd ** -0.5))  # scaled after its bias
        k = heads(_projection(x, d, (EMBED, HEADS), cfg, "k_proj", column_parallel=True))
        v = heads(_projection(x, d, (EMBED, HEADS), cfg, "v_proj", column_parallel=True))

        if self.decode:
            k, v = (self._cached(name, y, index) for name, y in (("key", k), ("value", v)))

        dropout = not deterministic and cfg.attention_dropout > 0
        if cfg.attention_impl in ("flash", "cudnn") and fused:  # fused GPU kernels (flash_attention.py)
            seed = dropout_seed(self.make_rng("dropout")) if dropout else None
            out = fused_attention(cfg.attention_impl, q, k, v, key_mask, seed, cfg.attention_dropout * dropout,
                                  (BATCH, TP_LENGTH, HEADS, HEAD_DIM))
            out = nn.with_logical_constraint(out, (BATCH, TP_LENGTH, HEADS, HEAD_DIM)).reshape(b, t, d)
            return _projection(out, d, (HEADS, EMBED), cfg, "out_proj", column_parallel=False)
        if cfg.attention_impl == "manual" and fused:
            keep, keep_scale = None, 1.0
            if dropout:
                keep, keep_scale = keep_mask_16bit((b, h, t, t), cfg.attention_dropout, self.make_rng("dropout"))
            heads_major = lambda y: y.transpose(0, 2, 1, 3)  # noqa: E731  [b, t, h, hd] <-> [b, h, t, hd]
            out = heads_major(causal_attention(heads_major(q), heads_major(k), heads_major(v), key_mask, keep,
                                               keep_scale, cfg.attention_query_block))
            out = nn.with_logical_constraint(out, (BATCH, TP_LENGTH, HEADS, HEAD_DIM)).reshape(b, t, d)
            return _projection(out, d, (HEADS, EMBED), cfg, "out_proj", column_parallel=False)

        # Like fairseq in mixed precision: scores in the compute dtype, the softmax in fp32, probs cast back.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        allowed = causal_allowed_at(key_mask, index + jnp.arange(t) if query_index is None else query_index)
        # A finite minimum (not -inf) keeps fully masked rows (pad queries) finite.
        scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        if dropout:
            probs = dropout_16bit(probs, cfg.attention_dropout, self.make_rng("dropout"))
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        out = nn.with_logical_constraint(out, (BATCH, TP_LENGTH, HEADS, HEAD_DIM)).reshape(b, n, d)
        return _projection(out, d, (HEADS, EMBED), cfg, "out_proj", column_parallel=False)

    def _cached(self, name: str, y, index):
        """Write y [batch, t, heads, head_dim] into the cache at column `index`; return the whole cache."""
        axes = (BATCH, TP_LENGTH, HEADS, HEAD_DIM)
        var = _cache_variable(self, name, y.shape, y.dtype, axes)
        var.value = nn.with_logical_constraint(
            jax.lax.dynamic_update_slice(var.value, y.astype(var.value.dtype), (0, index, 0, 0)), axes)
        return var.value


class DecodeState(nn.Module):
    """Decoding bookkeeping in the `cache` collection: the next cache column, each row's count of real tokens
    (its positions continue from there) and which cache columns hold real tokens."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens):
        """-> (positions, key mask over the cache, column where these tokens' keys go)."""
        real = tokens != self.cfg.pad_idx
        index = _cache_variable(self, "index", (), jnp.int32, ())
        seen = _cache_variable(self, "seen", tokens.shape[:1], jnp.int32, (BATCH,))
        mask = _cache_variable(self, "key_mask", tokens.shape, jnp.bool_, (BATCH, TP_LENGTH))
        at = index.value
        positions = fairseq_positions(tokens, self.cfg.pad_idx, seen.value)
        mask.value = jax.lax.dynamic_update_slice(mask.value, real, (0, at))
        seen.value = seen.value + real.sum(axis=1, dtype=jnp.int32)
        index.value = at + tokens.shape[1]
        return positions, mask.value, at


class DecoderLayer(nn.Module):
    """One pre-LayerNorm transformer block. Called as a scan body: (carry, broadcast) -> (carry, None)."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, index=0, query_index=None):
        """query_index [batch, n]: the layer's output only at these positions (scoring's last layer)."""
        cfg = self.cfg
        cdt = jax_dtype(cfg.compute_dtype)
        residual = (BATCH, RESIDUAL_LENGTH, ACTIVATION_EMBED)
        x = nn.with_logical_constraint(x, residual)

        h = _layer_norm(cfg, "self_attn_layer_norm")(x).astype(cdt)
        h = SelfAttention(cfg, self.decode, name="self_attn")(h, key_mask, deterministic, index, query_index)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[..., None], axis=1)
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        x = nn.with_logical_constraint(x + h.astype(x.dtype), residual)

        h = _layer_norm(cfg, "final_layer_norm")(x).astype(cdt)
        h = _projection(h, cfg.ffn_dim, (EMBED, MLP), cfg, "fc1", column_parallel=True)
        h = nn.with_logical_constraint(h, (BATCH, TP_LENGTH, MLP))
        h = gelu_erf(h.astype(jnp.float32)).astype(cdt)  # exact erf GELU in fp32
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
        h = _projection(h, cfg.d_model, (MLP, EMBED), cfg, "fc2", column_parallel=False)
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        x = nn.with_logical_constraint(x + h.astype(x.dtype), residual)
        return x, None


class TransformerLM(nn.Module):
    """Decoder-only LM. `__call__(tokens) -> logits [batch, length, vocab]` in the compute dtype.

    decode=True (m11b_jax.generation): the same layers with a key/value cache; each call continues the
    sequences of the previous ones (a left-padded prompt first, then one token per row per call)."""

    cfg: ModelConfig
    decode: bool = False

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = self.param(
            "embed_tokens",
            nn.with_logical_partitioning(embedding_init(cfg.pad_idx), (VOCAB, EMBED)),
            (cfg.vocab_size, cfg.d_model),
            jax_dtype(cfg.param_dtype),
        )
        layer = DecoderLayer
        if cfg.remat_policy != "none":
            layer = nn.remat(layer, policy=_REMAT_SAVEABLE[cfg.remat_policy], prevent_cse=False,
                             static_argnums=(3,))
        # Always a scan, so the parameter tree is the same stacked [layers, ...] tree; `scan_layers=False`
        # unrolls the loop in the compiled program (faster for tiny CPU models, slower to compile).
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "cache": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )(cfg, self.decode, name="layers")
        if self.decode:
            self.decode_state = DecodeState(cfg)
        self.layer_norm = _layer_norm(cfg, "layer_norm")
        self.dropout = nn.Dropout(cfg.dropout)

    def _embedding(self) -> jax.Array:
        # The table as the lookup and the output projection use it: whole along d_model (gathered first when the
        # table splits the weight's `embed` axis, as FSDP does), split over the vocabulary.
        return nn.with_logical_constraint(self.embed_tokens, (VOCAB, ACTIVATION_EMBED))

    def hidden_states(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """Final-LayerNorm output [batch, length, d] (fp32)."""
        x, key_mask, index = self.embed(tokens, deterministic)
        x, _ = self.layers(x, key_mask, deterministic, index)
        return self.layer_norm(x)

    def embed(self, tokens: jax.Array, deterministic: bool = True):
        """(the first layer's input [batch, length, d], the key mask, the cache column these tokens go to)."""
        cfg = self.cfg
        cdt = jax_dtype(cfg.compute_dtype)
        tokens = nn.with_logical_constraint(tokens, (BATCH, TP_LENGTH))
        if self.decode:
            positions, key_mask, index = self.decode_state(tokens)
        else:
            positions, key_mask, index = fairseq_positions(tokens, cfg.pad_idx), tokens != cfg.pad_idx, 0
        emb = jnp.take(self._embedding(), tokens, axis=0).astype(jnp.float32)
        pos = sinusoidal_embedding(positions, cfg.d_model, cfg.pad_idx)
        x = nn.with_logical_constraint(math.sqrt(cfg.d_model) * emb + pos, (BATCH, RESIDUAL_LENGTH, ACTIVATION_EMBED))
        x = self.dropout(x, deterministic=deterministic)
        # The residual stream is carried in fp32 when params are fp32 (bf16 only inside matmuls).
        x = nn.with_logical_constraint(x.astype(jnp.promote_types(cdt, jax_dtype(cfg.param_dtype))),
                                       (BATCH, RESIDUAL_LENGTH, ACTIVATION_EMBED))
        return x, key_mask, index

    def logits(self, hidden: jax.Array, dtype=None) -> jax.Array:
        """Tied output projection: hidden @ E^T, vocab-parallel (each model shard makes its vocab slice). dtype:
        the logits' (default: the compute dtype; scoring asks for float32 accumulation)."""
        hidden, embed = self._output_operands(hidden)
        b, t, d = hidden.shape
        # One 2-D matmul: its weight gradient is a plain 2-D product too.
        out = jnp.einsum("nd,vd->nv", hidden.reshape(b * t, d), embed, preferred_element_type=dtype)
        return nn.with_logical_constraint(out.reshape(b, t, -1), (BATCH, TP_LENGTH, VOCAB))

    def _output_operands(self, hidden: jax.Array):
        """(hidden [batch, length, d], tied embedding [V, d]) in the compute dtype: what the output projection
        multiplies."""
        cdt = jax_dtype(self.cfg.compute_dtype)
        hidden = nn.with_logical_constraint(hidden.astype(cdt), (BATCH, TP_LENGTH, ACTIVATION_EMBED))
        return hidden, self._embedding().astype(cdt)

    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.logits(self.hidden_states(tokens, deterministic))

    def output_operands(self, tokens: jax.Array, deterministic: bool = True):
        """The output projection's operands instead of its product, for a loss that fuses the projection
        (`loss.output_cross_entropy`, composed in the train step under config `loss_impl="fused"`)."""
        return self._output_operands(self.hidden_states(tokens, deterministic))


def init_variables(cfg: ModelConfig, key: jax.Array):
    """The model's variables, each parameter boxed with its logical axis names (`nn.Partitioned`). Under
    `jax.eval_shape` this is the abstract tree: shapes, dtypes and names, no memory."""
    return TransformerLM(cfg).init(key, jnp.zeros((1, 8), jnp.int32))


def abstract_variables(cfg: ModelConfig):
    """`init_variables` as ShapeDtypeStructs (still boxed with their logical names): nothing is allocated."""
    return jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
