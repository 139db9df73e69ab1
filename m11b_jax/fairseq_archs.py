"""fairseq's `transformer_lm` architecture names and size flags, resolved to a `ModelConfig`.

The registry is fairseq's (`fairseq/models/transformer_lm.py` for the single-device archs,
`fairseq/model_parallel/models/transformer_lm.py` for the Megatron ones), with its sizes and dropouts; the
size flags (`--decoder-embed-dim`, `--decoder-ffn-embed-dim`, `--decoder-layers`, `--decoder-attention-heads`)
override any arch, as `getattr(args, ..., default)` does in fairseq. What fairseq decides that the arch name
does not (all confirmed in its source):
- the vocabulary is the dictionary's size (`len(dict.txt)` + 4 specials); the model-parallel archs pad it to
  a multiple of 8 x model-parallel size, as fairseq pads its dictionary;
- max positions = `--tokens-per-sample` (fairseq's `max_target_positions` default);
- pre-LayerNorm (`base_lm_architecture` forces `decoder_normalize_before`), sinusoidal positions, scaled
  embedding, a final LayerNorm;
- the initialization: `fairseq` for the single-device archs, `megatron` (the release's, model-parallel size > 1)
  or `megatron_mp1` (model-parallel size 1, where Megatron's layers draw with gain 1) for the model-parallel
  ones (m11b_jax/init_rules.py).
Policies (remat, layer scan, attention implementation) are not fairseq's to decide: the single-device archs
take `configs/tiny.json`'s (CPU-suited: remat none, the manual attention backward), the model-parallel ones
`configs/transformer_lm_megatron_11b.json`'s (remat full, autodiff attention); `--remat-policy` and
`--attention-impl` override them.

Not implemented, refused by name: `transformer_lm`'s ReLU (the model computes GELU; pass `--activation-fn gelu`
to train it with GELU) and untied output embeddings (fairseq's default without
`--share-decoder-input-output-embed`; the model always ties them).
"""

from __future__ import annotations

import dataclasses
import json

from m11b_jax.config import CONFIG_DIR, ModelConfig
from m11b_jax.errors import UserError

# name: (d_model, ffn_dim, layers, heads, dropout, attention_dropout, activation, model_parallel)
FAIRSEQ_ARCHS = {
    "transformer_lm": (512, 2048, 6, 8, 0.1, 0.0, "relu", False),
    "transformer_lm_gpt": (768, 3072, 12, 12, 0.1, 0.1, "gelu", False),
    "transformer_lm_gpt2_small": (1024, 4096, 24, 16, 0.1, 0.1, "gelu", False),
    "transformer_lm_gpt2_medium": (1280, 5120, 36, 20, 0.1, 0.1, "gelu", False),
    "transformer_lm_gpt2_big": (1600, 6400, 48, 25, 0.1, 0.1, "gelu", False),
    "transformer_lm_megatron": (3072, 3072 * 4, 72, 32, 0.1, 0.1, "gelu", True),
}
# transformer_lm_megatron_11b (ffn 6 x 3072) is configs/transformer_lm_megatron_11b.json: a configs/ name wins.
# The config fields the size flags set, by flag.
SIZE_FLAGS = {"decoder_embed_dim": "d_model", "decoder_ffn_embed_dim": "ffn_dim", "decoder_layers": "num_layers",
              "decoder_attention_heads": "num_heads"}
POLICY_FIELDS = ("remat_policy", "scan_layers", "attention_impl", "loss_impl", "weight_grad_impl")


def is_model_parallel_arch(arch: str) -> bool:
    return arch in FAIRSEQ_ARCHS and FAIRSEQ_ARCHS[arch][-1]


def padded_vocab(num_symbols: int, model_parallel: bool, model_parallel_size: int) -> int:
    """fairseq's model-parallel LM pads its dictionary to a multiple of 8 x model-parallel size."""
    if not model_parallel:
        return num_symbols
    m = 8 * model_parallel_size
    return -(-num_symbols // m) * m


def _policies(json_name: str) -> dict:
    d = json.loads((CONFIG_DIR / f"{json_name}.json").read_text())
    return {k: d[k] for k in POLICY_FIELDS if k in d}


def registry_config(arch: str, *, num_symbols: int | None, tokens_per_sample: int, model_parallel_size: int,
                    activation_fn: str | None) -> ModelConfig:
    """The ModelConfig of fairseq arch `arch` (sizes from the registry; flags applied by `apply_size_flags`)."""
    d, ffn, layers, heads, dropout, attn_dropout, activation, mp_arch = FAIRSEQ_ARCHS[arch]
    if (activation_fn or activation) != "gelu":
        raise UserError(f"--arch {arch} uses {activation_fn or activation} activations in fairseq; this model "
                        f"computes GELU only: pass --activation-fn gelu to train {arch}'s sizes with GELU")
    vocab = padded_vocab(num_symbols, mp_arch, model_parallel_size) if num_symbols else 51200
    if mp_arch:
        init = "megatron" if model_parallel_size > 1 else "megatron_mp1"
        policies = _policies("transformer_lm_megatron_11b")
    else:
        init, policies = "fairseq", _policies("tiny")
    return ModelConfig(name=arch, vocab_size=vocab, d_model=d, ffn_dim=ffn, num_layers=layers, num_heads=heads,
                       max_positions=tokens_per_sample, dropout=dropout, attention_dropout=attn_dropout, init=init,
                       **policies)


def apply_size_flags(cfg: ModelConfig, flags: dict) -> ModelConfig:
    """`--decoder-*` size flags (None = not given) over any config."""
    changes = {SIZE_FLAGS[k]: v for k, v in flags.items() if v is not None}
    for field, value in changes.items():
        if value < 1:
            flag = next(k for k, f in SIZE_FLAGS.items() if f == field)
            raise UserError(f"--{flag.replace('_', '-')} {value} must be >= 1")
    return dataclasses.replace(cfg, **changes) if changes else cfg
