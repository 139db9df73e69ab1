"""Hugging Face layout: our checkpoints as transformers' `XGLMForCausalLM` (+ a fast tokenizer), and back.

    python -m m11b_jax.convert --to-hf CKPT OUTDIR [--bpe-dir DIR] [--dtype ...] [--max-shard-size 5GB]
    python -m m11b_jax.convert --from-hf HFDIR OUT [--dtype ...]

XGLM computes fairseq's transformer_lm (../shared/REFERENCE.md, "Hugging Face layout"): each weight is named
`model.` + its fairseq name without `decoder.`, nn.Linear weights are [out, in], the output projection is tied
to the embedding and the sinusoidal positions are computed, not stored. `hf_key` and `xglm_config` are the one
mapping (the tests' transformers reference uses them too).

Streaming: the safetensors files are written here directly (an 8-byte header length, a JSON header of every
tensor's dtype, shape and byte range, then the raw little-endian bytes), so the header is computed from the
shapes first and each tensor is read from the checkpoint, laid out and appended, then dropped: host memory
holds about one tensor twice, never the model (the `safetensors` package's writer takes the whole dict).
Reading (`--from-hf`) uses the `safetensors` package (`safe_open`, memory-mapped, one tensor at a time).
Output goes to a temporary sibling of OUTDIR, renamed at the end; OUTDIR must not exist.

Tokenizer (`--bpe-dir DIR` with GPT-2's encoder.json + vocab.bpe): a byte-level BPE with GPT-2's merges whose
vocabulary gives every GPT-2 token its fairseq dictionary id (line k of dict.txt -> 4 + k; `<s>`=0, `<pad>`=1,
`</s>`=2, `<unk>`=3; `madeupword`s are vocabulary entries no merge produces). Its post-processor prepends `</s>`
(fairseq's LM inputs start with it, as XGLM's tokenizer does); `add_special_tokens=False` gives exactly our ids.
Special-token strings in the text are encoded as text (`split_special_tokens`), as our BPE does.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import struct
import sys
import time
from typing import Callable

import numpy as np

from m11b_jax.config import ModelConfig
from m11b_jax.dictionary import Dictionary
from m11b_jax.errors import UserError
from m11b_jax.fairseq_layout import ENTRIES, Entry, fairseq_key, get_path
from m11b_jax.params_io import META_FILE, ParamsWriter, numpy_dtype
from m11b_jax.params_source import open_params_source
from m11b_jax.textio import atomic_directory

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MADEUP = re.compile(r"madeupword\d+")
# XGLM keys that hold no weights of ours: the tied output projection and (older versions) the sinusoid table.
DERIVED_KEYS = ("lm_head.weight", "model.embed_positions.weights")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the mapping -------------------------------------------------------------------------------------------


def hf_key(fairseq_name: str) -> str:
    """fairseq weight name -> XGLM's (`decoder.layers.3.fc1.weight` -> `model.layers.3.fc1.weight`)."""
    return "model." + fairseq_name.removeprefix("decoder.")


def hf_tensors(num_layers: int) -> list[tuple[str, Entry, int | None]]:
    """Every XGLM weight in file order (embedding, layers, final LayerNorm): (name, layout entry, layer)."""
    top = [e for e in ENTRIES if not e.per_layer]
    per_layer = [e for e in ENTRIES if e.per_layer]
    names = [(hf_key(fairseq_key(e)), e, None) for e in top if e.fairseq.startswith("embed_tokens")]
    names += [(hf_key(fairseq_key(e, i)), e, i) for i in range(num_layers) for e in per_layer]
    names += [(hf_key(fairseq_key(e)), e, None) for e in top if not e.fairseq.startswith("embed_tokens")]
    return names


def hf_shape(entry: Entry, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = list(our_shape[1:] if entry.per_layer else our_shape)
    return tuple(reversed(shape)) if entry.transpose else tuple(shape)


def xglm_config(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """config.json of the XGLMForCausalLM that computes `cfg`'s model (plus our own config, for the way back)."""
    return {
        "architectures": ["XGLMForCausalLM"], "model_type": "xglm",
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
        "attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_positions,
        "activation_function": "gelu", "scale_embedding": True, "tie_word_embeddings": True,
        "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout, "layerdrop": 0.0, "init_std": 0.02, "use_cache": True,
        "pad_token_id": cfg.pad_idx, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
        "dtype": dtype, "m11b_jax_config": json.loads(cfg.to_json()),
    }


def state_dict_from_params(params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """In-memory (host) params -> XGLM's state dict of numpy arrays (for tests; the export streams instead)."""
    out = {}
    for name, entry, layer in hf_tensors(cfg.num_layers):
        a = np.asarray(get_path(params, entry.ours))
        a = a[layer] if entry.per_layer else a
        out[name] = np.ascontiguousarray(a.T if entry.transpose else a)
    return out


# ---- safetensors, streamed ---------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1000' -> 1000 bytes (transformers' convention)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(text).upper())
    if not m:
        raise UserError(f"--max-shard-size {text!r}: give a size like 5GB, 500MB or 2GiB")
    number, unit = float(m.group(1)), (m.group(2) or "B")
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    size = int(number * ((1024 if "I" in unit else 1000) ** power))
    if size < 1:
        raise UserError(f"--max-shard-size {text!r} must be at least one byte")
    return size


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list[int]]:
    """Indices of `tensors` per file, in order: a new file starts when the next tensor would pass `max_bytes`."""
    shards, current, size = [], [], 0
    for i, (_, shape) in enumerate(tensors):
        n = math.prod(shape) * itemsize
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    return shards + [current] if current else shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]], dtype: str) -> bytes:
    """The 8-byte length + JSON header (padded with spaces to 8 bytes) of a file holding `tensors` in order."""
    itemsize = numpy_dtype(dtype).itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(directory: pathlib.Path, tensors: list[tuple[str, tuple[int, ...]]],
                      produce: Callable[[int], np.ndarray], dtype: str, max_bytes: int, log=_log) -> list[str]:
    """Write `tensors` (name, shape) as safetensors file(s) in `directory`; `produce(i)` gives tensor i.

    One file (model.safetensors) when everything fits in `max_bytes`, else model-0000k-of-0000n.safetensors
    plus model.safetensors.index.json. Returns the file names.
    """
    out_dtype = numpy_dtype(dtype)
    shards = plan_shards(tensors, out_dtype.itemsize, max_bytes)
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for name, indices in zip(names, shards):
        members = [tensors[i] for i in indices]
        with open(directory / name, "wb") as f:
            f.write(safetensors_header(members, dtype))
            for i in indices:
                tname, shape = tensors[i]
                block = produce(i)
                if tuple(block.shape) != tuple(shape):
                    raise RuntimeError(f"{tname}: produced shape {block.shape}, planned {shape}")
                block = np.ascontiguousarray(block, dtype=out_dtype)  # little-endian on every platform we run on
                f.write(block.reshape(-1).view(np.uint8).data)
                total += block.nbytes
                weight_map[tname] = name
                del block
        log(f"  {name}: {len(indices)} tensors")
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


# ---- tokenizer -----------------------------------------------------------------------------------------------


class TokenizerNotExact(Exception):
    """The dictionary cannot be expressed exactly as a byte-level BPE tokenizer (the message says why)."""


def tokenizer_vocab(encoder: dict[str, int], dictionary: Dictionary, where: str) -> dict[str, int]:
    """GPT-2 token string -> fairseq id, plus the specials and the dictionary's madeupwords.

    Raises UserError when the dictionary holds a symbol that is no GPT-2 token id of `encoder` (the BPE files
    belong to another dictionary), TokenizerNotExact when it lacks some GPT-2 tokens.
    """
    by_gpt2_id = {str(i): token for token, i in encoder.items()}
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    madeup = []
    for fid in range(dictionary.nspecial, len(dictionary)):
        symbol = dictionary[fid]
        if symbol in by_gpt2_id:
            vocab[by_gpt2_id[symbol]] = fid
        elif MADEUP.fullmatch(symbol):
            madeup.append((symbol, fid))
        else:
            raise UserError(f"{where}: dictionary symbol {symbol!r} (id {fid}) is not a token id of the BPE's "
                            f"encoder.json ({len(encoder)} tokens): the --bpe-dir files do not belong to this "
                            "checkpoint's dictionary")
    for symbol, fid in madeup:
        if symbol in vocab:
            raise TokenizerNotExact(f"dictionary symbol {symbol!r} is also a GPT-2 token string")
        vocab[symbol] = fid
    missing = [t for t in encoder if t not in vocab]
    if missing:
        raise TokenizerNotExact(
            f"the dictionary lacks {len(missing)} of the BPE's {len(encoder)} tokens (e.g. {missing[0]!r}); fairseq "
            "maps each to <unk>, which a byte-level BPE tokenizer cannot express (its merges need every token)")
    return vocab


def build_tokenizer(encoder_json, vocab_bpe, dictionary: Dictionary, where: str = "dict.txt"):
    """The fast tokenizer (a `tokenizers.Tokenizer`) whose ids are `dictionary`'s; see the module docstring."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    from m11b_jax.tokenizer import GPT2BPE, load_encoder_json, load_vocab_bpe

    encoder, merges = load_encoder_json(encoder_json), load_vocab_bpe(vocab_bpe)
    GPT2BPE(encoder, merges, engine="python")  # checks that the two files belong together
    vocab = tokenizer_vocab(encoder, dictionary, where)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.encode_special_tokens = True  # "</s>" in the text is text, as in fairseq's BPE
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> </s> $B",
                                                       special_tokens=[("</s>", 2)])
    return tok


def tokenizer_config(cfg: ModelConfig) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "model_max_length": cfg.max_positions, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "padding_side": "right",
    }


def write_tokenizer(tmp: pathlib.Path, bpe_dir: pathlib.Path, dict_file: pathlib.Path, cfg, log=_log) -> bool:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json into `tmp`; False (and a log line saying
    why) when the dictionary cannot be expressed exactly."""
    try:
        tok = build_tokenizer(bpe_dir / "encoder.json", bpe_dir / "vocab.bpe", Dictionary.load(dict_file),
                              where=str(dict_file))
    except TokenizerNotExact as e:
        log(f"tokenizer not written: {e}; the model is exported alone")
        return False
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(cfg), indent=2) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return True


# ---- export ------------------------------------------------------------------------------------------------------

MODEL_CARD = """---
library_name: transformers
pipeline_tag: text-generation
---
# {name} (Megatron-11b family) as XGLMForCausalLM

Exported by m11b_jax (`python -m m11b_jax.convert --to-hf`) from {source}.
fairseq's `transformer_lm` (pre-LayerNorm decoder, sinusoidal positions, tied output embedding):
{layers} layers, d_model {d}, ffn {ffn}, {heads} heads, vocabulary {vocab}, up to {positions} positions,
{params:.3f}B parameters, stored as {dtype}. transformers' XGLM computes the same function.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
{tok_line}
```

Token ids are fairseq's dictionary ids (`dict.txt` line k -> 4 + k; `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3).
{tok_note}
Padding: always pass `attention_mask` (XGLM takes padding only from it). With left padding also pass
fairseq's positions, `position_ids = cumsum(m, 1) * m - 1` with `m = attention_mask`, as `generate` does.
"""


def _model_card(cfg: ModelConfig, source: str, dtype: str, tokenizer: bool) -> str:
    return MODEL_CARD.format(
        name=cfg.name, source=source, layers=cfg.num_layers, d=cfg.d_model, ffn=cfg.ffn_dim, heads=cfg.num_heads,
        vocab=cfg.vocab_size, positions=cfg.max_positions, params=cfg.num_params() / 1e9, dtype=dtype,
        tok_line='tokenizer = AutoTokenizer.from_pretrained("PATH")' if tokenizer else "# no tokenizer was exported",
        tok_note=("The tokenizer prepends `</s>` (fairseq's LM inputs start with it); `add_special_tokens=False` "
                  "gives the bare ids." if tokenizer else "No tokenizer: feed fairseq dictionary ids."))


def export_hf(ckpt, outdir, bpe_dir=None, dtype: str | None = None, max_shard_size: str | int = "5GB",
              log=_log) -> dict:
    """Write checkpoint `ckpt` (params or training) as an XGLMForCausalLM directory `outdir`. Returns a summary."""
    outdir = pathlib.Path(outdir)
    if outdir.exists():
        raise UserError(f"output {outdir} already exists: remove it or choose another path")
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    source = open_params_source(ckpt)
    cfg, reader = source.cfg, source.reader
    dtype = dtype or reader.dtype_name
    numpy_dtype(dtype)
    if cfg.layernorm_eps != 1e-5 or cfg.pad_idx != 1:
        raise UserError(f"{ckpt}: layernorm_eps {cfg.layernorm_eps} / pad_idx {cfg.pad_idx}: XGLM fixes them at 1e-5 "
                        "and 1 (fairseq's values); this model cannot be exported as XGLM")
    if bpe_dir is not None:
        bpe_dir = pathlib.Path(bpe_dir)
        for name in ("encoder.json", "vocab.bpe"):
            if not (bpe_dir / name).is_file():
                raise UserError(f"--bpe-dir {bpe_dir} has no {name}: give the folder with GPT-2's encoder.json and vocab.bpe")
        if source.dictionary is None:
            raise UserError(f"{source.description} has no dict.txt: the tokenizer needs the model's dictionary "
                            "(export without --bpe-dir for the model alone)")
    shapes = dict(reader.leaves)
    plan = hf_tensors(cfg.num_layers)
    tensors = [(name, hf_shape(entry, shapes[entry.ours])) for name, entry, _ in plan]

    def produce(i: int) -> np.ndarray:
        _, entry, layer = plan[i]
        block = reader.read(entry.ours, (layer,) if entry.per_layer else ())
        return block.T if entry.transpose else block

    start = time.perf_counter()
    log(f"{source.description}: {cfg.num_layers} layers, d={cfg.d_model}, vocab={cfg.vocab_size} -> {outdir} ({dtype})")
    with atomic_directory(outdir) as tmp:
        tokenizer = False
        if bpe_dir is not None:
            tokenizer = write_tokenizer(tmp, bpe_dir, source.dictionary, cfg, log)
        else:
            log("no --bpe-dir: writing the model only (no tokenizer)")
        files = write_safetensors(tmp, tensors, produce, dtype, max_bytes, log)
        (tmp / "config.json").write_text(json.dumps(xglm_config(cfg, dtype), indent=2) + "\n")
        generation = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": cfg.pad_idx, "decoder_start_token_id": 2}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(cfg, source.description, dtype, tokenizer))
        if source.dictionary is not None:
            shutil.copyfile(source.dictionary, tmp / "dict.txt")  # lets --from-hf restore the dictionary exactly
    nbytes = sum(math.prod(s) for _, s in tensors) * numpy_dtype(dtype).itemsize
    seconds = time.perf_counter() - start
    log(f"wrote {nbytes / 2**20:.0f} MiB in {len(files)} file(s) in {seconds:.1f} s "
        f"({nbytes / 2**20 / max(seconds, 1e-9):.0f} MiB/s) -> {outdir}")
    return {"files": files, "tokenizer": tokenizer, "bytes": nbytes, "seconds": seconds, "config": cfg}


# ---- import ------------------------------------------------------------------------------------------------------


def _hf_model_config(hfdir: pathlib.Path) -> ModelConfig:
    path = hfdir / "config.json"
    if not hfdir.is_dir():
        raise UserError(f"Hugging Face model directory not found: {hfdir}")
    if (hfdir / META_FILE).is_file():
        raise UserError(f"{hfdir} is an m11b_jax params checkpoint, not a Hugging Face model directory: "
                        "--from-hf takes what --to-hf (or save_pretrained) wrote")
    try:
        c = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{hfdir} has no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}): not a Hugging Face model directory") from None
    kind = c.get("model_type")
    archs = c.get("architectures") or ["XGLMForCausalLM"]
    if kind != "xglm" or not set(archs) <= {"XGLMForCausalLM", "XGLMModel"}:
        raise UserError(f"{hfdir} holds a {kind!r} model ({', '.join(map(str, archs))}), not XGLMForCausalLM: only "
                        "XGLM-layout models (as --to-hf writes them) convert back")
    wants = {"activation_function": "gelu", "scale_embedding": True, "tie_word_embeddings": True,
             "add_cross_attention": False, "pad_token_id": 1}
    wrong = [f"{k}={c.get(k)!r}" for k, v in wants.items() if c.get(k, v) != v]
    if wrong:
        raise UserError(f"{path}: {', '.join(wrong)}: our model is XGLM with "
                        f"{', '.join(f'{k}={v!r}' for k, v in wants.items())} only")
    try:
        shape = dict(vocab_size=int(c["vocab_size"]), d_model=int(c["d_model"]), ffn_dim=int(c["ffn_dim"]),
                     num_layers=int(c["num_layers"]), num_heads=int(c["attention_heads"]),
                     max_positions=int(c["max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: missing or bad XGLM field {e}: the config is damaged") from None
    ours = c.get("m11b_jax_config")
    if isinstance(ours, dict):  # our own export: keep the name and policies when the shapes agree
        try:
            stored = ModelConfig.from_dict(ours)
            if all(getattr(stored, k) == v for k, v in shape.items()):
                return stored
        except (TypeError, ValueError, UserError):
            pass
    return ModelConfig(name="custom", dropout=float(c.get("dropout", 0.1)),
                       attention_dropout=float(c.get("attention_dropout", 0.1)),
                       activation_dropout=float(c.get("activation_dropout", 0.0)), **shape)


def _weight_files(hfdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """XGLM tensor name -> the safetensors file holding it."""
    index = hfdir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index} is unreadable ({e}): the model directory is damaged") from None
        files = {name: hfdir / f for name, f in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise UserError(f"{hfdir}: {INDEX_NAME} lists missing file(s) {', '.join(absent[:3])}: the download is incomplete")
        return files
    single = hfdir / WEIGHTS_NAME
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return {name: single for name in f.keys()}
    other = sorted(p.name for p in hfdir.glob("*.bin"))
    raise UserError(f"{hfdir} has no {WEIGHTS_NAME} or {INDEX_NAME}" +
                    (f" (only {', '.join(other[:2])}): re-save it with save_pretrained(..., safe_serialization=True)"
                     if other else ": not a Hugging Face model directory with safetensors weights"))


def import_hf(hfdir, out, dtype: str | None = None, log=_log) -> ModelConfig:
    """An XGLM-layout model directory -> our params checkpoint `out`, one tensor at a time."""
    from safetensors import safe_open

    hfdir, out = pathlib.Path(hfdir), pathlib.Path(out)
    if out.exists():
        raise UserError(f"output {out} already exists: remove it or choose another path")
    cfg = _hf_model_config(hfdir)
    cfg.validate()
    files = _weight_files(hfdir)
    plan = hf_tensors(cfg.num_layers)
    wanted = {name for name, _, _ in plan}
    unexpected = sorted(k for k in files if k not in wanted and k not in DERIVED_KEYS)
    missing = sorted(wanted - set(files))
    if unexpected or missing:
        raise UserError(f"{hfdir}: weights do not match its {cfg.num_layers}-layer XGLM config (missing "
                        f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                        f"{'...' if len(unexpected) > 3 else ''}): the directory is damaged or of another model")
    dict_file = hfdir / "dict.txt"
    handles: dict[pathlib.Path, object] = {}

    def tensor(name: str) -> np.ndarray:
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="numpy")
        return handles[path].get_tensor(name)

    if dtype is None:
        with safe_open(str(files[plan[0][0]]), framework="numpy") as f:
            stored = f.get_slice(plan[0][0]).get_dtype()
        dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored, "float32")
    start = time.perf_counter()
    with ParamsWriter(out, cfg, dict_file if dict_file.is_file() else None, dtype=dtype) as writer:
        shapes = {path: shape for path, (shape, _) in writer.specs.items()}
        for name, entry, layer in plan:
            block = tensor(name)
            want = hf_shape(entry, shapes[entry.ours])
            if tuple(block.shape) != want:
                raise UserError(f"{hfdir}: {name} has shape {list(block.shape)}, its config (d_model={cfg.d_model}, "
                                f"ffn_dim={cfg.ffn_dim}, vocab_size={cfg.vocab_size}) gives {list(want)}: the weights "
                                "are of another size than config.json says")
            writer.write(entry.ours, (layer,) if entry.per_layer else (), block.T if entry.transpose else block)
            if name == "model.embed_tokens.weight" and "lm_head.weight" in files:
                if not np.array_equal(tensor("lm_head.weight"), block):
                    raise UserError(f"{hfdir}: lm_head.weight differs from model.embed_tokens.weight: an untied "
                                    "output projection is not supported")
            del block
    log(f"{hfdir} -> {out}: {cfg.num_layers} layers, d={cfg.d_model}, vocab={cfg.vocab_size} ({dtype}) in "
        f"{time.perf_counter() - start:.1f} s" + ("" if dict_file.is_file() else "; no dict.txt in HFDIR, none written"))
    return cfg
