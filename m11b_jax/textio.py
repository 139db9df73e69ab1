"""Helpers shared by the data CLIs: strict UTF-8 line reading, all-or-nothing writes, worker pools."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import tempfile
from typing import IO, Iterator

from .errors import UserError


def iter_lines(path: str | os.PathLike) -> Iterator[str]:
    """Lines of a UTF-8 text file ('-' = stdin) without their line ends.

    Lines end at '\\n', '\\r\\n' or a lone '\\r', as in Python's text mode (what fairseq reads
    with). Bytes that are not UTF-8 raise a UserError naming the file and the line number.
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
        for lineno, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open `path` for writing through a temporary file in the same folder, renamed on success.

    On an exception the temporary file is removed and `path` is left as it was. '-' writes to
    stdout directly (text mode only).
    """
    if str(path) == "-":
        if "b" in mode:
            raise UserError("binary output cannot go to stdout: give a file name")
        yield sys.stdout
        sys.stdout.flush()
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder does not exist: {folder} (create it first)")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; give the file the usual permissions
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def default_file_mode() -> int:
    """Permissions a new file would get from open(): 0o666 minus the umask (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def worker_pool(workers: int, initializer=None, initargs=()):
    """A multiprocessing pool: forked (cheap) unless JAX is loaded, whose threads make fork unsafe."""
    method = "spawn" if "jax" in sys.modules else "fork"
    return multiprocessing.get_context(method).Pool(workers, initializer=initializer, initargs=initargs)
