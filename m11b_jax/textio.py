"""Helpers shared by the data CLIs: strict UTF-8 line reading, all-or-nothing writes, worker pools."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pathlib
import sys
from typing import IO, Iterator

from . import fsutil
from .errors import UserError


def iter_lines(path: str | os.PathLike, start: int = 0, end: int | None = None) -> Iterator[str]:
    """Lines of a UTF-8 text file ('-' = stdin) without their line ends.

    Lines end at '\\n', '\\r\\n' or a lone '\\r', as in Python's text mode (what fairseq reads
    with). Bytes that are not UTF-8 raise a UserError naming the file and the line number.
    `start`/`end` restrict reading to a byte range that starts at a line start (see
    `line_aligned_offsets`); the range holds the lines that start before `end`.
    """
    name = "<stdin>" if str(path) == "-" else str(path)
    try:
        stream = sys.stdin.buffer if str(path) == "-" else open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"input file not found: {name}") from None
    except IsADirectoryError:
        raise UserError(f"input is a directory, not a text file: {name}") from None
    with contextlib.ExitStack() as stack:
        if stream is not sys.stdin.buffer:
            stack.enter_context(stream)
            stream.seek(start)
        position = start
        for lineno, raw in enumerate(stream, start=1):
            if end is not None and position >= end:
                break
            position += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if start:
                    lineno += _count_newlines(path, start)
                raise UserError(
                    f"{name} line {lineno} is not UTF-8 (byte {e.start} of the line is {raw[e.start]:#04x}): "
                    "convert the file to UTF-8, e.g. with iconv"
                ) from None
            if line.endswith("\n"):
                line = line[:-1]
            if "\r" in line:
                if line.endswith("\r"):
                    line = line[:-1]
                yield from line.split("\r")
            else:
                yield line


def line_aligned_offsets(path: str | os.PathLike, pieces: int) -> list[int]:
    """Byte offsets [0, ..., file size] cutting the file into about `pieces` ranges of whole lines."""
    size = os.path.getsize(path)
    offsets = [0]
    with open(path, "rb") as f:
        for k in range(1, pieces):
            f.seek(size * k // pieces)
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                f.readline()  # to the start of the next line
            if f.tell() > offsets[-1] and f.tell() < size:
                offsets.append(f.tell())
    return offsets + [size]


def _count_newlines(path: str | os.PathLike, end: int) -> int:
    count, left = 0, end
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def check_output_file(path: str | os.PathLike) -> pathlib.Path:
    """Fail at once (not after the work) when `path` cannot become a file: its folder is missing or is a file,
    or `path` is a directory."""
    final = fsutil.resolve(path)
    folder = final.parent
    if os.path.isdir(final):
        raise UserError(f"output {path} is a directory: give a file name")
    if not folder.is_dir():
        if folder.exists() or any(p.is_file() for p in folder.parents):
            raise UserError(f"output {path}: a component of its folder {folder} is a file, not a folder: fix the path")
        raise UserError(f"output folder does not exist: {folder} (create it first)")
    return final


def check_output_dir(path: str | os.PathLike) -> pathlib.Path:
    """Fail at once when `path` cannot become a new directory: it exists, or a component above it is a file."""
    final = fsutil.resolve(path)
    if final.exists():
        raise UserError(f"output {path} already exists: remove it or choose another path")
    blocker = next((p for p in final.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"output {path}: {blocker} is a file, not a folder: fix the path")
    return final


def open_temp_file(final: pathlib.Path, mode: int) -> tuple[int, pathlib.Path]:
    tmp = fsutil.temp_path(final)
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp
    except OSError as e:
        fsutil.unregister(tmp)
        raise UserError(f"cannot write {final}: {fsutil.os_error_message(e)}") from None


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open `path` for writing through a hidden temporary file in the same folder, renamed on success.

    On an exception (a signal included, see fsutil) the temporary file is removed and `path` is left as it
    was; temporaries of `path` left by a dead run are removed first. '-' writes to stdout directly (text mode
    only).
    """
    if str(path) == "-":
        if "b" in mode:
            raise UserError("binary output cannot go to stdout: give a file name")
        yield sys.stdout
        sys.stdout.flush()
        return
    final = check_output_file(path)
    fsutil.remove_stale_temporaries(final)
    fd, tmp = open_temp_file(final, default_file_mode())
    try:
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
        os.replace(tmp, final)
    finally:
        fsutil.remove_path(tmp)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, exist_ok: bool = False) -> Iterator[pathlib.Path]:
    """Build a directory through a hidden temporary sibling, renamed to `final` when the block succeeds.

    On an exception (a signal included) the temporary directory is removed and `final` never exists
    half-made; temporaries of `final` left by a dead run are removed first. If `final` appears meanwhile
    (another writer), that is an error, or with `exist_ok` theirs is kept and ours dropped.
    """
    final = fsutil.resolve(final)
    if not exist_ok:
        check_output_dir(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder of {final}: {fsutil.os_error_message(e)}") from None
    fsutil.remove_stale_temporaries(final)
    tmp = fsutil.temp_path(final)
    try:
        os.mkdir(tmp, default_file_mode(directory=True))
    except OSError as e:
        fsutil.unregister(tmp)
        raise UserError(f"cannot write {final}: {fsutil.os_error_message(e)}") from None
    try:
        yield tmp
        if final.exists() and not exist_ok:
            raise UserError(f"output {final} appeared while writing: not overwriting it")
        if not final.exists():
            os.rename(tmp, final)
    finally:
        fsutil.remove_path(tmp)


def default_file_mode(directory: bool = False) -> int:
    """Permissions open() / mkdir() would give: 0o666 / 0o777 minus the umask (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def worker_pool(workers: int, initializer=None, initargs=()):
    """A multiprocessing pool: forked (cheap) unless JAX is loaded, whose threads make fork unsafe."""
    method = "spawn" if "jax" in sys.modules else "fork"
    return multiprocessing.get_context(method).Pool(workers, initializer=initializer, initargs=initargs)
