"""eval_lm's compiled scoring step: `scoring.score_in_passes` jitted with the sharding table's placements, and
its per-platform defaults. Used by `eval_lm.evaluate` and by `aot.compile_eval_report` (the same program).
"""

from __future__ import annotations

import jax

from m11b_jax import sharding
from m11b_jax.param_tree import param_shardings
from m11b_jax.scoring import score_in_passes


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


def make_score_step(cfg, mesh, rules, attention_chunk: int, passes: int = 1):
    """jit of scoring.score_in_passes: (params, tokens [n, T], first [n], targets [n, block]) -> log-probs
    [n, block], with the params' and the batch's shardings on `mesh`."""
    rows = sharding.batch_sharding(mesh, 2, rules=rules)

    def step(params, tokens, first, targets):
        return score_in_passes(params, tokens, first, targets, cfg, passes=passes, attention_chunk=attention_chunk)

    return jax.jit(step, in_shardings=(param_shardings(cfg, mesh, rules), rows,
                                       sharding.batch_sharding(mesh, 1, rules=rules), rows), out_shardings=rows)
