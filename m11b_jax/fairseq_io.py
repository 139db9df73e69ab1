"""Reading and writing fairseq `.pt` checkpoint shards, safely, and the model config their `args` describe.

Safety: a `.pt` file is a pickle, and unpickling runs whatever callables the file names. We only ever call
`torch.load(weights_only=True)`, whose unpickler accepts tensors, storages and plain containers, plus exactly
the globals in `SAFE_GLOBALS` (`argparse.Namespace`, which fairseq stores as `args`). A file that names any
other global (`os.system`, a class with a `__reduce__`, ...) is refused while unpickling, before any of its
code runs, and reported as a UserError naming the global.

Formats: PyTorch's legacy (non-zip) serialization, as the 2020 release was written, is read into memory;
the zip format is memory-mapped (`mmap=True`), so only the pages of the tensor being copied are touched.
Tensors may be fp16, bf16 or fp32 (`tensor_to_numpy` keeps the dtype; bf16 via ml_dtypes).

Architecture: fairseq's `transformer_lm` family (pre-LN decoder, sinusoidal positions, tied embedding,
exact GELU, final LayerNorm). The stored args are completed with the defaults of fairseq's
`base_lm_architecture` / `transformer_lm_megatron*` (the names fairseq itself would fill in) and anything
this port cannot compute is refused with the option that makes it different.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from m11b_jax.config import CONFIG_DIR, ModelConfig, load_config
from m11b_jax.errors import UserError

SAFE_GLOBALS = (argparse.Namespace,)

# Defaults of fairseq's base_lm_architecture for the options that decide the computation.
LM_DEFAULTS: dict[str, Any] = {
    "activation_fn": "relu", "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "relu_dropout": 0.0, "decoder_embed_dim": 512, "decoder_ffn_embed_dim": 2048, "decoder_layers": 6,
    "decoder_attention_heads": 8, "no_decoder_final_norm": False,
    "adaptive_softmax_cutoff": None, "no_token_positional_embeddings": False,
    "share_decoder_input_output_embed": False, "character_embeddings": False, "adaptive_input": False,
    "decoder_learned_pos": False, "decoder_layers_to_keep": None, "layernorm_embedding": False,
    "no_scale_embedding": False, "tie_adaptive_weights": False, "model_parallel_size": 1,
}
# transformer_lm_megatron / transformer_lm_megatron_11b (fairseq/model_parallel/models/transformer_lm.py).
MEGATRON_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformer_lm_megatron": {"decoder_embed_dim": 3072, "decoder_ffn_embed_dim": 3072 * 4, "decoder_layers": 72,
                                "decoder_attention_heads": 32, "dropout": 0.1, "attention_dropout": 0.1,
                                "activation_fn": "gelu"},
    "transformer_lm_megatron_11b": {"decoder_embed_dim": 3072, "decoder_ffn_embed_dim": 3072 * 6,
                                    "decoder_layers": 72, "decoder_attention_heads": 32, "dropout": 0.1,
                                    "attention_dropout": 0.1, "activation_fn": "gelu"},
}
DEFAULT_MAX_TARGET_POSITIONS = 1024
# Options that change what the network computes, each with the (required) value this port implements.
# (`decoder_normalize_before` is not among them: fairseq's base_lm_architecture forces pre-LN for every
# transformer_lm whatever the stored value, and so do we.)
_REQUIRED = (
    ("no_decoder_final_norm", False, "no final LayerNorm (--no-decoder-final-norm)"),
    ("decoder_learned_pos", False, "learned positions (--decoder-learned-pos)"),
    ("no_token_positional_embeddings", False, "no positional embeddings (--no-token-positional-embeddings)"),
    ("share_decoder_input_output_embed", True, "an untied output embedding (no --share-decoder-input-output-embed)"),
    ("no_scale_embedding", False, "unscaled embeddings (--no-scale-embedding)"),
    ("layernorm_embedding", False, "a LayerNorm on the embedding (--layernorm-embedding)"),
    ("adaptive_input", False, "adaptive input (--adaptive-input)"),
    ("adaptive_softmax_cutoff", None, "an adaptive softmax (--adaptive-softmax-cutoff)"),
    ("character_embeddings", False, "character embeddings (--character-embeddings)"),
    ("decoder_layers_to_keep", None, "pruned layers (--decoder-layers-to-keep)"),
)


# ---- loading shards ------------------------------------------------------------------------------


def import_torch():
    """torch, or a one-line error naming the extra that installs it (the converter is its only user)."""
    try:
        import torch
    except ImportError:
        raise UserError("reading or writing fairseq .pt files needs PyTorch, which is not installed: "
                        "pip install -e '.[convert]' (a CPU build of torch 2.13)") from None
    return torch


def load_shard(path: str | os.PathLike) -> dict:
    """One fairseq checkpoint file as a dict (`args`/`cfg`, `model`, ...), loaded with weights_only=True."""
    torch = import_torch()
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise UserError(_load_error(path, e)) from None
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise UserError(f"{path} is not a fairseq checkpoint: expected a dict with a 'model' state dict")
    return state


def _load_error(path: pathlib.Path, e: Exception) -> str:
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return (f"refused {path}: it asks to load the Python global {m.group(1)}, which a fairseq checkpoint never "
                "needs (only tensors and argparse.Namespace); not loading it, as unpickling could run its code")
    if tarfile.is_tarfile(path):
        return (f"refused {path}: it is in PyTorch's oldest (.tar) serialization, which cannot be loaded without "
                "unpickling arbitrary objects; not loading it, as unpickling could run code. Convert it with the "
                "PyTorch version that wrote it into the zip format (torch.save) if you trust its source")
    if "Unsupported operand" in text:
        return (f"refused {path}: its pickle uses constructs a plain weights file does not need; "
                "not loading it, as unpickling could run code")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        detail = "a zip archive cut short: no central directory"
    else:
        detail = f"{type(e).__name__}: {_first_line(text)}" if _first_line(text) else type(e).__name__
    return f"{path} is truncated or corrupt ({detail}): download it again"


def _first_line(text: str) -> str:
    """The first line of torch's message, cut before any advice to load with weights_only=False (never safe
    for a file of unknown origin, so never repeated here)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and "weights_only" not in ln]
    line = lines[0] if lines else ""
    return re.split(r"(?i)\s*(?:re-running|weights.only|in pytorch 2\.6)", line)[0].rstrip(" .:")


def tensor_to_numpy(t) -> np.ndarray:
    """A CPU tensor as numpy in its own dtype (bf16 -> ml_dtypes.bfloat16); only float dtypes are weights."""
    torch = import_torch()

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in (torch.float16, torch.float32, torch.float64):
        raise UserError(f"tensor of dtype {t.dtype} is not a floating-point weight")
    return t.numpy()


def numpy_to_tensor(a: np.ndarray):
    """Inverse of tensor_to_numpy (bfloat16 arrays become torch.bfloat16)."""
    torch = import_torch()

    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def save_shard(obj: dict, path: str | os.PathLike, legacy_format: bool = False) -> None:
    """torch.save (zip format, or the legacy format of PyTorch < 1.6 that the release used)."""
    torch = import_torch()

    torch.save(obj, path, _use_new_zipfile_serialization=not legacy_format)


# ---- locating shards --------------------------------------------------------------------------------

_PART = re.compile(r"^(?P<stem>.+)-model_part-(?P<rank>\d+)\.pt$")


def find_shards(src: str | os.PathLike) -> tuple[pathlib.Path, dict[int, pathlib.Path]]:
    """(directory, {rank: file}) for SRC: a directory, or fairseq's `--path DIR/NAME.pt` meaning
    `DIR/NAME-model_part-{rank}.pt` (or the single file `DIR/NAME.pt` of a non-sharded model).

    Refuses two files of the same rank (`-model_part-1` and `-model_part-01`) and ranks with gaps.
    """
    src = pathlib.Path(src)
    if src.is_dir():
        directory, stem = src, None
    elif src.suffix == ".pt":
        directory, stem = src.parent, src.stem
        if not directory.is_dir():
            raise UserError(f"checkpoint directory not found: {directory}")
    else:
        raise UserError(f"checkpoint not found: {src} (give the unpacked directory or DIR/model.pt)")
    parts: dict[str, dict[int, list[pathlib.Path]]] = {}
    for f in sorted(directory.iterdir()):
        m = _PART.match(f.name)
        if m and f.is_file():
            parts.setdefault(m["stem"], {}).setdefault(int(m["rank"]), []).append(f)
    if stem is None:
        if len(parts) > 1:
            names = ", ".join(f"{s}.pt" for s in sorted(parts))
            raise UserError(f"{directory} holds shards of several checkpoints ({names}): pass DIR/<one of them>")
        stem = next(iter(parts), "model")
    ranks = parts.get(stem, {})
    if not ranks:
        single = directory / f"{stem}.pt"
        if single.is_file():
            return directory, {0: single}
        raise UserError(f"no checkpoint in {directory}: expected {stem}-model_part-0.pt ... or {stem}.pt")
    for rank, files in ranks.items():
        if len(files) > 1:
            raise UserError(f"rank {rank} appears twice: {', '.join(f.name for f in files)}: remove the duplicate")
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise UserError(f"missing shard(s) {', '.join(f'{stem}-model_part-{r}.pt' for r in missing)} in {directory}")
    return directory, {r: fs[0] for r, fs in sorted(ranks.items())}


# ---- the architecture ----------------------------------------------------------------------------------


def checkpoint_options(state: Mapping) -> dict[str, Any]:
    """The model/task options stored in a checkpoint: `args` (Namespace) or `cfg` (dict with model/task/common)."""
    args = state.get("args")
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    cfg = state.get("cfg")
    if isinstance(cfg, Mapping) and cfg.get("model") is not None:
        opts: dict[str, Any] = {}
        for section in ("common", "task", "model"):  # model options win over task/common ones
            value = cfg.get(section)
            if isinstance(value, argparse.Namespace):
                value = vars(value)
            if isinstance(value, Mapping):
                opts.update(value)
        if "arch" not in opts and "_name" in opts:
            opts["arch"] = opts["_name"]
        return opts
    raise UserError("the checkpoint stores neither 'args' (argparse.Namespace) nor 'cfg' with a 'model' section: "
                    "cannot tell its architecture")


def model_config_from_options(opts: Mapping[str, Any], vocab_size: int) -> tuple[ModelConfig, int]:
    """(ModelConfig, model_parallel_size) from fairseq options; UserError for an architecture we cannot compute."""
    arch = opts.get("arch")
    if not isinstance(arch, str) or not arch.startswith("transformer_lm"):
        raise UserError(f"architecture {arch!r} is not a fairseq transformer_lm: only decoder-only transformer "
                        "language models (e.g. transformer_lm_megatron_11b) can be converted")
    o = {**LM_DEFAULTS, **MEGATRON_DEFAULTS.get(arch, {}), **{k: v for k, v in opts.items()}}
    if "no_tie_adaptive_proj" in opts:  # fairseq: such (pre-2019) checkpoints have no final LayerNorm
        o["no_decoder_final_norm"] = True
    if "decoder_final_norm" in opts:
        o["no_decoder_final_norm"] = not opts["decoder_final_norm"]
    for name, required, what in _REQUIRED:
        if o.get(name) != required and not (required is None and not o.get(name)):
            raise UserError(f"{arch} checkpoint uses {what} ({name}={o.get(name)!r}): "
                            "this port implements only the Megatron-11b transformer_lm variant")
    if o["activation_fn"] != "gelu":
        raise UserError(f"{arch} checkpoint uses activation_fn={o['activation_fn']!r}: only 'gelu' (exact erf) "
                        "is implemented")
    d = o["decoder_embed_dim"]
    for dim in ("decoder_input_dim", "decoder_output_dim"):
        if o.get(dim) not in (None, d):
            raise UserError(f"{arch} checkpoint has {dim}={o[dim]} != decoder_embed_dim={d}: "
                            "projected inputs/outputs are not implemented")
    max_positions = o.get("max_target_positions") or o.get("tokens_per_sample") or DEFAULT_MAX_TARGET_POSITIONS
    base = load_config(arch) if (CONFIG_DIR / f"{arch}.json").is_file() else ModelConfig()
    try:
        cfg = base.replace(
            name=arch, vocab_size=int(vocab_size), d_model=int(o["decoder_embed_dim"]),
            ffn_dim=int(o["decoder_ffn_embed_dim"]), num_layers=int(o["decoder_layers"]),
            num_heads=int(o["decoder_attention_heads"]), max_positions=int(max_positions),
            dropout=float(o["dropout"]), attention_dropout=float(o["attention_dropout"]),
            activation_dropout=float(o.get("activation_dropout") or o.get("relu_dropout") or 0.0),
        )
        mp = int(o.get("model_parallel_size") or 1)
    except (TypeError, ValueError) as e:
        raise UserError(f"{arch} checkpoint has an unreadable model option ({e}): is its args/cfg intact?") from None
    return cfg.validate(mp), mp


def dictionary_multiple(arch: str, model_parallel_size: int) -> int:
    """fairseq's model-parallel transformer_lm pads the dictionary to a multiple of 8 x model_parallel_size
    (`pad_to_multiple_` in build_model); the plain transformer_lm uses it as it is."""
    return 8 * model_parallel_size if arch.startswith("transformer_lm_megatron") else 1


def padded_size(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple
