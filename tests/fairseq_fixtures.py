"""Synthetic fairseq Megatron-11b release-layout checkpoints, written with torch, for the converter tests.

Written from ../shared/REFERENCE.md's shard table directly (not from m11b_jax.fairseq_layout), so the
converter's merge is checked against an independent split.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re

import numpy as np
import torch

# (regex on the key, dim the ranks split; None = replicated), per REFERENCE.md.
SPLIT_RULES = (
    (r"decoder\.embed_tokens\.weight", 0),
    (r"decoder\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)", 0),
    (r"decoder\.layers\.\d+\.self_attn\.out_proj\.weight", 1),
    (r"decoder\.layers\.\d+\.self_attn\.out_proj\.bias", None),
    (r"decoder\.layers\.\d+\.fc1\.(weight|bias)", 0),
    (r"decoder\.layers\.\d+\.fc2\.weight", 1),
    (r"decoder\.layers\.\d+\.fc2\.bias", None),
    (r"decoder\.layers\.\d+\.(self_attn_layer_norm|final_layer_norm)\.(weight|bias)", None),
    (r"decoder\.layer_norm\.(weight|bias)", None),
)


def split_dim(key: str):
    for pattern, dim in SPLIT_RULES:
        if re.fullmatch(pattern, key):
            return dim
    raise KeyError(key)


def merged_state(vocab: int, d: int, ffn: int, layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random merged fp32 weights with fairseq names and [out, in] layouts."""
    rng = np.random.default_rng(seed)
    w = lambda *shape, s=0.08: (rng.standard_normal(shape) * s).astype(np.float32)  # noqa: E731
    state = {"decoder.embed_tokens.weight": w(vocab, d, s=d ** -0.5)}
    state["decoder.embed_tokens.weight"][1] = 0.0  # pad row, as fairseq initializes it
    for i in range(layers):
        p = f"decoder.layers.{i}."
        for proj in "kvq":
            state[p + f"self_attn.{proj}_proj.weight"] = w(d, d)
            state[p + f"self_attn.{proj}_proj.bias"] = w(d, s=0.02)
        state[p + "self_attn.out_proj.weight"] = w(d, d)
        state[p + "self_attn.out_proj.bias"] = w(d, s=0.02)
        state[p + "self_attn_layer_norm.weight"] = 1 + w(d, s=0.1)
        state[p + "self_attn_layer_norm.bias"] = w(d, s=0.05)
        state[p + "fc1.weight"] = w(ffn, d)
        state[p + "fc1.bias"] = w(ffn, s=0.02)
        state[p + "fc2.weight"] = w(d, ffn)
        state[p + "fc2.bias"] = w(d, s=0.02)
        state[p + "final_layer_norm.weight"] = 1 + w(d, s=0.1)
        state[p + "final_layer_norm.bias"] = w(d, s=0.05)
    state["decoder.layer_norm.weight"] = 1 + w(d, s=0.1)
    state["decoder.layer_norm.bias"] = w(d, s=0.05)
    return state


def fairseq_args(d: int, ffn: int, layers: int, heads: int, mp: int, arch="transformer_lm_megatron", **extra):
    """An args Namespace as fairseq's train.py stores it (fairseq option names)."""
    return argparse.Namespace(
        arch=arch, task="language_modeling", criterion="vocab_parallel_cross_entropy", optimizer="adam",
        adam_betas="(0.9, 0.98)", adam_eps=1e-08, lr=[0.00015], lr_scheduler="inverse_sqrt", warmup_updates=3000,
        weight_decay=0.01, clip_norm=0.0, fp16=True, model_parallel_size=mp, distributed_world_size=mp,
        tokens_per_sample=64, max_target_positions=64, sample_break_mode="none", max_tokens=1024, update_freq=[1],
        seed=1, decoder_embed_dim=d, decoder_input_dim=d, decoder_output_dim=d, decoder_ffn_embed_dim=ffn,
        decoder_layers=layers, decoder_attention_heads=heads, decoder_normalize_before=True,
        no_decoder_final_norm=False, decoder_learned_pos=False, share_decoder_input_output_embed=True,
        activation_fn="gelu", dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, relu_dropout=0.0,
        adaptive_softmax_cutoff=None, adaptive_input=False, character_embeddings=False,
        no_token_positional_embeddings=False, decoder_layerdrop=0.0, decoder_layers_to_keep=None,
        layernorm_embedding=False, no_scale_embedding=False, add_bos_token=False, data="data-bin/wikitext103",
        **extra,
    )


def shard_states(merged: dict[str, np.ndarray], mp: int, dtype=torch.float16) -> list[collections.OrderedDict]:
    """Each rank's `model` state dict: rank r holds block r of every split tensor, a copy of the rest."""
    shards = []
    for r in range(mp):
        sd = collections.OrderedDict()
        sd["decoder.version"] = torch.tensor([3.0], dtype=dtype)
        for key, value in merged.items():
            dim = split_dim(key)
            if dim is not None:
                n = value.shape[dim] // mp
                value = np.take(value, np.arange(r * n, (r + 1) * n), axis=dim)
            sd[key] = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
            if key == "decoder.embed_tokens.weight":
                sd["decoder.embed_positions._float_tensor"] = torch.zeros(1, dtype=dtype)
        sd._metadata = collections.OrderedDict({"": {"version": 1}, "decoder": {"version": 1}})  # as nn.Module saves
        shards.append(sd)
    return shards


def write_dict(path: pathlib.Path, n_lines: int) -> None:
    """A dict.txt of `n_lines` symbols with decreasing counts (sorted like fairseq-preprocess writes it)."""
    path.write_text("".join(f"{1000 + i} {10 * (n_lines - i) + 1}\n" for i in range(n_lines)))


def write_release(directory: pathlib.Path, merged, *, d, ffn, layers, heads, mp=8, dtype=torch.float16,
                  legacy=True, dict_lines=None, args=None, model_states=None, stem="model") -> pathlib.Path:
    """Write dict.txt and `{stem}-model_part-{r}.pt` (or `{stem}.pt` when mp == 1) like the release."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = merged["decoder.embed_tokens.weight"].shape[0]
    write_dict(directory / "dict.txt", vocab - 4 if dict_lines is None else dict_lines)
    args = fairseq_args(d, ffn, layers, heads, mp) if args is None else args
    states = shard_states(merged, mp, dtype) if model_states is None else model_states
    for r, sd in enumerate(states):
        obj = {
            "args": args,
            "model": sd,
            "optimizer_history": [{"criterion_name": "VocabParallelCrossEntropyCriterion",
                                   "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 3.02},
                                   "num_updates": 100}],
            "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 100, "shuffle": True},
                            "val_loss": 3.02, "previous_training_time": 1.5},
        }
        name = f"{stem}-model_part-{r}.pt" if mp > 1 else f"{stem}.pt"
        torch.save(obj, directory / name, _use_new_zipfile_serialization=not legacy)
    return directory
