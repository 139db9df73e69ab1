"""Convert fairseq Megatron-11b shards into our params checkpoint (and back), shard by shard.

    python -m m11b_jax.convert SRC OUT [--dtype float32|bfloat16|float16] [--verify] [--allow-nonfinite]
    python -m m11b_jax.convert --to-fairseq CKPT OUTDIR --model-parallel-size N [--dtype ...] [--legacy-format]
    python -m m11b_jax.convert --to-hf CKPT OUTDIR [--bpe-dir DIR] [--dtype ...] [--max-shard-size 5GB]
    python -m m11b_jax.convert --from-hf HFDIR OUT [--dtype ...]

CKPT (for --to-fairseq and --to-hf) is our params checkpoint or a training checkpoint: a --save-dir (its newest
update) or one update's directory SAVE_DIR/<update>. The Hugging Face layout (XGLMForCausalLM) is in m11b_jax.hf.

SRC is the unpacked release directory (dict.txt + model-model_part-{0..7}.pt) or fairseq's `--path` form
DIR/model.pt (meaning DIR/model-model_part-{rank}.pt, or the one file DIR/model.pt of a non-sharded model).

Memory: one source shard at a time (memory-mapped for zip-format files) plus the tensor being written, each
tensor dropped once written; replicated tensors (biases and LayerNorms, a few MB) are kept from rank 0 to check every other rank's copy.
The output is written into a hidden sibling of OUT and renamed at the end: after any error OUT does not exist,
and SIGTERM/SIGINT remove the sibling (one left by a killed run is removed by the next run). Needs torch
(`pip install -e '.[convert]'`). Every tensor is checked to be finite (`--allow-nonfinite` to convert anyway).

`decoder.version`: fairseq's TransformerDecoder treats a missing version or one <= 2 as a pre-2019 model
without a final LayerNorm (it drops `layer_norm`, then refuses the checkpoint's `decoder.layer_norm.*`
weights). The release stores 3. A version <= 2 is refused here; a missing version (a re-packed file) is
converted keeping the final LayerNorm, with a warning. Exports always write version 3.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import math
import pathlib
import shutil
import sys
import time

import numpy as np

from m11b_jax.config import DTYPES, ModelConfig, largest_model_parallel
from m11b_jax.dictionary import EOS, Dictionary
from m11b_jax import fsutil
from m11b_jax.errors import UserError, cli_main
from m11b_jax.fairseq_io import (checkpoint_options, dictionary_multiple, find_shards, load_shard,
                                 model_config_from_options, numpy_to_tensor, padded_size, save_shard,
                                 tensor_to_numpy)
from m11b_jax.fairseq_layout import (BOOKKEEPING, TIED_ALIASES, VERSION_KEY, fairseq_keys, fairseq_shard_shape,
                                     rank_block, to_fairseq, to_ours)
from m11b_jax.params_io import ParamsWriter, dictionary_path, load_model_config, load_params, numpy_dtype
from m11b_jax.params_source import open_params_source
from m11b_jax.textio import atomic_directory, check_output_dir

EMBED_KEY = "decoder.embed_tokens.weight"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ---- fairseq -> ours ------------------------------------------------------------------------------


def convert_fairseq(src, out, dtype: str = "float32", verify: bool = False, allow_nonfinite: bool = False,
                    log=_log, bpe_dir=None) -> ModelConfig:
    """Convert fairseq shards at `src` into our checkpoint at `out`; returns the model config.

    Every tensor must be finite (NaN/inf weights make every score NaN): the first that is not is named in a
    UserError, unless `allow_nonfinite`, which converts it with a warning. bpe_dir: GPT-2's encoder.json and
    vocab.bpe, stored beside dict.txt.
    """
    out = pathlib.Path(out)
    check_output_dir(out)
    numpy_dtype(dtype)
    directory, shards = find_shards(src)
    dict_path = directory / "dict.txt"
    if not dict_path.is_file():
        raise UserError(f"dictionary not found: {dict_path}: the release's dict.txt must sit next to the shards")
    start = time.perf_counter()
    state = load_shard(shards[0])
    cfg, mp = _config_of(state, shards[0])
    _check_ranks(shards, mp)
    _check_dictionary(dict_path, cfg, mp)
    log(f"{cfg.name}: {cfg.num_layers} layers, d={cfg.d_model}, ffn={cfg.ffn_dim}, heads={cfg.num_heads}, "
        f"vocab={cfg.vocab_size}, {mp} shard(s) -> {out} ({dtype})")
    with ParamsWriter(out, cfg, dict_path, dtype=dtype, model_parallel_size=mp, bpe_dir=bpe_dir) as writer:
        total_bytes = _stream_shards(shards, state, cfg, mp, writer, log, allow_nonfinite)
        if verify:
            verify_checkpoint(writer.finish(), log=log)
    seconds = time.perf_counter() - start
    log(f"converted {total_bytes / 2**20:.0f} MiB in {seconds:.1f} s ({total_bytes / 2**20 / seconds:.0f} MiB/s) -> {out}")
    return cfg


def _stream_shards(shards: dict[int, pathlib.Path], state0, cfg: ModelConfig, mp: int, writer, log,
                   allow_nonfinite: bool = False) -> int:
    """Check and hand every block of every shard to `writer.write`, one shard in memory at a time (rank 0's is
    `state0`, already loaded). Returns the bytes read."""
    replicated: dict[str, np.ndarray] = {}  # rank 0's copy of every replicated tensor
    fingerprints: dict[bytes, int] = {}
    total_bytes = 0
    shapes = {path: shape for path, (shape, _) in writer.specs.items()}
    state = state0
    for rank, path in shards.items():
        t0 = time.perf_counter()
        if rank > 0:
            state = load_shard(path)
            other, other_mp = _config_of(state, path, vocab_size=cfg.vocab_size)
            if (other, other_mp) != (cfg, mp):
                raise UserError(f"{path.name} was saved with other options than {shards[0].name} "
                                f"({_config_diff(cfg, mp, other, other_mp)}): the shards do not belong together")
        _convert_shard(state["model"], path, rank, mp, cfg, shapes, writer, replicated, fingerprints, log,
                       allow_nonfinite)
        state = None  # drop this shard before loading the next
        fsutil.signal_hook_for_tests("convert-shard")
        size = path.stat().st_size
        total_bytes += size
        log(f"  rank {rank}: {path.name} ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    return total_bytes


def load_fairseq_onto_mesh(src, mesh, rules, dtype: str = "float32", log=_log):
    """fairseq shards (`DIR`, or `DIR/model.pt` meaning `DIR/model-model_part-{r}.pt`) read with the converter's
    safe loader and checks, one shard at a time, each block placed straight onto the devices of `mesh` that hold
    it (no converted copy, never the whole model on the host). Returns (config, params, dict.txt path)."""
    directory, shards = find_shards(src)
    dict_path = directory / "dict.txt"
    if not dict_path.is_file():
        raise UserError(f"dictionary not found: {dict_path}: the release's dict.txt must sit next to the shards")
    state = load_shard(shards[0])
    stored, mp = _config_of(state, shards[0])
    _check_ranks(shards, mp)
    _check_dictionary(dict_path, stored, mp)
    cfg = stored.replace(param_dtype=dtype, compute_dtype=dtype)
    log(f"{cfg.name}: {cfg.num_layers} layers, d={cfg.d_model}, ffn={cfg.ffn_dim}, heads={cfg.num_heads}, "
        f"vocab={cfg.vocab_size}, {mp} shard(s) -> {dict(mesh.shape)} mesh ({dtype})")
    writer = MeshWriter(cfg, mesh, rules)
    _stream_shards(shards, state, stored, mp, writer, log)
    return cfg, writer.finish(), dict_path


class MeshWriter:
    """`ParamsWriter.write`'s interface, writing into per-device buffers of the mesh layout instead of a file.

    Each device's slice of each leaf is a zeroed buffer on that device; a block updates, in place (donated),
    the part of every slice it overlaps. `finish` checks every element was written once and returns the params.
    """

    def __init__(self, cfg: ModelConfig, mesh, rules):
        import jax
        import jax.numpy as jnp
        from flax import traverse_util

        from m11b_jax.params_io import leaf_specs
        from m11b_jax.param_tree import abstract_params

        self.specs = leaf_specs(cfg)
        self._target = traverse_util.flatten_dict(abstract_params(cfg, mesh, rules))
        self._slices, self._written = {}, {}
        for leaf, sds in self._target.items():
            slices = []
            for device, index in sds.sharding.addressable_devices_indices_map(sds.shape).items():
                bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, sds.shape))
                with jax.default_device(device):
                    buf = jnp.zeros(tuple(b - a for a, b in bounds), sds.dtype)
                slices.append([device, bounds, buf])
            self._slices[leaf], self._written[leaf] = slices, 0
        self._update = jax.jit(lambda buf, piece, starts: jax.lax.dynamic_update_slice(buf, piece, starts),
                               donate_argnums=0)

    def write(self, path, index: tuple, value: np.ndarray) -> None:
        import jax

        sds = self._target[path]
        region, value = [], np.asarray(value)
        for i, n in zip(index, sds.shape):  # ints (a layer) become size-1 dims of the block
            region.append((i, i + 1) if isinstance(i, int) else i.indices(n)[:2])
        value = value.reshape(tuple(b - a for a, b in region))
        for entry in self._slices[path]:
            device, bounds, buf = entry
            lo = [max(a, c) for (a, _), (c, _) in zip(region, bounds)]
            hi = [min(b, d) for (_, b), (_, d) in zip(region, bounds)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            piece = value[tuple(slice(a - r, b - r) for a, b, (r, _) in zip(lo, hi, region))]
            piece = jax.device_put(np.ascontiguousarray(piece, dtype=sds.dtype), device)
            starts = tuple(np.int32(a - c) for a, (c, _) in zip(lo, bounds))
            entry[2] = self._update(buf, piece, starts)
        self._written[path] += value.size

    def finish(self):
        import jax
        from flax import traverse_util

        from m11b_jax.params_io import leaf_dir_name

        incomplete = [leaf_dir_name(p) for p, sds in self._target.items() if self._written[p] != np.prod(sds.shape)]
        if incomplete:
            raise UserError(f"the shards did not fill {', '.join(incomplete)}: the checkpoint is incomplete")
        out = {leaf: jax.make_array_from_single_device_arrays(sds.shape, sds.sharding, [e[2] for e in self._slices[leaf]])
               for leaf, sds in self._target.items()}
        return traverse_util.unflatten_dict(out)


def _config_of(state, path: pathlib.Path, vocab_size: int | None = None) -> tuple[ModelConfig, int]:
    opts = checkpoint_options(state)
    embed = state["model"].get(EMBED_KEY)
    if vocab_size is None:
        if embed is None:
            raise UserError(f"{path.name}: missing key {EMBED_KEY}: not a transformer_lm state dict")
        vocab_size = embed.shape[0] * int(opts.get("model_parallel_size") or 1)
    try:
        return model_config_from_options(opts, vocab_size)
    except UserError as e:
        raise UserError(f"{path.name}: {e}") from None


def _config_diff(a: ModelConfig, mp_a: int, b: ModelConfig, mp_b: int) -> str:
    diffs = [f"{k} {getattr(a, k)} vs {getattr(b, k)}" for k in a.__dataclass_fields__ if getattr(a, k) != getattr(b, k)]
    if mp_a != mp_b:
        diffs.append(f"model_parallel_size {mp_a} vs {mp_b}")
    return "; ".join(diffs)


def _check_ranks(shards: dict[int, pathlib.Path], mp: int) -> None:
    first = shards[0].name
    if not first.endswith("-model_part-0.pt"):
        if mp > 1:
            stem = first.removesuffix(".pt")
            raise UserError(f"{first} is a single file but records model_parallel_size {mp}: expected "
                            f"{stem}-model_part-0.pt .. {stem}-model_part-{mp - 1}.pt")
        return
    stem = first.removesuffix("-model_part-0.pt")
    if len(shards) < mp:
        names = ", ".join(f"{stem}-model_part-{r}.pt" for r in range(len(shards), mp))
        raise UserError(f"missing shard(s) {names}: the checkpoint records model_parallel_size {mp} "
                        f"but only {len(shards)} file(s) exist")
    if len(shards) > mp:
        extra = ", ".join(shards[r].name for r in sorted(shards) if r >= mp)
        raise UserError(f"extra shard(s) {extra}: the checkpoint records model_parallel_size {mp} "
                        f"(ranks 0..{mp - 1}); remove the extra file(s)")


def _check_dictionary(dict_path: pathlib.Path, cfg: ModelConfig, mp: int) -> None:
    n = len(Dictionary.load(dict_path))
    multiple = dictionary_multiple(cfg.name, mp)
    expected = padded_size(n, multiple)
    if expected != cfg.vocab_size:
        raise UserError(
            f"{dict_path} has {n} symbols (4 specials + {n - 4} lines), which fairseq pads to {expected} "
            f"(a multiple of {multiple}), but the embedding has {cfg.vocab_size} rows "
            f"({cfg.vocab_size // mp} per shard x {mp}): use the dict.txt the model was trained with")


def _convert_shard(model, path, rank, mp, cfg, shapes, writer, replicated, fingerprints, log,
                   allow_nonfinite: bool = False) -> None:
    """Check one shard's state dict and write its blocks."""
    entries = fairseq_keys(cfg.num_layers)
    expected = {key for key, _, _ in entries}
    unknown = sorted(k for k in model if k not in expected and not BOOKKEEPING.match(k) and k not in TIED_ALIASES)
    if unknown:
        raise UserError(f"{path.name}: unknown keys {_short(unknown)}: not part of a {cfg.num_layers}-layer "
                        "transformer_lm as this converter knows it")
    missing = sorted(expected - set(model))
    if missing:
        raise UserError(f"{path.name}: missing keys {_short(missing)}")
    _check_version(model, path, rank, log)
    # Each tensor leaves the (loaded, ours to change) state dict once written, so a shard's memory shrinks as it
    # goes; the embedding, the largest block, comes last, when the rest is freed.
    for key, entry, layer in reversed(entries):
        tensor = model.pop(key)
        if not hasattr(tensor, "shape"):
            raise UserError(f"{path.name}: {key} is a {type(tensor).__name__}, not a tensor")
        want = fairseq_shard_shape(entry, shapes[entry.ours], mp)
        if tuple(tensor.shape) != want:
            raise UserError(f"{path.name}: {key} has shape {list(tensor.shape)} but the stored args (d={cfg.d_model}, "
                            f"ffn={cfg.ffn_dim}, vocab={cfg.vocab_size}, model_parallel_size={mp}) give every shard "
                            f"{list(want)}: the shards disagree")
        try:
            block = tensor_to_numpy(tensor)
        except UserError as e:
            raise UserError(f"{path.name}: {key}: {e}") from None
        bad = count_nonfinite(block)
        if bad:
            what = (f"{path.name}: {key} holds {bad[0]} non-finite value(s) ({bad[1]} at index {list(bad[2])})")
            if not allow_nonfinite:
                raise UserError(f"{what}: the file is damaged or the model diverged; convert another checkpoint, "
                                "or pass --allow-nonfinite to convert it anyway")
            log(f"warning: {what}; converting it anyway (--allow-nonfinite)")
        if key == EMBED_KEY:
            _check_embedding(model, block, path, rank, fingerprints)
        if entry.split_dim is None:
            as_f32 = block.astype(np.float32)
            if rank == 0:
                replicated[key] = as_f32
            elif not np.array_equal(as_f32, replicated[key], equal_nan=True):
                diff = np.nanmax(np.abs(as_f32 - replicated[key]))
                raise UserError(f"replicated tensor {key} differs between rank 0 and {path.name} (max |diff| {diff:.3g}): "
                                "the shards come from different checkpoints")
            if rank > 0:
                continue
        writer.write(entry.ours, rank_block(entry, shapes[entry.ours], layer, rank, mp), to_ours(entry, block))
        del tensor, block


def count_nonfinite(block: np.ndarray, rows: int = 1 << 22) -> tuple[int, str, tuple[int, ...]] | None:
    """(count, first value, its index) of NaN/inf elements, or None; reads `rows` elements at a time."""
    flat = block.reshape(-1)
    count, first = 0, None
    for start in range(0, flat.size, rows):
        bad = ~np.isfinite(flat[start:start + rows])
        n = int(bad.sum())
        if n and first is None:
            first = start + int(np.argmax(bad))
        count += n
    if not count:
        return None
    return count, str(float(flat[first])), tuple(int(i) for i in np.unravel_index(first, block.shape))


def _check_embedding(model, block: np.ndarray, path: pathlib.Path, rank: int, fingerprints: dict) -> None:
    """The tied output projection (if stored) equals the embedding; no two ranks hold the same vocabulary block."""
    for alias in TIED_ALIASES:
        if alias in model and not np.array_equal(tensor_to_numpy(model.pop(alias)), block):
            raise UserError(f"{path.name}: {alias} differs from {EMBED_KEY}: an untied output projection is not supported")
    digest = hashlib.blake2b(np.ascontiguousarray(block).view(np.uint8), digest_size=16).digest()
    if digest in fingerprints:
        raise UserError(f"{path.name} holds the same vocabulary block as rank {fingerprints[digest]}'s shard: "
                        "a duplicated rank (copied file?)")
    fingerprints[digest] = rank


def _check_version(model, path: pathlib.Path, rank: int, log) -> None:
    version = model.get(VERSION_KEY)
    if version is None:
        if rank == 0:
            log(f"warning: {path.name} has no {VERSION_KEY}; fairseq would take it for a pre-2019 model and drop "
                "the final LayerNorm. Keeping decoder.layer_norm (the release applies it); exports write version 3.")
        return
    value = float(tensor_to_numpy(version).reshape(-1)[0])
    if value <= 2:
        raise UserError(f"{path.name}: {VERSION_KEY} is {value:g} (<= 2): fairseq runs such a checkpoint without "
                        "its final LayerNorm (and refuses decoder.layer_norm weights); not a release-layout shard")


# ---- ours -> fairseq --------------------------------------------------------------------------------


def fairseq_args(cfg: ModelConfig, mp: int) -> argparse.Namespace:
    """An `args` Namespace with fairseq's option names, as fairseq's `--arch transformer_lm_megatron*` stores it."""
    release = (cfg.d_model, cfg.ffn_dim, cfg.num_layers, cfg.num_heads) == (3072, 18432, 72, 32)
    return argparse.Namespace(
        arch="transformer_lm_megatron_11b" if release else "transformer_lm_megatron",
        task="language_modeling", criterion="vocab_parallel_cross_entropy", model_parallel_size=mp,
        decoder_embed_dim=cfg.d_model, decoder_input_dim=cfg.d_model, decoder_output_dim=cfg.d_model,
        decoder_ffn_embed_dim=cfg.ffn_dim, decoder_layers=cfg.num_layers, decoder_attention_heads=cfg.num_heads,
        decoder_normalize_before=True, no_decoder_final_norm=False, decoder_learned_pos=False,
        share_decoder_input_output_embed=True, no_token_positional_embeddings=False, no_scale_embedding=False,
        layernorm_embedding=False, adaptive_input=False, adaptive_softmax_cutoff=None, character_embeddings=False,
        decoder_layers_to_keep=None, decoder_layerdrop=0.0, activation_fn="gelu", dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout, relu_dropout=0.0,
        tokens_per_sample=cfg.max_positions, max_target_positions=cfg.max_positions, sample_break_mode="none",
        add_bos_token=False, seed=1,
    )


def export_fairseq(ckpt, outdir, model_parallel_size: int, dtype: str | None = None, legacy_format: bool = False,
                   log=_log) -> list[pathlib.Path]:
    """Write our checkpoint as release-layout fairseq shards, one rank at a time (only its slices are read)."""
    source = open_params_source(ckpt)
    reader, cfg = source.reader, source.cfg
    mp = model_parallel_size
    cfg.validate(mp)
    out_dtype = numpy_dtype(dtype or reader.dtype_name)
    outdir = pathlib.Path(outdir)
    check_output_dir(outdir)
    dict_file = source.dictionary
    if dict_file is not None:
        n = len(Dictionary.load(dict_file))
        expected = padded_size(n, 8 * mp)
        if expected != cfg.vocab_size:
            raise UserError(f"fairseq pads the {n}-symbol dict.txt to {expected} for --model-parallel-size {mp} "
                            f"(a multiple of {8 * mp}), but the model has {cfg.vocab_size} embedding rows: "
                            "choose a model-parallel size that keeps them equal")
    shapes = dict(reader.leaves)
    bookkeeping = lambda value: numpy_to_tensor(np.array([value], dtype=out_dtype))  # noqa: E731
    written = []
    with atomic_directory(outdir) as tmp:
        for rank in range(mp):
            t0 = time.perf_counter()
            model = collections.OrderedDict()
            model[VERSION_KEY] = bookkeeping(3.0)
            for key, entry, layer in fairseq_keys(cfg.num_layers):
                block = reader.read(entry.ours, rank_block(entry, shapes[entry.ours], layer, rank, mp))
                model[key] = numpy_to_tensor(to_fairseq(entry, block).astype(out_dtype))
                if key == EMBED_KEY:
                    model["decoder.embed_positions._float_tensor"] = bookkeeping(0.0)
            name = f"model-model_part-{rank}.pt" if mp > 1 else "model.pt"
            shard = {
                "args": fairseq_args(cfg, mp),
                "model": model,
                "optimizer_history": [{"criterion_name": "VocabParallelCrossEntropyCriterion",
                                       "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": None},
                                       "num_updates": 0}],
                "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
                                "val_loss": None},
            }
            save_shard(shard, tmp / name, legacy_format=legacy_format)
            del model, shard
            written.append(outdir / name)
            log(f"  rank {rank}: {name} in {time.perf_counter() - t0:.1f} s")
        if dict_file is not None:
            shutil.copyfile(dict_file, tmp / "dict.txt")
    return written


# ---- --verify -----------------------------------------------------------------------------------------


def verify_tokens(dictionary: Dictionary, max_positions: int, k: int = 32) -> tuple[np.ndarray, int]:
    """[</s>, S, S] with S the k most frequent dictionary symbols (k shrunk to fit); returns (tokens, k)."""
    ranked = sorted(range(dictionary.nspecial, len(dictionary)), key=lambda i: -dictionary.counts[i])
    ranked = [i for i in ranked if dictionary.counts[i] > 0]
    k = min(k, (max_positions - 1) // 2, len(ranked))
    if k < 2:
        raise UserError("--verify needs a dict.txt with at least 2 symbols that have counts")
    s = ranked[:k]
    return np.array([EOS] + s + s, dtype=np.int32), k


def verify_checkpoint(path, devices=None, log=_log, strict: bool = True) -> dict:
    """Load `path` on `devices` (default: all), run one forward pass and judge the output.

    Input: `</s>` followed twice by the same 32 most frequent symbols of dict.txt. Checks that every logit is
    finite, and that the loss on the repeated half is below ln(V)/2: any trained LM of this size copies a
    repeated span almost perfectly (in-context copying), while a uniform guess costs ln(V) per token and a
    mis-converted or untrained model stays near or above that. The loss on the first half is reported
    next to ln(V) and the unigram cross-entropy of dict.txt's counts, for information.
    Raises UserError if a check fails (strict) and returns the figures.
    """
    import jax
    import jax.numpy as jnp

    from m11b_jax.model import TransformerLM
    from m11b_jax.sharding import activate, batch_sharding, logical_rules, make_mesh

    cfg = load_model_config(path)
    devices = list(jax.devices() if devices is None else devices)
    mp = largest_model_parallel(cfg, len(devices))
    mesh, rules = make_mesh(mp, devices), logical_rules()
    params = load_params(path, mesh, rules)
    dict_file = dictionary_path(path)
    if dict_file is None:
        raise UserError(f"{path} has no dict.txt: --verify needs the dictionary to build its input")
    dictionary = Dictionary.load(dict_file)
    seq, k = verify_tokens(dictionary, cfg.max_positions)
    tokens = np.tile(seq, (mesh.shape["data"], 1))
    model = TransformerLM(cfg)

    @jax.jit
    def forward(params, tokens):
        logits = model.apply({"params": params}, tokens)[0].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[0, 1:, None], axis=-1)[:, 0]
        return jnp.isfinite(logits).all(), nll

    with activate(mesh, rules):
        finite, nll = forward(params, jax.device_put(tokens, batch_sharding(mesh, rules=rules)))
    finite, nll = bool(finite), np.asarray(nll, dtype=np.float64)
    counts = np.asarray(dictionary.counts[dictionary.nspecial:], dtype=np.float64)
    unigram = float(np.mean(-np.log(np.asarray([dictionary.counts[i] for i in seq[1:k + 1]]) / counts.sum())))
    report = {
        "devices": len(devices), "mesh": dict(mesh.shape), "finite": finite, "k": k,
        "loss_first": float(nll[:k].mean()), "loss_repeat": float(nll[k:].mean()),
        "uniform": math.log(cfg.vocab_size), "unigram": unigram,
    }
    report["sane"] = finite and report["loss_repeat"] < report["uniform"] / 2
    log(f"verify on {len(devices)} device(s), mesh {report['mesh']}: logits finite: {finite}; loss (nats/token) on "
        f"{k} frequent symbols {report['loss_first']:.3f} (uniform {report['uniform']:.3f}, unigram {unigram:.3f}); "
        f"on their repetition {report['loss_repeat']:.3f} (sane below {report['uniform'] / 2:.3f})")
    if strict and not finite:
        raise UserError(f"verification failed: {path} gives non-finite logits: the weights are corrupt")
    if strict and not report["sane"]:
        raise UserError(f"verification failed: loss {report['loss_repeat']:.2f} on a repeated span is not below "
                        f"ln(V)/2 = {report['uniform'] / 2:.2f}, as a trained LM's would be: the weights look "
                        "untrained or mis-converted (rerun without --verify to keep them anyway)")
    return report


# ---- CLI ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m m11b_jax.convert",
        description="Convert fairseq Megatron-11b shards (SRC: the unpacked release directory, or DIR/model.pt) "
                    "into an m11b_jax params checkpoint OUT; or back with --to-fairseq.")
    p.add_argument("src", nargs="?", help="directory with dict.txt and model-model_part-{rank}.pt, or DIR/model.pt")
    p.add_argument("out", nargs="?", help="output checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="storage dtype (default float32; with --to-fairseq: the checkpoint's own)")
    p.add_argument("--verify", action="store_true",
                   help="before publishing OUT, load it on the available devices and check one forward pass")
    p.add_argument("--to-fairseq", nargs=2, metavar=("CKPT", "OUTDIR"),
                   help="write our checkpoint CKPT as fairseq shards into OUTDIR")
    p.add_argument("--model-parallel-size", type=int, help="number of shards to write with --to-fairseq")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert tensors holding NaN or inf (with a warning) instead of refusing them")
    p.add_argument("--legacy-format", action="store_true",
                   help="with --to-fairseq: PyTorch's pre-1.6 (non-zip) serialization, as the release used")
    p.add_argument("--to-hf", nargs=2, metavar=("CKPT", "OUTDIR"),
                   help="write CKPT as a Hugging Face XGLMForCausalLM directory OUTDIR (safetensors)")
    p.add_argument("--bpe-dir", help="folder with GPT-2's encoder.json and vocab.bpe: with SRC OUT, stored in OUT "
                                     "beside dict.txt (text generation and LanguageModel.load(OUT) need nothing "
                                     "else); with --to-hf, also write a tokenizer whose ids are the dictionary ids")
    p.add_argument("--max-shard-size", default="5GB",
                   help="with --to-hf: largest safetensors file before splitting (default 5GB)")
    p.add_argument("--from-hf", nargs=2, metavar=("HFDIR", "OUT"),
                   help="convert a Hugging Face XGLM-layout model directory HFDIR into our checkpoint OUT")
    return p


@cli_main
def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to_hf or args.from_hf:
        from m11b_jax import hf

        if args.src or args.out or args.verify or args.to_fairseq or args.model_parallel_size or args.legacy_format:
            parser.error("--to-hf / --from-hf take no SRC OUT, --verify, --to-fairseq, --model-parallel-size or "
                         "--legacy-format")
        if args.to_hf and args.from_hf:
            parser.error("give one of --to-hf and --from-hf")
        if args.to_hf:
            summary = hf.export_hf(*args.to_hf, bpe_dir=args.bpe_dir, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size)
            print(f"wrote {args.to_hf[1]}: XGLMForCausalLM in {len(summary['files'])} safetensors file(s)"
                  + (" + tokenizer" if summary["tokenizer"] else " (no tokenizer)"))
        else:
            if args.bpe_dir:
                parser.error("--bpe-dir goes with --to-hf")
            cfg = hf.import_hf(*args.from_hf, dtype=args.dtype)
            print(f"wrote {args.from_hf[1]}: {cfg.name}, {cfg.num_params() / 1e9:.3f}B parameters")
        return
    if args.to_fairseq:
        if args.bpe_dir:
            parser.error("--bpe-dir goes with --to-hf or with SRC OUT")
        if args.src or args.out or args.verify:
            parser.error("--to-fairseq CKPT OUTDIR takes no SRC OUT and no --verify")
        if args.model_parallel_size is None:
            parser.error("--to-fairseq needs --model-parallel-size N")
        written = export_fairseq(args.to_fairseq[0], args.to_fairseq[1], args.model_parallel_size, args.dtype,
                                 args.legacy_format)
        print(f"wrote {len(written)} shard(s) to {args.to_fairseq[1]}")
        return
    if not (args.src and args.out):
        parser.error("give SRC and OUT (or --to-fairseq CKPT OUTDIR, --to-hf CKPT OUTDIR, --from-hf HFDIR OUT)")
    if args.model_parallel_size is not None or args.legacy_format:
        parser.error("--model-parallel-size and --legacy-format go with --to-fairseq")
    cfg = convert_fairseq(args.src, args.out, dtype=args.dtype or "float32", verify=args.verify,
                          allow_nonfinite=args.allow_nonfinite, bpe_dir=args.bpe_dir)
    print(f"wrote {args.out}: {cfg.name}, {cfg.num_params() / 1e9:.3f}B parameters")


if __name__ == "__main__":
    main()
