"""eval_lm's compiled scoring step, on the model's own modules (model.py), and its per-platform defaults. Used by
`eval_lm.evaluate`, by `aot.compile_eval_report` (the same program) and by the tests.

`score_positions(params, tokens, first, targets, cfg)` gives, for each row and each of the n = targets.shape[1]
positions first[row] + j, the natural-log probability of targets[row, j]: the number
`log_softmax(TransformerLM(cfg)(tokens))[row, first + j, target]` gives, without the work nothing reads. Three
options of the one model do that (no second forward exists):

* attention in causal query chunks: config attention_impl="manual" with attention_query_block = the chunk
  (m11b_jax.attention: chunk [c0, c1) reads keys [0, c1) only, the masked rest is never computed);
* the last layer runs its queries, attention, out_proj and feed-forward block only at the n scored positions
  (`DecoderLayer(..., query_index=...)`; its keys and values still come from every position). Every layer
  before it runs in full: later layers read every earlier position;
* the final LayerNorm and the output projection (`TransformerLM.logits`, fp32 accumulation) see only those n
  positions; log-softmax and the target pick run in fp32 over the vocabulary-parallel logits (a sharded
  reduction: the [batch, n, vocab] logits are never gathered).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m11b_jax import sharding
from m11b_jax.model import DecoderLayer, TransformerLM
from m11b_jax.param_tree import param_shardings


def default_attention_chunk(platform: str) -> int:
    """Query chunk of the causal attention: small on CPU (cache-sized blocks), large on accelerators."""
    return 64 if platform == "cpu" else 256


def default_passes(platform: str, batch_size: int) -> int:
    """Sequential passes per batch: one window at a time on CPU (small temporaries), one pass elsewhere."""
    return batch_size if platform == "cpu" else 1


def matmul_precision(cfg):
    """fp32 evaluation means fp32 matmuls: 'highest' precision, so GPUs do not round inputs to TF32 (which
    moved per-token log-probs by ~2e-3 on an H200); bfloat16 keeps the default."""
    return jax.default_matmul_precision("highest" if cfg.compute_dtype == "float32" else None)


def score_positions(params, tokens, first, targets, cfg, *, attention_chunk: int = 64, last_layer_only: bool = True):
    """log p(targets[r, j] | tokens[r, :first[r] + j + 1]) as fp32 [b, n]; 0 where the target is pad.

    tokens [b, T] int (right padding with cfg.pad_idx is masked; positions restart at 2 in every row), first [b]
    int: each row's first scored position, targets [b, n] int. Positions first + j past a row's end (T) are
    clamped and must carry a pad target. attention_chunk: queries per causal chunk (>= T: one chunk);
    last_layer_only=False runs the last layer at every position too (the same numbers; for the tests).
    """
    if attention_chunk < 1:
        raise ValueError(f"attention_chunk must be >= 1, got {attention_chunk}")
    cfg = cfg.replace(attention_impl="manual", attention_query_block=attention_chunk)
    t, n = tokens.shape[1], targets.shape[1]
    model, layer = TransformerLM(cfg), DecoderLayer(cfg)
    x, key_mask, _ = model.apply({"params": params}, tokens, method=TransformerLM.embed)

    def run(i, x, query_index=None):  # layer i of the stacked tree (a dynamic slice: no copy of the stack)
        p = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False), params["layers"])
        return layer.apply({"params": p}, x, key_mask, True, 0, query_index)[0]

    last = cfg.num_layers - 1
    if cfg.scan_layers:  # one compiled layer body (the 72-layer release)
        x = jax.lax.fori_loop(0, last, run, x)
    else:
        for i in range(last):
            x = run(i, x)
    index = jnp.minimum(first[:, None] + jnp.arange(n)[None, :], t - 1)
    if last_layer_only:
        x = run(last, x, index)
    else:
        x = jnp.take_along_axis(run(last, x), index[..., None], axis=1)
    logits = model.apply({"params": params}, x, method=lambda m, x: m.logits(m.layer_norm(x), jnp.float32))
    top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    log_total = jnp.log(jnp.exp(logits - top).sum(-1)) + top[..., 0]
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    picked = jnp.where(vocab_ids == targets[..., None], logits, 0.0).sum(-1)
    return jnp.where(targets != cfg.pad_idx, picked - log_total, 0.0)


def score_in_passes(params, tokens, first, targets, cfg, *, passes: int = 1, attention_chunk: int = 64):
    """score_positions over the batch in `passes` sequential passes (a lax.map), same results.

    Fewer rows per pass means smaller temporary buffers: on a CPU this keeps the working set in cache and the
    per-call allocation small (XLA allocates its temporaries on every call, and fresh pages cost a fault each),
    which is faster than one pass over a large batch. Pass i takes rows i, i + passes, ..., so when the batch
    axis is split over `data` in contiguous blocks, every device keeps its own rows.
    """
    b = tokens.shape[0]
    if passes <= 1:
        return score_positions(params, tokens, first, targets, cfg, attention_chunk=attention_chunk)
    if b % passes:
        raise ValueError(f"batch {b} is not divisible into {passes} passes")

    def split(a):  # [b, ...] -> [passes, b / passes, ...]: pass i holds rows i, i + passes, ...
        return jnp.swapaxes(a.reshape(b // passes, passes, *a.shape[1:]), 0, 1)

    out = jax.lax.map(lambda xs: score_positions(params, *xs, cfg, attention_chunk=attention_chunk),
                      (split(tokens), split(first), split(targets)))
    return jnp.swapaxes(out, 0, 1).reshape(b, targets.shape[1])


def make_score_step(cfg, mesh, rules, attention_chunk: int, passes: int = 1):
    """jit of score_in_passes: (params, tokens [n, T], first [n], targets [n, block]) -> log-probs [n, block],
    with the params' and the batch's shardings on `mesh`."""
    rows = sharding.batch_sharding(mesh, 2, rules=rules)

    def step(params, tokens, first, targets):
        return score_in_passes(params, tokens, first, targets, cfg, passes=passes, attention_chunk=attention_chunk)

    return jax.jit(step, in_shardings=(param_shardings(cfg, mesh, rules), rows,
                                       sharding.batch_sharding(mesh, 1, rules=rules), rows), out_shardings=rows)
