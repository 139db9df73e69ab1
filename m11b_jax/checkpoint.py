"""Training checkpoints: the whole TrainState plus what is needed to continue exactly, with orbax.

A checkpoint is one orbax step directory `SAVE_DIR/<update>/` holding two items:
  * `state`: the TrainState (update counter, fp32 parameters, Adam moments), each array written by the
    processes that own its shards (no host ever gathers the model);
  * `meta`: JSON with the update number, the data iterator's position, the seed, the model config, the
    optimizer config and the mesh it was saved on.

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the files are written
in the background while training goes on. orbax writes into `<update>.orbax-checkpoint-tmp-*` and renames it
into place only when complete, so a process killed mid-save leaves the previous checkpoint as the latest
(the leftover temporary folder is removed by the next run).

Restore takes the *abstract* train state of the current mesh (`train_step.abstract_train_state`), so a
checkpoint saved on one mesh shape restores onto another: orbax reads each device's slice.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import time
from typing import Any, Callable

from m11b_jax.config import ModelConfig
from m11b_jax.errors import UserError

META_VERSION = 1
# Model hyperparameters that decide array shapes: a checkpoint can only continue with the same values.
SHAPE_FIELDS = ("vocab_size", "d_model", "ffn_dim", "num_layers", "num_heads", "max_positions")
LAST = ("checkpoint_last", "checkpoint_last.pt")


def check_writable(directory: str | os.PathLike) -> pathlib.Path:
    """Create `directory` if needed and prove that a file can be written in it (one-line error if not)."""
    path = pathlib.Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --save-dir {path} ({e.strerror or e}): choose a writable directory") from None
    return path


def is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir() and (path / "meta").exists()


def _manager(directory: pathlib.Path, keep: int | None, read_only: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options)


class Checkpointer:
    """Save / find / restore training checkpoints in one directory (all processes call every method)."""

    def __init__(self, directory: str | os.PathLike, keep: int | None = None):
        self.directory = pathlib.Path(directory).absolute()
        self._mgr = _manager(self.directory, keep)
        self.last_saved: int | None = self._mgr.latest_step()

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, update: int, state, meta: dict[str, Any]) -> bool:
        """Start an asynchronous save of `state` at `update`; False if that update is already saved."""
        import orbax.checkpoint as ocp

        if update in self._mgr.all_steps():
            return False
        meta = dict(meta, update=int(update), meta_version=META_VERSION, saved_unix_time=time.time())
        self._mgr.save(update, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
        self.last_saved = update
        _test_kill_during_save(update, self.directory)
        return True

    def wait(self) -> None:
        """Block until every pending save is committed."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def find_restore_point(save_dir: str | os.PathLike, restore_file: str | None) -> tuple[pathlib.Path, int] | None:
    """Where to resume from: (checkpoint root, update) or None for a fresh start.

    `restore_file` is fairseq's `--restore-file`: the default `checkpoint_last` means the latest checkpoint in
    `save_dir` (none: start fresh). Otherwise a step directory (`.../1200`) or a checkpoint root (its latest
    step); a relative path is looked up in the current directory, then in `save_dir`.
    """
    save_dir = pathlib.Path(save_dir)
    if restore_file in (None, "", *LAST):
        steps = list_steps(save_dir)
        return (save_dir.absolute(), steps[-1]) if steps else None
    candidates = [pathlib.Path(restore_file)]
    if not candidates[0].is_absolute():
        candidates.append(save_dir / restore_file)
    for path in candidates:
        if is_step_dir(path):
            return path.parent.absolute(), int(path.name)
        steps = list_steps(path)
        if steps:
            return path.absolute(), steps[-1]
    raise UserError(f"--restore-file {restore_file}: no checkpoint there (looked in "
                    f"{', '.join(str(p) for p in candidates)}): give a checkpoint step directory or a --save-dir "
                    "that holds checkpoints")


def list_steps(directory: pathlib.Path) -> list[int]:
    """Committed checkpoint updates in `directory`, ascending (temporary, unfinished saves are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and is_step_dir(p))


def training_point(path: str | os.PathLike) -> tuple[pathlib.Path, int] | None:
    """(save dir, update) of a training checkpoint: one update's directory, or a --save-dir (its newest update);
    None when `path` is neither."""
    path = pathlib.Path(path)
    if is_step_dir(path):
        return path.parent, int(path.name)
    steps = list_steps(path)
    return (path, steps[-1]) if steps else None


def stored_model_config(root: pathlib.Path, update: int) -> ModelConfig:
    """The model config a training checkpoint was saved with."""
    meta = read_meta(root, update)
    try:
        return ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{root / str(update)}: no usable model config in its metadata ({e}): "
                        "the checkpoint is damaged") from None


def read_meta(root: pathlib.Path, update: int) -> dict:
    import json

    path = root / str(update) / "meta"
    file = path / "metadata" if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint metadata {file} ({e}): the checkpoint is damaged; "
                        "pass an older one with --restore-file") from None


def check_compatible(meta: dict, model_config: dict, where: str) -> None:
    saved = meta.get("model_config", {})
    diff = [f"{k} {saved.get(k)} vs {model_config.get(k)}" for k in SHAPE_FIELDS if saved.get(k) != model_config.get(k)]
    if diff:
        raise UserError(f"the checkpoint {where} is of another model ({'; '.join(diff)}): use its --arch, "
                        "or a new --save-dir to start a fresh run")


def _restore_item(root: pathlib.Path, update: int, state_args):
    import orbax.checkpoint as ocp

    mgr = _manager(root, None, read_only=True)
    try:
        return mgr.restore(update, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot restore checkpoint {root / str(update)} ({first[:300]}): it does not match this "
                        "model and optimizer; use a new --save-dir or the run's own flags") from None
    finally:
        mgr.close()


def restore(root: pathlib.Path, update: int, abstract_state) -> tuple[Any, dict]:
    """Read checkpoint `root/update` onto the shardings of `abstract_state` (any mesh). Returns (state, meta)."""
    import orbax.checkpoint as ocp

    out = _restore_item(root, update, ocp.args.StandardRestore(abstract_state))
    return out.state, dict(out.meta)


def restore_params(root: pathlib.Path, update: int, abstract_params):
    """Only the parameters of checkpoint `root/update`, onto the shardings of `abstract_params`: the Adam moments
    (twice the parameters' size) are never read."""
    import orbax.checkpoint as ocp

    target = {"params": abstract_params}
    out = _restore_item(root, update, ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return out.state["params"]


def training_meta(update: int, *, data_state: dict, seed: int, model_config, optim_config, mesh_shape: dict,
                  dtype_policy: str, data_path: str, tokens_per_sample: int, update_freq: int,
                  dropout_rng: str) -> dict:
    """The `meta` item of a training checkpoint: what continuing exactly needs, and what the run was."""
    return {"update": update, "data": data_state, "seed": seed, "model_config": dataclasses.asdict(model_config),
            "optim": dataclasses.asdict(optim_config), "mesh": dict(mesh_shape), "dtype_policy": dtype_policy,
            "data_path": os.path.abspath(data_path), "tokens_per_sample": tokens_per_sample,
            "update_freq": update_freq, "dropout_rng": dropout_rng}


def check_global_batch(meta: dict, where, global_rows: int, data_replicas: int, batch_size: int) -> None:
    """A run continues with the global batch it was trained with, whatever the mesh."""
    saved = int(meta.get("data", {}).get("global_batch_size", global_rows))
    if saved == global_rows:
        return
    d = data_replicas
    fix = (f"pass --batch-size {saved // d}" if saved % d == 0 else
           f"its global batch is not divisible by the data axis ({d} = devices / --model-parallel-size); pick a "
           "--model-parallel-size that makes it so")
    raise UserError(f"the checkpoint {where} was trained with a global batch of {saved} blocks, this run has "
                    f"{global_rows} ({batch_size} x {d} data replicas): {fix}")


@dataclasses.dataclass
class Resumed:
    """A training checkpoint restored to continue from: the train state, its meta, where it was."""

    state: Any
    meta: dict
    where: pathlib.Path

    @property
    def update(self) -> int:
        return int(self.meta["update"])


def resume(save_dir: str | os.PathLike, restore_file: str | None, *, model_config, abstract_state: Callable[[], Any],
           global_rows: int, data_replicas: int, batch_size: int) -> Resumed | None:
    """The checkpoint a run continues from (`find_restore_point`), checked against this run's model and global
    batch before anything is read, then restored onto `abstract_state()`; None for a fresh start."""
    point = find_restore_point(save_dir, restore_file)
    if point is None:
        return None
    root, update = point
    where = root / str(update)
    meta = read_meta(root, update)
    check_compatible(meta, dataclasses.asdict(model_config), str(where))
    check_global_batch(meta, where, global_rows, data_replicas, batch_size)
    state, meta = restore(root, update, abstract_state())
    return Resumed(state, meta, where)


def _test_kill_during_save(update: int, directory: pathlib.Path) -> None:
    """Test hook: M11B_TEST_KILL_DURING_SAVE=<update> SIGKILLs this process while that save is in flight."""
    target = os.environ.get("M11B_TEST_KILL_DURING_SAVE")
    if target is None or int(target) != update:
        return
    os.kill(os.getpid(), signal.SIGKILL)
