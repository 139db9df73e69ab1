"""Read the parameters of any of our checkpoints leaf by leaf: a params checkpoint or a training checkpoint.

    source = open_params_source(path)   # params checkpoint dir, training --save-dir (newest update) or SAVE_DIR/<update>
    source.cfg, source.dictionary       # the ModelConfig, the dict.txt path (or None)
    source.reader.read(("layers", "fc1", "kernel"), (3,))   # one layer's block, in the stored dtype

A training checkpoint (m11b_jax.checkpoint, orbax) holds the whole TrainState; only its `params` subtree is
read here, array by array with tensorstore from orbax's own storage (zarr arrays, inside an OCDBT key-value
store when orbax used one), so neither the Adam moments nor the whole model is ever in host memory.
Its dictionary is DATA_PATH/dict.txt of the run (recorded in the checkpoint's metadata), when it still exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from m11b_jax import checkpoint as train_ckpt
from m11b_jax.config import ModelConfig
from m11b_jax.errors import UserError
from m11b_jax.params_io import META_FILE, LeafPath, ParamsReader, dictionary_path, leaf_specs, load_model_config


@dataclasses.dataclass
class ParamsSource:
    reader: "ParamsReader | TrainingParamsReader"
    cfg: ModelConfig
    dictionary: pathlib.Path | None
    description: str


def open_params_source(path: str | os.PathLike) -> ParamsSource:
    """Our params checkpoint, or a training checkpoint (a --save-dir: its newest update; or one update's dir)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / META_FILE).is_file():
        return ParamsSource(ParamsReader(path), load_model_config(path), dictionary_path(path), f"params checkpoint {path}")
    point = train_ckpt.training_point(path)
    if point is None:
        raise UserError(f"{path} is not a checkpoint: neither an m11b_jax params checkpoint (no {META_FILE}) nor a "
                        "training checkpoint (a --save-dir holding <update>/state, or one such <update> dir)")
    root, update = point
    train_ckpt.check_intact(root, update, "pass another update's directory")
    cfg = train_ckpt.stored_model_config(root, update)
    meta = train_ckpt.read_meta(root, update)
    reader = TrainingParamsReader(root / str(update), cfg)
    dict_file = pathlib.Path(meta.get("data_path") or "/nonexistent") / "dict.txt"
    return ParamsSource(reader, cfg, dict_file if dict_file.is_file() else None,
                        f"training checkpoint {root / str(update)} (update {update})")


class TrainingParamsReader:
    """The `params` leaves of one orbax training checkpoint: `read(path, index) -> np.ndarray`, like ParamsReader."""

    def __init__(self, step_dir: pathlib.Path, cfg: ModelConfig):
        import tensorstore as ts

        self.path = pathlib.Path(step_dir)
        state = self.path / "state"
        try:
            meta = json.loads((state / "_METADATA").read_text())
            tree = meta["tree_metadata"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{state}: unreadable orbax metadata ({e}): the checkpoint is damaged or not ours") from None
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        use_ocdbt = bool(meta.get("use_ocdbt", True))
        expected = {path: shape for path, (shape, _) in leaf_specs(cfg).items()}
        self.leaves: dict[LeafPath, tuple[int, ...]] = {}
        self._arrays = {}
        names = {}
        for entry in tree.values():
            keys = tuple(str(k["key"]) for k in entry.get("key_metadata", ()))
            if len(keys) > 1 and keys[0] == "params":
                names[keys[1:]] = ".".join(keys)
        missing = sorted(".".join(p) for p in set(expected) - set(names))
        extra = sorted(".".join(p) for p in set(names) - set(expected))
        if missing or extra:
            raise UserError(f"{self.path}: its params do not match its model config (missing {missing[:3]}, unexpected "
                            f"{extra[:3]}): the checkpoint is damaged")
        dtypes = set()
        for leaf, name in names.items():
            kvstore = ({"driver": "ocdbt", "base": f"file://{state.absolute()}/", "path": name} if use_ocdbt
                       else {"driver": "file", "path": str(state / name)})
            try:
                arr = ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True).result()
            except ValueError as e:
                raise UserError(f"{self.path}: cannot open params.{'.'.join(leaf)} "
                                f"({(str(e).splitlines() or ['?'])[0][:200]}): the checkpoint is damaged") from None
            if tuple(arr.shape) != expected[leaf]:
                raise UserError(f"{self.path}: params.{'.'.join(leaf)} has shape {tuple(arr.shape)}, its config gives "
                                f"{expected[leaf]}: the checkpoint is damaged")
            self._arrays[leaf] = arr
            self.leaves[leaf] = tuple(arr.shape)
            dtypes.add(np.dtype(arr.dtype.numpy_dtype).name)
        self.dtype_name = dtypes.pop() if len(dtypes) == 1 else "float32"

    def read(self, path: LeafPath, index: tuple = ()) -> np.ndarray:
        try:
            return np.asarray(self._arrays[path][index].read().result())
        except ValueError as e:
            raise UserError(f"{self.path}: cannot read params.{'.'.join(path)} "
                            f"({(str(e).splitlines() or ['?'])[0][:200]}): the checkpoint is damaged") from None
