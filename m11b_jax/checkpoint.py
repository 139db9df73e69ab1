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

Integrity: once orbax has finished writing a checkpoint, every file of it is hashed (SHA-256) into
`<update>/m11b_manifest.json` in a background thread while training goes on (one process hashes all; several
split the files and process 0 merges their shares, `_split_manifest`); only then does the checkpoint
count as committed (`last_verified`). The next save, `wait` and `close` join that thread first (its errors
surface there as one line). Keep-last-N retention runs only after a checkpoint is committed, so the newest
verified checkpoint is never deleted while a newer one is still being hashed. Before a
restore the files are checked against the manifest: a damaged or unverified newest checkpoint is reported and
(by a single process) moved aside (`damaged-<update>-<time>`, nothing deleted), and the newest intact one is used,
named in the log; with no intact one, or a damaged `--restore-file`, the run stops with one line. Before each
save the free space is compared with the state's size (a full disk is one line, the previous checkpoint kept).

Restore takes the *abstract* train state of the current mesh (`train_step.abstract_train_state`), so a
checkpoint saved on one mesh shape restores onto another: orbax reads each device's slice.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any, Callable

from m11b_jax import fsutil
from m11b_jax.config import ModelConfig
from m11b_jax.errors import UserError

META_VERSION = 1
# Model hyperparameters that decide array shapes: a checkpoint can only continue with the same values.
SHAPE_FIELDS = ("vocab_size", "d_model", "ffn_dim", "num_layers", "num_heads", "max_positions")
LAST = ("checkpoint_last", "checkpoint_last.pt")
MANIFEST = "m11b_manifest.json"


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


def _manager(directory: pathlib.Path, read_only: bool = False):
    """orbax's manager; it never deletes old steps (Checkpointer.keep does, once a newer one is committed)."""
    import orbax.checkpoint as ocp

    directory = fsutil.resolve(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options)


class Checkpointer:
    """Save / find / restore training checkpoints in one directory (all processes call every method)."""

    def __init__(self, directory: str | os.PathLike, keep: int | None = None):
        self.directory = fsutil.resolve(directory)
        self.keep = keep if keep and keep > 0 else None  # --keep-interval-updates: the last N checkpoints
        self._mgr = _manager(self.directory)
        self.last_saved: int | None = self._mgr.latest_step()
        # Committed (hashed) by an earlier run; the restore verified the one it resumed from.
        self.last_verified: int | None = self.last_saved if self.last_saved is not None and (
            self.directory / str(self.last_saved) / MANIFEST).is_file() else None
        self._commit: tuple[int, threading.Thread, list] | None = None  # (update, thread, [its error]) in flight
        self._need: int | None = None  # bytes the newest save needs on disk (for a write error's message)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, update: int, state, meta: dict[str, Any]) -> bool:
        """Start an asynchronous save of `state` at `update`; False if that update is already saved.

        The previous save is finished and verified first (orbax would wait for it anyway); this one is written
        and then hashed in the background (`_commit_in_background`).
        """
        import orbax.checkpoint as ocp

        self._finalize()
        if update in self._mgr.all_steps():
            return False
        self._need = self._check_space(update, state)
        meta = dict(meta, update=int(update), meta_version=META_VERSION, saved_unix_time=time.time())
        try:
            self._mgr.save(update, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        except OSError as e:
            raise UserError(self._write_error(update, e)) from None
        self.last_saved = update
        self._commit_in_background(update)
        _test_kill_during_save(update, self.directory)
        return True

    def _check_space(self, update: int, state) -> int:
        """The bytes the save of `state` needs; a one-line error if the disk has less free."""
        import jax

        need = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(state)) + (16 << 20)
        free = fsutil.free_bytes(self.directory)
        if free is not None and free < need:
            raise UserError(f"not enough disk space for the checkpoint of update {update} in {self.directory}: it "
                            f"needs about {need / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free; free space or "
                            f"choose another --save-dir ({self._kept()})")
        return need

    def _kept(self) -> str:
        return (f"the previous checkpoint {self.directory / str(self.last_verified)} is kept"
                if self.last_verified is not None else "no earlier checkpoint was saved")

    def _write_error(self, update: int, e: BaseException) -> str:
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC and self._need is not None
        return (f"writing the checkpoint of update {update} in {self.directory} failed: "
                f"{fsutil.os_error_message(e) if isinstance(e, OSError) else e}"
                + (f"; it needs about {self._need / 2**30:.2f} GiB free" if full else "") + f" ({self._kept()})")

    def _commit_in_background(self, update: int) -> None:
        """Start the thread that waits for orbax's background write of `update`, then hashes it into its manifest
        (process 0) and applies retention: training goes on meanwhile. `_finalize` joins it."""
        error: list = []

        def job():
            try:
                self._commit_job(update, error)
            except Exception as e:  # noqa: BLE001 - never lost in the thread: reported at the join
                error.append(self._write_error(update, e))

        thread = threading.Thread(target=job, name=f"m11b-commit-{update}")
        self._commit = (update, thread, error)
        thread.start()

    def _commit_job(self, update: int, error: list) -> None:
        import jax

        failed = None
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax wraps the OSError of a full disk in its own errors
            cause = _os_error_in(e)
            failed = self._write_error(update, cause if cause is not None else e)
        step = self.directory / str(update)
        if jax.process_count() > 1:  # every process takes part, even after a failure (nobody waits in vain)
            message = _split_manifest(step, update, failed=failed is not None)
            if failed or message:
                error.append(failed or self._write_error(update, message))
            if jax.process_index() != 0 or error or not (step / MANIFEST).is_file():
                return
        elif failed:
            error.append(failed)
            return
        elif not is_step_dir(step):
            return
        else:
            try:
                write_manifest(step)
            except Exception as e:  # noqa: BLE001 - an OSError (a disk error) above all; reported at the join
                error.append(self._write_error(update, e))
                return
        try:
            self._retain(update)
        except OSError as e:
            error.append(f"removing old checkpoints in {self.directory} after update {update} failed: "
                         f"{fsutil.os_error_message(e)} (the checkpoint {step} is saved and verified)")

    def _retain(self, newest: int) -> None:
        """--keep-interval-updates N: delete the checkpoints before the N newest, counted from `newest` (just
        committed), so the newest verified checkpoint is never the one deleted. Process 0 only."""
        if self.keep is None:
            return
        older = [u for u in step_dirs(self.directory) if u <= newest]
        for update in older[:-self.keep]:
            shutil.rmtree(self.directory / str(update))

    def _finalize(self) -> None:
        """Join the commit in flight (orbax's write, then the hashing): now that checkpoint is committed."""
        if self._commit is None:
            return
        update, thread, error = self._commit
        thread.join()
        self._commit = None
        if error:
            raise UserError(error[0])
        self.last_verified = update

    def wait(self) -> None:
        """Block until every pending save is committed (written and hashed)."""
        self._finalize()

    def close(self) -> None:
        try:
            self._finalize()
        finally:
            self._mgr.close()


def _os_error_in(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# ---- the manifest of content hashes ------------------------------------------------------------------


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hashes(step: pathlib.Path, names: list[str]) -> list[str]:
    """SHA-256 of each file, several at once (hashlib releases the GIL: one core hashes ~0.3-1 GiB/s)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda name: _sha256(step / name), names))


def _manifest_names(step: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(step)) for p in step.rglob("*")
                  if p.is_file() and p.name != MANIFEST and ".tmp-" not in p.name)


def _entries(step: pathlib.Path, names: list[str]) -> dict:
    return {name: {"bytes": (step / name).stat().st_size, "sha256": digest}
            for name, digest in zip(names, _hashes(step, names))}


def _write_entries(step: pathlib.Path, entries: dict, **extra) -> None:
    from m11b_jax.textio import atomic_output

    with atomic_output(step / MANIFEST) as f:
        f.write(json.dumps({"algorithm": "sha256", "files": entries, **extra}, indent=1, sort_keys=True) + "\n")


def write_manifest(step: pathlib.Path) -> None:
    """Hash every file of a finished checkpoint into `step/m11b_manifest.json` (written atomically)."""
    names = _manifest_names(step)
    _write_entries(step, _entries(step, names), hashed_by={"0": len(names)})


SPLIT_TIMEOUT_MS = 4 * 3600 * 1000  # how long process 0 waits for another process's share of the hashing


def _split_manifest(step: pathlib.Path, update: int, failed: bool = False) -> str | None:
    """Several processes: process 0 lists the checkpoint's files (orbax has renamed it into place on process 0)
    and publishes the list through the coordination service's key-value store; each process hashes the files
    whose index in the sorted list is its process index modulo the process count, and publishes its share;
    process 0 merges the shares into the manifest. Every process always publishes (an error too), so nobody
    waits for a process that failed (`failed`: orbax's write failed here). Returns what went wrong or None."""
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    me, count = jax.process_index(), jax.process_count()
    key = f"m11b_manifest/{step.parent.name}/{update}"
    if me == 0:
        try:
            names = _manifest_names(step) if is_step_dir(step) and not failed else None
        except OSError as e:
            client.key_value_set(f"{key}/names", json.dumps(None))
            return fsutil.os_error_message(e)
        client.key_value_set(f"{key}/names", json.dumps(names))
    else:
        names = json.loads(client.blocking_key_value_get(f"{key}/names", SPLIT_TIMEOUT_MS))
    if names is None:
        return None  # process 0 has nothing to hash (a failed write is reported by the process it failed on)
    try:
        if failed:
            raise RuntimeError(f"orbax's write failed on process {me}")
        share: dict = {"files": _entries(step, names[me::count])}
    except Exception as e:  # noqa: BLE001 - a disk error above all: sent to process 0, reported here too
        share = {"error": fsutil.os_error_message(e) if isinstance(e, OSError) else str(e)}
    if me != 0:
        client.key_value_set(f"{key}/part/{me}", json.dumps(share))
        return share.get("error")
    shares = [share] + [json.loads(client.blocking_key_value_get(f"{key}/part/{i}", SPLIT_TIMEOUT_MS))
                        for i in range(1, count)]
    for i, got in enumerate(shares):
        if "error" in got:
            return f"process {i} could not hash its share of the files: {got['error']}"
    entries = {name: entry for got in shares for name, entry in got["files"].items()}
    if sorted(entries) != names:
        return "the processes' shares of the hashing do not cover the checkpoint's files"
    try:
        _write_entries(step, entries, hashed_by={str(i): len(got["files"]) for i, got in enumerate(shares)})
    except OSError as e:
        return fsutil.os_error_message(e)
    return None


def verify_step(root: pathlib.Path, update: int) -> str | None:
    """None if checkpoint `root/update` matches its manifest, else what is wrong (one phrase)."""
    step = pathlib.Path(root) / str(update)
    if not (step / "state").is_dir():
        return "its state directory is missing"
    manifest = step / MANIFEST
    if not manifest.is_file():
        return (f"it has no {MANIFEST}: the save never finished, or it was written without checksums, so it "
                "cannot be verified")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    names = sorted(entries)
    for name in names:  # the cheap checks first
        path = step / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entries[name]["bytes"]:
            return f"{name} has {size} bytes, {entries[name]['bytes']} were written"
    for name, digest in zip(names, _hashes(step, names)):
        if digest != entries[name]["sha256"]:
            return f"{name} does not match its checksum (the bytes changed after the save)"
    return None


def _set_aside(step: pathlib.Path) -> pathlib.Path:
    target = step.parent / f"damaged-{step.name}-{int(time.time())}"
    os.rename(step, target)
    return target


def find_restore_point(save_dir: str | os.PathLike, restore_file: str | None,
                       log=None) -> tuple[pathlib.Path, int] | None:
    """Where to resume from: (checkpoint root, update) of a verified checkpoint, or None for a fresh start.

    `restore_file` is fairseq's `--restore-file`: the default `checkpoint_last` means the newest intact
    checkpoint in `save_dir` (none at all: start fresh). Newer ones that fail verification are named in `log`
    and moved aside (`damaged-<update>-<time>`, so the next saves can reuse their update numbers); if every one
    fails, a one-line error. Otherwise a step directory (`.../1200`) or a checkpoint root (its latest step),
    which must verify; a relative path is looked up in the current directory, then in `save_dir`.
    """
    import jax

    log = log or (lambda msg: None)
    save_dir = fsutil.resolve(save_dir)
    if restore_file in (None, "", *LAST):
        steps = step_dirs(save_dir)
        damaged = []
        for update in reversed(steps):
            reason = verify_step(save_dir, update)
            if reason is None:
                if damaged:
                    log(f"| resuming from {save_dir / str(update)}, the newest intact checkpoint")
                return save_dir, update
            damaged.append((update, reason))
            where = save_dir / str(update)
            if jax.process_count() == 1:
                moved = _set_aside(where)
                log(f"| checkpoint {where} is damaged ({reason}): moved it to {moved.name} and falling back")
            else:
                log(f"| checkpoint {where} is damaged ({reason}): falling back")
        if damaged:
            older = " and so are the older ones" if len(damaged) > 1 else ""
            raise UserError(f"no intact checkpoint in {save_dir}: the newest, update {damaged[0][0]}, is damaged "
                            f"({damaged[0][1]}){older} (moved aside as damaged-<update>-<time>): pass --restore-file "
                            "with a checkpoint you trust, or use a new --save-dir")
        return None
    candidates = [fsutil.resolve(restore_file)]
    if not pathlib.Path(restore_file).is_absolute():
        candidates.append(save_dir / restore_file)
    for path in candidates:
        point = training_point(path, damaged_too=True)
        if point is not None:
            check_intact(*point, "pass another --restore-file", flag=f"--restore-file {restore_file}: ")
            return point
    raise UserError(f"--restore-file {restore_file}: no checkpoint there (looked in "
                    f"{', '.join(str(p) for p in candidates)}): give a checkpoint step directory or a --save-dir "
                    "that holds checkpoints")


def step_dirs(directory: pathlib.Path) -> list[int]:
    """Every update directory orbax committed (renamed from its temporary), intact or not, ascending."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def list_steps(directory: pathlib.Path) -> list[int]:
    """Committed checkpoint updates in `directory`, ascending (temporary, unfinished saves are ignored)."""
    return [u for u in step_dirs(directory) if is_step_dir(pathlib.Path(directory) / str(u))]


def training_point(path: str | os.PathLike, damaged_too: bool = False) -> tuple[pathlib.Path, int] | None:
    """(save dir, update) of a training checkpoint: one update's directory, or a --save-dir (its newest update);
    None when `path` is neither. `damaged_too` also counts update directories that lost their state or meta (to be
    reported as damaged, not as no checkpoint)."""
    path = pathlib.Path(path)
    one = (path.name.isdigit() and path.is_dir() and ((path / "state").exists() or (path / "meta").exists())
           if damaged_too else is_step_dir(path))
    if one:
        return path.parent, int(path.name)
    steps = step_dirs(path) if damaged_too else list_steps(path)
    return (path, steps[-1]) if steps else None


def check_intact(root: pathlib.Path, update: int, fix: str, flag: str = "") -> None:
    """A one-line error (`flag` first, `fix` last) unless checkpoint `root/update` matches its manifest."""
    reason = verify_step(root, update)
    if reason is not None:
        raise UserError(f"{flag}checkpoint {pathlib.Path(root) / str(update)} is damaged ({reason}): {fix}")


def stored_model_config(root: pathlib.Path, update: int) -> ModelConfig:
    """The model config a training checkpoint was saved with."""
    meta = read_meta(root, update)
    try:
        return ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{root / str(update)}: no usable model config in its metadata ({e}): "
                        "the checkpoint is damaged") from None


def read_meta(root: pathlib.Path, update: int) -> dict:
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

    root = fsutil.resolve(root)  # orbax reads a relative path against another directory
    mgr = _manager(root, read_only=True)
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


def resume(save_dir: str | os.PathLike, restore_file: str | None, *, model_config,
           abstract_state: Callable[[dict, pathlib.Path], Any], global_rows: int, data_replicas: int, batch_size: int,
           log=None) -> Resumed | None:
    """The verified checkpoint a run continues from (`find_restore_point`, which reports to `log`), checked against
    this run's model and global batch before anything is read, then restored onto `abstract_state(meta, where)`;
    None for a fresh start."""
    point = find_restore_point(save_dir, restore_file, log=log)
    if point is None:
        return None
    root, update = point
    where = root / str(update)
    meta = read_meta(root, update)
    check_compatible(meta, dataclasses.asdict(model_config), str(where))
    check_global_batch(meta, where, global_rows, data_replicas, batch_size)
    state, meta = restore(root, update, abstract_state(meta, where))
    return Resumed(state, meta, where)


def _test_kill_during_save(update: int, directory: pathlib.Path) -> None:
    """Test hook: M11B_TEST_KILL_DURING_SAVE=<update> SIGKILLs this process while that save is in flight."""
    target = os.environ.get("M11B_TEST_KILL_DURING_SAVE")
    if target is None or int(target) != update:
        return
    os.kill(os.getpid(), signal.SIGKILL)
