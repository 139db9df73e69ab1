"""Filesystem safety shared by every command: user paths, temporaries, signals, OS errors, a directory lock.

* `resolve(path)`: a user's path made absolute (and `~` expanded) before it reaches orbax or tensorstore,
  which read a relative path against another directory or refuse it.
* Temporaries: `temp_path(final)` names a hidden sibling `.NAME.tmp-HOST-PID-XXXX` of the final output and
  registers it; `remove_stale_temporaries(final)` deletes the ones a dead process of this host left behind
  (saying so) and is called at the start of every write of `final`.
* `handle_signals()`: SIGTERM (and SIGHUP) raise `Interrupted`, as SIGINT raises KeyboardInterrupt, so every
  `finally` that removes a temporary runs; `cli_main` then removes whatever is still registered and prints
  one line. Worker processes forked from the main one keep the default action.
* `os_error_message(e)`: one line for an OSError a user can fix (disk full, read-only, permission, ...).
* `DirectoryLock`: an exclusive `flock` on DIR/.lock held for a run; a second run refuses at once, and a lock
  file left by a dead process is taken over (the kernel drops a dead process's flock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from typing import Iterator

from m11b_jax.errors import UserError

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TEMPS: set[str] = set()
_OWNER_PID = os.getpid()
removed_count = 0  # temporaries removed by remove_path in this process (cli_main reports them after a signal)


def resolve(path: str | os.PathLike) -> pathlib.Path:
    """An absolute path (`~` expanded, `..` folded) without following symlinks."""
    return pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


# ---- temporaries ------------------------------------------------------------------------------------


def temp_path(final: str | os.PathLike) -> pathlib.Path:
    """A fresh hidden sibling name for building `final`, registered for removal on a signal."""
    final = resolve(final)
    tmp = final.parent / f".{final.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    register(tmp)
    return tmp


def register(path: str | os.PathLike) -> None:
    _TEMPS.add(os.fspath(path))


def unregister(path: str | os.PathLike) -> None:
    _TEMPS.discard(os.fspath(path))


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a directory tree if it exists; unregister it (`removed_count` counts what went)."""
    global removed_count
    path = os.fspath(path)
    if os.path.lexists(path):
        removed_count += 1
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            os.unlink(path)
    unregister(path)


def remove_registered() -> None:
    """Remove every registered temporary (after an interrupt)."""
    for p in list(_TEMPS):
        remove_path(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: str | os.PathLike, log=None) -> list[pathlib.Path]:
    """Delete temporaries of `final` left by dead processes of this host; `log` one line for each."""
    final = resolve(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.tmp-{re.escape(_HOST)}-(\d+)-[0-9a-f]+$")
    removed = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            remove_path(entry)
            removed.append(entry)
            (log or _stderr)(f"removed {entry}: a temporary left by an interrupted run (process {m.group(1)} is gone)")
    return removed


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- signals ----------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM/SIGHUP received: unwinds like KeyboardInterrupt so temporaries are cleaned up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    if os.getpid() != _OWNER_PID:  # a forked worker: behave as if no handler were installed
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


def _default_signals_in_child() -> None:
    """A forked worker (multiprocessing's fork pool) gets the default SIGTERM/SIGHUP back: a Python-level handler
    only runs between bytecodes, so a worker blocked in C would never die when its pool terminates it."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is _raise_interrupted:
            signal.signal(sig, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_signals_in_child)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Interrupted (main thread only; others: no change)."""
    global _OWNER_PID
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _OWNER_PID = os.getpid()
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            old[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def signal_hook_for_tests(point: str) -> None:
    """Test hook: M11B_TEST_SIGNAL=POINT[:KILL] sends this process SIGTERM (or SIGKILL) at `point`."""
    want = os.environ.get("M11B_TEST_SIGNAL", "")
    name, _, kind = want.partition(":")
    if name == point:
        os.kill(os.getpid(), signal.SIGKILL if kind == "KILL" else signal.SIGTERM)


# ---- OS errors --------------------------------------------------------------------------------------

_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or choose another output location",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another output location",
    errno.EROFS: "the filesystem is read-only: choose a writable output location",
    errno.EACCES: "permission denied: choose a location you can write to",
    errno.EPERM: "operation not permitted: choose a location you can write to",
    errno.ENOTDIR: "a component of the path is a file, not a folder: fix the path",
    errno.EISDIR: "it is a directory: give a file name",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EEXIST: "it already exists: remove it or choose another path",
    errno.ENOENT: "no such file or folder: check the path",
}
USER_ERRNOS = frozenset(_FIXES)


def os_error_message(e: OSError, what: str = "") -> str:
    """One line for an OSError: the path, the system's words and the fix."""
    where = e.filename if e.filename is not None else what
    fix = _FIXES.get(e.errno, "")
    text = e.strerror or str(e)
    return f"{what + ': ' if what and where != what else ''}{where}: {text}" + (f" ({fix})" if fix else "")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = resolve(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


# ---- an exclusive lock on a directory ------------------------------------------------------------


class DirectoryLock:
    """`flock(LOCK_EX | LOCK_NB)` on DIR/.lock for the life of a run; UserError if another process holds it."""

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike, flag: str = "--save-dir", log=None):
        self.directory = resolve(directory)
        self.path = self.directory / self.NAME
        self.flag = flag
        self.log = log or _stderr
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = _read_owner(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.flag} {self.directory} is in use by another run ({owner or 'unknown process'}, "
                                f"lock {self.path}): wait for it to finish or choose another {self.flag}") from None
            raise
        previous = _read_owner(fd)
        if previous:
            self.log(f"| {self.flag} {self.directory}: took over a stale lock of a run that is gone ({previous})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # empty: a clean exit leaves no owner to report
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
