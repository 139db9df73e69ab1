"""Our params-only checkpoint: one zarr array per parameter leaf, written block by block, read slice by slice.

Layout of a checkpoint directory:
    config.json       the ModelConfig (`ModelConfig.to_json`)
    dict.txt          fairseq dictionary (when one was given)
    checkpoint.json   format name and version, storage dtype, every leaf's shape and dtype
    params/<a.b.c>/   one zarr v3 array (tensorstore) per leaf, e.g. `params/layers.fc1.kernel`

Chunks follow the Megatron split: a chunk is one layer's block of one model-parallel rank
(e.g. [1, d, ffn/mp] for fc1's kernel), so a converter writes whole chunks and a loader reads only the
chunks its devices need. `ParamsWriter` fills a hidden temporary sibling of the target and renames it
into place on success (no half-written checkpoint is ever visible under the target name);
`load_params` builds every leaf with one host slice per device, so no process ever holds the full model.
Single-process writer; multi-host restore works (each process reads its own devices' slices).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sys
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts
from flax import traverse_util

from m11b_jax import checkpoint as train_checkpoint
from m11b_jax.config import DTYPES, ModelConfig
from m11b_jax.errors import UserError
from m11b_jax.model import abstract_variables
from m11b_jax.param_tree import abstract_params, param_shardings
from m11b_jax.sharding import MODEL, logical_rules
from m11b_jax.textio import atomic_directory

# What a checkpoint can be evaluated in (parameters and matmuls alike).
EVAL_DTYPES = ("float32", "bfloat16")
FORMAT = "m11b_jax.params"
FORMAT_VERSION = 1
CONFIG_FILE, DICT_FILE, META_FILE, PARAMS_DIR = "config.json", "dict.txt", "checkpoint.json", "params"
BPE_FILES = ("encoder.json", "vocab.bpe")  # GPT-2's BPE, stored beside dict.txt by --bpe-dir

LeafPath = tuple[str, ...]


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for one of config.DTYPES (bfloat16 via ml_dtypes)."""
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def leaf_specs(cfg: ModelConfig) -> dict[LeafPath, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """Every parameter leaf: path -> (shape, logical axis names), from the model itself (no memory allocated)."""
    boxed = abstract_variables(cfg)
    shapes = traverse_util.flatten_dict(nn.unbox(boxed)["params"])
    names = traverse_util.flatten_dict(nn.get_partition_spec(boxed)["params"])
    return {path: (tuple(shapes[path].shape), tuple(names[path])) for path in shapes}


def leaf_dir_name(path: LeafPath) -> str:
    return ".".join(path)


def _model_split_names() -> set[str]:
    return {name for name, axis in logical_rules() if axis == MODEL}


def chunk_shape(shape: tuple[int, ...], names: tuple[str | None, ...], model_parallel_size: int) -> list[int]:
    """One layer's block of one model-parallel rank: 1 along `layers`, dim/mp along a model-split axis."""
    split = _model_split_names()
    chunks = []
    for dim, name in zip(shape, names):
        if name == "layers":
            chunks.append(1)
        elif name in split and dim % model_parallel_size == 0:
            chunks.append(dim // model_parallel_size)
        else:
            chunks.append(dim)
    return chunks


def _array_spec(path: pathlib.Path) -> dict[str, Any]:
    # A missing chunk is an error, not silently the fill value.
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}, "fill_missing_data_reads": False}


class ParamsWriter:
    """Write a checkpoint block by block; `with` commits it atomically (rename) or removes everything on error.

        with ParamsWriter(out, cfg, "dict.txt", dtype="float32", model_parallel_size=8) as w:
            w.write(("layers", "fc1", "kernel"), (i, slice(None), slice(a, b)), block)

    Every element of every leaf must be written exactly once (checked at commit).
    `model_parallel_size` only sets the chunking (the split a converter writes in); any mesh can read it.
    """

    def __init__(self, out_dir: str | os.PathLike, cfg: ModelConfig, dictionary_path: str | os.PathLike | None = None,
                 dtype: str = "float32", *, model_parallel_size: int = 1, bpe_dir: str | os.PathLike | None = None):
        self.out_dir = pathlib.Path(out_dir)
        self.cfg = cfg
        self.dictionary_path = None if dictionary_path is None else pathlib.Path(dictionary_path)
        self.dtype_name = dtype
        self.dtype = numpy_dtype(dtype)
        self.model_parallel_size = model_parallel_size
        if self.out_dir.exists():
            raise UserError(f"output {self.out_dir} already exists: remove it or choose another path")
        if self.dictionary_path is not None and not self.dictionary_path.is_file():
            raise UserError(f"dictionary not found: {self.dictionary_path}")
        self.bpe_files = check_bpe_dir(bpe_dir)
        self.specs = leaf_specs(cfg)
        self.tmp_dir: pathlib.Path | None = None
        self._arrays: dict[LeafPath, ts.TensorStore] = {}
        self._written: dict[LeafPath, int] = {}
        self._finished = False

    def __enter__(self) -> "ParamsWriter":
        self._commit = contextlib.ExitStack()
        self.tmp_dir = self._commit.enter_context(atomic_directory(self.out_dir))
        try:
            for path, (shape, names) in self.specs.items():
                metadata = {
                    "shape": list(shape),
                    "data_type": self.dtype_name,
                    "chunk_grid": {"name": "regular", "configuration": {
                        "chunk_shape": chunk_shape(shape, names, self.model_parallel_size)}},
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "fill_value": "NaN",
                }
                spec = {**_array_spec(self.tmp_dir / PARAMS_DIR / leaf_dir_name(path)), "metadata": metadata}
                self._arrays[path] = ts.open(spec, create=True).result()
                self._written[path] = 0
        except BaseException as e:
            self._commit.__exit__(type(e), e, e.__traceback__)  # removes the temporary directory
            raise
        return self

    def write(self, path: LeafPath, index: tuple, value: np.ndarray) -> None:
        """Write `value` (any float dtype; cast to the storage dtype) at `index` (ints/slices) of leaf `path`."""
        if path not in self._arrays:
            raise KeyError(f"no parameter leaf {leaf_dir_name(path)}")
        target = self._arrays[path][index]
        value = np.asarray(value)
        if tuple(target.shape) != value.shape:
            raise ValueError(f"{leaf_dir_name(path)}{index}: block shape {value.shape} != target {tuple(target.shape)}")
        target.write(np.ascontiguousarray(value, dtype=self.dtype)).result()  # numpy transposes faster than ts
        self._written[path] += value.size

    def finish(self) -> pathlib.Path:
        """Write config, dictionary and metadata into the temporary directory and return it (still uncommitted).

        Lets a caller check the result (e.g. `--verify`) before the rename that publishes it.
        """
        if self._finished:
            return self.tmp_dir
        incomplete = [leaf_dir_name(p) for p, (shape, _) in self.specs.items() if self._written[p] != np.prod(shape)]
        if incomplete:
            raise RuntimeError(f"checkpoint leaves not fully written: {', '.join(incomplete)}")
        (self.tmp_dir / CONFIG_FILE).write_text(self.cfg.to_json() + "\n")
        if self.dictionary_path is not None:
            shutil.copyfile(self.dictionary_path, self.tmp_dir / DICT_FILE)
        for f in self.bpe_files:
            shutil.copyfile(f, self.tmp_dir / f.name)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype_name,
            "leaves": {leaf_dir_name(p): {"shape": list(s), "dtype": self.dtype_name} for p, (s, _) in self.specs.items()},
        }
        (self.tmp_dir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        self._finished = True
        return self.tmp_dir

    def __exit__(self, exc_type, exc, tb) -> None:
        """On success: finish, then rename the temporary directory to OUT; on any error: remove it."""
        if exc_type is None:
            try:
                self.finish()
            except BaseException as e:
                self._commit.__exit__(type(e), e, e.__traceback__)
                raise
        self._commit.__exit__(exc_type, exc, tb)


# ---- reading -----------------------------------------------------------------------------------


def _read_meta(path: pathlib.Path) -> dict:
    meta_file = path / META_FILE
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path} is not a directory")
    if not meta_file.is_file():
        raise UserError(f"{path} is not an m11b_jax params checkpoint (no {META_FILE}): "
                        "convert fairseq shards with `python -m m11b_jax.convert`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_file} is unreadable ({e}): the checkpoint is corrupt") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_file}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
                        f"{FORMAT} v{FORMAT_VERSION}: reconvert with this version of m11b_jax")
    return meta


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig stored with a checkpoint."""
    path = pathlib.Path(path)
    _read_meta(path)
    try:
        return ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{path / CONFIG_FILE} is unreadable ({e}): the checkpoint is corrupt") from None


def check_bpe_dir(bpe_dir: str | os.PathLike | None) -> list[pathlib.Path]:
    """[encoder.json, vocab.bpe] of a GPT-2 BPE folder (none for None), with a one-line error if one is missing."""
    if bpe_dir is None:
        return []
    files = [pathlib.Path(bpe_dir) / name for name in BPE_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"--bpe-dir {bpe_dir}: {', '.join(missing)} not found: give the folder holding GPT-2's "
                        "encoder.json and vocab.bpe")
    return files


def bpe_folder(path: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint folder when it carries encoder.json and vocab.bpe (converted with --bpe-dir), else None."""
    path = pathlib.Path(path)
    return path if all((path / name).is_file() for name in BPE_FILES) else None


def dictionary_path(path: str | os.PathLike) -> pathlib.Path | None:
    """The checkpoint's dict.txt, or None when it was saved without one."""
    p = pathlib.Path(path) / DICT_FILE
    return p if p.is_file() else None


class ParamsReader:
    """Random access to a checkpoint's leaves: `read(path, index) -> np.ndarray` in the stored dtype."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self.meta = _read_meta(self.path)
        self.leaves = {tuple(k.split(".")): tuple(v["shape"]) for k, v in self.meta["leaves"].items()}
        self.dtype_name = self.meta["dtype"]
        self._arrays: dict[LeafPath, ts.TensorStore] = {}

    def _array(self, path: LeafPath) -> ts.TensorStore:
        if path not in self._arrays:
            try:
                self._arrays[path] = ts.open(_array_spec(self.path / PARAMS_DIR / leaf_dir_name(path)),
                                             open=True, read=True).result()
            except ValueError as e:
                raise UserError(f"{self.path}: cannot open leaf {leaf_dir_name(path)} ({_first_line(e)}): "
                                "the checkpoint is incomplete or corrupt") from None
            if tuple(self._arrays[path].shape) != self.leaves[path]:
                raise UserError(f"{self.path}: leaf {leaf_dir_name(path)} has shape {tuple(self._arrays[path].shape)}, "
                                f"{META_FILE} says {self.leaves[path]}: the checkpoint is corrupt")
        return self._arrays[path]

    def read(self, path: LeafPath, index: tuple = ()) -> np.ndarray:
        try:
            return np.asarray(self._array(path)[index].read().result())
        except ValueError as e:
            raise UserError(f"{self.path}: cannot read {leaf_dir_name(path)}{_format_index(index)} "
                            f"({_first_line(e)}): the checkpoint is incomplete or corrupt") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _format_index(index: tuple) -> str:
    def one(i):
        return f"{i.start or 0}:{'' if i.stop is None else i.stop}" if isinstance(i, slice) else str(i)
    return "[" + ", ".join(one(i) for i in index) + "]" if index else ""


def _index_key(index: tuple) -> tuple:
    return tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)


def load_params(path: str | os.PathLike, mesh, rules, dtype=None, cfg: ModelConfig | None = None):
    """Restore a checkpoint onto `mesh` with the sharding table `rules`, reading only this process's slices.

    Each leaf becomes a global jax.Array laid out as `param_tree.abstract_params(cfg, mesh, rules)` says; one
    host slice per distinct device index is read, put on its device(s) and dropped before the next.
    dtype: cast to this (default: `cfg.param_dtype`). cfg: the config to restore into (default: the stored
    one); its shapes must match the checkpoint's.
    """
    reader = ParamsReader(path)
    cfg = load_model_config(path) if cfg is None else cfg
    target = traverse_util.flatten_dict(abstract_params(cfg, mesh, rules))
    missing = sorted(leaf_dir_name(p) for p in set(target) - set(reader.leaves))
    extra = sorted(leaf_dir_name(p) for p in set(reader.leaves) - set(target))
    if missing or extra:
        raise UserError(f"{reader.path} does not hold this model's parameters (missing {missing}, unexpected {extra}): "
                        "is it a checkpoint of another model?")
    out = {}
    for leaf, sds in target.items():
        if reader.leaves[leaf] != tuple(sds.shape):
            raise UserError(f"{reader.path}: {leaf_dir_name(leaf)} has shape {reader.leaves[leaf]} but the config "
                            f"wants {tuple(sds.shape)}: pass the checkpoint's own config (or none)")
        out_dtype = jnp.dtype(dtype if dtype is not None else sds.dtype)
        devices_by_index: dict[tuple, tuple[tuple, list]] = {}
        for device, index in sds.sharding.addressable_devices_indices_map(sds.shape).items():
            devices_by_index.setdefault(_index_key(index), (index, []))[1].append(device)
        shards = []
        for index, devices in devices_by_index.values():
            host = reader.read(leaf, index).astype(out_dtype, copy=False)
            placed = [jax.device_put(host, d) for d in devices]
            jax.block_until_ready(placed)  # the host slice is dropped before the next one is read
            shards.extend(placed)
            del host, placed
        out[leaf] = jax.make_array_from_single_device_arrays(sds.shape, sds.sharding, shards)
    return traverse_util.unflatten_dict(out)


def iter_addressable_blocks(params) -> Iterator[tuple[LeafPath, tuple, np.ndarray]]:
    """(leaf path, index, host block) for each distinct addressable shard of sharded jax params."""
    for path, arr in traverse_util.flatten_dict(params).items():
        for shard in arr.addressable_shards:
            if shard.replica_id == 0:
                yield path, shard.index, np.asarray(shard.data)


def save_params(params, out_dir: str | os.PathLike, cfg: ModelConfig,
                dictionary_path: str | os.PathLike | None = None, dtype: str | None = None,
                bpe_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Save in-memory (sharded) jax params, one addressable shard at a time. Single-process only.

    dtype: storage dtype (default: the params' own dtype).
    """
    if jax.process_count() > 1:
        raise NotImplementedError("save_params writes from one process; multi-host export is not implemented")
    if dtype is None:
        dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype).name
    with ParamsWriter(out_dir, cfg, dictionary_path, dtype=dtype, bpe_dir=bpe_dir) as w:
        for path, index, block in iter_addressable_blocks(params):
            w.write(path, index, block)
    return pathlib.Path(out_dir)


# ---- any checkpoint, for inference -------------------------------------------------------------


def eval_config(cfg: ModelConfig, dtype: str) -> ModelConfig:
    """The stored config with parameters and matmuls in `dtype` (float32 = how the release evaluated)."""
    if dtype not in EVAL_DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(EVAL_DTYPES)}")
    return cfg.replace(param_dtype=dtype, compute_dtype=dtype)


def load_checkpoint(path: str | os.PathLike, mesh, rules, dtype: str):
    """(config, params on mesh in `dtype`, the checkpoint's dict.txt or None) from a checkpoint directory.

    Either a params checkpoint (`python -m m11b_jax.convert`, `save_params`), or a training checkpoint of
    `python -m m11b_jax.train` (a `--save-dir`: its latest update, or one update's directory `SAVE_DIR/<update>`),
    of which only the parameters are read.
    """
    from m11b_jax.fsutil import resolve

    path = resolve(path)  # orbax and tensorstore need absolute paths
    if is_fairseq_checkpoint(path):  # read straight onto the mesh, no converted copy
        from m11b_jax.convert import load_fairseq_onto_mesh

        eval_config(ModelConfig(), dtype)  # the same --dtype check
        return load_fairseq_onto_mesh(path, mesh, rules, dtype, log=lambda m: print(m, file=sys.stderr, flush=True))
    if not path.exists():
        raise UserError(f"checkpoint not found: {path} (give fairseq's DIR/model.pt, or the directory written by "
                        "python -m m11b_jax.convert)")
    if path.is_file():
        raise UserError(
            f"{path} is a file, not an m11b_jax params checkpoint directory nor fairseq's NAME.pt: pass fairseq "
            "shards as DIR/model.pt, or a directory written by python -m m11b_jax.convert")
    if train_checkpoint.is_step_dir(path) or train_checkpoint.list_steps(path):
        return load_training_checkpoint(path, mesh, rules, dtype)
    cfg = eval_config(load_model_config(path), dtype)
    return cfg, load_params(path, mesh, rules, cfg=cfg), dictionary_path(path)


def is_fairseq_checkpoint(path: pathlib.Path) -> bool:
    """fairseq's `--path DIR/NAME.pt` (the file itself, or its shards `DIR/NAME-model_part-{r}.pt`), or a directory
    holding such shards and no m11b_jax checkpoint."""
    if path.suffix == ".pt":
        return True
    return path.is_dir() and not (path / META_FILE).exists() and any(path.glob("*-model_part-*.pt"))


def load_training_checkpoint(path: pathlib.Path, mesh, rules, dtype: str):
    """(config, params, None) of an orbax training checkpoint (see load_checkpoint), cast to `dtype` on `mesh`."""
    root, update = train_checkpoint.training_point(path)
    train_checkpoint.check_intact(root, update, "pass another update's directory with --path")
    stored = train_checkpoint.stored_model_config(root, update)
    params = train_checkpoint.restore_params(root, update, abstract_params(stored, mesh, rules))
    cfg = eval_config(stored, dtype)
    cast = jax.jit(lambda tree: jax.tree.map(lambda leaf: leaf.astype(dtype), tree),
                   out_shardings=param_shardings(cfg, mesh, rules))
    return cfg, cast(params), None
